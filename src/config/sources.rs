//! Where values come from: the main file, its `config.d/*.toml` drop-ins in name order,
//! then `EDGESIGHT__SECTION__KEY` environment variables, layered by the `config` crate.
//!
//! Each file is also kept as its own table, so an error can say which file (or which
//! variable) set the value it is about: once merged, `config` no longer tells.

use std::fmt;
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use serde::de::DeserializeOwned;

use super::error::ConfigError;
use super::raw::{self, RawConfig};

/// Environment variables `EDGESIGHT__MQTT__HOST=...` override `[mqtt] host`.
pub const ENV_PREFIX: &str = "EDGESIGHT";

/// Drop-in directory for a main config file: `<dir of file>/config.d`.
pub fn dropin_dir(file: &Path) -> PathBuf {
    file.parent()
        .unwrap_or_else(|| Path::new("."))
        .join("config.d")
}

/// The layers read for one load, kept to name the origin of a value (the settings keep
/// them too, for errors found after the load: a label the model lacks, a busy outbox).
#[derive(Clone, Default)]
pub struct Sources {
    /// Each file's own table, in layering order.
    files: Vec<(String, toml::Table)>,
    env: config::Map<String, String>,
}

/// Not the tables themselves: the environment may hold a password.
impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files: Vec<&str> = self.files.iter().map(|(f, _)| f.as_str()).collect();
        write!(
            f,
            "Sources {{ files: {files:?}, {} variable(s) }}",
            self.env.len()
        )
    }
}

impl Sources {
    /// Read every layer, check each for unknown keys, and merge them into the raw layer.
    pub fn read(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Sources, RawConfig), ConfigError> {
        let mut builder = Config::builder();
        let mut files = Vec::new();
        for f in std::iter::once(file.to_path_buf()).chain(dropins(file)?) {
            let text = std::fs::read_to_string(&f).map_err(|e| {
                ConfigError::new(format!("cannot read config file {}: {e}", f.display()))
            })?;
            // Parse each file on its own first so a syntax error or an unknown key names its
            // file.
            let table = toml::from_str::<toml::Table>(&text)
                .map_err(|e| ConfigError::new(format!("{}: invalid TOML: {e}", f.display())))?;
            check_known_keys(&table, &f.display().to_string())?;
            files.push((f.display().to_string(), table));
            builder = builder.add_source(File::from(f.as_path()).format(FileFormat::Toml));
        }
        let env: config::Map<String, String> = env.into_iter().collect();
        check_known_env(&env)?;
        check_model_tables_and_env(&files, &env)?;
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env.clone())),
        );
        let sources = Sources { files, env };
        let merged: serde_json::Value = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::new(e.to_string()))?;
        let raw = sources.deserialize("", merged)?;
        Ok((sources, raw))
    }

    /// serde's reading of `value` (found at `prefix`, "" for the root), its errors in our
    /// format: serde_path_to_error supplies the key path below `prefix`.
    pub fn deserialize<T: DeserializeOwned>(
        &self,
        prefix: &str,
        value: serde_json::Value,
    ) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let below = e.path().to_string();
            let key = match (prefix, below.as_str()) {
                (p, ".") => p.to_string(),
                ("", b) => b.to_string(),
                (p, b) if b.starts_with('[') => format!("{p}{b}"),
                (p, b) => format!("{p}.{b}"),
            };
            self.err(&key, e.into_inner())
        })
    }

    /// An error about the value at `key`, naming where it came from.
    pub fn err(&self, key: &str, msg: impl fmt::Display) -> ConfigError {
        ConfigError::new(format!("{key} (in {}): {msg}", self.origin(key)))
    }

    /// Where the value at `key` ("mqtt.port", "camera[0].fps") came from: the environment
    /// variable or the last file that sets it.
    fn origin(&self, key: &str) -> String {
        let var = format!(
            "{ENV_PREFIX}__{}",
            key.replace('.', "__").to_ascii_uppercase()
        );
        if self.env.contains_key(&var) {
            return format!("the environment, {var}");
        }
        // A key no layer sets (a required one missing) is named by the table that lacks
        // it: the file that declares `camera[0]` for `camera[0].url`.
        let mut at = key;
        loop {
            let file = self
                .files
                .iter()
                .rev()
                .find(|(_, t)| lookup(t, at).is_some());
            if let Some((origin, _)) = file {
                return origin.clone();
            }
            match at.rfind(['.', '[']) {
                Some(cut) if cut > 0 => at = &at[..cut],
                _ => return "defaults".to_string(),
            }
        }
    }
}

/// The value at a key path such as "camera[0].fps" in one file's table.
fn lookup<'t>(table: &'t toml::Table, key: &str) -> Option<&'t toml::Value> {
    let mut cur: Option<&toml::Value> = None;
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, i)) => (n, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let next = match cur {
            None => table.get(name),
            Some(v) => v.get(name),
        };
        cur = match index {
            Some(i) => next.and_then(|v| v.get(i)),
            None => next,
        };
        cur?;
    }
    cur
}

fn dropins(file: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = dropin_dir(file);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => {
            return Err(ConfigError::new(format!(
                "cannot read drop-in directory {}: {e}",
                dir.display()
            )));
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

fn unknown_key(key: &str, origin: &str, valid: &[&str]) -> ConfigError {
    ConfigError::new(format!(
        "{key} (in {origin}): unknown key; valid keys here: {}",
        valid.join(", ")
    ))
}

fn check_known_keys(table: &toml::Table, origin: &str) -> Result<(), ConfigError> {
    let known = raw::known();
    let sections: Vec<&str> = known.iter().map(|(s, _)| *s).collect();
    for (section, value) in table {
        let Some((_, keys)) = known.iter().find(|(s, _)| s == section) else {
            return Err(unknown_key(section, origin, &sections));
        };
        // [section] is a table; [[camera]] an array of tables. Wrong shapes are left to
        // the type check, which names the key too.
        let tables: Vec<(String, &toml::Table)> = match value {
            toml::Value::Table(t) => vec![(section.clone(), t)],
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.as_table().map(|t| (format!("{section}[{i}]"), t)))
                .collect(),
            _ => vec![],
        };
        for (path, t) in tables {
            if let Some(k) = t.keys().find(|k| !keys.contains(&k.as_str())) {
                return Err(unknown_key(&format!("{path}.{k}"), origin, keys));
            }
        }
    }
    Ok(())
}

/// `EDGESIGHT__MODEL__*` sets keys of a single `[model]` table: beside `[[model]]` tables
/// it would replace them all with one (the `config` crate merges a table over an array),
/// so it is refused.
fn check_model_tables_and_env(
    files: &[(String, toml::Table)],
    env: &config::Map<String, String>,
) -> Result<(), ConfigError> {
    let prefix = format!("{ENV_PREFIX}__MODEL__");
    let var = env
        .keys()
        .find(|k| k.to_ascii_uppercase().starts_with(&prefix));
    let tables = files
        .iter()
        .find(|(_, t)| matches!(t.get("model"), Some(toml::Value::Array(_))));
    match (var, tables) {
        (Some(var), Some((file, _))) => Err(ConfigError::new(format!(
            "{var}: {file} has [[model]] tables, which cannot be set from the environment; \
             use a config.d drop-in"
        ))),
        _ => Ok(()),
    }
}

fn check_known_env(env: &config::Map<String, String>) -> Result<(), ConfigError> {
    let prefix = format!("{ENV_PREFIX}__");
    let known = raw::known();
    for var in env.keys() {
        let Some(rest) = var.strip_prefix(&prefix) else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        let mut parts = lower.splitn(2, "__");
        let (section, key) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let origin = format!("the environment, {var}");
        match known.iter().find(|(s, _)| *s == section) {
            None => {
                let sections: Vec<&str> = known.iter().map(|(s, _)| *s).collect();
                return Err(unknown_key(section, &origin, &sections));
            }
            Some(("camera", _)) => {
                return Err(ConfigError::new(format!(
                    "{var}: [[camera]] tables cannot be set from the environment; use a config.d drop-in"
                )));
            }
            Some((_, keys)) if !keys.contains(&key) => {
                return Err(unknown_key(&format!("{section}.{key}"), &origin, keys));
            }
            Some(_) => {}
        }
    }
    Ok(())
}
