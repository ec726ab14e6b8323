//! edgesight: camera frames -> ONNX ResNet (tract) -> MQTT.
//!
//! [`run`] is the daemon. It takes its shutdown trigger as a parameter so tests (and
//! `main`, which wires it to SIGTERM/SIGINT) decide when it stops. See ARCHITECTURE.md.

pub mod bench;
pub mod capture;
pub mod commands;
pub mod detect;
pub mod discovery;
pub mod frame;
pub mod int8;
pub mod model;
pub mod mqtt;
pub mod notify;
pub mod onnx_quant;
pub mod outbox;
pub mod pipeline;
pub mod preprocess;
pub mod qconv;
pub mod report;
pub mod settings;
pub mod source;
pub mod stats;
pub mod supervise;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::model::Classifier;
use crate::notify::Notifier;
use crate::pipeline::Slots;
use crate::settings::{ConfigError, Settings};
use crate::stats::Stats;

/// How long shutdown waits for the broker to take the last messages and `offline`.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Load the configured model, or a configuration error naming `model.path`: a model that
/// does not load will not load after a restart either.
pub fn load_model(settings: &Settings) -> Result<Classifier> {
    Classifier::load(&settings.model)
        .map_err(|e| anyhow::Error::new(ConfigError::new(format!("model.path: {e:#}"))))
}

/// Run the daemon until `shutdown` is cancelled or every source has ended (image sources
/// with `loop = false`). Returns the counters of the run.
///
/// Shutdown order: capture stops, the frame in flight is finished and published, the
/// retained `offline` is published, and the MQTT connection is closed cleanly.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<Arc<Stats>> {
    run_with_notifier(settings, shutdown, Notifier::from_env()).await
}

/// [`run`], reporting to systemd through `notifier` (READY=1 once the model is loaded and
/// capture started, STATUS lines, the watchdog while the pipeline makes progress,
/// STOPPING=1 when the drain begins).
pub async fn run_with_notifier(
    settings: Settings,
    shutdown: CancellationToken,
    notifier: Notifier,
) -> Result<Arc<Stats>> {
    run_with(settings, shutdown, notifier, Arc::new(Notify::new())).await
}

/// [`run_with_notifier`], reloading the configuration and model whenever `reload` is
/// notified (`main` wires it to SIGHUP, systemd's `ExecReload`). A configuration or model
/// that does not load is logged and the running one kept.
pub async fn run_with(
    settings: Settings,
    shutdown: CancellationToken,
    notifier: Notifier,
    reload: Arc<Notify>,
) -> Result<Arc<Stats>> {
    let notifier = Arc::new(notifier);
    // Load the model first: a bad model must fail start-up before anything is announced.
    let classifier = load_model(&settings)?;
    let mut next = (settings, classifier);
    let mut broker = None;
    let mut first = true;
    loop {
        let (settings, classifier) = next;
        match run_pipeline(
            settings,
            classifier,
            &shutdown,
            &notifier,
            &reload,
            &mut broker,
            first,
        )
        .await?
        {
            Outcome::Stopped(stats) => return Ok(stats),
            Outcome::Reload(r) => {
                notifier.notify("RELOADING=1\nSTATUS=reloading");
                info!("reloading: configuration and model validated; restarting the pipeline");
                next = (r.0, r.1);
                first = false;
            }
        }
    }
}

enum Outcome {
    Stopped(Arc<Stats>),
    /// A `reload` command brought a validated configuration and its model.
    Reload(commands::Reload),
}

/// One life of the pipeline: from a loaded model to a drained shutdown, which `shutdown`
/// or a `reload` command starts.
async fn run_pipeline(
    settings: Settings,
    classifier: Classifier,
    outer: &CancellationToken,
    notifier: &Arc<Notifier>,
    hup: &Arc<Notify>,
    broker: &mut Option<(String, u16)>,
    first: bool,
) -> Result<Outcome> {
    let settings = Arc::new(settings);
    let classifier = Arc::new(classifier);
    // A reload ends this pipeline without ending the process.
    let shutdown = &outer.child_token();
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
    // Label names in [detection] are checked against the model: a typo is a config error.
    let rules = if settings.detection.enabled {
        Some(
            settings
                .detection
                .rules(classifier.labels())
                .map_err(anyhow::Error::new)?,
        )
    } else {
        None
    };
    let here = (settings.mqtt.host.clone(), settings.mqtt.port);
    if settings.mqtt.embedded_broker && broker.as_ref() != Some(&here) {
        // rumqttd cannot be stopped: after a reload it keeps serving where it was started.
        mqtt::start_embedded_broker(&here.0, here.1)?;
        *broker = Some(here);
    }

    let stats = Arc::new(Stats::new(settings.camera.iter().map(|c| c.name.clone())));
    let tracker = TaskTracker::new();
    let (client, eventloop) = mqtt::client(&settings);
    let net_stop = CancellationToken::new();
    let retained = Arc::new(mqtt::Retained::default());
    if settings.homeassistant.discovery {
        // Retained and re-sent after every connect, like the cameras' state.
        retained.set(
            discovery::config_topic(&settings),
            discovery::payload(&settings).to_string().into_bytes(),
        );
    }
    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::channel(8);
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<commands::Reload>(1);
    tracker.spawn(mqtt::drive(
        eventloop,
        settings.clone(),
        stats.clone(),
        retained.clone(),
        settings.commands.enabled.then_some(cmd_tx),
        net_stop.clone(),
    ));
    if settings.commands.enabled {
        tracker.spawn(commands::serve(
            settings.clone(),
            stats.clone(),
            client.clone(),
            cmd_rx,
            reload_tx.clone(),
        ));
    }
    // SIGHUP: the same reload as the command, rejected the same way.
    {
        let (hup, file, stop) = (hup.clone(), settings.file.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = hup.notified() => {}
                    _ = stop.cancelled() => return,
                }
                match commands::prepare_reload(file.clone()).await {
                    Ok(r) => {
                        let _ = reload_tx.send(r).await;
                        return;
                    }
                    Err(e) => warn!("reload rejected: {e}"),
                }
            }
        });
    }
    let reload = {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let r = tokio::select! {
                r = reload_rx.recv() => r,
                _ = stop.cancelled() => None,
            };
            if r.is_some() {
                stop.cancel();
            }
            r
        })
    };
    info!(
        "device {}: publishing to {}:{} under {}/",
        settings.device.id,
        settings.mqtt.host,
        settings.mqtt.port,
        settings.base_topic()
    );

    // Detection events: written to the outbox before they are sent, on a connection of
    // their own (see outbox.rs).
    let outbox_stop = CancellationToken::new();
    if rules.is_some() || settings.classification.durable {
        let outbox = Arc::new(outbox::Outbox::open(&settings.outbox));
        info!(
            "detection events: outbox {}, {} waiting",
            outbox.describe(),
            outbox.depth()
        );
        let _ = stats.outbox.set(outbox.clone());
        tracker.spawn(outbox::drive(
            outbox,
            settings.clone(),
            outbox_stop.clone(),
            DRAIN_TIMEOUT,
        ));
    }

    let slots = Arc::new(Slots::new(settings.camera.len()));
    let capture_stop = shutdown.child_token();
    let mut image_threads = Vec::new();
    let cameras = TaskTracker::new();
    let v4l2 = Arc::new(capture::V4l2Backend);
    for (i, cam) in settings.camera.iter().enumerate() {
        let status = mqtt::status_sink(
            settings.clone(),
            cam.name.clone(),
            client.clone(),
            retained.clone(),
        );
        match capture::Request::from_settings(cam) {
            Some(request) => {
                let ctx = capture::CameraCtx {
                    index: i,
                    settings: cam.clone(),
                    slots: slots.clone(),
                    stats: stats.clone(),
                    status,
                    cancel: capture_stop.clone(),
                };
                let (backend, slots) = (v4l2.clone(), slots.clone());
                cameras.spawn(async move {
                    capture::supervise(backend, request, ctx).await;
                    slots.source_finished();
                });
            }
            None => {
                let spawned = source::spawn_images(
                    i,
                    cam.clone(),
                    slots.clone(),
                    stats.clone(),
                    status,
                    capture_stop.clone(),
                );
                match spawned {
                    Ok(h) => image_threads.push(h),
                    Err(e) => {
                        // Stop the cameras already started before giving up.
                        capture_stop.cancel();
                        return Err(anyhow::Error::new(e)
                            .context(format!("starting capture thread for camera {}", cam.name)));
                    }
                }
            }
        }
    }
    cameras.close();

    notifier.notify(&format!(
        "READY=1\nSTATUS={} camera(s) {}, model {}",
        settings.camera.len(),
        if first { "starting" } else { "reloaded" },
        classifier.file_name()
    ));
    let supervisor_stop = CancellationToken::new();
    tracker.spawn(report::publish_stats(
        settings.clone(),
        stats.clone(),
        client.clone(),
        supervisor_stop.clone(),
    ));
    tracker.spawn(supervise::supervise(
        notifier.clone(),
        settings.clone(),
        stats.clone(),
        supervisor_stop.clone(),
    ));

    let infer = {
        let (classifier, settings, slots, stats, client, cancel) = (
            classifier.clone(),
            settings.clone(),
            slots.clone(),
            stats.clone(),
            client.clone(),
            shutdown.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let durable = stats.outbox.get().map(|outbox| pipeline::Durable {
                trackers: match rules {
                    Some(r) => vec![detect::Tracker::new(r); settings.camera.len()],
                    None => vec![],
                },
                outbox,
                labels: classifier.labels(),
            });
            pipeline::inference_loop(
                &classifier,
                &settings,
                &slots,
                &stats,
                &client,
                durable,
                &cancel,
            )
        })
    };
    if let Err(e) = infer.await {
        warn!("inference thread ended abnormally: {e}");
    }
    // Inference is done (cancelled or out of frames): end everything tied to this pipeline
    // (capture, the reload watchers) so the drain below waits only for the network.
    notifier.notify("STOPPING=1\nSTATUS=draining");
    shutdown.cancel();
    for h in image_threads {
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    }
    // Supervisors return at once on cancel (a reader stuck in the driver is abandoned);
    // each has queued its camera's final `offline` by then, ahead of the device's.
    cameras.wait().await;

    // Flush: `offline` queues behind every classification already handed to the client.
    // Without a connection there is nobody to tell (the broker never saw our `online`, or
    // will publish the last will), so do not wait for queue space that will not come.
    let avail = mqtt::availability_topic(&settings);
    let qos1 = rumqttc::QoS::AtLeastOnce;
    if stats.connected.load(Ordering::Relaxed) {
        match tokio::time::timeout(
            DRAIN_TIMEOUT,
            client.publish(avail, qos1, true, mqtt::OFFLINE),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("cannot queue offline message: {e}"),
            Err(_) => warn!("MQTT queue still full after {DRAIN_TIMEOUT:?}; offline not queued"),
        }
    } else {
        let _ = client.try_publish(avail, qos1, true, mqtt::OFFLINE);
    }
    let _ = client.try_disconnect();
    net_stop.cancel();
    // Every detection event, including the ends of open detections, is in the outbox by
    // now: deliver what the broker will take within the drain time; the rest stays on disk.
    outbox_stop.cancel();
    supervisor_stop.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(1), tracker.wait())
        .await
        .is_err()
    {
        warn!("MQTT did not drain within {DRAIN_TIMEOUT:?}");
    }
    info!("stopped; {}", stats.summary());
    let outer_stop = outer.is_cancelled();
    match reload.await {
        Ok(Some(r)) if !outer_stop => Ok(Outcome::Reload(r)),
        _ => Ok(Outcome::Stopped(stats)),
    }
}
