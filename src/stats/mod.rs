//! Counters shared by the stages. Plain atomics: written on the hot path, read for the
//! stats topic, the watchdog and the shutdown summary. Also here, because capture, mqtt
//! and inference all need them and none may import another: a camera's published
//! [`status`], and the [`control`] mailbox (pause, snapshot requests) commands write and
//! inference reads.
//!
//! May use: util, config. Knows nothing of tokio, rumqttc or nokhwa.

pub mod control;
pub mod status;
pub mod switches;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

#[derive(Debug, Default)]
pub struct CameraStats {
    /// Frames the source produced.
    pub captured: AtomicU64,
    /// Frames the model classified.
    pub classified: AtomicU64,
    /// Frames not classified because a newer one replaced them in the latest-frame slot,
    /// or because the camera ran faster than the configured fps.
    pub skipped: AtomicU64,
    /// Frames older than `max_age_ms` when inference reached them.
    pub stale: AtomicU64,
    /// Frames not classified because the scene had not changed (change gating).
    pub gated: AtomicU64,
    /// Frames that could not be decoded (truncated or garbage MJPEG, short buffers).
    pub bad_frames: AtomicU64,
    /// Source errors: undecodable files, failed opens, capture failures.
    pub errors: AtomicU64,
    /// Times the camera stopped delivering for `stall_secs` and was reopened.
    pub stalls: AtomicU64,
    /// A [`CameraState`] as u8.
    pub state: AtomicU8,
    /// Milliseconds since the run started when the last frame arrived.
    pub last_frame_ms: AtomicU64,
    /// The latest inference times, for the stats topic's percentiles.
    pub inference_ms: Mutex<Window>,
    /// Frames taken and dropped while the camera was paused by command.
    pub paused_frames: AtomicU64,
    /// The camera's regions (`[[camera.region]]`), in configuration order; empty when
    /// the whole frame is classified. With regions, the camera's counters still count
    /// frames: `classified` when any region was, `gated` when every region was, and its
    /// inference time is the frame's (all its regions').
    pub regions: Vec<RegionStats>,
}

/// One region of a camera: what happened to its crops.
#[derive(Debug, Default)]
pub struct RegionStats {
    pub name: String,
    /// Crops the model classified.
    pub classified: AtomicU64,
    /// Crops not classified because the region had not changed (change gating).
    pub gated: AtomicU64,
    /// Frames the region could not be cut from (outside the frame).
    pub bad: AtomicU64,
    pub inference_ms: Mutex<Window>,
}

/// The last [`Window::LEN`] samples: percentiles over recent behaviour in fixed memory.
#[derive(Debug, Default)]
pub struct Window {
    samples: Vec<f32>,
    next: usize,
}

impl Window {
    pub const LEN: usize = 256;

    pub fn push(&mut self, v: f32) {
        if self.samples.len() < Self::LEN {
            self.samples.push(v);
        } else {
            self.samples[self.next] = v;
        }
        self.next = (self.next + 1) % Self::LEN;
    }

    /// The `p` quantile (0..=1, nearest rank) of the samples; None when empty.
    pub fn quantile(&self, p: f64) -> Option<f32> {
        if self.samples.is_empty() {
            return None;
        }
        let mut v = self.samples.clone();
        v.sort_by(f32::total_cmp);
        let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(v[rank - 1])
    }
}

/// What a camera is doing, for the watchdog and STATUS: only a camera that should be
/// streaming and is not delivering counts as stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum CameraState {
    Starting = 0,
    Streaming = 1,
    /// No device, or reopening after an error: idle on purpose, retrying.
    Waiting = 2,
    Ended = 3,
}

impl CameraStats {
    pub fn set_state(&self, s: CameraState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
    pub fn state(&self) -> CameraState {
        match self.state.load(Ordering::Relaxed) {
            1 => CameraState::Streaming,
            2 => CameraState::Waiting,
            3 => CameraState::Ended,
            _ => CameraState::Starting,
        }
    }
}

/// The outbox's counters and gauges, for stats and the shutdown summary. The outbox
/// (mqtt::outbox) keeps them current.
#[derive(Debug, Default)]
pub struct OutboxCounters {
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    /// Oldest records dropped to stay within `max_events` / `max_bytes`.
    pub dropped: AtomicU64,
    /// Corrupt or undeliverable (poison) records moved to `quarantine/`, at start-up or
    /// when the sender meets one; messages refused as poison by `push`.
    pub quarantined: AtomicU64,
    /// Directory entries that could not be read at start-up (skipped, left in place).
    pub skipped: AtomicU64,
    /// Records kept in memory only because the disk refused them (full, read-only...).
    pub memory_fallback: AtomicU64,
    /// Of those, records written to disk later, once it took them again.
    pub rewritten: AtomicU64,
    /// PUBACKs received for records already gone (dropped, or duplicates after a resend).
    pub stale_acks: AtomicU64,
    /// Records waiting for their PUBACK, and their bytes (gauges).
    pub waiting: AtomicU64,
    pub waiting_bytes: AtomicU64,
}

impl OutboxCounters {
    /// Records waiting for their PUBACK.
    pub fn depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed) as usize
    }
    pub fn bytes(&self) -> usize {
        self.waiting_bytes.load(Ordering::Relaxed) as usize
    }
}

/// A folder the daemon keeps (event snapshots, hard examples: the `keep` module).
#[derive(Debug, Default)]
pub struct KeepCounters {
    pub saved: AtomicU64,
    /// Entries deleted (oldest first) to stay within the bounds.
    pub deleted: AtomicU64,
    /// Entries that could not be written (or made).
    pub failed: AtomicU64,
    /// What the folder holds now (gauges).
    pub files: AtomicU64,
    pub bytes: AtomicU64,
}

/// Inference times in fixed buckets, for `/metrics`: counts per upper bound (seconds),
/// their sum and count. Fixed memory, lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or below `BOUNDS[i]` and above the bound before (not cumulative).
    buckets: [AtomicU64; Histogram::BOUNDS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Upper bounds in seconds: a fixture model's 1 ms to a Pi 4's ResNet-50 (~1 s).
    pub const BOUNDS: [f64; 11] = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];

    pub fn observe(&self, seconds: f64) {
        let i = Self::BOUNDS.partition_point(|b| *b < seconds);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6).max(0.0) as u64, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per bucket its upper bound and count, `+Inf` last); each
    /// bucket's own count, not cumulative (the exposition format's encoder sums them).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let bounds = Self::BOUNDS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.buckets)
            .map(|(b, n)| (b, n.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count, buckets)
    }
}

#[derive(Debug)]
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
    /// Bumped every time the inference thread wakes (a frame or a 50 ms tick): proof it
    /// is not stuck.
    pub inference_heartbeat: AtomicU64,
    /// When the run started: the clock `last_frame_ms` is read against.
    pub started: Instant,
    /// The durable outbox's counters, once it is opened (detection on).
    pub outbox: OnceLock<Arc<OutboxCounters>>,
    /// Per model (by name, in configuration order), its inference times.
    pub models: Vec<(String, Histogram)>,
    /// Event snapshots and hard examples kept, once their folders are open.
    pub snapshots: OnceLock<Arc<KeepCounters>>,
    pub hard_examples: OnceLock<Arc<KeepCounters>>,
    /// Event snapshots not published because the MQTT queue was full.
    pub snapshots_dropped: AtomicU64,
}

impl Stats {
    /// Counters for cameras without regions on one model, `default` (tests and tools).
    pub fn new(camera_names: impl IntoIterator<Item = String>) -> Self {
        let cameras = camera_names.into_iter().map(|n| (n, vec![])).collect();
        Self::with(cameras, vec!["default".to_string()])
    }

    /// Counters for `settings`' cameras, their regions and its models.
    pub fn for_settings(settings: &crate::config::Settings) -> Self {
        let cameras = settings.camera.iter().map(|c| {
            let regions = c.regions.iter().map(|r| r.name.clone()).collect();
            (c.name.clone(), regions)
        });
        let models = settings.models.iter().map(|m| m.name.clone()).collect();
        Self::with(cameras.collect(), models)
    }

    fn with(cameras: Vec<(String, Vec<String>)>, models: Vec<String>) -> Self {
        Self {
            cameras: cameras
                .into_iter()
                .map(|(n, regions)| {
                    let regions = regions
                        .into_iter()
                        .map(|name| RegionStats {
                            name,
                            ..RegionStats::default()
                        })
                        .collect();
                    let c = CameraStats {
                        regions,
                        ..CameraStats::default()
                    };
                    (n, c)
                })
                .collect(),
            publish_dropped: AtomicU64::new(0),
            publish_lost: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            inference_errors: AtomicU64::new(0),
            inference_heartbeat: AtomicU64::new(0),
            started: Instant::now(),
            outbox: OnceLock::new(),
            models: models
                .into_iter()
                .map(|m| (m, Histogram::default()))
                .collect(),
            snapshots: OnceLock::new(),
            hard_examples: OnceLock::new(),
            snapshots_dropped: AtomicU64::new(0),
        }
    }

    /// Model `i`'s inference times.
    pub fn model(&self, i: usize) -> Option<&Histogram> {
        self.models.get(i).map(|(_, h)| h)
    }

    /// Milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Camera `i` is (or should now be) delivering frames: from now on, a gap longer than
    /// its stall limit counts as a stall.
    pub fn streaming(&self, i: usize) {
        let c = self.camera(i);
        c.last_frame_ms.store(self.now_ms(), Ordering::Relaxed);
        c.set_state(CameraState::Streaming);
    }

    /// Record a captured frame of camera `i`.
    pub fn frame_captured(&self, i: usize) {
        self.camera(i).captured.fetch_add(1, Ordering::Relaxed);
        self.streaming(i);
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
                "{name}: captured {} classified {} skipped {} stale {} gated {} bad {} \
                 errors {} stalls {}; ",
                g(&c.captured),
                g(&c.classified),
                g(&c.skipped),
                g(&c.stale),
                g(&c.gated),
                g(&c.bad_frames),
                g(&c.errors),
                g(&c.stalls)
            ));
        }
        s.push_str(&format!(
            "mqtt: dropped {} lost {} reconnects {}; inference errors {}",
            g(&self.publish_dropped),
            g(&self.publish_lost),
            g(&self.reconnects),
            g(&self.inference_errors)
        ));
        if let Some(c) = self.outbox.get() {
            s.push_str(&format!(
                "; outbox: accepted {} delivered {} waiting {} dropped {} quarantined {} \
                 skipped {} memory-only {} written late {}",
                g(&c.accepted),
                g(&c.delivered),
                c.depth(),
                g(&c.dropped),
                g(&c.quarantined),
                g(&c.skipped),
                g(&c.memory_fallback),
                g(&c.rewritten)
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_hold_their_own_counts_and_bounds_are_inclusive() {
        let h = Histogram::default();
        for s in [0.0005, 0.001, 0.003, 0.003, 0.7, 9.0] {
            h.observe(s);
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 6);
        assert!((sum - 9.7075).abs() < 1e-6, "{sum}");
        let at = |b: f64| buckets.iter().find(|(x, _)| *x == b).unwrap().1;
        assert_eq!((at(0.001), at(0.0025), at(0.005)), (2, 0, 2));
        assert_eq!((at(0.5), at(1.0), at(2.5), at(f64::INFINITY)), (0, 1, 0, 1));
        assert_eq!(buckets.len(), Histogram::BOUNDS.len() + 1);
    }

    #[test]
    fn window_quantiles_over_the_last_samples_only() {
        let mut w = Window::default();
        assert_eq!(w.quantile(0.5), None);
        for v in 1..=100 {
            w.push(v as f32);
        }
        assert_eq!(
            (w.quantile(0.5), w.quantile(0.95)),
            (Some(50.0), Some(95.0))
        );
        // 300 more: only the last 256 (145..=400) count.
        for v in 101..=400 {
            w.push(v as f32);
        }
        assert_eq!(w.quantile(0.0), Some(145.0));
        assert_eq!(w.quantile(1.0), Some(400.0));
    }
}
