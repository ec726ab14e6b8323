//! Reloading: the configuration file (with its drop-ins and the environment) read again
//! and its models loaded (those unchanged taken over), checking everything start-up checks, *before* the running
//! pipeline is touched. Asked for by SIGHUP (systemd's `ExecReload`) or the `reload`
//! command; a rejected one is logged (and replied to) and the running one kept.

use std::sync::Arc;

use anyhow::Result;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{ConfigError, ModelSettings, Settings};
use crate::detect::Rules;
use crate::model::Classifier;
use crate::mqtt::commands::{CommandError, ReloadRequest};
use crate::mqtt::outbox;

/// One model of a configuration, loaded: its settings, a digest of its files (what a
/// reload compares), and the classifier every camera and region on it shares.
pub struct LoadedModel {
    pub settings: ModelSettings,
    digest: u64,
    pub classifier: Arc<Classifier>,
}

/// The loaded models, in the order of `settings.models`.
#[derive(Clone, Default)]
pub struct Models(Vec<Arc<LoadedModel>>);

impl Models {
    /// Load every model of `settings`, or a configuration error naming the model's
    /// `path`: a model that does not load will not load after a restart either. A model
    /// of `previous` whose settings and files are unchanged is taken over, not loaded
    /// again (a reload replaces only what changed).
    pub fn load(settings: &Settings, previous: &Models) -> Result<Models> {
        let mut models = Vec::with_capacity(settings.models.len());
        for (i, ms) in settings.models.iter().enumerate() {
            let key = model_key(settings, i);
            let digest = digest(ms).map_err(|e| settings.error_at(&key, e))?;
            let same = previous
                .0
                .iter()
                .find(|p| p.digest == digest && same_load(&p.settings, ms));
            let classifier = match same {
                Some(p) => {
                    info!("model {}: unchanged, kept", ms.name);
                    p.classifier.clone()
                }
                None => Arc::new(
                    Classifier::load(ms).map_err(|e| settings.error_at(&key, format!("{e:#}")))?,
                ),
            };
            models.push(Arc::new(LoadedModel {
                settings: ms.clone(),
                digest,
                classifier,
            }));
        }
        Ok(Models(models))
    }

    pub fn iter(&self) -> impl Iterator<Item = &LoadedModel> {
        self.0.iter().map(|m| &**m)
    }

    /// The classifiers, in the order of `settings.models`.
    pub fn classifiers(&self) -> Vec<Arc<Classifier>> {
        self.0.iter().map(|m| m.classifier.clone()).collect()
    }
}

/// Load the configured models (see [`Models::load`]).
pub fn load_models(settings: &Settings) -> Result<Models> {
    Models::load(settings, &Models::default())
}

/// `model.path` for a single `[model]` table, `model[i].path` for `[[model]]` tables.
fn model_key(settings: &Settings, i: usize) -> String {
    match settings.models.len() {
        1 if settings.models[0].name == "default" => "model.path".to_string(),
        _ => format!("model[{i}].path"),
    }
}

/// Whether a model loaded with `a` serves as one loaded with `b`: everything but the
/// name (which only labels it) is the same.
fn same_load(a: &ModelSettings, b: &ModelSettings) -> bool {
    let renamed = ModelSettings {
        name: b.name.clone(),
        ..a.clone()
    };
    renamed == *b
}

/// The contents of a model's file and labels file, hashed: a file replaced in place is a
/// changed model even when its settings are not.
fn digest(ms: &ModelSettings) -> std::result::Result<u64, String> {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for path in std::iter::once(&ms.path).chain(&ms.labels) {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        h.write(&bytes);
        h.write_u8(0xff);
    }
    Ok(h.finish())
}

/// A validated configuration and its loaded models: what a pipeline starts from.
pub struct Loaded {
    pub settings: Settings,
    pub models: Models,
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
pub async fn prepare(running: Arc<Settings>, models: Models) -> Result<Loaded, ReloadError> {
    tokio::task::spawn_blocking(move || -> Result<Loaded, ReloadError> {
        let settings = Settings::load(&running.file)?;
        let models = Models::load(&settings, &models).map_err(ReloadError::Model)?;
        if settings.detection.enabled {
            let labels: Vec<&[String]> = models.iter().map(|m| m.classifier.labels()).collect();
            Rules::for_models(&settings, &labels)?;
        }
        let dir = &settings.outbox.dir;
        if settings.uses_outbox() && !(running.uses_outbox() && running.outbox.dir == *dir) {
            outbox::ensure_free(dir).map_err(|e| settings.error_at("outbox.dir", e))?;
        }
        Ok(Loaded { settings, models })
    })
    .await?
}

/// Until `stop`: answer SIGHUP (`hup`) and reload commands (`requests`). The first reload
/// that validates cancels `stop` (ending the running pipeline) and is returned; one that
/// does not is logged and replied to, and the watch goes on.
pub async fn watch(
    running: Arc<Settings>,
    models: Models,
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
        match prepare(running.clone(), models.clone()).await {
            Ok(loaded) => {
                if let Some(r) = reply {
                    let files: Vec<&str> = loaded
                        .models
                        .iter()
                        .map(|m| m.classifier.file_name())
                        .collect();
                    let _ = r.send(Ok(files.join(", ")));
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
