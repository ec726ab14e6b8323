//! The telemetry connection's event loop: polls rumqttc, backs off between failed
//! connects (rumqttc itself retries at once), publishes the retained `online` after each
//! CONNACK ahead of anything queued, then every retained message we own ([`Retained`]),
//! counts what a broken clean session loses, and hands `cmd/<verb>` publishes to the
//! command server.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rumqttc::{Event, EventLoop, Outgoing, Packet, Publish, QoS, Request, Subscribe};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{MqttSettings, Settings};
use crate::mqtt::client::describe;
use crate::mqtt::discovery;
use crate::mqtt::topics::{ONLINE, availability_topic, cmd_prefix};
use crate::stats::Stats;

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
/// the drain deadline passes). Publishes the retained `online` after every CONNACK.
pub async fn drive(
    mut eventloop: EventLoop,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    retained: Arc<Retained>,
    commands: Option<tokio::sync::mpsc::Sender<(String, Vec<u8>)>>,
    stop: CancellationToken,
) {
    let m: &MqttSettings = &settings.mqtt;
    let cmd_prefix = cmd_prefix(&settings);
    let avail = availability_topic(&settings);
    // The discovery message itself is one of the retained messages (`run` puts it there).
    let discovery = settings.homeassistant.discovery.then(|| Discovery {
        status_topic: discovery::status_topic(&settings),
        config_topic: discovery::config_topic(&settings),
    });
    let mut backoff = m.reconnect_min();
    let mut connected_once = false;
    loop {
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            // While the broker is away, a shutdown must not wait for it forever.
            _ = stop.cancelled(), if !connected(&eventloop) => {
                info!("mqtt: not connected at shutdown; giving up on the broker");
                return;
            }
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = m.reconnect_min();
                if connected_once {
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                connected_once = true;
                stats.connected.store(true, Ordering::Relaxed);
                info!(host = %m.host, port = m.port, code = ?ack.code, "mqtt: connected");
                // Ahead of anything queued while we were away: subscribers see `online` first.
                // Queue order after a connect: device online, then the cameras' retained
                // state, then whatever was waiting.
                for (topic, payload) in retained.all().into_iter().rev() {
                    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
                    p.retain = true;
                    eventloop.pending.push_front(Request::Publish(p));
                }
                let mut online = Publish::new(&avail, QoS::AtLeastOnce, ONLINE);
                online.retain = true;
                eventloop.pending.push_front(Request::Publish(online));
                if commands.is_some() {
                    eventloop
                        .pending
                        .push_back(Request::Subscribe(Subscribe::new(
                            format!("{cmd_prefix}+"),
                            QoS::AtLeastOnce,
                        )));
                }
                if let Some(d) = &discovery {
                    // Home Assistant re-announces itself after a restart; answer with the
                    // discovery message again.
                    eventloop
                        .pending
                        .push_back(Request::Subscribe(Subscribe::new(
                            &d.status_topic,
                            QoS::AtLeastOnce,
                        )));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p)))
                if discovery
                    .as_ref()
                    .is_some_and(|d| p.topic == d.status_topic && &p.payload[..] == b"online") =>
            {
                if let Some(d) = &discovery
                    && let Some(payload) = retained.get(&d.config_topic)
                {
                    info!("mqtt: Home Assistant is online; discovery published again");
                    let mut m = Publish::new(&d.config_topic, QoS::AtLeastOnce, payload);
                    m.retain = true;
                    eventloop.pending.push_back(Request::Publish(m));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic.starts_with(&cmd_prefix) => {
                let verb = &p.topic[cmd_prefix.len()..];
                // Our own replies come back on cmd/result: not a command.
                if verb != "result"
                    && let Some(tx) = &commands
                    && tx.try_send((verb.to_string(), p.payload.to_vec())).is_err()
                {
                    warn!("mqtt: command {verb} dropped: too many commands waiting");
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                info!("mqtt: disconnected cleanly");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                stats.connected.store(false, Ordering::Relaxed);
                // A clean session loses what was in flight or queued inside rumqttc; count it
                // here so the loss is visible (the durable outbox is a separate layer).
                let lost = eventloop
                    .pending
                    .drain(..)
                    .filter(|r| matches!(r, Request::Publish(_)))
                    .count() as u64;
                if lost > 0 {
                    stats.publish_lost.fetch_add(lost, Ordering::Relaxed);
                }
                if stop.is_cancelled() {
                    warn!("mqtt: connection error during shutdown: {}", describe(&e));
                    return;
                }
                warn!(
                    "mqtt: {} (lost {lost} queued message(s)); retrying in {:?}",
                    describe(&e),
                    backoff
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(m.reconnect_max());
            }
        }
    }
}

struct Discovery {
    status_topic: String,
    config_topic: String,
}

fn connected(eventloop: &EventLoop) -> bool {
    eventloop.network.is_some()
}
