//! Counters shared by the stages. Plain atomics: written on the hot path, read for logs
//! and the shutdown summary.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct CameraStats {
    /// Frames the source produced.
    pub captured: AtomicU64,
    /// Frames the model classified.
    pub classified: AtomicU64,
    /// Frames replaced in the latest-frame slot before inference took them.
    pub skipped: AtomicU64,
    /// Source errors: undecodable files, capture failures.
    pub errors: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub cameras: Vec<(String, CameraStats)>,
    /// Classifications dropped because the MQTT request queue was full.
    pub publish_dropped: AtomicU64,
    /// Messages queued inside the MQTT client and lost when the connection broke.
    pub publish_lost: AtomicU64,
    pub reconnects: AtomicU64,
    /// The MQTT session is up (set by the event-loop driver).
    pub connected: AtomicBool,
    pub inference_errors: AtomicU64,
}

impl Stats {
    pub fn new(camera_names: impl IntoIterator<Item = String>) -> Self {
        Self {
            cameras: camera_names
                .into_iter()
                .map(|n| (n, CameraStats::default()))
                .collect(),
            ..Default::default()
        }
    }

    pub fn camera(&self, i: usize) -> &CameraStats {
        &self.cameras[i].1
    }

    /// One line for the log at shutdown.
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = String::new();
        for (name, c) in &self.cameras {
            s.push_str(&format!(
                "{name}: captured {} classified {} skipped {} errors {}; ",
                g(&c.captured),
                g(&c.classified),
                g(&c.skipped),
                g(&c.errors)
            ));
        }
        s.push_str(&format!(
            "mqtt: dropped {} lost {} reconnects {}; inference errors {}",
            g(&self.publish_dropped),
            g(&self.publish_lost),
            g(&self.reconnects),
            g(&self.inference_errors)
        ));
        s
    }
}
