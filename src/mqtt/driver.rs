//! The telemetry connection's event loop: polls rumqttc, backs off between failed
//! connects (rumqttc itself retries at once); after each CONNACK, ahead of anything
//! queued, subscribes, then publishes the retained `online` and every retained message we
//! own ([`Retained`]),
//! counts what a broken clean session loses, and hands `cmd/<verb>` publishes to the
//! command server.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rumqttc::{Event, EventLoop, Outgoing, Packet, Publish, QoS, Request, Subscribe};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{MqttSettings, Settings};
use crate::mqtt::client::{HANG_UP_WAIT, describe, hang_up};
use crate::mqtt::discovery;
use crate::mqtt::topics::{ONLINE, availability_topic, cmd_prefix};
use crate::stats::Stats;
use crate::util::Backoff;

/// The retained messages we own (camera availability and status), by topic: re-sent at
/// the front of the queue after every connect, because a clean session drops whatever was
/// queued when the connection broke, and the retained state must end up current. Bounded:
/// two topics per configured camera.
#[derive(Debug, Default)]
pub struct Retained {
    map: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl Retained {
    pub fn set(&self, topic: String, payload: Vec<u8>) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic, payload);
    }
    pub fn get(&self, topic: &str) -> Option<Vec<u8>> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.get(topic).cloned()
    }
    pub fn all(&self) -> Vec<(String, Vec<u8>)> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(t, p)| (t.clone(), p.clone())).collect()
    }
}

/// Drive the event loop until `stop` is cancelled and the final DISCONNECT is written (or
/// the connection is gone). Publishes the retained `online` after every CONNACK.
pub async fn drive(
    eventloop: EventLoop,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    retained: Arc<Retained>,
    commands: Option<mpsc::Sender<(String, Vec<u8>)>>,
    stop: CancellationToken,
) {
    let m: &MqttSettings = &settings.mqtt;
    let mut driver = Driver {
        cmd_prefix: cmd_prefix(&settings),
        avail: availability_topic(&settings),
        // The discovery message itself is one of the retained messages (the daemon puts
        // it there).
        discovery: settings.homeassistant.discovery.then(|| Discovery {
            status_topic: discovery::status_topic(&settings),
            config_topic: discovery::config_topic(&settings),
        }),
        backoff: Backoff::new(m.reconnect_min(), m.reconnect_max()),
        connected_once: false,
        broker: (m.host.clone(), m.port),
        eventloop,
        stats,
        retained,
        commands,
        stop,
    };
    let mut state = State::Connecting;
    while state != State::Stopped {
        state = driver.step(state).await;
    }
}

/// Where the telemetry connection is. rumqttc reconnects on the next poll after an
/// error; the back-off between those polls is ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No session: polling connects (again).
    Connecting,
    /// CONNACK received: the session is up.
    Connected,
    /// Shutdown: DISCONNECT written, or the broker was away when it came.
    Stopped,
}

struct Driver {
    eventloop: EventLoop,
    stats: Arc<Stats>,
    retained: Arc<Retained>,
    commands: Option<mpsc::Sender<(String, Vec<u8>)>>,
    stop: CancellationToken,
    cmd_prefix: String,
    avail: String,
    discovery: Option<Discovery>,
    backoff: Backoff,
    connected_once: bool,
    /// Host and port, for the log.
    broker: (String, u16),
}

impl Driver {
    /// One event of the loop, and the state it leads to.
    async fn step(&mut self, state: State) -> State {
        let no_network = self.eventloop.network.is_none();
        let ev = tokio::select! {
            ev = self.eventloop.poll() => ev,
            // While the broker is away, a shutdown must not wait for it forever.
            _ = self.stop.cancelled(), if no_network => {
                info!("mqtt: not connected at shutdown; giving up on the broker");
                return State::Stopped;
            }
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                self.on_connect(ack.code);
                State::Connected
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                self.on_publish(&p);
                state
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                let unacked = hang_up(&mut self.eventloop, HANG_UP_WAIT).await as u64;
                self.stats.connected.store(false, Ordering::Relaxed);
                if unacked > 0 {
                    self.stats
                        .publish_lost
                        .fetch_add(unacked, Ordering::Relaxed);
                    warn!("mqtt: disconnected; {unacked} message(s) never acknowledged");
                } else {
                    info!("mqtt: disconnected cleanly");
                }
                State::Stopped
            }
            Ok(_) => state,
            Err(e) => self.on_error(&e).await,
        }
    }

    /// A new session: subscriptions, `online`, the retained state we own, then whatever
    /// was waiting (a clean session has no subscriptions left, and dropped what was queued).
    fn on_connect(&mut self, code: rumqttc::ConnectReturnCode) {
        self.backoff.reset();
        if self.connected_once {
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.connected_once = true;
        self.stats.connected.store(true, Ordering::Relaxed);
        let (host, port) = &self.broker;
        info!(host = %host, port = port, code = ?code, "mqtt: connected");
        let mut filters = Vec::new();
        if self.commands.is_some() {
            filters.push(format!("{}+", self.cmd_prefix));
        }
        if let Some(d) = &self.discovery {
            // Home Assistant re-announces itself after a restart; answer with the
            // discovery message again.
            filters.push(d.status_topic.clone());
        }
        let start = session_start(&filters, &self.avail, self.retained.all());
        let pending = &mut self.eventloop.pending;
        for r in start.into_iter().rev() {
            pending.push_front(r);
        }
    }

    /// Home Assistant's birth message, or a command.
    fn on_publish(&mut self, p: &Publish) {
        if let Some(d) = &self.discovery
            && p.topic == d.status_topic
        {
            if &p.payload[..] == b"online"
                && let Some(payload) = self.retained.get(&d.config_topic)
            {
                info!("mqtt: Home Assistant is online; discovery published again");
                let mut m = Publish::new(&d.config_topic, QoS::AtLeastOnce, payload);
                m.retain = true;
                self.eventloop.pending.push_back(Request::Publish(m));
            }
            return;
        }
        let Some(verb) = p.topic.strip_prefix(&self.cmd_prefix) else {
            return;
        };
        // Our own replies come back on cmd/result: not a command.
        if verb != "result"
            && let Some(tx) = &self.commands
            && tx.try_send((verb.to_string(), p.payload.to_vec())).is_err()
        {
            warn!("mqtt: command {verb:?} dropped: too many commands waiting");
        }
    }

    /// A broken connection: count what the clean session lost, then back off (unless
    /// the daemon is stopping).
    async fn on_error(&mut self, e: &rumqttc::ConnectionError) -> State {
        self.stats.connected.store(false, Ordering::Relaxed);
        // A clean session loses what was in flight or queued inside rumqttc; count it
        // here so the loss is visible (the durable outbox is a separate layer).
        let lost = self
            .eventloop
            .pending
            .drain(..)
            .filter(|r| matches!(r, Request::Publish(_)))
            .count() as u64;
        if lost > 0 {
            self.stats.publish_lost.fetch_add(lost, Ordering::Relaxed);
        }
        if self.stop.is_cancelled() {
            warn!("mqtt: connection error during shutdown: {}", describe(e));
            return State::Stopped;
        }
        let delay = self.backoff.step();
        warn!(
            "mqtt: {} (lost {lost} queued message(s)); retrying in {delay:?}",
            describe(e)
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => State::Connecting,
            _ = self.stop.cancelled() => State::Stopped,
        }
    }
}

/// What a new session sends ahead of anything queued, in order: the subscriptions first,
/// so whoever sees our `online` or our discovery message can already reach us (a broker
/// handles one connection's packets in order) — Home Assistant's birth message right
/// after our discovery, a command sent on seeing `online`, would otherwise be lost; then
/// `online`; then every retained message we own.
fn session_start(
    filters: &[String],
    avail: &str,
    retained: Vec<(String, Vec<u8>)>,
) -> Vec<Request> {
    let subscribe = filters
        .iter()
        .map(|f| Request::Subscribe(Subscribe::new(f, QoS::AtLeastOnce)));
    let publish = std::iter::once((avail.to_string(), ONLINE.as_bytes().to_vec()))
        .chain(retained)
        .map(|(topic, payload)| {
            let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
            p.retain = true;
            Request::Publish(p)
        });
    subscribe.chain(publish).collect()
}

struct Discovery {
    status_topic: String,
    config_topic: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_subscribes_before_it_announces_itself() {
        let filters = ["e/d/cmd/+".to_string(), "homeassistant/status".to_string()];
        let retained = vec![("homeassistant/device/d/config".to_string(), b"{}".to_vec())];
        let got: Vec<String> = session_start(&filters, "e/d/availability", retained)
            .iter()
            .map(|r| match r {
                Request::Subscribe(s) => format!("sub {}", s.filters[0].path),
                Request::Publish(p) => format!("pub {} retain={}", p.topic, p.retain),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                "sub e/d/cmd/+",
                "sub homeassistant/status",
                "pub e/d/availability retain=true",
                "pub homeassistant/device/d/config retain=true",
            ]
        );
    }
}
