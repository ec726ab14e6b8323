//! MQTT side: the rumqttc client options, the event-loop driver (reconnect with capped
//! exponential back-off, availability), and the optional in-process broker (rumqttd).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet,
    Publish, QoS, Request, Subscribe, TlsConfiguration, Transport,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::capture::{CameraStatus, StatusSink};
use crate::settings::{MqttSettings, Settings};
use crate::stats::Stats;

pub const ONLINE: &str = "online";
pub const OFFLINE: &str = "offline";

pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

pub fn availability_topic(settings: &Settings) -> String {
    format!("{}/availability", settings.base_topic())
}

/// `<prefix>/<device>/<camera>/<leaf>`.
pub fn camera_topic(settings: &Settings, camera: &str, leaf: &str) -> String {
    format!("{}/{camera}/{leaf}", settings.base_topic())
}

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

/// The `<prefix>/<device>/<camera>/status` payload.
#[derive(Debug, serde::Serialize)]
pub struct StatusMsg<'a> {
    pub v: u32,
    pub device: &'a str,
    pub camera: &'a str,
    pub ts: String,
    #[serde(flatten)]
    pub status: &'a CameraStatus,
}

/// Where camera `camera` reports status changes: retained `availability` (`online` /
/// `offline`) and `status` (JSON), remembered for re-sending after a reconnect and queued
/// now without waiting (a full queue means no connection; the reconnect re-sends them).
pub fn status_sink(
    settings: Arc<Settings>,
    camera: String,
    client: AsyncClient,
    retained: Arc<Retained>,
) -> StatusSink {
    let avail = camera_topic(&settings, &camera, "availability");
    let topic = camera_topic(&settings, &camera, "status");
    Arc::new(move |status: &CameraStatus| {
        let msg = StatusMsg {
            v: 1,
            device: &settings.device.id,
            camera: &camera,
            ts: crate::pipeline::rfc3339_ms(std::time::SystemTime::now()),
            status,
        };
        let payload = serde_json::to_vec(&msg).unwrap_or_default();
        let online = if status.online { ONLINE } else { OFFLINE };
        for (t, p) in [(&avail, online.as_bytes().to_vec()), (&topic, payload)] {
            retained.set(t.clone(), p.clone());
            // Not counted as a drop when the queue is full: the latest state is kept
            // above and re-sent at the next connect, which is all a retained topic needs.
            let _ = client.try_publish(t, QoS::AtLeastOnce, true, p);
        }
    })
}

/// Connection options shared by the daemon's connections: broker, keep-alive, credentials.
pub fn options(settings: &Settings, client_id: String) -> MqttOptions {
    let m = &settings.mqtt;
    let mut opts = MqttOptions::new(client_id, m.host.clone(), m.port);
    opts.set_keep_alive(Duration::from_secs(m.keep_alive_secs));
    opts.set_clean_session(true);
    if let Some(user) = &m.username {
        let pw = m.password.as_ref().map(|p| p.expose().to_string());
        opts.set_credentials(user.clone(), pw.unwrap_or_default());
    }
    if let Some(t) = &m.tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: t.ca.clone(),
            alpn: None,
            client_auth: t
                .client_auth
                .as_ref()
                .map(|(c, k)| (c.clone(), k.expose().as_bytes().to_vec())),
        }));
    }
    // rumqttc's default is 10 KiB; room for snapshots and large discovery payloads.
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    opts
}

/// Largest MQTT packet sent or accepted.
pub const MAX_PACKET: usize = 1 << 20;

/// Build the client and its event loop. `AsyncClient`'s request channel (capacity
/// `mqtt.queue`) is the only buffer for telemetry between inference and the network: when it is full,
/// publishes are dropped and counted rather than blocking inference.
pub fn client(settings: &Settings) -> (AsyncClient, EventLoop) {
    let m = &settings.mqtt;
    let mut opts = options(settings, m.client_id.clone());
    opts.set_last_will(LastWill::new(
        availability_topic(settings),
        OFFLINE,
        QoS::AtLeastOnce,
        true,
    ));
    AsyncClient::new(opts, m.queue)
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
    let cmd_prefix = crate::commands::cmd_prefix(&settings);
    let avail = availability_topic(&settings);
    // The discovery message itself is one of the retained messages (`run` puts it there).
    let discovery = settings.homeassistant.discovery.then(|| Discovery {
        status_topic: crate::discovery::status_topic(&settings),
        config_topic: crate::discovery::config_topic(&settings),
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

const TLS_HINT: &str = "check mqtt.ca_file, mqtt.client_cert_file and mqtt.client_key_file, \
     and that mqtt.host is a name or address in the broker's certificate";

pub fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => format!("connection failed: {io}"),
        ConnectionError::ConnectionRefused(code) => format!("broker refused connection: {code:?}"),
        ConnectionError::Tls(t) => format!("TLS failed: {t} ({TLS_HINT})"),
        other => {
            // A broker that rejects our certificate (or wants one) answers with a TLS alert
            // after the handshake, which rumqttc reports as a read error.
            let s = other.to_string();
            if s.contains("fatal alert") {
                format!("TLS failed: {s} ({TLS_HINT})")
            } else {
                format!("connection error: {s}")
            }
        }
    }
}

/// An in-process MQTT broker (rumqttd) listening on `host:port`, for demos and boards
/// without a gateway. It runs on its own threads for the life of the process.
pub fn start_embedded_broker(host: &str, port: u16) -> Result<SocketAddr> {
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("mqtt.host {host:?}: cannot resolve"))?
        .next()
        .with_context(|| format!("mqtt.host {host:?}: no address"))?;
    // rumqttd logs a failed bind on its own thread and carries on; probe first so a busy
    // port is a clear start-up error instead.
    drop(TcpListener::bind(addr).with_context(|| {
        format!("embedded broker: cannot listen on {addr} (mqtt.host/mqtt.port)")
    })?);
    let cfg = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 200
max_segment_size = 10485760
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "{addr}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 262144
    max_inflight_count = 200
    dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&cfg).context("embedded broker config")?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("embedded broker stopped: {e}");
            }
        })
        .context("spawning the embedded broker")?;
    // Wait until it accepts connections so our own client's first attempt succeeds.
    for _ in 0..200 {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok() {
            info!("embedded MQTT broker listening on {addr}");
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!("embedded broker did not start listening on {addr}")
}
