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

/// How long a connection, its DISCONNECT written, waits for the broker to hang up.
pub const HANG_UP_WAIT: Duration = Duration::from_secs(2);

/// After our DISCONNECT is written: read what the broker still sends until it closes the
/// connection (or `within` passes), and only then drop ours. Dropped at once, with the
/// broker's last PUBACKs unread, our end answers them with a TCP reset; Mosquitto, failing
/// to send a PUBACK, then drops the connection with our last packets unread ("disconnected
/// due to out of memory" in its log): the final classifications and the `offline` after
/// them were lost, and the will announced `offline` instead. Returns how many publishes the
/// broker never acknowledged.
pub async fn hang_up(el: &mut EventLoop, within: Duration) -> usize {
    if el.network.is_none() {
        return 0;
    }
    let read_to_end = async {
        // Another poll after the broker's close would connect again.
        while el.poll().await.is_ok() {}
    };
    let _ = tokio::time::timeout(within, read_to_end).await;
    // On its error rumqttc moved whatever was unacknowledged back into `pending`.
    el.state.inflight() as usize
        + el.pending
            .iter()
            .filter(|r| matches!(r, rumqttc::Request::Publish(_)))
            .count()
}

const TLS_HINT: &str = "check mqtt.ca_file, mqtt.client_cert_file and mqtt.client_key_file, \
     and that mqtt.host is a name or address in the broker's certificate";

/// The one setting a TLS failure points at, read off rustls' words for it (they are
/// rustls' enum names, stable across its versions); the general hint when it is none of
/// these.
fn tls_hint(error: &str) -> &'static str {
    const CASES: &[(&[&str], &str)] = &[
        (
            &["UnknownIssuer", "BadSignature", "Expired", "NotValidYet"],
            "the broker's certificate is not one mqtt.ca_file trusts (not signed by that CA, \
             or out of date)",
        ),
        (
            &["NotValidForName", "not valid for name"],
            "mqtt.host is not a name or address in the broker's certificate",
        ),
        (
            &["CertificateRequired", "HandshakeFailure"],
            "the broker wants a client certificate: set mqtt.client_cert_file and \
             mqtt.client_key_file",
        ),
        (
            &[
                "BadCertificate",
                "UnknownCA",
                "CertificateUnknown",
                "DecryptError",
            ],
            "the broker refused the client certificate in mqtt.client_cert_file (not \
             signed by a CA it trusts?)",
        ),
    ];
    CASES
        .iter()
        .find(|(words, _)| words.iter().any(|w| error.contains(w)))
        .map_or(TLS_HINT, |(_, hint)| hint)
}

pub fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => format!("connection failed: {io}"),
        ConnectionError::ConnectionRefused(code) => format!("broker refused connection: {code:?}"),
        ConnectionError::Tls(t) => {
            let s = t.to_string();
            format!("TLS failed: {s} ({})", tls_hint(&s))
        }
        other => {
            // A broker that rejects our certificate (or wants one) answers with a TLS alert
            // after the handshake, which rumqttc reports as a read error.
            let s = other.to_string();
            if s.contains("fatal alert") {
                format!("TLS failed: {s} ({})", tls_hint(&s))
            } else {
                format!("connection error: {s}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Data-driven: rustls' words for each TLS failure (as rumqttc prints them) point at
    /// the one setting to fix.
    #[test]
    fn each_tls_failure_names_its_setting() {
        for (error, want) in [
            (
                "invalid peer certificate: UnknownIssuer",
                "not one mqtt.ca_file trusts",
            ),
            (
                "invalid peer certificate: Expired",
                "not one mqtt.ca_file trusts",
            ),
            (
                "invalid peer certificate: NotValidForName",
                "mqtt.host is not a name",
            ),
            (
                "IO: received fatal alert: CertificateRequired",
                "set mqtt.client_cert_file",
            ),
            (
                "IO: received fatal alert: UnknownCA",
                "refused the client certificate in mqtt.client_cert_file",
            ),
            (
                "IO: received corrupt message",
                "check mqtt.ca_file, mqtt.client_cert_file",
            ),
        ] {
            assert!(
                tls_hint(error).contains(want),
                "{error}: {}",
                tls_hint(error)
            );
        }
    }
}
