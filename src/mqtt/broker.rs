//! An in-process MQTT broker (rumqttd), for demos and boards without a gateway. Behind
//! the default cargo feature `embedded-broker`: rumqttd brings a web server (axum) and a
//! metrics exporter along, which a slim build for a board with a gateway leaves out.

use std::net::SocketAddr;
#[cfg(feature = "embedded-broker")]
use std::net::{TcpListener, ToSocketAddrs};
#[cfg(feature = "embedded-broker")]
use std::time::Duration;

#[cfg(feature = "embedded-broker")]
use anyhow::Context;
use anyhow::Result;
#[cfg(feature = "embedded-broker")]
use tracing::info;

#[cfg(feature = "embedded-broker")]
use crate::mqtt::client::MAX_PACKET;

/// An in-process MQTT broker (rumqttd) listening on `host:port`, for demos and boards
/// without a gateway. It runs on its own threads for the life of the process.
#[cfg(feature = "embedded-broker")]
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
    // Packets as large as our own clients may send (snapshots up to
    // commands.snapshot_max_bytes): a smaller limit would drop the connection, and what
    // was queued on it, on the first large snapshot.
    let max_payload = MAX_PACKET;
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
    max_payload_size = {max_payload}
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

/// This build has no embedded broker: say so as the configuration error it is.
#[cfg(not(feature = "embedded-broker"))]
pub fn start_embedded_broker(_host: &str, _port: u16) -> Result<SocketAddr> {
    Err(anyhow::Error::new(crate::config::ConfigError::new(
        "mqtt.embedded_broker: this build has no embedded broker (built without the cargo \
         feature `embedded-broker`); point mqtt.host at a broker instead",
    )))
}
