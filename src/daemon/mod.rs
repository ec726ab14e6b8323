//! The daemon: the only module that wires the stages together.
//!
//! * [`run`] (and its variants) is the daemon's whole life: load the models, then run
//!   pipelines until shutdown, one after another across reloads.
//! * [`pipeline`]: one pipeline's start-up and its drain, in the documented order.
//! * [`reload`]: a new configuration and model, validated before anything stops.
//! * [`notify`], [`watchdog`]: systemd's notify protocol, STATUS lines, the progress-gated
//!   watchdog.
//! * [`report`]: the stats message.
//!
//! May use every module below it. It takes its shutdown trigger as a parameter, so tests
//! (and `main`, which wires it to SIGTERM/SIGINT) decide when it stops.

pub mod notify;
pub mod pipeline;
pub mod reload;
pub mod report;
pub mod watchdog;

pub use pipeline::{DRAIN_TIMEOUT, Daemon};
pub use reload::{Models, load_models};

use std::sync::Arc;

use anyhow::Result;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Settings;
use crate::daemon::notify::Notifier;
use crate::daemon::pipeline::{Outcome, Pipeline};
use crate::daemon::reload::Loaded;
use crate::stats::Stats;

/// Run the daemon until `shutdown` is cancelled or every source has ended (image sources
/// with `loop = false`). Returns the counters of the last pipeline.
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
    // Load the models first: a bad one must fail start-up before anything is announced.
    let models = load_models(&settings)?;
    let mut daemon = Daemon::new(shutdown, notifier, reload);
    let mut next = Loaded { settings, models };
    let mut first = true;
    loop {
        let pipeline = Pipeline::start(&mut daemon, next, first).await?;
        match pipeline.finish(&daemon).await {
            Outcome::Stopped(stats) => return Ok(stats),
            Outcome::Reload(loaded) => {
                daemon.notify("RELOADING=1\nSTATUS=reloading");
                info!("reloading: configuration and model validated; restarting the pipeline");
                next = *loaded;
                first = false;
            }
        }
    }
}
