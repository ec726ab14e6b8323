//! The outbox's sender: its own MQTT connection, a window of records in flight, PUBACKs
//! matched to records, and a restart from the oldest unacknowledged record after any
//! reconnect.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Fsync, Settings};
use crate::mqtt::client::{HANG_UP_WAIT, describe, hang_up};
use crate::mqtt::outbox::queue::Outbox;
use crate::mqtt::outbox::store::poison;
use crate::util::Backoff;

/// How often the outbox's store is looked after when the fsync policy does not say.
const MAINTAIN_EVERY: Duration = Duration::from_secs(2);

/// The sender's MQTT options: the daemon's broker and credentials, its own client id.
fn options(settings: &Settings) -> MqttOptions {
    let m = &settings.mqtt;
    let mut opts = crate::mqtt::client::options(settings, format!("{}-outbox", m.client_id));
    opts.set_clean_session(true);
    opts
}

/// Send the outbox's records, oldest first, `window` at a time, until `stop` is cancelled;
/// then keep going for up to `drain` to deliver what is left (what is not delivered stays
/// on disk for the next run).
pub async fn drive(
    outbox: Arc<Outbox>,
    settings: Arc<Settings>,
    stop: CancellationToken,
    drain: Duration,
) {
    let s = &settings.outbox;
    let m = &settings.mqtt;
    let (client, el) = AsyncClient::new(options(&settings), s.window * 2 + 4);
    // The timer also writes again what the disk refused, and retries a directory that
    // could not be opened: often enough that a recovered disk is used within seconds.
    let sync_every = match s.fsync {
        Fsync::Interval(d) => d.min(MAINTAIN_EVERY),
        _ => MAINTAIN_EVERY,
    };
    let mut sender = Sender {
        outbox,
        client,
        el,
        window: s.window,
        handed: VecDeque::new(),
        inflight: HashMap::new(),
        next: 0,
        backoff: Backoff::new(m.reconnect_min(), m.reconnect_max()),
        sync_tick: tokio::time::interval(sync_every),
        last_report: Instant::now(),
        stop,
        drain,
    };
    let mut state = State::Offline;
    loop {
        state = match state {
            State::Finished => return sender.finish(false).await,
            State::Draining(deadline) if sender.drained(deadline) => {
                return sender.finish(true).await;
            }
            s => sender.step(s).await,
        };
    }
}

/// The sender's connection, and whether the daemon is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No session: polling connects (again), records wait.
    Offline,
    /// A session: the window is kept full.
    Online,
    /// Stopping while connected: delivering what is left until the deadline.
    Draining(tokio::time::Instant),
    /// Stopping with no connection (or it broke while draining): nothing more to do.
    Finished,
}

struct Sender {
    outbox: Arc<Outbox>,
    client: AsyncClient,
    el: EventLoop,
    window: usize,
    /// Handed to the client, waiting for rumqttc to assign a packet id (Outgoing::Publish
    /// events come in request order on this connection, which carries nothing else).
    handed: VecDeque<u64>,
    /// Packet id -> record, waiting for its PUBACK.
    inflight: HashMap<u16, u64>,
    /// The next record to send is the first at or after this sequence number.
    next: u64,
    backoff: Backoff,
    sync_tick: tokio::time::Interval,
    last_report: Instant,
    stop: CancellationToken,
    drain: Duration,
}

impl Sender {
    /// One event, and the state it leads to.
    async fn step(&mut self, state: State) -> State {
        let online = matches!(state, State::Online | State::Draining(_));
        if online {
            self.fill_window();
        }
        let (draining, deadline) = match state {
            State::Draining(d) => (true, d),
            _ => (false, tokio::time::Instant::now()),
        };
        // rumqttc's poll is not cancel-safe while it connects: a tick that interrupted it
        // closed the half-made connection and opened another (every start did that once).
        // Between attempts, `backoff` looks after the store instead.
        let connecting = self.el.network.is_none();
        tokio::select! {
            ev = self.el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    self.on_connect();
                    if draining { state } else { State::Online }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(seq) = self.handed.pop_front() {
                        self.inflight.insert(pkid, seq);
                    }
                    state
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(seq) = self.inflight.remove(&ack.pkid) {
                        self.outbox.ack(seq);
                    }
                    state
                }
                Ok(_) => state,
                Err(e) => self.on_error(&e, online, draining).await,
            },
            _ = self.outbox.wake.notified(), if online => state,
            _ = self.sync_tick.tick(), if !connecting => {
                self.sync();
                state
            }
            // The drain ends at its deadline even if the broker goes quiet.
            _ = tokio::time::sleep_until(deadline), if draining => state,
            _ = self.stop.cancelled(), if !draining => match state {
                State::Online => State::Draining(tokio::time::Instant::now() + self.drain),
                _ => State::Finished,
            },
        }
    }

    /// Hand records to the client until `window` are on their way.
    fn fill_window(&mut self) {
        while self.handed.len() + self.inflight.len() < self.window {
            let Some(r) = self.outbox.next_from(self.next) else {
                break;
            };
            // Never handed to the client: it would refuse it (or the broker drop the
            // connection) every time, and everything behind it would wait for ever.
            if let Some(why) = poison(&r) {
                self.outbox.quarantine(r.seq, &why);
                continue;
            }
            if self
                .client
                .try_publish(&r.topic, QoS::AtLeastOnce, false, r.payload.clone())
                .is_err()
            {
                break;
            }
            self.handed.push_back(r.seq);
            self.next = r.seq + 1;
        }
    }

    /// The store's timer. When the outbox directory finally opened, its older records
    /// went in front and the rest were renumbered: follow the numbers, and start again
    /// from the oldest (duplicates, never loss).
    fn sync(&mut self) {
        let Some(renumbered) = self.outbox.sync() else {
            return;
        };
        let follow = |seq: &mut u64| *seq = renumbered.get(seq).copied().unwrap_or(*seq);
        self.handed.iter_mut().for_each(follow);
        self.inflight.values_mut().for_each(follow);
        self.next = 0;
    }

    /// A new session knows nothing of the old one: start again from the oldest
    /// unacknowledged record.
    fn on_connect(&mut self) {
        self.backoff.reset();
        self.next = 0;
        self.handed.clear();
        self.inflight.clear();
        if self.outbox.depth() > 0 {
            info!(
                "outbox: connected; sending {} waiting record(s)",
                self.outbox.depth()
            );
        }
    }

    /// A broken connection: forget the session, back off (not while draining: the
    /// drain is over).
    async fn on_error(&mut self, e: &ConnectionError, was_online: bool, draining: bool) -> State {
        if was_online || self.last_report.elapsed() > Duration::from_secs(60) {
            warn!(
                "outbox: {}; {} record(s) waiting, retrying in {:?}",
                describe(e),
                self.outbox.depth(),
                self.backoff.peek()
            );
            self.last_report = Instant::now();
        }
        // Requests still queued in the client would otherwise go out after the reconnect
        // out of our order.
        self.el.clean();
        self.el.pending.clear();
        self.el.state.events.clear();
        self.handed.clear();
        self.inflight.clear();
        if draining {
            return State::Finished;
        }
        self.backoff().await
    }

    /// Wait out the back-off before the next connect, looking after the store meanwhile
    /// (a disk that recovers during a long outage is used again within seconds).
    async fn backoff(&mut self) -> State {
        let until = tokio::time::Instant::now() + self.backoff.step();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return State::Offline,
                _ = self.stop.cancelled() => return State::Finished,
                _ = self.sync_tick.tick() => self.sync(),
            }
        }
    }

    /// Draining is over when everything was acknowledged or the deadline passed.
    fn drained(&self, deadline: tokio::time::Instant) -> bool {
        let idle = self.handed.is_empty() && self.inflight.is_empty();
        idle && self.outbox.next_from(self.next).is_none()
            || tokio::time::Instant::now() >= deadline
    }

    /// Say what is left, disconnect cleanly if connected, and make the store durable.
    async fn finish(mut self, connected: bool) {
        if self.outbox.depth() > 0 {
            info!(
                "outbox: {} record(s) not yet delivered; kept for the next run",
                self.outbox.depth()
            );
        }
        if connected {
            let _ = self.client.try_disconnect();
            let written = tokio::time::timeout(Duration::from_millis(500), async {
                while let Ok(ev) = self.el.poll().await {
                    if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                        return true;
                    }
                }
                false
            })
            .await;
            // What was not acknowledged stays in the store for the next run.
            if written == Ok(true) {
                hang_up(&mut self.el, HANG_UP_WAIT).await;
            }
        }
        self.sync();
    }
}
