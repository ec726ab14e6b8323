//! A camera's status as MQTT sees it: retained `availability` and `status` topics,
//! remembered in [`Retained`] so the driver re-sends them after every connect.

use std::collections::BTreeMap;
use std::sync::Arc;

use rumqttc::{AsyncClient, QoS};

use crate::config::Settings;
use crate::mqtt::driver::Retained;
use crate::mqtt::topics::{OFFLINE, ONLINE, camera_topic};
use crate::stats::control::Control;
use crate::stats::status::{CameraStatus, StatusSink};
use crate::stats::switches::ViewOff;
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
    /// What commands switched off, per view (`frame`, or a region's name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off: Option<&'a BTreeMap<String, ViewOff>>,
}

/// Where a camera's status goes: its retained topics, and the connection.
pub struct StatusOut {
    pub settings: Arc<Settings>,
    pub client: AsyncClient,
    pub retained: Arc<Retained>,
    pub control: Arc<Control>,
}

impl StatusOut {
    /// Publish camera `i`'s `status` with its switches: retained `availability` (`online`
    /// / `offline`) and `status` (JSON), remembered for re-sending after a reconnect and
    /// queued now without waiting (a full queue means no connection; the reconnect
    /// re-sends them).
    pub fn publish(&self, i: usize, status: &CameraStatus) {
        let s = &self.settings;
        let camera = &s.camera[i].name;
        let switches = self.control.switches();
        let msg = StatusMsg {
            v: 1,
            device: &s.device.id,
            camera,
            ts: rfc3339_ms(std::time::SystemTime::now()),
            status,
            off: switches.cameras.get(camera),
        };
        let payload = serde_json::to_vec(&msg).unwrap_or_default();
        let online = if status.online { ONLINE } else { OFFLINE };
        let avail = camera_topic(s, camera, "availability");
        let topic = camera_topic(s, camera, "status");
        for (t, p) in [(&avail, online.as_bytes().to_vec()), (&topic, payload)] {
            self.retained.set(t.clone(), p.clone());
            // Not counted as a drop when the queue is full: the latest state is kept
            // above and re-sent at the next connect, which is all a retained topic needs.
            let _ = self.client.try_publish(t, QoS::AtLeastOnce, true, p);
        }
    }

    /// Publish camera `i`'s last status again (its switches changed).
    pub fn republish(&self, i: usize) {
        if let Some(status) = self.control.camera(i).status() {
            self.publish(i, &status);
        }
    }
}

/// Where camera `i` reports status changes: remembered for [`StatusOut::republish`], then
/// published.
pub fn status_sink(out: Arc<StatusOut>, i: usize) -> StatusSink {
    Arc::new(move |status: &CameraStatus| {
        out.control.camera(i).set_status(status);
        out.publish(i, status);
    })
}
