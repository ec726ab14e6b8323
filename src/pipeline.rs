//! Capture -> inference hand-off and the inference stage.
//!
//! Each camera has a one-frame slot. Capture overwrites it (the overwritten frame is counted
//! as skipped), inference takes from it. So inference always works on the newest frame and
//! no queue of stale frames can build up, whatever the model's speed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, ClientError};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::commands;
use crate::detect::{self, Tracker};
use crate::frame::Pixels;
use crate::model::{Classifier, Prediction};
use crate::mqtt;
use crate::outbox::Outbox;
use crate::settings::{PublishMode, Settings};
use crate::source::Frame;
use crate::stats::Stats;

#[derive(Debug)]
struct SlotState {
    frames: Vec<Option<Frame>>,
    live_sources: usize,
    /// Round-robin start, so a fast camera cannot starve a slow one.
    next: usize,
}

#[derive(Debug)]
pub struct Slots {
    state: Mutex<SlotState>,
    ready: Condvar,
}

impl Slots {
    pub fn new(cameras: usize) -> Self {
        Self {
            state: Mutex::new(SlotState {
                frames: (0..cameras).map(|_| None).collect(),
                live_sources: cameras,
                next: 0,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store the newest frame of camera `i`; true when it replaced one never taken.
    pub fn put(&self, i: usize, frame: Frame) -> bool {
        let replaced = self.lock().frames[i].replace(frame).is_some();
        self.ready.notify_one();
        replaced
    }

    /// One camera will produce no more frames.
    pub fn source_finished(&self) {
        let mut s = self.lock();
        s.live_sources = s.live_sources.saturating_sub(1);
        drop(s);
        self.ready.notify_all();
    }

    /// Wait for the next frame of any camera. `None` once `cancel` fires, or once every
    /// source has finished and nothing is left to classify.
    pub fn take(
        &self,
        cancel: &CancellationToken,
        heartbeat: &AtomicU64,
    ) -> Option<(usize, Frame)> {
        let mut s = self.lock();
        loop {
            heartbeat.fetch_add(1, Ordering::Relaxed);
            if cancel.is_cancelled() {
                return None;
            }
            let n = s.frames.len();
            for k in 0..n {
                let i = (s.next + k) % n;
                if let Some(f) = s.frames[i].take() {
                    s.next = (i + 1) % n;
                    return Some((i, f));
                }
            }
            if s.live_sources == 0 {
                return None;
            }
            // The timeout bounds how late a cancellation is noticed.
            s = self
                .ready
                .wait_timeout(s, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Change gating for one camera: classify a frame only when its thumbnail differs from
/// the last classified one by at least `threshold` (mean grey level, 0..255), or when
/// `heartbeat` has passed since. Comparing with the last *classified* frame, not the
/// previous one, means a slow drift still adds up to a change.
#[derive(Debug, Clone)]
pub struct Gate {
    threshold: f32,
    heartbeat: Duration,
    last: Option<(Vec<f32>, Instant)>,
}

impl Gate {
    pub fn new(threshold: f32, heartbeat: Duration) -> Self {
        Gate {
            threshold,
            heartbeat,
            last: None,
        }
    }

    /// Whether to classify `pixels` (captured `at`); remembered when so.
    pub fn admit(&mut self, pixels: &Pixels, at: Instant) -> bool {
        if self.threshold <= 0.0 {
            return true;
        }
        let thumb = pixels.thumbnail();
        let pass = match &self.last {
            None => true,
            Some((prev, t)) => {
                at.saturating_duration_since(*t) >= self.heartbeat
                    || change_score(prev, &thumb) >= self.threshold
            }
        };
        if pass {
            self.last = Some((thumb, at));
        }
        pass
    }
}

/// Mean absolute difference of two thumbnails, in grey levels.
pub fn change_score(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len().max(1) as f32
}

/// Log the 1st, 2nd, 4th, 8th... occurrence: a problem that repeats at frame rate must not
/// flood the journal, and its count is in the stats anyway.
pub(crate) fn worth_logging(n: u64) -> bool {
    n.is_power_of_two()
}

/// The `.../<camera>/classification` payload.
#[derive(Debug, Serialize)]
pub struct ClassificationMsg<'a> {
    pub v: u32,
    pub device: &'a str,
    pub camera: &'a str,
    pub seq: u64,
    pub ts: String,
    pub model: &'a str,
    pub inference_ms: f64,
    pub top: Vec<Prediction>,
    /// Capture counter of the frame; a gap means frames were skipped.
    pub frame: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<&'a str>,
}

/// The `.../<camera>/detection` payload: one event of a detection's life.
#[derive(Debug, Serialize)]
pub struct DetectionMsg<'a> {
    pub v: u32,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: detect::Kind,
    pub device: &'a str,
    pub camera: &'a str,
    pub label: &'a str,
    pub class: usize,
    pub score: f32,
    pub max_score: f32,
    pub started_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    pub frames: u64,
}

/// The durable path: detection events (one tracker per camera; none when detection is
/// off) and durable classifications, made into messages and handed to the outbox.
pub struct Durable<'a> {
    pub trackers: Vec<Tracker>,
    pub outbox: &'a Outbox,
    pub labels: &'a [String],
}

impl Durable<'_> {
    fn publish(&self, settings: &Settings, camera: usize, events: Vec<detect::Event>) {
        let cam = &settings.camera[camera].name;
        let device = &settings.device.id;
        for e in events {
            let label = self.labels.get(e.class).map_or("", String::as_str);
            let msg = DetectionMsg {
                v: 1,
                id: detect::event_id(device, cam, e.class, e.started_at),
                kind: e.kind,
                device,
                camera: cam,
                label,
                class: e.class,
                score: round3(e.score),
                max_score: round3(e.max_score),
                started_at: rfc3339_ms(e.started_at),
                ended_at: e.ended_at.map(rfc3339_ms),
                frames: e.frames,
            };
            if e.kind != detect::Kind::Update {
                info!(
                    "{cam}: detection {} {label} (score {:.3}, max {:.3}, {} frames)",
                    if e.kind == detect::Kind::Start {
                        "start"
                    } else {
                        "end"
                    },
                    e.score,
                    e.max_score,
                    e.frames
                );
            }
            match serde_json::to_vec(&msg) {
                Ok(p) => {
                    self.outbox
                        .push(mqtt::camera_topic(settings, cam, "detection"), p);
                }
                Err(e) => warn!("camera {cam}: cannot encode detection: {e}"),
            }
        }
    }

    /// Close every open detection (the run is ending).
    fn end_all(&mut self, settings: &Settings) {
        for i in 0..self.trackers.len() {
            let events = self.trackers[i].end_all();
            self.publish(settings, i, events);
        }
    }
}

fn round3(x: f32) -> f32 {
    (x * 1000.0).round() / 1000.0
}

/// RFC 3339, UTC, millisecond precision: `2026-11-29T22:48:14.123Z`.
pub fn rfc3339_ms(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

/// Answer a `snapshot` command with camera `camera`'s current frame as JPEG (full
/// resolution, shrunk only to fit `commands.snapshot_max_bytes`), then the reply.
fn publish_snapshot(
    settings: &Settings,
    camera: &str,
    frame: &Frame,
    id: Option<serde_json::Value>,
    client: &AsyncClient,
) {
    let topic = mqtt::camera_topic(settings, camera, "snapshot");
    let result = frame
        .raw
        .to_rgb()
        .map_err(|e| format!("frame {}: {e}", frame.number))
        .and_then(|img| commands::snapshot_jpeg(&img, settings.commands.snapshot_max_bytes))
        .and_then(|jpeg| {
            let n = jpeg.len();
            client
                .try_publish(&topic, rumqttc::QoS::AtLeastOnce, false, jpeg)
                .map(|()| serde_json::json!({"camera": camera, "topic": topic, "bytes": n}))
                .map_err(|_| "MQTT queue full (broker away?)".to_string())
        });
    if let Err(e) = &result {
        warn!("camera {camera}: snapshot failed: {e}");
    }
    let _ = client.try_publish(
        commands::result_topic(settings),
        rumqttc::QoS::AtLeastOnce,
        false,
        commands::reply("snapshot", &id, result),
    );
}

/// The inference stage: runs on its own thread until `take` says stop. One classifier
/// serves every camera; the frame in flight is always finished before returning.
pub fn inference_loop(
    classifier: &Classifier,
    settings: &Settings,
    slots: &Slots,
    stats: &Stats,
    client: &AsyncClient,
    mut durable: Option<Durable>,
    cancel: &CancellationToken,
) {
    let base = settings.base_topic();
    let topics: Vec<String> = settings
        .camera
        .iter()
        .map(|c| format!("{base}/{}/classification", c.name))
        .collect();
    let qos = mqtt::qos(settings.mqtt.qos);
    let mut seq = vec![0u64; settings.camera.len()];
    // Per camera: the top class and capture time of the last classification published.
    let mut last_published: Vec<Option<(Option<usize>, Instant)>> =
        vec![None; settings.camera.len()];
    let mut gates: Vec<Gate> = settings
        .camera
        .iter()
        .map(|c| {
            Gate::new(
                c.change_threshold,
                Duration::from_secs_f64(c.heartbeat_secs),
            )
        })
        .collect();
    let spec = *classifier.input_spec();
    while let Some((i, frame)) = slots.take(cancel, &stats.inference_heartbeat) {
        let cam = &settings.camera[i];
        let camera = &cam.name;
        let cs = stats.camera(i);
        let snapshot = cs.snapshot.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(id) = snapshot {
            publish_snapshot(settings, camera, &frame, id, client);
        }
        if cs.paused.load(Ordering::Relaxed) {
            cs.paused_frames.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let age = frame.captured.elapsed();
        if age > Duration::from_millis(cam.max_age_ms) {
            let n = cs.stale.fetch_add(1, Ordering::Relaxed) + 1;
            if worth_logging(n) {
                warn!(
                    "camera {camera}: frame {} is {age:?} old (max_age_ms {}); not classified, \
                     {n} stale so far",
                    frame.number, cam.max_age_ms
                );
            }
            continue;
        }
        let pixels = match frame.raw.prepare_pixels(&spec) {
            Ok(p) => p,
            Err(e) => {
                let n = cs.bad_frames.fetch_add(1, Ordering::Relaxed) + 1;
                if worth_logging(n) {
                    warn!(
                        "camera {camera}: frame {} dropped: {e}; {n} bad frame(s) so far",
                        frame.number
                    );
                }
                continue;
            }
        };
        if !gates[i].admit(&pixels, frame.captured) {
            cs.gated.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let t0 = Instant::now();
        let probs = match classifier.probabilities(pixels.tensor(&spec)) {
            Ok(p) => p,
            Err(e) => {
                stats.inference_errors.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "camera {camera}: inference failed on frame {}: {e:#}",
                    frame.number
                );
                continue;
            }
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let top = classifier.top(&probs);
        seq[i] += 1;
        cs.classified.fetch_add(1, Ordering::Relaxed);
        cs.inference_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ms as f32);
        if let Some(d) = &mut durable
            && let Some(t) = d.trackers.get_mut(i)
        {
            let events = t.observe(&probs, frame.captured_at);
            d.publish(settings, i, events);
        }
        let msg = ClassificationMsg {
            v: 1,
            device: &settings.device.id,
            camera,
            seq: seq[i],
            ts: rfc3339_ms(frame.captured_at),
            model: classifier.file_name(),
            inference_ms: (ms * 1000.0).round() / 1000.0,
            top,
            frame: frame.number,
            file: frame.file.as_deref(),
        };
        let best = msg
            .top
            .first()
            .map(|p| format!("{} {:.3}", p.label, p.score))
            .unwrap_or_else(|| "(nothing above threshold)".into());
        info!(
            "{camera} #{} {best} ({ms:.1} ms){}",
            msg.seq,
            frame
                .file
                .as_deref()
                .map(|f| format!(" {f}"))
                .unwrap_or_default()
        );
        let top_class = msg.top.first().map(|p| p.class);
        let due = match settings.classification.publish {
            PublishMode::Every => true,
            PublishMode::OnChange => last_published[i].is_none_or(|(c, _)| c != top_class),
            PublishMode::Interval(d) => last_published[i]
                .is_none_or(|(_, t)| frame.captured.saturating_duration_since(t) >= d),
        };
        if !due {
            continue;
        }
        last_published[i] = Some((top_class, frame.captured));
        let payload = match serde_json::to_vec(&msg) {
            Ok(p) => p,
            Err(e) => {
                warn!("camera {camera}: cannot encode classification: {e}");
                continue;
            }
        };
        if settings.classification.durable
            && let Some(d) = &durable
        {
            d.outbox.push(topics[i].clone(), payload);
            continue;
        }
        // Never block inference on the network: a full queue drops and counts.
        if let Err(e) = client.try_publish(&topics[i], qos, false, payload) {
            let n = stats.publish_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if worth_logging(n) {
                let why = match e {
                    ClientError::TryRequest(_) => "MQTT queue full (broker away?)",
                    _ => "MQTT client closed",
                };
                warn!(
                    "camera {camera}: classification seq {} dropped: {why}; {n} dropped so far",
                    msg.seq
                );
            }
        }
    }
    if let Some(d) = &mut durable {
        d.end_all(settings);
    }
    info!("inference stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(level: f32) -> Pixels {
        Pixels {
            width: 32,
            height: 32,
            rgb: vec![level; 32 * 32 * 3],
        }
    }

    /// Data-driven: (seconds since start, grey level of the frame, classified?) with a
    /// threshold of 4 levels and a 10 s heartbeat.
    #[test]
    fn gate_passes_changes_and_heartbeats_only() {
        let steps: &[(u64, f32, bool)] = &[
            (0, 100.0, true),  // the first frame always
            (1, 101.0, false), // noise
            (2, 103.0, false), // drift: 3 levels from the last classified
            (3, 104.5, true),  // drift adds up past 4
            (4, 104.5, false),
            (14, 104.5, true), // heartbeat: 10 s since the last classified
            (15, 80.0, true),  // a real change
        ];
        let t0 = Instant::now();
        let mut g = Gate::new(4.0, Duration::from_secs(10));
        for &(t, level, want) in steps {
            let at = t0 + Duration::from_secs(t);
            assert_eq!(g.admit(&flat(level), at), want, "t={t} level={level}");
        }
        // Threshold 0: gating off, everything passes.
        let mut off = Gate::new(0.0, Duration::from_secs(10));
        assert!((0..5).all(|_| off.admit(&flat(1.0), t0)));
    }

    #[test]
    fn change_score_is_the_mean_absolute_difference() {
        assert_eq!(change_score(&[0.0, 10.0], &[4.0, 6.0]), 4.0);
        let a = flat(10.0).thumbnail();
        assert_eq!(a.len(), crate::frame::THUMB * crate::frame::THUMB);
        assert_eq!(change_score(&a, &flat(13.0).thumbnail()), 3.0);
    }
}
