//! The inference stage, on one OS thread: take the newest frame of any camera, admit it
//! (control requests, age, preparation, change gating), classify it, track detections,
//! and publish the classification. One classifier serves every camera; the frame in
//! flight is always finished before the stage returns.
//!
//! It never blocks on the network: telemetry goes out with `try_publish` (a full queue
//! drops the message and counts it), and detection events go to the outbox, whose `push`
//! returns once the record is written.
//!
//! * [`gate`]: change gating (pure).
//! * [`messages`]: the classification and detection payloads.
//!
//! May use: config, util, stats, frame, detect, model, capture's slots, and mqtt's topics,
//! command replies and outbox (the stage publishes; it does not drive a connection).

pub mod gate;
pub mod messages;

pub use gate::{Gate, change_score};
pub use messages::{ClassificationMsg, DetectionMsg};

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ClientError, QoS};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::capture::{Frame, Slots};
use crate::config::{PublishMode, Settings};
use crate::detect::{self, Tracker};
use crate::frame::Pixels;
use crate::frame::snapshot::snapshot_jpeg;
use crate::model::{Classifier, Prediction};
use crate::mqtt::commands::{CommandError, reply};
use crate::mqtt::outbox::Outbox;
use crate::mqtt::qos;
use crate::mqtt::topics::{camera_topic, result_topic};
use crate::stats::Stats;
use crate::stats::control::Control;
use crate::util::{rfc3339_ms, worth_logging};

/// What the inference stage works with, handed in by the daemon.
pub struct Context {
    pub classifier: Arc<Classifier>,
    pub settings: Arc<Settings>,
    pub slots: Arc<Slots>,
    pub stats: Arc<Stats>,
    pub control: Arc<Control>,
    pub client: AsyncClient,
    /// The durable path, when the outbox is open (detection on, or durable
    /// classifications).
    pub durable: Option<Durable>,
}

/// The durable path: detection events (one tracker per camera; none when detection is
/// off) and durable classifications, made into messages and handed to the outbox.
pub struct Durable {
    pub trackers: Vec<Tracker>,
    pub outbox: Arc<Outbox>,
}

/// Per camera: what the stage remembers between frames.
struct Camera {
    topic: String,
    seq: u64,
    gate: Gate,
    /// The top class and capture time of the last classification published.
    last_published: Option<(Option<usize>, Instant)>,
}

/// A classified frame, on its way out.
struct Classified {
    probs: Vec<f32>,
    top: Vec<Prediction>,
    ms: f64,
}

/// The inference stage. [`Inference::run`] is its whole life.
pub struct Inference {
    ctx: Context,
    cameras: Vec<Camera>,
    qos: QoS,
}

impl Inference {
    pub fn new(ctx: Context) -> Self {
        let s = &ctx.settings;
        let cameras = s
            .camera
            .iter()
            .map(|c| Camera {
                topic: camera_topic(s, &c.name, "classification"),
                seq: 0,
                gate: Gate::new(
                    c.change_threshold,
                    Duration::from_secs_f64(c.heartbeat_secs),
                ),
                last_published: None,
            })
            .collect();
        let qos = qos(s.mqtt.qos);
        Inference { ctx, cameras, qos }
    }

    /// Classify frames until `cancel` fires or every source has ended; then close every
    /// open detection (their end events reach the outbox before this returns).
    pub fn run(mut self, cancel: &CancellationToken) {
        let (slots, stats) = (self.ctx.slots.clone(), self.ctx.stats.clone());
        while let Some((i, frame)) = slots.take(cancel, &stats.inference_heartbeat) {
            self.step(i, &frame);
        }
        if let Some(d) = &mut self.ctx.durable {
            for i in 0..d.trackers.len() {
                let events = d.trackers[i].end_all();
                publish_events(&self.ctx.settings, &self.ctx.classifier, d, i, events);
            }
        }
        info!("inference stopped");
    }

    /// One frame of camera `i`, from the slot to the broker.
    fn step(&mut self, i: usize, frame: &Frame) {
        let Some(pixels) = self.admit(i, frame) else {
            return;
        };
        let Some(c) = self.classify(i, frame, &pixels) else {
            return;
        };
        if let Some(d) = &mut self.ctx.durable
            && let Some(t) = d.trackers.get_mut(i)
        {
            let events = t.observe(&c.probs, frame.captured_at);
            publish_events(&self.ctx.settings, &self.ctx.classifier, d, i, events);
        }
        self.publish(i, frame, c);
    }

    /// Carry out the camera's control requests, then the checks a frame must pass before
    /// it is worth the model's time: not paused, not stale, decodable, changed.
    fn admit(&mut self, i: usize, frame: &Frame) -> Option<Pixels> {
        let (settings, stats) = (&self.ctx.settings, &self.ctx.stats);
        let cam = &settings.camera[i];
        let cs = stats.camera(i);
        let control = self.ctx.control.camera(i);
        if let Some(id) = control.take_snapshot() {
            publish_snapshot(settings, &self.ctx.client, &cam.name, frame, id);
        }
        if control.is_paused() {
            cs.paused_frames.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let age = frame.captured.elapsed();
        if age > Duration::from_millis(cam.max_age_ms) {
            let n = cs.stale.fetch_add(1, Ordering::Relaxed) + 1;
            if worth_logging(n) {
                warn!(
                    "camera {}: frame {} is {age:?} old (max_age_ms {}); not classified, \
                     {n} stale so far",
                    cam.name, frame.number, cam.max_age_ms
                );
            }
            return None;
        }
        let pixels = match frame.raw.prepare_pixels(self.ctx.classifier.input_spec()) {
            Ok(p) => p,
            Err(e) => {
                let n = cs.bad_frames.fetch_add(1, Ordering::Relaxed) + 1;
                if worth_logging(n) {
                    warn!(
                        "camera {}: frame {} dropped: {e}; {n} bad frame(s) so far",
                        cam.name, frame.number
                    );
                }
                return None;
            }
        };
        if !self.cameras[i].gate.admit(&pixels, frame.captured) {
            cs.gated.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(pixels)
    }

    /// Run the model on an admitted frame; the time it took goes into the stats window.
    fn classify(&mut self, i: usize, frame: &Frame, pixels: &Pixels) -> Option<Classified> {
        let (classifier, stats) = (&self.ctx.classifier, &self.ctx.stats);
        let t0 = Instant::now();
        let probs = match classifier.probabilities(pixels.tensor(classifier.input_spec())) {
            Ok(p) => p,
            Err(e) => {
                stats.inference_errors.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "camera {}: inference failed on frame {}: {e:#}",
                    self.ctx.settings.camera[i].name, frame.number
                );
                return None;
            }
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let top = classifier.top(&probs);
        self.cameras[i].seq += 1;
        let cs = stats.camera(i);
        cs.classified.fetch_add(1, Ordering::Relaxed);
        cs.inference_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ms as f32);
        stats.inference_seconds.observe(ms / 1e3);
        Some(Classified { probs, top, ms })
    }

    /// Log the classification and publish it when `classification.publish` says it is
    /// due: through the outbox when durable, else as telemetry that never waits.
    fn publish(&mut self, i: usize, frame: &Frame, c: Classified) {
        let settings = &self.ctx.settings;
        let name = &settings.camera[i].name;
        let cam = &mut self.cameras[i];
        let msg = ClassificationMsg {
            v: 1,
            device: &settings.device.id,
            camera: name,
            seq: cam.seq,
            ts: rfc3339_ms(frame.captured_at),
            model: self.ctx.classifier.file_name(),
            inference_ms: (c.ms * 1000.0).round() / 1000.0,
            top: c.top,
            frame: frame.number,
            file: frame.file.as_deref(),
        };
        log_classification(&msg, c.ms);
        let top_class = msg.top.first().map(|p| p.class);
        let due = match settings.classification.publish {
            PublishMode::Every => true,
            PublishMode::OnChange => cam.last_published.is_none_or(|(c, _)| c != top_class),
            PublishMode::Interval(d) => cam
                .last_published
                .is_none_or(|(_, t)| frame.captured.saturating_duration_since(t) >= d),
        };
        if !due {
            return;
        }
        cam.last_published = Some((top_class, frame.captured));
        let payload = match serde_json::to_vec(&msg) {
            Ok(p) => p,
            Err(e) => {
                warn!("camera {name}: cannot encode classification: {e}");
                return;
            }
        };
        if settings.classification.durable
            && let Some(d) = &self.ctx.durable
        {
            // A refusal (a topic no broker takes) is logged and counted by the outbox.
            let _ = d.outbox.push(cam.topic.clone(), payload);
            return;
        }
        // Never block inference on the network: a full queue drops and counts.
        if let Err(e) = self
            .ctx
            .client
            .try_publish(&cam.topic, self.qos, false, payload)
        {
            let n = self
                .ctx
                .stats
                .publish_dropped
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if worth_logging(n) {
                let why = match e {
                    ClientError::TryRequest(_) => "MQTT queue full (broker away?)",
                    _ => "MQTT client closed",
                };
                warn!(
                    "camera {name}: classification seq {} dropped: {why}; {n} dropped so far",
                    cam.seq
                );
            }
        }
    }
}

fn log_classification(msg: &ClassificationMsg, ms: f64) {
    let best = msg
        .top
        .first()
        .map(|p| format!("{} {:.3}", p.label, p.score))
        .unwrap_or_else(|| "(nothing above threshold)".into());
    let file = msg.file.map(|f| format!(" {f}")).unwrap_or_default();
    info!("{} #{} {best} ({ms:.1} ms){file}", msg.camera, msg.seq);
}

/// Detection events of camera `camera`, made into messages and written to the outbox.
fn publish_events(
    settings: &Settings,
    classifier: &Classifier,
    d: &Durable,
    camera: usize,
    events: Vec<detect::Event>,
) {
    let cam = &settings.camera[camera].name;
    let device = &settings.device.id;
    let labels = classifier.labels();
    for e in events {
        let label = labels.get(e.class).map_or("", String::as_str);
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
            let what = if e.kind == detect::Kind::Start {
                "start"
            } else {
                "end"
            };
            info!(
                "{cam}: detection {what} {label} (score {:.3}, max {:.3}, {} frames)",
                e.score, e.max_score, e.frames
            );
        }
        match serde_json::to_vec(&msg) {
            Ok(p) => {
                // A refusal (a topic no broker takes) is logged and counted by the outbox.
                let _ = d.outbox.push(camera_topic(settings, cam, "detection"), p);
            }
            Err(e) => warn!("camera {cam}: cannot encode detection: {e}"),
        }
    }
}

fn round3(x: f32) -> f32 {
    (x * 1000.0).round() / 1000.0
}

/// Answer a `snapshot` command with camera `camera`'s current frame as JPEG (full
/// resolution, shrunk only to fit `commands.snapshot_max_bytes`), then the reply.
fn publish_snapshot(
    settings: &Settings,
    client: &AsyncClient,
    camera: &str,
    frame: &Frame,
    id: Option<serde_json::Value>,
) {
    let topic = camera_topic(settings, camera, "snapshot");
    let result = frame
        .raw
        .to_rgb()
        .map_err(|source| CommandError::Frame {
            frame: frame.number,
            source,
        })
        .and_then(|img| Ok(snapshot_jpeg(&img, settings.commands.snapshot_max_bytes)?))
        .and_then(|jpeg| {
            let n = jpeg.len();
            client
                .try_publish(&topic, QoS::AtLeastOnce, false, jpeg)
                .map(|()| serde_json::json!({"camera": camera, "topic": topic, "bytes": n}))
                .map_err(|_| CommandError::QueueFull)
        });
    if let Err(e) = &result {
        warn!("camera {camera}: snapshot failed: {e}");
    }
    let _ = client.try_publish(
        result_topic(settings),
        QoS::AtLeastOnce,
        false,
        reply("snapshot", &id, result),
    );
}
