//! The inference stage, on one OS thread: take the newest frame of any camera, admit it
//! (control requests, age), cut it into its views (each region, or the whole frame) in one
//! preparation pass, and per view: change gating, classification on the view's model,
//! detection tracking, and the classification message. Cameras are taken round-robin, so
//! models interleave at the pace of the cameras that use them; every view of a frame is
//! classified from that frame. The frame in flight is always finished before the stage
//! returns.
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
pub mod keep;
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
use crate::config::{CameraSettings, PublishMode, Rect, Settings};
use crate::detect::{self, Rules, Tracker};
use crate::frame::snapshot::snapshot_jpeg;
use crate::frame::{Cut, Pixels};
use crate::model::{Classifier, Prediction};
use crate::mqtt::commands::{CommandError, reply};
use crate::mqtt::outbox::Outbox;
use crate::mqtt::qos;
use crate::mqtt::topics::{camera_topic, result_topic, view_topic};
use crate::stats::Stats;
use crate::stats::control::Control;
use crate::stats::switches::{FRAME, ViewOff, What};
use crate::util::{rfc3339_ms, worth_logging};

/// What the inference stage works with, handed in by the daemon.
pub struct Context {
    /// The models, in the order of `settings.models`; shared by every view on them.
    pub models: Vec<Arc<Classifier>>,
    pub settings: Arc<Settings>,
    pub slots: Arc<Slots>,
    pub stats: Arc<Stats>,
    pub control: Arc<Control>,
    pub client: AsyncClient,
    /// The durable path, when the outbox is open (detection on, or durable
    /// classifications).
    pub durable: Option<Durable>,
    /// Where event snapshots and hard examples are saved, for the views that save them.
    pub folders: keep::Folders,
}

/// The durable path: detection events and durable classifications, made into messages
/// and handed to the outbox.
pub struct Durable {
    /// Per model (in the order of `settings.models`), its `[detection]` rules; None when
    /// detection is off.
    pub rules: Option<Vec<Rules>>,
    pub outbox: Arc<Outbox>,
}

/// One view of a camera's frames: a region, or the whole frame; what the stage remembers
/// of it between frames.
struct View {
    /// Index into the camera's regions (settings and stats); None: the whole frame.
    region: Option<usize>,
    /// Index into the models.
    model: usize,
    /// The camera, or `camera/region`: how logs and event ids name the view.
    scope: String,
    topic: String,
    detection_topic: String,
    seq: u64,
    gate: Gate,
    /// The top class and capture time of the last classification published.
    last_published: Option<(Option<usize>, Instant)>,
    /// Detection tracking, when detection is on.
    tracker: Option<Tracker>,
    /// What commands switched off of it (`stats::switches`).
    off: Off,
    /// Its snapshots and hard examples.
    keeping: keep::Keeping,
}

/// A view's switches as inference applies them: label names resolved to classes of the
/// view's model.
#[derive(Debug, Clone, Default, PartialEq)]
struct Off {
    /// No classification messages.
    classification: bool,
    /// No detection events.
    detection: bool,
    /// Classes left out of the classification's `top`.
    hidden: Vec<usize>,
    /// Classes that start no detection (an open one ends).
    unwatched: Vec<usize>,
}

impl Off {
    fn of(off: Option<&ViewOff>, labels: &[String]) -> Off {
        let Some(off) = off else {
            return Off::default();
        };
        let classes = |pick: fn(&What) -> bool| -> Vec<usize> {
            let named = off.labels.iter().filter(|(_, w)| pick(w));
            let found = named.filter_map(|(l, _)| labels.iter().position(|x| x == l));
            found.collect()
        };
        Off {
            classification: off.view.classification,
            detection: off.view.detection,
            hidden: classes(|w| w.classification),
            unwatched: classes(|w| w.detection),
        }
    }

    /// Nothing of the view is wanted: it is not even cut out of the frame.
    fn all(&self) -> bool {
        self.classification && self.detection
    }
}

/// `probs` with `classes` at zero (a copy only when there are any).
fn without<'a>(probs: &'a [f32], classes: &[usize]) -> std::borrow::Cow<'a, [f32]> {
    if classes.is_empty() {
        return std::borrow::Cow::Borrowed(probs);
    }
    let mut p = probs.to_vec();
    for &c in classes {
        if let Some(x) = p.get_mut(c) {
            *x = 0.0;
        }
    }
    std::borrow::Cow::Owned(p)
}

impl View {
    /// The view's region name in camera `cam` (its own settings); None: the whole frame.
    fn region_name<'a>(&self, cam: &'a CameraSettings) -> Option<&'a str> {
        self.region.map(|r| cam.regions[r].name.as_str())
    }

    /// The views of camera `cam`: one per region, or the whole frame.
    fn of(settings: &Settings, cam: &CameraSettings, rules: Option<&[Rules]>) -> Vec<View> {
        let model_index = |name: &str| {
            let i = settings.models.iter().position(|m| m.name == name);
            i.unwrap_or(0) // validated: the name is one of the models'
        };
        let view = |region: Option<usize>, model: &str| {
            let name = region.map(|r| cam.regions[r].name.as_str());
            let model = model_index(model);
            View {
                region,
                model,
                scope: name.map_or(cam.name.clone(), |r| format!("{}/{r}", cam.name)),
                topic: view_topic(settings, &cam.name, name, "classification"),
                detection_topic: view_topic(settings, &cam.name, name, "detection"),
                seq: 0,
                gate: Gate::new(
                    cam.change_threshold,
                    Duration::from_secs_f64(cam.heartbeat_secs),
                ),
                last_published: None,
                tracker: rules.and_then(|r| r.get(model)).cloned().map(Tracker::new),
                off: Off::default(),
                keeping: keep::Keeping::default(),
            }
        };
        if cam.regions.is_empty() {
            let mut v = view(None, &cam.model);
            v.keeping.snapshots = cam.snapshots;
            v.keeping.hard_examples = cam.hard_examples;
            return vec![v];
        }
        let regions = cam.regions.iter().enumerate();
        let mut views: Vec<View> = regions.map(|(j, r)| view(Some(j), &r.model)).collect();
        for (v, r) in views.iter_mut().zip(&cam.regions) {
            v.keeping.snapshots = r.snapshots;
            v.keeping.hard_examples = r.hard_examples;
        }
        views
    }
}

/// A classified view, on its way out.
pub(crate) struct Classified {
    probs: Vec<f32>,
    top: Vec<Prediction>,
    ms: f64,
}

/// The inference stage. [`Inference::run`] is its whole life.
pub struct Inference {
    ctx: Context,
    /// Per camera, its views.
    views: Vec<Vec<View>>,
    qos: QoS,
    /// The switches' generation the views' `off` were taken from (None: not yet).
    switches_seen: Option<u64>,
}

impl Inference {
    pub fn new(ctx: Context) -> Self {
        let s = &ctx.settings;
        let rules = ctx.durable.as_ref().and_then(|d| d.rules.as_deref());
        let views = s.camera.iter().map(|c| View::of(s, c, rules)).collect();
        let qos = qos(s.mqtt.qos);
        Inference {
            ctx,
            views,
            qos,
            switches_seen: None,
        }
    }

    /// Take the switches again when a command changed them. A view whose detections were
    /// just switched off ends its open ones now (their end events go out); a label's end
    /// as the view's next frames drop below its threshold.
    fn refresh_switches(&mut self) {
        let generation = self.ctx.control.generation();
        if self.switches_seen == Some(generation) {
            return;
        }
        self.switches_seen = Some(generation);
        let switches = self.ctx.control.switches();
        for i in 0..self.views.len() {
            let cam = &self.ctx.settings.camera[i];
            for v in 0..self.views[i].len() {
                let view = &self.views[i][v];
                let name = view.region_name(cam).unwrap_or(FRAME);
                let labels = self.ctx.models[view.model].labels();
                let off = Off::of(switches.view(&cam.name, name), labels);
                let ended = off.detection && !view.off.detection;
                if off != view.off {
                    info!("{}: switches now {off:?}", view.scope);
                }
                self.views[i][v].off = off;
                if ended && let Some(t) = &mut self.views[i][v].tracker {
                    let events = t.end_all();
                    self.publish_events(i, v, events);
                }
            }
        }
    }

    /// Classify frames until `cancel` fires or every source has ended; then close every
    /// open detection (their end events reach the outbox before this returns).
    pub fn run(mut self, cancel: &CancellationToken) {
        let (slots, stats) = (self.ctx.slots.clone(), self.ctx.stats.clone());
        while let Some((i, frame)) = slots.take(cancel, &stats.inference_heartbeat) {
            self.step(i, &frame);
        }
        for i in 0..self.views.len() {
            for v in 0..self.views[i].len() {
                if let Some(t) = &mut self.views[i][v].tracker {
                    let events = t.end_all();
                    self.publish_events(i, v, events);
                }
            }
        }
        info!("inference stopped");
    }

    /// One frame of camera `i`, from the slot to the broker: each of its views. The
    /// camera's counters count frames (classified: any view was; gated: every view was),
    /// its inference time is the frame's (every view's); a region's count its crops.
    fn step(&mut self, i: usize, frame: &Frame) {
        self.refresh_switches();
        if !self.admit(i, frame) {
            return;
        }
        let stats = self.ctx.stats.clone();
        let cs = stats.camera(i);
        let (mut classified, mut gated, mut ms) = (0, 0, 0.0);
        let views = self.prepare(i, frame);
        let n = views.len();
        let mut picture = keep::Picture::new(frame);
        for (v, rect, pixels) in views {
            if !self.views[i][v].gate.admit(&pixels, frame.captured) {
                gated += 1;
                if let Some(r) = self.views[i][v].region {
                    cs.regions[r].gated.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            let Some(c) = self.classify(i, v, frame, &pixels) else {
                continue;
            };
            classified += 1;
            ms += c.ms;
            let view = &mut self.views[i][v];
            if let (false, Some(t)) = (view.off.detection, &mut view.tracker) {
                let probs = without(&c.probs, &view.off.unwatched);
                let events = t.observe(&probs, frame.captured_at);
                let labels = self.ctx.models[view.model].labels();
                let start = events.iter().find(|e| e.kind == detect::Kind::Start);
                let started = start.map(|e| labels.get(e.class).cloned().unwrap_or_default());
                self.publish_events(i, v, events);
                if let Some(label) = started {
                    self.snapshot((i, v), frame, rect, &label, &mut picture);
                }
            }
            self.hard_example((i, v), frame, rect, &c, &mut picture);
            if !self.views[i][v].off.classification {
                self.publish(i, v, frame, c);
            }
        }
        if classified > 0 {
            cs.classified.fetch_add(1, Ordering::Relaxed);
            let mut w = cs.inference_ms.lock().unwrap_or_else(|p| p.into_inner());
            w.push(ms as f32);
        } else if n > 0 && gated == n {
            cs.gated.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Carry out the camera's control requests, then the checks a frame must pass before
    /// it is worth preparing: not paused, not stale.
    fn admit(&mut self, i: usize, frame: &Frame) -> bool {
        let (settings, stats) = (&self.ctx.settings, &self.ctx.stats);
        let cam = &settings.camera[i];
        let cs = stats.camera(i);
        let control = self.ctx.control.camera(i);
        if let Some(id) = control.take_snapshot() {
            publish_snapshot(settings, &self.ctx.client, &cam.name, frame, id);
        }
        if control.is_paused() {
            cs.paused_frames.fetch_add(1, Ordering::Relaxed);
            return false;
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
            return false;
        }
        true
    }

    /// Each view of the frame at its model's input size, from one preparation pass; a
    /// region outside this frame is left out (counted `bad` for the region), a frame that
    /// cannot be decoded gives nothing (counted `bad_frames`).
    fn prepare(&self, i: usize, frame: &Frame) -> Vec<(usize, Option<Rect>, Pixels)> {
        let (settings, stats) = (&self.ctx.settings, &self.ctx.stats);
        let cam = &settings.camera[i];
        let cs = stats.camera(i);
        let (fw, fh) = (frame.raw.width, frame.raw.height);
        let mut views = Vec::with_capacity(self.views[i].len());
        let mut cuts = Vec::with_capacity(self.views[i].len());
        for (v, view) in self.views[i].iter().enumerate() {
            if view.off.all() {
                continue;
            }
            let rect = match view.region {
                None => None,
                Some(r) => match cam.regions[r].area.in_frame(fw, fh) {
                    Ok(rect) => Some(rect),
                    Err(e) => {
                        let n = cs.regions[r].bad.fetch_add(1, Ordering::Relaxed) + 1;
                        if worth_logging(n) {
                            warn!(
                                "camera[{i}].region[{r}] ({}): {e}; not classified, {n} \
                                 frame(s) so far",
                                view.scope
                            );
                        }
                        continue;
                    }
                },
            };
            let spec = self.ctx.models[view.model].input_spec();
            views.push((v, rect));
            cuts.push(Cut { rect, spec });
        }
        if cuts.is_empty() {
            return vec![];
        }
        match frame.raw.prepare_cuts(&cuts) {
            Ok(pixels) => views
                .into_iter()
                .zip(pixels)
                .map(|((v, rect), px)| (v, rect, px))
                .collect(),
            Err(e) => {
                let n = cs.bad_frames.fetch_add(1, Ordering::Relaxed) + 1;
                if worth_logging(n) {
                    warn!(
                        "camera {}: frame {} dropped: {e}; {n} bad frame(s) so far",
                        cam.name, frame.number
                    );
                }
                vec![]
            }
        }
    }

    /// Run view `v`'s model on its admitted pixels; the time it took goes into the
    /// region's and the model's stats.
    fn classify(&mut self, i: usize, v: usize, frame: &Frame, px: &Pixels) -> Option<Classified> {
        let stats = &self.ctx.stats;
        let view = &mut self.views[i][v];
        let classifier = &self.ctx.models[view.model];
        let t0 = Instant::now();
        let probs = match classifier.probabilities(px.tensor(classifier.input_spec())) {
            Ok(p) => p,
            Err(e) => {
                stats.inference_errors.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "{}: inference failed on frame {}: {e:#}",
                    view.scope, frame.number
                );
                return None;
            }
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let top = classifier.top(&without(&probs, &view.off.hidden));
        view.seq += 1;
        if let Some(r) = view.region {
            let rs = &stats.camera(i).regions[r];
            rs.classified.fetch_add(1, Ordering::Relaxed);
            let mut w = rs.inference_ms.lock().unwrap_or_else(|p| p.into_inner());
            w.push(ms as f32);
        }
        if let Some(h) = stats.model(view.model) {
            h.observe(ms / 1e3);
        }
        Some(Classified { probs, top, ms })
    }

    /// Log the classification and publish it when `classification.publish` says it is
    /// due: through the outbox when durable, else as telemetry that never waits.
    fn publish(&mut self, i: usize, v: usize, frame: &Frame, c: Classified) {
        let settings = &self.ctx.settings;
        let cam = &settings.camera[i];
        let view = &mut self.views[i][v];
        let msg = ClassificationMsg {
            v: 1,
            device: &settings.device.id,
            camera: &cam.name,
            region: view.region_name(cam),
            seq: view.seq,
            ts: rfc3339_ms(frame.captured_at),
            model: self.ctx.models[view.model].file_name(),
            inference_ms: (c.ms * 1000.0).round() / 1000.0,
            top: c.top,
            frame: frame.number,
            file: frame.file.as_deref(),
        };
        log_classification(&view.scope, &msg, c.ms);
        let top_class = msg.top.first().map(|p| p.class);
        let due = match settings.classification.publish {
            PublishMode::Every => true,
            PublishMode::OnChange => view.last_published.is_none_or(|(c, _)| c != top_class),
            PublishMode::Interval(d) => view
                .last_published
                .is_none_or(|(_, t)| frame.captured.saturating_duration_since(t) >= d),
        };
        if !due {
            return;
        }
        view.last_published = Some((top_class, frame.captured));
        let payload = match serde_json::to_vec(&msg) {
            Ok(p) => p,
            Err(e) => {
                warn!("{}: cannot encode classification: {e}", view.scope);
                return;
            }
        };
        if settings.classification.durable
            && let Some(d) = &self.ctx.durable
        {
            // A refusal (a topic no broker takes) is logged and counted by the outbox.
            let _ = d.outbox.push(view.topic.clone(), payload);
            return;
        }
        // Never block inference on the network: a full queue drops and counts.
        if let Err(e) = self
            .ctx
            .client
            .try_publish(&view.topic, self.qos, false, payload)
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
                    "{}: classification seq {} dropped: {why}; {n} dropped so far",
                    view.scope, view.seq
                );
            }
        }
    }

    /// Detection events of view `v` of camera `i`, made into messages and written to the
    /// outbox.
    fn publish_events(&self, i: usize, v: usize, events: Vec<detect::Event>) {
        let Some(d) = &self.ctx.durable else {
            return;
        };
        let settings = &self.ctx.settings;
        let cam = &settings.camera[i];
        let view = &self.views[i][v];
        let device = &settings.device.id;
        let labels = self.ctx.models[view.model].labels();
        for e in events {
            let label = labels.get(e.class).map_or("", String::as_str);
            let msg = DetectionMsg {
                v: 1,
                id: detect::event_id(device, &view.scope, e.class, e.started_at),
                kind: e.kind,
                device,
                camera: &cam.name,
                region: view.region_name(cam),
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
                    "{}: detection {what} {label} (score {:.3}, max {:.3}, {} frames)",
                    view.scope, e.score, e.max_score, e.frames
                );
            }
            match serde_json::to_vec(&msg) {
                // A refusal (a topic no broker takes) is logged and counted by the outbox.
                Ok(p) => drop(d.outbox.push(view.detection_topic.clone(), p)),
                Err(e) => warn!("{}: cannot encode detection: {e}", view.scope),
            }
        }
    }
}

fn log_classification(scope: &str, msg: &ClassificationMsg, ms: f64) {
    let best = msg
        .top
        .first()
        .map(|p| format!("{} {:.3}", p.label, p.score))
        .unwrap_or_else(|| "(nothing above threshold)".into());
    let file = msg.file.map(|f| format!(" {f}")).unwrap_or_default();
    info!("{scope} #{} {best} ({ms:.1} ms){file}", msg.seq);
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
