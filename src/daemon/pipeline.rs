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

use crate::capture::{self, CameraCtx, Slots, V4l2Backend};
use crate::config::Settings;
use crate::daemon::notify::Notifier;
use crate::daemon::reload::{self, Loaded};
use crate::daemon::{report, watchdog};
use crate::detect::{Rules, Tracker};
use crate::infer::{self, Inference};
use crate::model::Classifier;
use crate::mqtt::commands::{self, Handles};
use crate::mqtt::outbox::{self, Outbox};
use crate::mqtt::{self, OFFLINE, Retained, discovery, start_embedded_broker};
use crate::stats::Stats;
use crate::stats::control::Control;

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
}

impl Daemon {
    pub fn new(shutdown: CancellationToken, notifier: Notifier, hup: Arc<Notify>) -> Self {
        Daemon {
            shutdown,
            notifier: Arc::new(notifier),
            hup,
            broker: None,
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

pub struct Pipeline {
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    client: AsyncClient,
    stops: Stops,
    /// Every network-side task; the drain waits for them (capped).
    tasks: TaskTracker,
    cameras: Cameras,
    inference: JoinHandle<()>,
    reload: JoinHandle<Option<Loaded>>,
}

impl Pipeline {
    /// Start every stage for `loaded`. A configuration error found only now (a detection
    /// label the model lacks, a busy broker port) fails the start before capture begins.
    pub async fn start(daemon: &mut Daemon, loaded: Loaded, first: bool) -> Result<Pipeline> {
        let settings = Arc::new(loaded.settings);
        let classifier = Arc::new(loaded.classifier);
        log_model(&classifier);
        // Label names in [detection] are checked against the model: a typo is a config error.
        let rules = match settings.detection.enabled {
            true => Some(Rules::for_model(&settings.detection, classifier.labels())?),
            false => None,
        };
        daemon.ensure_broker(&settings)?;
        let stats = Arc::new(Stats::new(settings.camera.iter().map(|c| c.name.clone())));
        let control = Arc::new(Control::new(settings.camera.len()));
        let stops = Stops {
            pipeline: daemon.shutdown.child_token(),
            network: CancellationToken::new(),
        };
        let tasks = TaskTracker::new();
        // Commands reach the server through the driver (it owns the connection); at most
        // 8 wait, more are refused with a log line.
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let commands_on = settings.commands.enabled;
        let (client, retained) = start_mqtt(
            &settings,
            &stats,
            commands_on.then_some(cmd_tx),
            &stops,
            &tasks,
        );
        let (reload_tx, reload_rx) = mpsc::channel(1);
        if commands_on {
            let handles = Handles {
                control: control.clone(),
                reload: reload_tx,
            };
            tasks.spawn(commands::serve(
                settings.clone(),
                handles,
                client.clone(),
                cmd_rx,
            ));
        }
        let reload = tokio::spawn(reload::watch(
            settings.file.clone(),
            daemon.hup.clone(),
            reload_rx,
            stops.pipeline.clone(),
        ));
        info!(
            "device {}: publishing to {}:{} under {}/",
            settings.device.id,
            settings.mqtt.host,
            settings.mqtt.port,
            settings.base_topic()
        );
        let outbox = start_outbox(&settings, &stats, &stops, &tasks, rules.is_some());
        let slots = Arc::new(Slots::new(settings.camera.len()));
        let cameras = match start_cameras(&settings, &slots, &stats, &client, &retained, &stops) {
            Ok(c) => c,
            Err(e) => {
                stops.pipeline.cancel();
                stops.network.cancel();
                return Err(e);
            }
        };
        daemon.notifier.notify(&format!(
            "READY=1\nSTATUS={} camera(s) {}, model {}",
            settings.camera.len(),
            if first { "starting" } else { "reloaded" },
            classifier.file_name()
        ));
        tasks.spawn(report::publish_stats(
            settings.clone(),
            stats.clone(),
            control.clone(),
            client.clone(),
            stops.network.clone(),
        ));
        tasks.spawn(watchdog::supervise(
            daemon.notifier.clone(),
            settings.clone(),
            stats.clone(),
            stops.network.clone(),
        ));
        let durable = outbox.map(|outbox| infer::Durable {
            trackers: match rules {
                Some(r) => vec![Tracker::new(r); settings.camera.len()],
                None => vec![],
            },
            outbox,
        });
        let ctx = infer::Context {
            classifier,
            settings: settings.clone(),
            slots,
            stats: stats.clone(),
            control,
            client: client.clone(),
            durable,
        };
        let cancel = stops.pipeline.clone();
        let inference = tokio::task::spawn_blocking(move || Inference::new(ctx).run(&cancel));
        Ok(Pipeline {
            settings,
            stats,
            client,
            stops,
            tasks,
            cameras,
            inference,
            reload,
        })
    }

    /// Wait for inference to end (cancelled, reloaded, or out of frames), then drain.
    pub async fn finish(mut self, daemon: &Daemon) -> Outcome {
        if let Err(e) = (&mut self.inference).await {
            warn!("inference thread ended abnormally: {e}");
        }
        daemon.notifier.notify("STOPPING=1\nSTATUS=draining");
        let reload = self.reload;
        let stats = Self::drain(
            self.settings,
            self.stats,
            self.client,
            self.stops,
            self.cameras,
            self.tasks,
        )
        .await;
        match reload.await {
            Ok(Some(r)) if !daemon.shutdown.is_cancelled() => Outcome::Reload(Box::new(r)),
            _ => Outcome::Stopped(stats),
        }
    }

    /// The shutdown order (ARCHITECTURE.md, "Shutdown drains in order"). Inference has
    /// finished the frame in flight and queued it when this starts.
    async fn drain(
        settings: Arc<Settings>,
        stats: Arc<Stats>,
        client: AsyncClient,
        stops: Stops,
        cameras: Cameras,
        tasks: TaskTracker,
    ) -> Arc<Stats> {
        // 1. Capture stops (and the reload watchers with it); each camera queues its final
        //    `offline` on the way out, ahead of the device's.
        stops.pipeline.cancel();
        cameras.stop().await;
        // 2. The device's retained `offline`, behind every classification already queued.
        queue_offline(&settings, &stats, &client).await;
        // 3. DISCONNECT, then the network side ends: the driver once DISCONNECT is written,
        //    the outbox once it has delivered what the broker takes within the drain time
        //    (the rest stays on disk), the reporters at once.
        let _ = client.try_disconnect();
        stops.network.cancel();
        tasks.close();
        if tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(1), tasks.wait())
            .await
            .is_err()
        {
            warn!("MQTT did not drain within {DRAIN_TIMEOUT:?}");
        }
        info!("stopped; {}", stats.summary());
        stats
    }
}

fn log_model(classifier: &Classifier) {
    let spec = classifier.input_spec();
    let t = classifier.timing();
    info!(
        "model {}: input {}x{} {:?}, {} classes, preprocess {:?}, loaded in {:.0} ms + optimised in {:.0} ms ({})",
        classifier.file_name(),
        spec.width,
        spec.height,
        spec.layout,
        classifier.labels().len(),
        spec.preprocess,
        t.load_ms,
        t.optimize_ms,
        classifier.int8_rewrites()
    );
}

/// The telemetry client and its driver; the retained messages it re-sends after every
/// connect (the cameras' state, and the discovery message when it is on).
fn start_mqtt(
    settings: &Arc<Settings>,
    stats: &Arc<Stats>,
    commands: Option<mpsc::Sender<(String, Vec<u8>)>>,
    stops: &Stops,
    tasks: &TaskTracker,
) -> (AsyncClient, Arc<Retained>) {
    let (client, eventloop) = mqtt::client(settings);
    let retained = Arc::new(Retained::default());
    if settings.homeassistant.discovery {
        retained.set(
            discovery::config_topic(settings),
            discovery::payload(settings).to_string().into_bytes(),
        );
    }
    tasks.spawn(mqtt::drive(
        eventloop,
        settings.clone(),
        stats.clone(),
        retained.clone(),
        commands,
        stops.network.clone(),
    ));
    (client, retained)
}

/// The durable outbox and its sender, when anything is durable: detection events, or
/// classifications with `classification.durable`.
fn start_outbox(
    settings: &Arc<Settings>,
    stats: &Stats,
    stops: &Stops,
    tasks: &TaskTracker,
    detection: bool,
) -> Option<Arc<Outbox>> {
    if !detection && !settings.classification.durable {
        return None;
    }
    let outbox = Arc::new(Outbox::open(&settings.outbox));
    info!(
        "detection events: outbox {}, {} waiting",
        outbox.describe(),
        outbox.depth()
    );
    let _ = stats.outbox.set(outbox.counters.clone());
    tasks.spawn(outbox::drive(
        outbox.clone(),
        settings.clone(),
        stops.network.clone(),
        DRAIN_TIMEOUT,
    ));
    Some(outbox)
}

/// Start every camera: a supervisor task per V4L2 camera, a thread per image source.
fn start_cameras(
    settings: &Arc<Settings>,
    slots: &Arc<Slots>,
    stats: &Arc<Stats>,
    client: &AsyncClient,
    retained: &Arc<Retained>,
    stops: &Stops,
) -> Result<Cameras> {
    let mut cameras = Cameras {
        threads: Vec::new(),
        supervisors: TaskTracker::new(),
    };
    let v4l2 = Arc::new(V4l2Backend);
    for (i, cam) in settings.camera.iter().enumerate() {
        let ctx = CameraCtx {
            index: i,
            settings: cam.clone(),
            slots: slots.clone(),
            stats: stats.clone(),
            status: mqtt::status_sink(
                settings.clone(),
                cam.name.clone(),
                client.clone(),
                retained.clone(),
            ),
            cancel: stops.pipeline.clone(),
        };
        match capture::Request::from_settings(cam) {
            Some(request) => {
                let (backend, slots) = (v4l2.clone(), slots.clone());
                cameras.supervisors.spawn(async move {
                    capture::supervise(backend, request, ctx).await;
                    slots.source_finished();
                });
            }
            None => {
                let thread = capture::images::spawn_images(ctx)
                    .with_context(|| format!("starting capture thread for camera {}", cam.name))?;
                cameras.threads.push(thread);
            }
        }
    }
    cameras.supervisors.close();
    Ok(cameras)
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
