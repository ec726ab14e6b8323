//! A camera's status as MQTT sees it: retained `availability` and `status` topics,
//! remembered in [`Retained`] so the driver re-sends them after every connect.

use std::sync::Arc;

use rumqttc::{AsyncClient, QoS};

use crate::config::Settings;
use crate::mqtt::driver::Retained;
use crate::mqtt::topics::{OFFLINE, ONLINE, camera_topic};
use crate::stats::status::{CameraStatus, StatusSink};
use crate::util::rfc3339_ms;

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
            ts: rfc3339_ms(std::time::SystemTime::now()),
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
