//! Health for systemd: READY/STATUS/STOPPING come from the pipeline's start and drain;
//! this task sends STATUS lines and pings the watchdog only while the pipeline makes
//! progress, so a wedged inference thread or a silently stalled camera gets the process
//! restarted whole.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::Settings;
use crate::daemon::notify::Notifier;
use crate::stats::{CameraState, Stats};

/// A streaming camera is stalled after this long without a frame, or three frame
/// periods, whichever is longer.
pub const STALL_AFTER: Duration = Duration::from_secs(5);

/// The longest gap between frames camera `i` may show before it counts as stalled.
///
/// A V4L2 camera's supervisor reopens it after `stall_secs` without a frame (and reports
/// it waiting): until then, plus [`STALL_AFTER`] for the report to land, a gap is the
/// supervisor's to handle. Withholding the watchdog sooner would have systemd restart the
/// whole daemon for what a camera reopen fixes.
pub fn stall_limit(settings: &Settings, i: usize) -> Duration {
    let cam = &settings.camera[i];
    let supervised = if cam.source.supervised() {
        cam.stall_after() + STALL_AFTER
    } else {
        Duration::ZERO
    };
    STALL_AFTER
        .max(Duration::from_secs_f64(3.0 / cam.source.fps()))
        .max(supervised)
}

/// Cameras that should be delivering frames and are not. Cameras waiting for a device
/// (unplugged, retrying) or finished are idle on purpose, not stalled.
pub fn stalled(settings: &Settings, stats: &Stats, now_ms: u64) -> Vec<usize> {
    (0..settings.camera.len())
        .filter(|&i| {
            let c = stats.camera(i);
            let since = now_ms.saturating_sub(c.last_frame_ms.load(Ordering::Relaxed));
            c.state() == CameraState::Streaming
                && since > stall_limit(settings, i).as_millis() as u64
        })
        .collect()
}

/// Until `stop`: every tick (half the watchdog timeout, or 5 s), a STATUS line, and a
/// WATCHDOG=1 if the inference thread woke since the last tick and no camera is stalled.
pub async fn supervise(
    notifier: Arc<Notifier>,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let tick = notifier
        .watchdog()
        .map(|w| w / 2)
        .unwrap_or(Duration::from_secs(5));
    let total = |s: &Stats| {
        (0..s.cameras.len())
            .map(|i| s.camera(i).classified.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let mut last_beat = stats.inference_heartbeat.load(Ordering::Relaxed);
    let mut last_total = total(&stats);
    let mut withheld = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.cancelled() => return,
        }
        let beat = stats.inference_heartbeat.load(Ordering::Relaxed);
        let now_total = total(&stats);
        let stalled = stalled(&settings, &stats, stats.now_ms());
        let streaming = (0..settings.camera.len())
            .filter(|&i| stats.camera(i).state() == CameraState::Streaming)
            .count();
        let fps = (now_total - last_total) as f64 / tick.as_secs_f64();
        notifier.notify(&format!(
            "STATUS={} camera(s), {streaming} streaming, {fps:.1} fps, mqtt {}, {} dropped, outbox {}",
            settings.camera.len(),
            if stats.connected.load(Ordering::Relaxed) {
                "connected"
            } else {
                "disconnected"
            },
            stats.publish_dropped.load(Ordering::Relaxed),
            stats.outbox.get().map_or(0, |o| o.depth()),
        ));
        if notifier.watchdog().is_some() {
            if beat != last_beat && stalled.is_empty() {
                notifier.notify("WATCHDOG=1");
                withheld = false;
            } else if !withheld {
                withheld = true;
                let names: Vec<&str> = stalled
                    .iter()
                    .map(|&i| settings.camera[i].name.as_str())
                    .collect();
                warn!(
                    "watchdog withheld: inference {}, stalled camera(s): {names:?}",
                    if beat != last_beat {
                        "alive"
                    } else {
                        "not waking"
                    }
                );
            }
        }
        last_beat = beat;
        last_total = now_total;
    }
}
