//! One life of the pipeline: from a loaded model to a drained shutdown.
//!
//! [`Pipeline::start`] wires the stages (MQTT driver, command server, reload watch,
//! outbox sender, cameras, stats reporter, watchdog, inference); [`Pipeline::finish`]
//! waits for inference to end (the daemon's shutdown, a reload, or the images running out)
//! and drains in the order ARCHITECTURE.md promises ([`Pipeline::drain`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::capture::{self, CameraCtx, Slots, StreamBackend, StreamRequest, V4l2Backend};
use crate::config::Settings;
use crate::daemon::notify::Notifier;
use crate::daemon::reload::{self, Loaded, Models};
use crate::daemon::{report, watchdog};
use crate::detect::Rules;
use crate::infer::{self, Inference};
use crate::keep::Folder;
use crate::metrics;
use crate::model::Classifier;
use crate::mqtt::commands::{self, Handles};
use crate::mqtt::outbox::{self, Outbox};
use crate::mqtt::{self, OFFLINE, Retained, StatusOut, discovery, start_embedded_broker};
use crate::stats::KeepCounters;
use crate::stats::Stats;
use crate::stats::control::Control;
use crate::stats::switches::Switches;

/// How long shutdown waits for the broker to take the last messages and `offline`.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What outlives one pipeline: the shutdown trigger, systemd's socket, the SIGHUP
/// notifier, and the embedded broker (rumqttd cannot be stopped).
pub struct Daemon {
    shutdown: CancellationToken,
    notifier: Arc<Notifier>,
    hup: Arc<Notify>,
    /// Where the embedded broker listens, once started.
    broker: Option<(String, u16)>,
    /// `/metrics`: where it listens, once started, and the pipeline it reads.
    metrics: Option<std::net::SocketAddr>,
    metrics_current: Arc<metrics::Current>,
    /// The outbox outlives a pipeline: a reload hands it to the next one (same
    /// directory) once the old sender has stopped, so two senders never share records
    /// and the directory lock is never contended by ourselves.
    outbox: Option<HeldOutbox>,
}

/// The open outbox and the task sending from it.
struct HeldOutbox {
    outbox: Arc<Outbox>,
    sender: JoinHandle<()>,
}

/// How long a new pipeline waits for the previous outbox sender (which had its own
/// drain) before it aborts it: abortion loses nothing, records leave only on a PUBACK.
const SENDER_HANDOVER: Duration = Duration::from_secs(2);

impl Daemon {
    pub fn new(shutdown: CancellationToken, notifier: Notifier, hup: Arc<Notify>) -> Self {
        Daemon {
            shutdown,
            notifier: Arc::new(notifier),
            hup,
            broker: None,
            metrics: None,
            metrics_current: Arc::default(),
            outbox: None,
        }
    }

    pub fn notify(&self, msg: &str) {
        self.notifier.notify(msg);
    }

    /// Start the embedded broker if the settings want one where none runs yet. After a
    /// reload that moves it, the old one keeps serving where it was started.
    fn ensure_broker(&mut self, settings: &Settings) -> Result<()> {
        let here = (settings.mqtt.host.clone(), settings.mqtt.port);
        if settings.mqtt.embedded_broker && self.broker.as_ref() != Some(&here) {
            start_embedded_broker(&here.0, here.1)?;
            self.broker = Some(here);
        }
        Ok(())
    }

    /// Start `/metrics` if the settings want it where it does not run yet. Like the
    /// embedded broker, a listener a reload moves keeps serving where it was started.
    async fn ensure_metrics(&mut self, settings: &Settings) -> Result<()> {
        let Some(listen) = settings.metrics.listen else {
            return Ok(());
        };
        match self.metrics {
            Some(at) if at != listen => {
                warn!("metrics.listen: {listen} takes effect after a restart; serving on {at}")
            }
            Some(_) => {}
            None => {
                let listener = metrics::bind(listen)
                    .await
                    .map_err(|e| settings.error_at("metrics.listen", format!("{e:#}")))?;
                tokio::spawn(metrics::serve(
                    listener,
                    self.metrics_current.clone(),
                    self.shutdown.clone(),
                ));
                self.metrics = Some(listen);
            }
        }
        Ok(())
    }
}

/// How a pipeline ended.
pub enum Outcome {
    Stopped(Arc<Stats>),
    /// A reload (SIGHUP or the command) brought a validated configuration and its model.
    Reload(Box<Loaded>),
}

/// The cancellation points of one pipeline, in the order the drain fires them.
struct Stops {
    /// Ends this pipeline: capture, inference, the command and reload watchers. A child
    /// of the daemon's shutdown; a validated reload cancels it too.
    pipeline: CancellationToken,
    /// After DISCONNECT is queued: the MQTT driver, the outbox sender (which then has
    /// `DRAIN_TIMEOUT` to deliver what is left), the stats reporter and the watchdog.
    network: CancellationToken,
}

/// The capture side: image threads and V4L2 supervisors.
struct Cameras {
    threads: Vec<std::thread::JoinHandle<()>>,
    supervisors: TaskTracker,
}

/// What every stage of one pipeline is wired with: the settings, the counters and the
/// control mailbox, the telemetry client, the stop tokens and the network-side tasks.
struct Wiring {
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    control: Arc<Control>,
    client: AsyncClient,
    stops: Stops,
    /// Every network-side task; the drain waits for them (capped).
    tasks: TaskTracker,
}

pub struct Pipeline {
    w: Wiring,
    cameras: Cameras,
    inference: InferenceThread,
    reload: JoinHandle<Option<Loaded>>,
}

/// The inference stage runs on a thread of its own named `inference` (a name `top -H`,
/// gdb and the watchdog test find). Not a `spawn_blocking` task: a wedged one would hold
/// the runtime's shutdown, and so the process, forever.
struct InferenceThread {
    /// Resolves when the thread ends (its sender is dropped with the thread's closure).
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Pipeline {
    /// Start every stage for `loaded`. A configuration error found only now (a detection
    /// label the model lacks, a busy broker port) fails the start before capture begins.
    pub async fn start(daemon: &mut Daemon, loaded: Loaded, first: bool) -> Result<Pipeline> {
        let settings = Arc::new(loaded.settings);
        let models = loaded.models;
        for m in models.iter() {
            log_model(&m.settings.name, &m.classifier);
        }
        // Label names in [detection] are checked against the models: a typo is a config
        // error.
        let rules = match settings.detection.enabled {
            true => {
                let labels: Vec<&[String]> = models.iter().map(|m| m.classifier.labels()).collect();
                Some(Rules::for_models(&settings, &labels)?)
            }
            false => None,
        };
        // Before anything connects: a second daemon on this outbox must not announce itself.
        let outbox = open_outbox(&settings, &mut daemon.outbox).await?;
        daemon.ensure_broker(&settings)?;
        daemon.ensure_metrics(&settings).await?;
        let (client, eventloop) = mqtt::client(&settings);
        let w = Wiring {
            stats: Arc::new(Stats::for_settings(&settings)),
            control: Arc::new(Control::with_switches(
                settings.camera.len(),
                load_switches(&settings),
            )),
            stops: Stops {
                pipeline: daemon.shutdown.child_token(),
                network: CancellationToken::new(),
            },
            tasks: TaskTracker::new(),
            settings,
            client,
        };
        daemon.metrics_current.set(w.stats.clone());
        let (retained, commands) = w.start_mqtt(eventloop);
        let status = Arc::new(StatusOut {
            settings: w.settings.clone(),
            client: w.client.clone(),
            retained,
            control: w.control.clone(),
        });
        let reload = w.start_control(daemon, commands, &models, status.clone());
        let s = &w.settings;
        info!(
            "device {}: publishing to {}:{} under {}/",
            s.device.id,
            s.mqtt.host,
            s.mqtt.port,
            s.base_topic()
        );
        let outbox = outbox.map(|ob| w.send_from(ob, &mut daemon.outbox));
        let slots = Arc::new(Slots::new(s.camera.len()));
        let cameras = w.start_cameras(&slots, &status).inspect_err(|_| {
            w.stops.pipeline.cancel();
            w.stops.network.cancel();
        })?;
        let files: Vec<&str> = models.iter().map(|m| m.classifier.file_name()).collect();
        daemon.notifier.notify(&format!(
            "READY=1\nSTATUS={} camera(s) {}, model {}",
            s.camera.len(),
            if first { "starting" } else { "reloaded" },
            files.join(", ")
        ));
        w.start_reporters(daemon);
        let inference = w
            .start_inference(models.classifiers(), slots, outbox, rules)
            .inspect_err(|_| {
                w.stops.pipeline.cancel();
                w.stops.network.cancel();
            })?;
        Ok(Pipeline {
            w,
            cameras,
            inference,
            reload,
        })
    }

    /// Wait for inference to end (cancelled, reloaded, or out of frames), then drain.
    pub async fn finish(mut self, daemon: &Daemon) -> Outcome {
        self.inference.ended(&self.w.stops.pipeline).await;
        daemon.notifier.notify("STOPPING=1\nSTATUS=draining");
        let stats = self.w.drain(self.cameras).await;
        match self.reload.await {
            Ok(Some(r)) if !daemon.shutdown.is_cancelled() => Outcome::Reload(Box::new(r)),
            _ => Outcome::Stopped(stats),
        }
    }
}

impl Wiring {
    /// The telemetry connection's driver. Returns the retained messages it re-sends after
    /// every connect (the cameras' state, and the discovery message when it is on), and
    /// the commands it takes in when commands are on.
    fn start_mqtt(&self, eventloop: rumqttc::EventLoop) -> (Arc<Retained>, Option<CommandRx>) {
        let s = &self.settings;
        let retained = Arc::new(Retained::default());
        if s.homeassistant.discovery {
            retained.set(
                discovery::config_topic(s),
                discovery::payload(s).to_string().into_bytes(),
            );
        }
        // Commands reach the server through the driver (it owns the connection); at most
        // 8 wait, more are refused with a log line.
        let (tx, rx) = mpsc::channel(8);
        let on = s.commands.enabled;
        self.tasks.spawn(mqtt::drive(
            eventloop,
            s.clone(),
            self.stats.clone(),
            retained.clone(),
            on.then_some(tx),
            self.stops.network.clone(),
        ));
        (retained, on.then_some(rx))
    }

    /// The command server (when commands are on) and the reload watch (SIGHUP and the
    /// `reload` command); the watch's result is the next pipeline's configuration.
    fn start_control(
        &self,
        daemon: &Daemon,
        commands: Option<CommandRx>,
        models: &Models,
        status: Arc<StatusOut>,
    ) -> JoinHandle<Option<Loaded>> {
        let (reload_tx, reload_rx) = mpsc::channel(1);
        if let Some(rx) = commands {
            let labels = models.iter().map(|m| m.classifier.labels().to_vec());
            let handles = Handles {
                control: self.control.clone(),
                reload: reload_tx,
                status,
                labels: labels.collect(),
            };
            self.tasks.spawn(commands::serve(
                self.settings.clone(),
                handles,
                self.client.clone(),
                rx,
            ));
        }
        tokio::spawn(reload::watch(
            self.settings.clone(),
            models.clone(),
            daemon.hup.clone(),
            reload_rx,
            self.stops.pipeline.clone(),
        ))
    }

    /// Start the sender of `outbox` on this pipeline's network side; `held` keeps both
    /// for the next pipeline.
    fn send_from(&self, outbox: Arc<Outbox>, held: &mut Option<HeldOutbox>) -> Arc<Outbox> {
        info!(
            "detection events: outbox {}, {} waiting",
            outbox.describe(),
            outbox.depth()
        );
        let _ = self.stats.outbox.set(outbox.counters.clone());
        let sender = self.tasks.spawn(outbox::drive(
            outbox.clone(),
            self.settings.clone(),
            self.stops.network.clone(),
            DRAIN_TIMEOUT,
        ));
        *held = Some(HeldOutbox {
            outbox: outbox.clone(),
            sender,
        });
        outbox
    }

    /// Start every camera: a supervisor task per V4L2 or stream camera, a thread per image
    /// source.
    fn start_cameras(&self, slots: &Arc<Slots>, status: &Arc<StatusOut>) -> Result<Cameras> {
        let mut cameras = Cameras {
            threads: Vec::new(),
            supervisors: TaskTracker::new(),
        };
        let v4l2 = Arc::new(V4l2Backend);
        let streams = Arc::new(StreamBackend);
        for (i, cam) in self.settings.camera.iter().enumerate() {
            let status = mqtt::status_sink(status.clone(), i);
            let ctx = CameraCtx {
                index: i,
                settings: cam.clone(),
                slots: slots.clone(),
                stats: self.stats.clone(),
                status,
                cancel: self.stops.pipeline.clone(),
            };
            let slots = slots.clone();
            if let Some(request) = capture::Request::from_settings(cam) {
                let backend = v4l2.clone();
                cameras.supervisors.spawn(async move {
                    capture::supervise(backend, request, ctx).await;
                    slots.source_finished();
                });
            } else if let Some(request) = StreamRequest::from_settings(cam) {
                let backend = streams.clone();
                cameras.supervisors.spawn(async move {
                    capture::supervise(backend, request, ctx).await;
                    slots.source_finished();
                });
            } else {
                let thread = capture::images::spawn_images(ctx)
                    .with_context(|| format!("starting capture thread for camera {}", cam.name))?;
                cameras.threads.push(thread);
            }
        }
        cameras.supervisors.close();
        Ok(cameras)
    }

    /// The stats reporter and the watchdog: both stop with the network side.
    fn start_reporters(&self, daemon: &Daemon) {
        self.tasks.spawn(report::publish_stats(
            self.settings.clone(),
            self.stats.clone(),
            self.control.clone(),
            self.client.clone(),
            self.stops.network.clone(),
        ));
        self.tasks.spawn(watchdog::supervise(
            daemon.notifier.clone(),
            self.settings.clone(),
            self.stats.clone(),
            self.stops.network.clone(),
        ));
    }

    /// The inference stage, on a blocking thread of its own.
    fn start_inference(
        &self,
        models: Vec<Arc<Classifier>>,
        slots: Arc<Slots>,
        outbox: Option<Arc<Outbox>>,
        rules: Option<Vec<Rules>>,
    ) -> Result<InferenceThread> {
        let durable = outbox.map(|outbox| infer::Durable { rules, outbox });
        let ctx = infer::Context {
            folders: self.open_folders(),
            models,
            settings: self.settings.clone(),
            slots,
            stats: self.stats.clone(),
            control: self.control.clone(),
            client: self.client.clone(),
            durable,
        };
        let cancel = self.stops.pipeline.clone();
        let (tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                let _ended = tx;
                Inference::new(ctx).run(&cancel)
            })
            .context("starting the inference thread")?;
        Ok(InferenceThread { done })
    }

    /// The folders for event snapshots and hard examples, when a camera or region saves
    /// into them; one that cannot be opened is logged and that kind is not saved (the
    /// cameras go on).
    fn open_folders(&self) -> infer::keep::Folders {
        let s = &self.settings;
        let views = s.camera.iter().flat_map(|c| {
            let whole = c
                .regions
                .is_empty()
                .then_some((c.snapshots, c.hard_examples));
            let regions = c.regions.iter().map(|r| (r.snapshots, r.hard_examples));
            whole.into_iter().chain(regions).collect::<Vec<_>>()
        });
        let (mut snapshots, mut hard) = (false, false);
        for (snap, h) in views {
            snapshots |= snap.saves();
            hard |= h;
        }
        let open = |wanted: bool,
                    name: &str,
                    files: usize,
                    bytes: u64,
                    stats: &std::sync::OnceLock<Arc<KeepCounters>>| {
            if !wanted {
                return None;
            }
            let dir = s.device.state_dir.join(name);
            let counters = stats.get_or_init(Arc::default).clone();
            match Folder::open(&dir, files, bytes, counters) {
                Ok(f) => {
                    let (n, b) = f.len();
                    info!("{name}: {} ({n} kept, {b} bytes)", dir.display());
                    Some(f)
                }
                Err(e) => {
                    warn!(
                        "{name}: cannot open {}: {e}; none will be saved",
                        dir.display()
                    );
                    None
                }
            }
        };
        let (sn, he) = (&s.snapshots, &s.hard_examples);
        infer::keep::Folders {
            snapshots: open(
                snapshots,
                "snapshots",
                sn.max_files,
                sn.max_bytes,
                &self.stats.snapshots,
            ),
            hard_examples: open(
                hard,
                "hard-examples",
                he.max_files,
                he.max_bytes,
                &self.stats.hard_examples,
            ),
        }
    }

    /// The shutdown order (ARCHITECTURE.md, "Shutdown drains in order"). Inference has
    /// finished the frame in flight and queued it when this starts.
    async fn drain(self, cameras: Cameras) -> Arc<Stats> {
        // 1. Capture stops (and the reload watchers with it); each camera queues its final
        //    `offline` on the way out, ahead of the device's.
        self.stops.pipeline.cancel();
        cameras.stop().await;
        // 2. The device's retained `offline`, behind every classification already queued.
        queue_offline(&self.settings, &self.stats, &self.client).await;
        // 3. DISCONNECT, then the network side ends: the driver once DISCONNECT is written,
        //    the outbox once it has delivered what the broker takes within the drain time
        //    (the rest stays on disk), the reporters at once.
        let _ = self.client.try_disconnect();
        self.stops.network.cancel();
        self.tasks.close();
        let all = DRAIN_TIMEOUT + Duration::from_secs(1);
        if tokio::time::timeout(all, self.tasks.wait()).await.is_err() {
            warn!("MQTT did not drain within {DRAIN_TIMEOUT:?}");
        }
        info!("stopped; {}", self.stats.summary());
        self.stats
    }
}

/// The durable outbox (its sender starts with the network side): detection events, or
/// classifications with `classification.durable`. The previous pipeline's outbox is
/// taken over when it names the same directory; a directory another process holds is
/// a configuration error.
async fn open_outbox(s: &Settings, held: &mut Option<HeldOutbox>) -> Result<Option<Arc<Outbox>>> {
    if let Some(previous) = held.take() {
        let ob = previous.stop().await;
        if ob.dir() == s.outbox.dir && s.uses_outbox() {
            ob.retune(&s.outbox);
            return Ok(Some(ob));
        }
        if ob.depth() > 0 {
            warn!(
                "outbox: {} undelivered record(s) stay in {} until a run uses it again",
                ob.depth(),
                ob.dir().display()
            );
        }
        // Dropped here: its directory is released.
    }
    if !s.uses_outbox() {
        return Ok(None);
    }
    let ob = Outbox::open(&s.outbox).map_err(|e| s.error_at("outbox.dir", e))?;
    Ok(Some(Arc::new(ob)))
}

/// The switches commands set in an earlier run (`<device.state_dir>/switches.json`). A file
/// that cannot be read is set aside as `switches.json.bad` (for a person to look at) and
/// the run starts with everything on: a damaged state file must not stop the cameras.
fn load_switches(s: &Settings) -> Switches {
    let path = Switches::path(&s.device.state_dir);
    match Switches::load(&path) {
        Ok(sw) => {
            if !sw.cameras.is_empty() {
                info!("switches from {}: {}", path.display(), summary(&sw));
            }
            sw
        }
        Err(e) => {
            let aside = path.with_extension("json.bad");
            let moved = std::fs::rename(&path, &aside).map(|()| aside.display().to_string());
            warn!(
                "{e}; every region and label starts on (the file: {})",
                moved.unwrap_or_else(|e| format!("left in place: {e}"))
            );
            Switches::new()
        }
    }
}

/// "yard/gate: detection off; yard/feeder: person off in classification" for the log.
fn summary(sw: &Switches) -> String {
    let what = |w: &crate::stats::switches::What| match (w.classification, w.detection) {
        (true, true) => "off",
        (true, false) => "classification off",
        (false, true) => "detection off",
        (false, false) => "on",
    };
    let mut parts = Vec::new();
    for (camera, views) in &sw.cameras {
        for (view, off) in views {
            if !off.view.is_on() {
                parts.push(format!("{camera}/{view}: {}", what(&off.view)));
            }
            for (label, w) in &off.labels {
                parts.push(format!("{camera}/{view}: {label} {}", what(w)));
            }
        }
    }
    parts.join("; ")
}

/// Commands from the driver to the command server: (verb, payload).
type CommandRx = mpsc::Receiver<(String, Vec<u8>)>;

fn log_model(name: &str, classifier: &Classifier) {
    let spec = classifier.input_spec();
    let t = classifier.timing();
    info!(
        "model {name} ({}): input {}x{} {:?}, {} classes, preprocess {}, resize {:?}, loaded in {:.0} ms + optimised in {:.0} ms ({})",
        classifier.file_name(),
        spec.width,
        spec.height,
        spec.layout,
        classifier.labels().len(),
        spec.normalization,
        spec.resize,
        t.load_ms,
        t.optimize_ms,
        classifier.int8_rewrites()
    );
    if let Some(note) = classifier.change_axes().note() {
        warn!("model {}: {note}", classifier.file_name());
    }
}

impl HeldOutbox {
    /// Make sure the sender has stopped (its pipeline drained it already), then hand the
    /// outbox on. An outbox no longer wanted, or for another directory, is dropped by the
    /// caller, which releases its directory; what it holds stays there for a later run.
    async fn stop(mut self) -> Arc<Outbox> {
        if tokio::time::timeout(SENDER_HANDOVER, &mut self.sender)
            .await
            .is_err()
        {
            warn!("outbox sender still running after the drain; stopped it");
            self.sender.abort();
            let _ = self.sender.await;
        }
        self.outbox
    }
}

impl InferenceThread {
    /// Until the thread ends by itself (its sources ran out), or, once the pipeline is
    /// stopped, for at most [`DRAIN_TIMEOUT`] while it finishes the frame in flight. A
    /// thread wedged past that is left behind (the process exit ends it): the drain must
    /// still publish `offline` and close the connection.
    async fn ended(&mut self, stop: &CancellationToken) {
        tokio::select! {
            _ = &mut self.done => return,
            _ = stop.cancelled() => {}
        }
        if tokio::time::timeout(DRAIN_TIMEOUT, &mut self.done)
            .await
            .is_err()
        {
            warn!("inference still busy {DRAIN_TIMEOUT:?} after the stop; draining without it");
        }
    }
}

impl Cameras {
    /// Wait for every source to stop (they are cancelled already). Supervisors return at
    /// once on cancel: a reader stuck in the driver is abandoned, not waited on.
    async fn stop(self) {
        for h in self.threads {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        self.supervisors.wait().await;
    }
}

/// Queue the device's retained `offline`. Without a connection there is nobody to tell
/// (the broker never saw our `online`, or will publish the last will), so do not wait for
/// queue space that will not come.
async fn queue_offline(settings: &Settings, stats: &Stats, client: &AsyncClient) {
    let avail = mqtt::availability_topic(settings);
    let qos1 = QoS::AtLeastOnce;
    if !stats.connected.load(std::sync::atomic::Ordering::Relaxed) {
        let _ = client.try_publish(avail, qos1, true, OFFLINE);
        return;
    }
    match tokio::time::timeout(DRAIN_TIMEOUT, client.publish(avail, qos1, true, OFFLINE)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("cannot queue offline message: {e}"),
        Err(_) => warn!("MQTT queue still full after {DRAIN_TIMEOUT:?}; offline not queued"),
    }
}
