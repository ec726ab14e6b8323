//! The outbox's sender: its own MQTT connection, a window of records in flight, PUBACKs
//! matched to records, and a restart from the oldest unacknowledged record after any
//! reconnect.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Fsync, Settings};
use crate::mqtt::outbox::queue::Outbox;

/// The sender's MQTT options: the daemon's broker and credentials, its own client id.
fn options(settings: &Settings) -> MqttOptions {
    let m = &settings.mqtt;
    let mut opts = crate::mqtt::options(settings, format!("{}-outbox", m.client_id));
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
    let (client, mut el) = AsyncClient::new(options(&settings), s.window * 2 + 4);
    let mut connected = false;
    // Handed to the client, waiting for rumqttc to assign a packet id (Outgoing::Publish
    // events come in request order on this connection, which carries nothing else).
    let mut handed: VecDeque<u64> = VecDeque::new();
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut next = 0u64;
    let mut backoff = m.reconnect_min();
    let mut deadline: Option<tokio::time::Instant> = None;
    let sync_every = match s.fsync {
        Fsync::Interval(d) => d,
        _ => Duration::from_secs(3600),
    };
    let mut sync_tick = tokio::time::interval(sync_every);
    let mut last_report = Instant::now();
    loop {
        if connected {
            while handed.len() + inflight.len() < s.window {
                let Some(r) = outbox.next_from(next) else {
                    break;
                };
                if client
                    .try_publish(&r.topic, QoS::AtLeastOnce, false, r.payload.clone())
                    .is_err()
                {
                    break;
                }
                handed.push_back(r.seq);
                next = r.seq + 1;
            }
        }
        if let Some(d) = deadline {
            let done = connected && handed.is_empty() && inflight.is_empty();
            if done || !connected || tokio::time::Instant::now() >= d {
                if outbox.depth() > 0 {
                    info!(
                        "outbox: {} record(s) not yet delivered; kept for the next run",
                        outbox.depth()
                    );
                }
                if connected {
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while let Ok(ev) = el.poll().await {
                            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                                break;
                            }
                        }
                    })
                    .await;
                }
                outbox.sync();
                return;
            }
        }
        tokio::select! {
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff = m.reconnect_min();
                    // A new session knows nothing of the old one: start again from the
                    // oldest unacknowledged record.
                    next = 0;
                    handed.clear();
                    inflight.clear();
                    if outbox.depth() > 0 {
                        info!("outbox: connected; sending {} waiting record(s)", outbox.depth());
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(seq) = handed.pop_front() {
                        inflight.insert(pkid, seq);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(seq) = inflight.remove(&ack.pkid) {
                        outbox.ack(seq);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected || last_report.elapsed() > Duration::from_secs(60) {
                        warn!(
                            "outbox: {}; {} record(s) waiting, retrying in {backoff:?}",
                            crate::mqtt::describe(&e),
                            outbox.depth()
                        );
                        last_report = Instant::now();
                    }
                    connected = false;
                    // Forget the broken session: requests still queued in the client would
                    // otherwise go out after the reconnect out of our order.
                    el.clean();
                    el.pending.clear();
                    el.state.events.clear();
                    handed.clear();
                    inflight.clear();
                    if deadline.is_some() {
                        continue;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(m.reconnect_max());
                }
            },
            _ = outbox.wake.notified(), if connected => {}
            _ = sync_tick.tick() => outbox.sync(),
            _ = stop.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + drain);
            }
        }
    }
}
