//! MQTT: everything that talks to the broker.
//!
//! * [`client`]: connection options (TLS, credentials, packet limit), the telemetry client.
//! * [`topics`]: every topic the daemon publishes or subscribes to.
//! * [`driver`]: the telemetry connection's event loop (reconnect with back-off,
//!   availability, retained state re-sent after every connect, command intake).
//! * [`status`]: a camera's status as retained topics (the [`StatusSink`] capture reports to).
//! * [`discovery`]: the Home Assistant discovery payload (pure).
//! * [`commands`]: `cmd/<verb>` parsing (pure) and serving.
//! * [`outbox`]: durable delivery of detection events on a connection of its own.
//! * [`broker`]: the optional in-process broker (rumqttd).
//!
//! May use: config, util, stats, detect. Never capture or infer.
//!
//! [`StatusSink`]: crate::stats::status::StatusSink

pub mod broker;
pub mod client;
pub mod commands;
pub mod discovery;
pub mod driver;
pub mod outbox;
pub mod status;
pub mod topics;

pub use broker::start_embedded_broker;
pub use client::{MAX_PACKET, client, describe, options, qos};
pub use driver::{Retained, drive};
pub use status::{StatusOut, status_sink};
pub use topics::{OFFLINE, ONLINE, availability_topic, camera_topic};
