//! Connection options shared by the daemon's connections (broker, keep-alive,
//! credentials, TLS, packet limit), the telemetry client, and connection errors in words
//! that say what to check.

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, EventLoop, LastWill, MqttOptions, QoS, TlsConfiguration,
    Transport,
};

use crate::config::Settings;
use crate::mqtt::topics::{OFFLINE, availability_topic};

/// Largest MQTT packet sent or accepted (the config's limits are derived from it).
pub use crate::config::MQTT_MAX_PACKET as MAX_PACKET;

pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
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
