//! Reloading: the configuration file (with its drop-ins and the environment) read again
//! and its model loaded, checking everything start-up checks, *before* the running
//! pipeline is touched. Asked for by SIGHUP (systemd's `ExecReload`) or the `reload`
//! command; a rejected one is logged (and replied to) and the running one kept.

use std::sync::Arc;

use anyhow::Result;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{ConfigError, Settings};
use crate::detect::Rules;
use crate::model::Classifier;
use crate::mqtt::commands::{CommandError, ReloadRequest};
use crate::mqtt::outbox;

/// Load the configured model, or a configuration error naming `model.path`: a model that
/// does not load will not load after a restart either.
pub fn load_model(settings: &Settings) -> Result<Classifier> {
    Classifier::load(&settings.model)
        .map_err(|e| anyhow::Error::new(settings.error_at("model.path", format!("{e:#}"))))
}

/// A validated configuration and its loaded model: what a pipeline starts from.
pub struct Loaded {
    pub settings: Settings,
    pub classifier: Classifier,
}

/// Why a reload was rejected (the running configuration is kept).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}; the running configuration is kept")]
    Config(#[from] ConfigError),
    #[error("{0:#}; the running configuration is kept")]
    Model(anyhow::Error),
    #[error("reload task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Read the running configuration's file again and load its model; the error says why
/// it was rejected. An outbox directory the running configuration does not hold already
/// must be free.
pub async fn prepare(running: Arc<Settings>) -> Result<Loaded, ReloadError> {
    tokio::task::spawn_blocking(move || -> Result<Loaded, ReloadError> {
        let settings = Settings::load(&running.file)?;
        let classifier = load_model(&settings).map_err(ReloadError::Model)?;
        if settings.detection.enabled {
            Rules::for_model(&settings, classifier.labels())?;
        }
        let dir = &settings.outbox.dir;
        if settings.uses_outbox() && !(running.uses_outbox() && running.outbox.dir == *dir) {
            outbox::ensure_free(dir).map_err(|e| settings.error_at("outbox.dir", e))?;
        }
        Ok(Loaded {
            settings,
            classifier,
        })
    })
    .await?
}

/// Until `stop`: answer SIGHUP (`hup`) and reload commands (`requests`). The first reload
/// that validates cancels `stop` (ending the running pipeline) and is returned; one that
/// does not is logged and replied to, and the watch goes on.
pub async fn watch(
    running: Arc<Settings>,
    hup: Arc<Notify>,
    mut requests: mpsc::Receiver<ReloadRequest>,
    stop: CancellationToken,
) -> Option<Loaded> {
    loop {
        let reply = tokio::select! {
            _ = hup.notified() => None,
            Some(r) = requests.recv() => Some(r),
            _ = stop.cancelled() => return None,
        };
        match prepare(running.clone()).await {
            Ok(loaded) => {
                if let Some(r) = reply {
                    let _ = r.send(Ok(loaded.classifier.file_name().to_string()));
                }
                stop.cancel();
                return Some(loaded);
            }
            Err(e) => {
                warn!("reload rejected: {e}");
                if let Some(r) = reply {
                    let _ = r.send(Err(CommandError::Reload(Box::new(e))));
                }
            }
        }
    }
}
