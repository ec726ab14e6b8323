//! The `<prefix>/<device>/stats` message: what the daemon is doing, every
//! `mqtt.stats_interval_secs`, for fleet dashboards. Built from the shared counters; the
//! message is pure data ([`stats_message`]), the task around it only times and publishes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::AsyncClient;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::mqtt::qos;
use crate::mqtt::topics::stats_topic;
use crate::stats::control::Control;
use crate::stats::{CameraState, KeepCounters, Stats};
use crate::util::{cpu_temp_c, rfc3339_ms, rss_mb};

#[derive(Debug, Serialize)]
pub struct StatsMsg {
    pub v: u32,
    pub device: String,
    pub ts: String,
    pub version: &'static str,
    pub uptime_s: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_mb: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_temp_c: Option<f64>,
    pub mqtt: MqttStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxStats>,
    /// Event snapshots and hard examples kept on disk, when any view saves them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<KeptStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hard_examples: Option<KeptStats>,
    pub cameras: BTreeMap<String, CameraReport>,
}

/// A folder of kept files (`keep`): what it holds and what it did.
#[derive(Debug, Serialize)]
pub struct KeptStats {
    pub files: u64,
    pub bytes: u64,
    pub saved: u64,
    /// Deleted, oldest first, to stay within the bounds.
    pub deleted: u64,
    pub failed: u64,
}

impl KeptStats {
    fn of(c: &KeepCounters) -> KeptStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KeptStats {
            files: g(&c.files),
            bytes: g(&c.bytes),
            saved: g(&c.saved),
            deleted: g(&c.deleted),
            failed: g(&c.failed),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct MqttStats {
    pub connected: bool,
    pub reconnects: u64,
    /// Classifications dropped because the request queue was full.
    pub dropped: u64,
    /// Messages queued in the client and lost when a connection broke.
    pub lost: u64,
}

#[derive(Debug, Serialize)]
pub struct OutboxStats {
    pub depth: usize,
    pub bytes: usize,
    pub accepted: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub quarantined: u64,
    pub skipped: u64,
    pub memory_fallback: u64,
    pub rewritten: u64,
}

#[derive(Debug, Serialize)]
pub struct CameraReport {
    pub state: CameraState,
    /// Paused by command.
    pub paused: bool,
    pub paused_frames: u64,
    /// Frames classified per second since the previous message.
    pub fps: f64,
    pub captured: u64,
    pub classified: u64,
    pub skipped: u64,
    pub gated: u64,
    pub stale: u64,
    pub bad_frames: u64,
    pub errors: u64,
    pub stalls: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_ms_p50: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_ms_p95: Option<f32>,
    /// The camera's regions by name; absent for a camera classified whole.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub regions: BTreeMap<String, RegionReport>,
}

/// One region of a camera: its crops.
#[derive(Debug, Serialize)]
pub struct RegionReport {
    /// Crops classified per second since the previous message.
    pub fps: f64,
    pub classified: u64,
    pub gated: u64,
    /// Frames the region was outside of.
    pub bad: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_ms_p50: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_ms_p95: Option<f32>,
}

/// The counters at the previous message, for rates.
#[derive(Debug, Clone)]
pub struct Previous {
    pub at: Instant,
    /// Per camera: its frames classified, and each region's crops.
    pub classified: Vec<(u64, Vec<u64>)>,
}

impl Previous {
    pub fn now(stats: &Stats) -> Previous {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let classified = stats.cameras.iter().map(|(_, c)| {
            let regions = c.regions.iter().map(|r| g(&r.classified)).collect();
            (g(&c.classified), regions)
        });
        Previous {
            at: Instant::now(),
            classified: classified.collect(),
        }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The stats message now; `prev` becomes now.
pub fn stats_message(
    settings: &Settings,
    stats: &Stats,
    control: &Control,
    prev: &mut Previous,
) -> StatsMsg {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let now = Previous::now(stats);
    let secs = now.at.duration_since(prev.at).as_secs_f64().max(1e-3);
    let cameras = stats
        .cameras
        .iter()
        .enumerate()
        .map(|(i, (name, c))| {
            let w = c.inference_ms.lock().unwrap_or_else(|p| p.into_inner());
            let before = prev.classified.get(i);
            let rate = |now: u64, then: Option<&u64>| {
                round1(now.saturating_sub(*then.unwrap_or(&0)) as f64 / secs)
            };
            let regions = c.regions.iter().enumerate().map(|(j, r)| {
                let w = r.inference_ms.lock().unwrap_or_else(|p| p.into_inner());
                let report = RegionReport {
                    fps: rate(now.classified[i].1[j], before.and_then(|b| b.1.get(j))),
                    classified: now.classified[i].1[j],
                    gated: g(&r.gated),
                    bad: g(&r.bad),
                    inference_ms_p50: w.quantile(0.5),
                    inference_ms_p95: w.quantile(0.95),
                };
                (r.name.clone(), report)
            });
            let report = CameraReport {
                state: c.state(),
                paused: control.camera(i).is_paused(),
                paused_frames: g(&c.paused_frames),
                fps: rate(now.classified[i].0, before.map(|b| &b.0)),
                captured: g(&c.captured),
                classified: now.classified[i].0,
                skipped: g(&c.skipped),
                gated: g(&c.gated),
                stale: g(&c.stale),
                bad_frames: g(&c.bad_frames),
                errors: g(&c.errors),
                stalls: g(&c.stalls),
                inference_ms_p50: w.quantile(0.5),
                inference_ms_p95: w.quantile(0.95),
                regions: regions.collect(),
            };
            (name.clone(), report)
        })
        .collect();
    *prev = now;
    StatsMsg {
        v: 1,
        device: settings.device.id.clone(),
        ts: rfc3339_ms(SystemTime::now()),
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: stats.started.elapsed().as_secs(),
        rss_mb: rss_mb(),
        cpu_temp_c: cpu_temp_c(),
        mqtt: MqttStats {
            connected: stats.connected.load(Ordering::Relaxed),
            reconnects: g(&stats.reconnects),
            dropped: g(&stats.publish_dropped),
            lost: g(&stats.publish_lost),
        },
        outbox: stats.outbox.get().map(|o| OutboxStats {
            depth: o.depth(),
            bytes: o.bytes(),
            accepted: g(&o.accepted),
            delivered: g(&o.delivered),
            dropped: g(&o.dropped),
            quarantined: g(&o.quarantined),
            skipped: g(&o.skipped),
            memory_fallback: g(&o.memory_fallback),
            rewritten: g(&o.rewritten),
        }),
        snapshots: stats.snapshots.get().map(|c| KeptStats::of(c)),
        hard_examples: stats.hard_examples.get().map(|c| KeptStats::of(c)),
        cameras,
    }
}

/// Publish the stats message every `mqtt.stats_interval_secs` until `stop`. Telemetry:
/// QoS `mqtt.qos`, not retained; a full queue skips this one (the next one carries the
/// same counters).
pub async fn publish_stats(
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    control: Arc<Control>,
    client: AsyncClient,
    stop: CancellationToken,
) {
    if settings.mqtt.stats_interval_secs == 0 {
        return;
    }
    let topic = stats_topic(&settings);
    let every = Duration::from_secs(settings.mqtt.stats_interval_secs);
    let mut prev = Previous::now(&stats);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let msg = stats_message(&settings, &stats, &control, &mut prev);
        if let Ok(p) = serde_json::to_vec(&msg) {
            let _ = client.try_publish(&topic, qos(settings.mqtt.qos), false, p);
        }
    }
}
