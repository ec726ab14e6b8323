//! Configuration: a raw, loosely typed layer read by the `config` crate (file, then
//! `config.d/*.toml` drop-ins in name order, then `EDGESIGHT__SECTION__KEY` environment
//! variables), validated once into [`Settings`]. Nothing past this module sees a raw value.
//!
//! Every error names the key path and where the offending value came from (a file or the
//! environment), because on a headless board that message is all the user gets.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat, Value};
use serde::{Deserialize, Serialize};

/// `sysexits.h` EX_CONFIG: systemd and scripts can tell "fix the config" from a crash.
pub const EX_CONFIG: u8 = 78;

/// Environment variables `EDGESIGHT__MQTT__HOST=...` override `[mqtt] host`.
/// Largest MQTT packet the daemon sends or accepts (1 MiB): the ground floor defines it
/// because the limits on configured sizes (`commands.snapshot_max_bytes`) derive from it.
pub const MQTT_MAX_PACKET: usize = 1 << 20;

pub const ENV_PREFIX: &str = "EDGESIGHT";

/// A configuration problem. `main` maps it to exit code 78.
#[derive(Debug)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configuration error: {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

// ------------------------------------------------------------------ raw layer

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    device: RawDevice,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    model: RawModel,
    #[serde(default)]
    camera: Vec<RawCamera>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    detection: RawDetection,
    #[serde(default)]
    outbox: RawOutbox,
    #[serde(default)]
    classification: RawClassification,
    #[serde(default)]
    homeassistant: RawHomeAssistant,
    #[serde(default)]
    commands: RawCommands,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetection {
    enabled: Option<bool>,
    threshold: Option<f64>,
    hysteresis: Option<f64>,
    min_frames: Option<i64>,
    end_frames: Option<i64>,
    update_interval_secs: Option<f64>,
    labels: Option<Vec<String>>,
    thresholds: Option<std::collections::BTreeMap<String, f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbox {
    dir: Option<PathBuf>,
    fsync: Option<String>,
    fsync_interval_ms: Option<i64>,
    max_events: Option<i64>,
    max_bytes: Option<i64>,
    window: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    host: Option<String>,
    port: Option<i64>,
    prefix: Option<String>,
    qos: Option<i64>,
    client_id: Option<String>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    embedded_broker: Option<bool>,
    keep_alive_secs: Option<i64>,
    reconnect_min_ms: Option<i64>,
    reconnect_max_ms: Option<i64>,
    queue: Option<i64>,
    stats_interval_secs: Option<i64>,
    tls: Option<bool>,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommands {
    enabled: Option<bool>,
    max_payload_bytes: Option<i64>,
    snapshot_max_bytes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHomeAssistant {
    discovery: Option<bool>,
    prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClassification {
    publish: Option<String>,
    durable: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: Option<PathBuf>,
    labels: Option<PathBuf>,
    preprocess: Option<String>,
    resize: Option<String>,
    top_k: Option<i64>,
    threshold: Option<f64>,
    threads: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCamera {
    name: Option<String>,
    source: Option<String>,
    // images
    path: Option<String>,
    #[serde(rename = "loop")]
    looped: Option<bool>,
    // both
    fps: Option<f64>,
    // v4l2
    device: Option<Value>,
    width: Option<i64>,
    height: Option<i64>,
    format: Option<String>,
    // pacing, loss, gating
    max_age_ms: Option<i64>,
    stall_secs: Option<f64>,
    reopen_min_ms: Option<i64>,
    reopen_max_ms: Option<i64>,
    change_threshold: Option<f64>,
    heartbeat_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
}

// ------------------------------------------------------------------ validated layer

/// The validated configuration the daemon runs on.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The main configuration file (drop-ins and environment are layered on top).
    #[serde(skip)]
    pub file: PathBuf,
    pub device: DeviceSettings,
    pub mqtt: MqttSettings,
    pub model: ModelSettings,
    pub camera: Vec<CameraSettings>,
    pub log: LogSettings,
    pub detection: DetectionSettings,
    pub outbox: OutboxSettings,
    pub classification: ClassificationSettings,
    pub homeassistant: HomeAssistantSettings,
    pub commands: CommandSettings,
}

/// `[commands]`: remote commands (`mqtt/commands.rs`), off by default.
#[derive(Debug, Clone, Serialize)]
pub struct CommandSettings {
    pub enabled: bool,
    /// Larger command payloads are rejected unread.
    pub max_payload_bytes: usize,
    /// Snapshots are re-encoded smaller until they fit.
    pub snapshot_max_bytes: usize,
}

/// `[homeassistant]`: MQTT discovery (`discovery.rs`).
#[derive(Debug, Clone, Serialize)]
pub struct HomeAssistantSettings {
    pub discovery: bool,
    /// Home Assistant's discovery prefix.
    pub prefix: String,
}

/// `[classification]`: which classification messages go out. They are telemetry: QoS
/// `mqtt.qos`, not persisted unless `durable`.
#[derive(Debug, Clone, Serialize)]
pub struct ClassificationSettings {
    pub publish: PublishMode,
    /// Through the durable outbox, like detection events.
    pub durable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishMode {
    /// Every classified frame.
    Every,
    /// When the top label changes (and the first frame).
    OnChange,
    /// At most one per interval per camera (the first frame after it has passed).
    Interval(Duration),
}

impl Serialize for PublishMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PublishMode::Every => s.serialize_str("every"),
            PublishMode::OnChange => s.serialize_str("on_change"),
            PublishMode::Interval(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
        }
    }
}

/// "500ms", "10s", "2m" (a bare number is seconds).
pub fn parse_interval(v: &str) -> Option<Duration> {
    let v = v.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60.0)
    } else {
        (v, 1.0)
    };
    let secs = num.trim().parse::<f64>().ok()? * scale;
    (secs > 0.0 && secs <= 86_400.0).then(|| Duration::from_secs_f64(secs))
}

/// `[detection]`: when a label's score makes a detection event (see `detect.rs`). Label
/// names are checked against the model's labels once the model is loaded
/// ([`DetectionSettings::rules`]).
#[derive(Debug, Clone, Serialize)]
pub struct DetectionSettings {
    pub enabled: bool,
    pub threshold: f32,
    pub hysteresis: f32,
    pub min_frames: u32,
    pub end_frames: u32,
    pub update_interval_secs: f64,
    /// Labels to watch; empty: every label.
    pub labels: Vec<String>,
    /// Per-label thresholds overriding `threshold`.
    pub thresholds: std::collections::BTreeMap<String, f32>,
}

/// When the outbox's writes reach the disk: `always` (before `push` returns, the safe
/// default), every interval (fewer flash writes on SD cards, up to one interval of events
/// at risk on power loss), or `never` (the kernel decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    Always,
    Interval(Duration),
    Never,
}

impl fmt::Display for Fsync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fsync::Always => f.write_str("always"),
            Fsync::Interval(d) => write!(f, "every {} ms", d.as_millis()),
            Fsync::Never => f.write_str("never"),
        }
    }
}

impl Serialize for Fsync {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Fsync::Always => "always",
            Fsync::Interval(_) => "interval",
            Fsync::Never => "never",
        })
    }
}

/// `[outbox]`: the durable queue of detection events (`mqtt/outbox/`).
#[derive(Debug, Clone, Serialize)]
pub struct OutboxSettings {
    pub dir: PathBuf,
    pub fsync: Fsync,
    pub max_events: usize,
    pub max_bytes: usize,
    /// Records in flight (published, PUBACK not yet received) at once.
    pub window: usize,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        OutboxSettings {
            dir: default_outbox_dir(),
            fsync: Fsync::Always,
            max_events: 10_000,
            max_bytes: 16 << 20,
            window: 16,
        }
    }
}

/// `$STATE_DIRECTORY/outbox` under systemd (`StateDirectory=edgesight`), else the same
/// place by hand.
fn default_outbox_dir() -> PathBuf {
    let state = std::env::var_os("STATE_DIRECTORY")
        .map(|s| {
            // systemd may list several directories, colon-separated; ours is the first.
            let s = s.to_string_lossy().into_owned();
            PathBuf::from(s.split(':').next().unwrap_or("").to_string())
        })
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/var/lib/edgesight"));
    state.join("outbox")
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceSettings {
    pub id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub prefix: String,
    pub qos: u8,
    pub client_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    pub embedded_broker: bool,
    pub keep_alive_secs: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub queue: usize,
    /// Seconds between `<prefix>/<device>/stats` messages; 0: none.
    pub stats_interval_secs: u64,
    /// TLS to the broker (default: on for port 8883), with the files already read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
}

/// Validated TLS material: PEM bytes read at start-up, so a missing or unreadable file is a
/// configuration error, not a reconnect loop.
#[derive(Debug, Clone, Serialize)]
pub struct TlsSettings {
    pub ca_file: PathBuf,
    #[serde(skip)]
    pub ca: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
    /// Client certificate and private key (the key never prints).
    #[serde(skip)]
    pub client_auth: Option<(Vec<u8>, Secret)>,
}

/// Debian's (and Raspberry Pi OS's) CA bundle: public brokers work without `ca_file`.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl MqttSettings {
    /// `<prefix>/<device id>`: every topic we publish lives under it.
    pub fn base_topic(&self, device_id: &str) -> String {
        format!("{}/{}", self.prefix, device_id)
    }
    pub fn reconnect_min(&self) -> Duration {
        Duration::from_millis(self.reconnect_min_ms)
    }
    pub fn reconnect_max(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_ms)
    }
}

/// A secret that never prints: `Debug`, `Display` and `Serialize` all redact it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preprocess {
    /// RGB scaled to 0..1, then ImageNet mean/std (torchvision models).
    Torchvision,
    /// BGR, 0..255 minus the ImageNet channel means (Keras ResNet50 "caffe" mode).
    Caffe,
    /// RGB 0..255 as float, untouched (models that normalise inside the graph).
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Scale to the model input, ignoring the aspect ratio.
    Stretch,
    /// Crop the largest centred region with the model's aspect ratio, then scale.
    CenterCrop,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSettings {
    pub path: PathBuf,
    pub labels: Option<PathBuf>,
    pub preprocess: Preprocess,
    pub resize: ResizeMode,
    pub top_k: usize,
    pub threshold: f32,
    /// Threads the model runs on: our int8 convs share their channel blocks out, tract
    /// runs its matrix products in parallel; everything else runs on one of them.
    pub threads: usize,
}

impl ModelSettings {
    /// Defaults for a model file given on the command line (no config file).
    pub fn for_file(path: PathBuf) -> ModelSettings {
        ModelSettings {
            path,
            labels: None,
            preprocess: Preprocess::Torchvision,
            resize: ResizeMode::Stretch,
            top_k: 3,
            threshold: 0.0,
            threads: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CameraSettings {
    pub name: String,
    #[serde(flatten)]
    pub source: SourceSettings,
    /// A frame older than this when inference reaches it is dropped (counted `stale`).
    pub max_age_ms: u64,
    /// A streaming V4L2 camera with no frame for this long is declared lost and reopened.
    pub stall_secs: f64,
    /// Back-off between reopen attempts: doubles from min to max.
    pub reopen_min_ms: u64,
    pub reopen_max_ms: u64,
    /// Change gating: skip inference while the scene differs from the last classified
    /// frame by less than this mean level (0..255 on a 16x16 grey thumbnail); 0 = off.
    pub change_threshold: f32,
    /// With gating on, classify at least this often anyway.
    pub heartbeat_secs: f64,
}

impl CameraSettings {
    pub fn stall_after(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.stall_secs)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum SourceSettings {
    Images {
        path: String,
        fps: f64,
        #[serde(rename = "loop")]
        looped: bool,
    },
    V4l2 {
        device: V4l2Device,
        width: u32,
        height: u32,
        fps: u32,
        format: PixelFormat,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum V4l2Device {
    Index(u32),
    Path(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    Auto,
    Mjpeg,
    Yuyv,
    Nv12,
    Gray,
    Rgb,
    Bgr,
}

impl PixelFormat {
    pub const NAMES: &[(&str, PixelFormat)] = &[
        ("auto", PixelFormat::Auto),
        ("mjpeg", PixelFormat::Mjpeg),
        ("yuyv", PixelFormat::Yuyv),
        ("nv12", PixelFormat::Nv12),
        ("gray", PixelFormat::Gray),
        ("rgb", PixelFormat::Rgb),
        ("bgr", PixelFormat::Bgr),
    ];

    /// The name the configuration uses.
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("auto", |(n, _)| n)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    pub level: String,
}

// ------------------------------------------------------------------ loading

/// Drop-in directory for a main config file: `<dir of file>/config.d`.
pub fn dropin_dir(file: &Path) -> PathBuf {
    file.parent()
        .unwrap_or_else(|| Path::new("."))
        .join("config.d")
}

impl Settings {
    /// Read `file`, its `config.d/*.toml` drop-ins and `EDGESIGHT__*` environment variables.
    pub fn load(file: &Path) -> Result<Settings, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment supplied (tests pass their own).
    pub fn load_with_env(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = Config::builder();
        let mut sources: Vec<(String, toml::Table)> = Vec::new();
        for f in std::iter::once(file.to_path_buf()).chain(dropins(file)?) {
            let text = std::fs::read_to_string(&f).map_err(|e| {
                ConfigError::new(format!("cannot read config file {}: {e}", f.display()))
            })?;
            // Parse each file on its own first so a syntax error or an unknown key names its
            // file (once merged, `config` no longer knows where an unknown key came from).
            let table = toml::from_str::<toml::Table>(&text)
                .map_err(|e| ConfigError::new(format!("{}: invalid TOML: {e}", f.display())))?;
            check_known_keys(&table, &f.display().to_string())?;
            sources.push((f.display().to_string(), table));
            // `File::from(path)` records the path as each value's origin for error messages.
            builder = builder.add_source(File::from(f.as_path()).format(FileFormat::Toml));
        }
        let env: config::Map<String, String> = env.into_iter().collect();
        check_known_env(&env)?;
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env.clone())),
        );
        let v = Validator {
            sources: &sources,
            env: &env,
        };
        let cfg = builder.build().map_err(|e| v.describe(e))?;
        let raw: RawConfig = cfg.try_deserialize().map_err(|e| v.describe(e))?;
        v.settings(file, raw)
    }

    pub fn base_topic(&self) -> String {
        self.mqtt.base_topic(&self.device.id)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
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

/// Every key a section may hold, read off the raw structs themselves (serde-aux's
/// introspection lists a struct's field names as serde sees them), so a key is defined
/// once, in its raw struct. Checked per source, before merging, so an unknown key is
/// reported with its file.
fn known() -> [(&'static str, &'static [&'static str]); 10] {
    use serde_aux::serde_introspection::serde_introspect as fields;
    [
        ("device", fields::<RawDevice>()),
        ("log", fields::<RawLog>()),
        ("detection", fields::<RawDetection>()),
        ("classification", fields::<RawClassification>()),
        ("homeassistant", fields::<RawHomeAssistant>()),
        ("commands", fields::<RawCommands>()),
        ("outbox", fields::<RawOutbox>()),
        ("mqtt", fields::<RawMqtt>()),
        ("model", fields::<RawModel>()),
        ("camera", fields::<RawCamera>()),
    ]
}

fn unknown_key(key: &str, origin: &str, valid: &[&str]) -> ConfigError {
    ConfigError::new(format!(
        "{key} (in {origin}): unknown key; valid keys here: {}",
        valid.join(", ")
    ))
}

fn check_known_keys(table: &toml::Table, origin: &str) -> Result<(), ConfigError> {
    let known = known();
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

fn check_known_env(env: &config::Map<String, String>) -> Result<(), ConfigError> {
    let prefix = format!("{ENV_PREFIX}__");
    for var in env.keys() {
        let Some(rest) = var.strip_prefix(&prefix) else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        let mut parts = lower.splitn(2, "__");
        let (section, key) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let origin = format!("the environment, {var}");
        let known = known();
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

struct Validator<'a> {
    /// Each file's own table, in layering order.
    sources: &'a [(String, toml::Table)],
    env: &'a config::Map<String, String>,
}

impl Validator<'_> {
    /// Where the value at `key` ("mqtt.port", "camera[0].fps") came from: the environment
    /// variable or the last file that sets it. (`config` keeps an origin per value but
    /// `Config::get` does not hand it out.)
    fn origin(&self, key: &str) -> String {
        let var = format!(
            "{ENV_PREFIX}__{}",
            key.replace('.', "__").to_ascii_uppercase()
        );
        if self.env.contains_key(&var) {
            return format!("the environment, {var}");
        }
        let found = self.sources.iter().rev().find(|(_, table)| {
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
                if cur.is_none() {
                    return false;
                }
            }
            true
        });
        match found {
            Some((origin, _)) => origin.clone(),
            None => "defaults".to_string(),
        }
    }

    /// A `config` error in our format: key path, origin, what is wrong.
    fn describe(&self, e: config::ConfigError) -> ConfigError {
        match e {
            config::ConfigError::Type {
                unexpected,
                expected,
                key: Some(key),
                ..
            } => {
                // `config` writes array members as "camera[0]fps"; we say "camera[0].fps".
                let key = key
                    .replace("]", "].")
                    .replace("].[", "][")
                    .replace("]..", "].");
                let key = key.trim_end_matches('.');
                self.err(
                    key,
                    format!("invalid type: {unexpected}, expected {expected}"),
                )
            }
            other => ConfigError::new(other.to_string()),
        }
    }

    fn err(&self, key: &str, msg: impl fmt::Display) -> ConfigError {
        ConfigError::new(format!("{key} (in {}): {msg}", self.origin(key)))
    }

    fn range(&self, key: &str, v: i64, lo: i64, hi: i64) -> Result<i64, ConfigError> {
        if v < lo || v > hi {
            return Err(self.err(key, format!("{v} is out of range {lo}..={hi}")));
        }
        Ok(v)
    }

    fn topic_level(&self, key: &str, v: &str) -> Result<(), ConfigError> {
        if v.is_empty() || v.contains(['/', '+', '#', '\0']) {
            return Err(self.err(
                key,
                format!("{v:?} must be a non-empty MQTT topic level without '/', '+' or '#'"),
            ));
        }
        Ok(())
    }

    fn settings(&self, file: &Path, raw: RawConfig) -> Result<Settings, ConfigError> {
        let device_id = match raw.device.id {
            Some(id) => id,
            None => default_device_id(),
        };
        self.topic_level("device.id", &device_id)?;

        let m = raw.mqtt;
        let prefix = m.prefix.unwrap_or_else(|| "edgesight".into());
        if prefix.is_empty() || prefix.contains(['+', '#', '\0']) || prefix.ends_with('/') {
            return Err(self.err(
                "mqtt.prefix",
                format!("{prefix:?} must be a non-empty topic without wildcards or trailing '/'"),
            ));
        }
        let password = match &m.password_file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    self.err(
                        "mqtt.password_file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                Some(Secret(text.trim_end_matches(['\r', '\n']).to_string()))
            }
            None => None,
        };
        if password.is_some() && m.username.is_none() {
            return Err(self.err("mqtt.password_file", "is set but mqtt.username is not"));
        }
        let reconnect_min_ms = self.range(
            "mqtt.reconnect_min_ms",
            m.reconnect_min_ms.unwrap_or(500),
            10,
            600_000,
        )? as u64;
        let reconnect_max_ms = self.range(
            "mqtt.reconnect_max_ms",
            m.reconnect_max_ms.unwrap_or(30_000),
            10,
            3_600_000,
        )? as u64;
        if reconnect_max_ms < reconnect_min_ms {
            return Err(self.err("mqtt.reconnect_max_ms", "must be >= mqtt.reconnect_min_ms"));
        }
        let port = self.range("mqtt.port", m.port.unwrap_or(1883), 1, 65535)? as u16;
        let tls = self.tls(
            m.tls.unwrap_or(port == 8883),
            m.ca_file,
            m.client_cert_file,
            m.client_key_file,
        )?;
        let mqtt = MqttSettings {
            host: match m.host {
                Some(h) if h.trim().is_empty() => return Err(self.err("mqtt.host", "is empty")),
                Some(h) => h,
                None => "127.0.0.1".into(),
            },
            port,
            tls,
            qos: self.range("mqtt.qos", m.qos.unwrap_or(1), 0, 2)? as u8,
            client_id: m
                .client_id
                .unwrap_or_else(|| format!("edgesight-{device_id}")),
            prefix,
            username: m.username,
            password_file: m.password_file,
            password,
            embedded_broker: m.embedded_broker.unwrap_or(false),
            keep_alive_secs: self.range(
                "mqtt.keep_alive_secs",
                m.keep_alive_secs.unwrap_or(30),
                5,
                3600,
            )? as u64,
            reconnect_min_ms,
            reconnect_max_ms,
            queue: self.range("mqtt.queue", m.queue.unwrap_or(256), 1, 1_000_000)? as usize,
            stats_interval_secs: self.range(
                "mqtt.stats_interval_secs",
                m.stats_interval_secs.unwrap_or(30),
                0,
                86_400,
            )? as u64,
        };
        if mqtt.client_id.is_empty() {
            return Err(self.err("mqtt.client_id", "is empty"));
        }

        let r = raw.model;
        let Some(path) = r.path else {
            return Err(ConfigError::new(format!(
                "model.path is required (in {} or EDGESIGHT__MODEL__PATH)",
                file.display()
            )));
        };
        let model = ModelSettings {
            path,
            labels: r.labels,
            preprocess: match r.preprocess.as_deref().unwrap_or("torchvision") {
                "torchvision" => Preprocess::Torchvision,
                "caffe" => Preprocess::Caffe,
                "raw" => Preprocess::Raw,
                other => {
                    return Err(self.err(
                        "model.preprocess",
                        format!("{other:?} is not one of \"torchvision\", \"caffe\", \"raw\""),
                    ));
                }
            },
            resize: match r.resize.as_deref().unwrap_or("stretch") {
                "stretch" => ResizeMode::Stretch,
                "center-crop" => ResizeMode::CenterCrop,
                other => {
                    return Err(self.err(
                        "model.resize",
                        format!("{other:?} is not one of \"stretch\", \"center-crop\""),
                    ));
                }
            },
            top_k: self.range("model.top_k", r.top_k.unwrap_or(3), 1, 1000)? as usize,
            threshold: {
                let t = r.threshold.unwrap_or(0.0);
                if !(0.0..=1.0).contains(&t) {
                    return Err(self.err("model.threshold", format!("{t} is out of range 0..=1")));
                }
                t as f32
            },
            threads: self.range("model.threads", r.threads.unwrap_or(1), 1, 64)? as usize,
        };

        if raw.camera.is_empty() {
            return Err(ConfigError::new(format!(
                "camera: at least one [[camera]] table is required (in {})",
                file.display()
            )));
        }
        let mut cameras = Vec::with_capacity(raw.camera.len());
        for (i, c) in raw.camera.into_iter().enumerate() {
            cameras.push(self.camera(i, c)?);
        }
        for (i, c) in cameras.iter().enumerate() {
            if cameras[..i].iter().any(|o| o.name == c.name) {
                return Err(self.err(
                    &format!("camera[{i}].name"),
                    format!("{:?} is used by another camera", c.name),
                ));
            }
        }

        let level = raw.log.level.unwrap_or_else(|| "info".into());
        if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
            return Err(self.err(
                "log.level",
                format!("{level:?} is not one of error, warn, info, debug, trace"),
            ));
        }

        Ok(Settings {
            file: file.to_path_buf(),
            device: DeviceSettings { id: device_id },
            mqtt,
            model,
            camera: cameras,
            log: LogSettings { level },
            detection: self.detection(raw.detection)?,
            outbox: self.outbox(raw.outbox)?,
            classification: ClassificationSettings {
                publish: match raw.classification.publish.as_deref().unwrap_or("every") {
                    "every" => PublishMode::Every,
                    "on_change" => PublishMode::OnChange,
                    other => match parse_interval(other) {
                        Some(d) => PublishMode::Interval(d),
                        None => {
                            return Err(self.err(
                                "classification.publish",
                                format!(
                                    "{other:?} is not \"every\", \"on_change\" or an interval \
                                     such as \"5s\" or \"500ms\" (at most a day)"
                                ),
                            ));
                        }
                    },
                },
                durable: raw.classification.durable.unwrap_or(false),
            },
            commands: CommandSettings {
                enabled: raw.commands.enabled.unwrap_or(false),
                max_payload_bytes: self.range(
                    "commands.max_payload_bytes",
                    raw.commands.max_payload_bytes.unwrap_or(4096),
                    16,
                    65_536,
                )? as usize,
                // Below the MQTT packet limit, with room for the topic and header.
                snapshot_max_bytes: self.range(
                    "commands.snapshot_max_bytes",
                    raw.commands.snapshot_max_bytes.unwrap_or(256 << 10),
                    4096,
                    (MQTT_MAX_PACKET - 4096) as i64,
                )? as usize,
            },
            homeassistant: HomeAssistantSettings {
                discovery: raw.homeassistant.discovery.unwrap_or(false),
                prefix: {
                    let p = raw
                        .homeassistant
                        .prefix
                        .unwrap_or_else(|| "homeassistant".into());
                    if p.is_empty() || p.contains(['+', '#', '\0']) || p.ends_with('/') {
                        return Err(self.err(
                            "homeassistant.prefix",
                            format!(
                                "{p:?} must be a non-empty topic without wildcards or trailing '/'"
                            ),
                        ));
                    }
                    p
                },
            },
        })
    }

    fn pem(&self, key: &str, path: &Path, what: &str) -> Result<Vec<u8>, ConfigError> {
        let bytes = std::fs::read(path)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))?;
        let marker = format!("-----BEGIN {what}");
        if !String::from_utf8_lossy(&bytes).contains(&marker) {
            return Err(self.err(key, format!("{} holds no PEM {what} block", path.display())));
        }
        Ok(bytes)
    }

    fn tls(
        &self,
        on: bool,
        ca_file: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsSettings>, ConfigError> {
        if !on {
            for (k, set) in [
                ("mqtt.ca_file", ca_file.is_some()),
                ("mqtt.client_cert_file", cert.is_some()),
                ("mqtt.client_key_file", key.is_some()),
            ] {
                if set {
                    return Err(self.err(k, "is set but TLS is off (mqtt.tls = false, or a port other than 8883 without mqtt.tls = true)"));
                }
            }
            return Ok(None);
        }
        match (&cert, &key) {
            (Some(_), None) => {
                return Err(self.err("mqtt.client_cert_file", "needs mqtt.client_key_file too"));
            }
            (None, Some(_)) => {
                return Err(self.err("mqtt.client_key_file", "needs mqtt.client_cert_file too"));
            }
            _ => {}
        }
        let ca_file = ca_file.unwrap_or_else(|| PathBuf::from(SYSTEM_CA_FILE));
        let ca = self.pem("mqtt.ca_file", &ca_file, "CERTIFICATE")?;
        let client_auth = match (&cert, &key) {
            (Some(c), Some(k)) => Some((
                self.pem("mqtt.client_cert_file", c, "CERTIFICATE")?,
                Secret(
                    String::from_utf8(self.pem("mqtt.client_key_file", k, "")?)
                        .map_err(|_| self.err("mqtt.client_key_file", "is not PEM text"))?,
                ),
            )),
            _ => None,
        };
        Ok(Some(TlsSettings {
            ca_file,
            ca,
            client_cert_file: cert,
            client_key_file: key,
            client_auth,
        }))
    }

    fn unit(&self, key: &str, v: f64) -> Result<f32, ConfigError> {
        if !(0.0..=1.0).contains(&v) {
            return Err(self.err(key, format!("{v} is out of range 0..=1")));
        }
        Ok(v as f32)
    }

    fn detection(&self, d: RawDetection) -> Result<DetectionSettings, ConfigError> {
        let threshold = self.unit("detection.threshold", d.threshold.unwrap_or(0.6))?;
        let hysteresis = self.unit("detection.hysteresis", d.hysteresis.unwrap_or(0.1))?;
        let mut thresholds = std::collections::BTreeMap::new();
        for (label, t) in d.thresholds.unwrap_or_default() {
            let t = self.unit(&format!("detection.thresholds.{label}"), t)?;
            thresholds.insert(label, t);
        }
        let update = d.update_interval_secs.unwrap_or(10.0);
        if !(update > 0.0 && update <= 86_400.0) {
            return Err(self.err(
                "detection.update_interval_secs",
                format!("{update} is out of range (0, 86400]"),
            ));
        }
        Ok(DetectionSettings {
            enabled: d.enabled.unwrap_or(true),
            threshold,
            hysteresis,
            min_frames: self.range("detection.min_frames", d.min_frames.unwrap_or(3), 1, 10_000)?
                as u32,
            end_frames: self.range("detection.end_frames", d.end_frames.unwrap_or(3), 1, 10_000)?
                as u32,
            update_interval_secs: update,
            labels: d.labels.unwrap_or_default(),
            thresholds,
        })
    }

    fn outbox(&self, o: RawOutbox) -> Result<OutboxSettings, ConfigError> {
        let interval = Duration::from_millis(self.range(
            "outbox.fsync_interval_ms",
            o.fsync_interval_ms.unwrap_or(1000),
            10,
            3_600_000,
        )? as u64);
        let fsync = match o.fsync.as_deref().unwrap_or("always") {
            "always" => Fsync::Always,
            "interval" => Fsync::Interval(interval),
            "never" => Fsync::Never,
            other => {
                return Err(self.err(
                    "outbox.fsync",
                    format!("{other:?} is not one of \"always\", \"interval\", \"never\""),
                ));
            }
        };
        if o.fsync_interval_ms.is_some() && !matches!(fsync, Fsync::Interval(_)) {
            return Err(self.err(
                "outbox.fsync_interval_ms",
                "only applies to fsync = \"interval\"",
            ));
        }
        let d = OutboxSettings::default();
        Ok(OutboxSettings {
            dir: match o.dir {
                Some(p) if p.as_os_str().is_empty() => {
                    return Err(self.err("outbox.dir", "is empty"));
                }
                Some(p) => p,
                None => d.dir,
            },
            fsync,
            max_events: self.range(
                "outbox.max_events",
                o.max_events.unwrap_or(d.max_events as i64),
                1,
                10_000_000,
            )? as usize,
            // At least one full-size record must fit.
            max_bytes: self.range(
                "outbox.max_bytes",
                o.max_bytes.unwrap_or(d.max_bytes as i64),
                64 << 10,
                1 << 34,
            )? as usize,
            // At most rumqttc's in-flight limit (100): past it the client queues them itself.
            window: self.range("outbox.window", o.window.unwrap_or(d.window as i64), 1, 100)?
                as usize,
        })
    }

    fn camera(&self, i: usize, c: RawCamera) -> Result<CameraSettings, ConfigError> {
        let k = |f: &str| format!("camera[{i}].{f}");
        let name = c.name.ok_or_else(|| self.err(&k("name"), "is required"))?;
        self.topic_level(&k("name"), &name)?;
        let source = match c.source.as_deref().unwrap_or("images") {
            "images" => {
                for (f, set) in [
                    ("device", c.device.is_some()),
                    ("width", c.width.is_some()),
                    ("height", c.height.is_some()),
                    ("format", c.format.is_some()),
                ] {
                    if set {
                        return Err(self.err(&k(f), "only applies to source = \"v4l2\""));
                    }
                }
                let path = c
                    .path
                    .ok_or_else(|| self.err(&k("path"), "is required for source = \"images\""))?;
                let fps = c.fps.unwrap_or(5.0);
                if !(fps > 0.0 && fps <= 1000.0) {
                    return Err(self.err(&k("fps"), format!("{fps} is out of range (0, 1000]")));
                }
                SourceSettings::Images {
                    path,
                    fps,
                    looped: c.looped.unwrap_or(true),
                }
            }
            "v4l2" => {
                for (f, set) in [("path", c.path.is_some()), ("loop", c.looped.is_some())] {
                    if set {
                        return Err(self.err(&k(f), "only applies to source = \"images\""));
                    }
                }
                let device = match c.device {
                    None => V4l2Device::Index(0),
                    Some(v) => self.v4l2_device(&k("device"), v)?,
                };
                let fps = c.fps.unwrap_or(30.0);
                if fps.fract() != 0.0 || !(1.0..=240.0).contains(&fps) {
                    return Err(self.err(
                        &k("fps"),
                        format!("{fps} must be a whole number in 1..=240"),
                    ));
                }
                SourceSettings::V4l2 {
                    device,
                    width: self.range(&k("width"), c.width.unwrap_or(640), 16, 8192)? as u32,
                    height: self.range(&k("height"), c.height.unwrap_or(480), 16, 8192)? as u32,
                    fps: fps as u32,
                    format: {
                        let f = c.format.as_deref().unwrap_or("auto");
                        match PixelFormat::NAMES.iter().find(|(n, _)| *n == f) {
                            Some((_, p)) => *p,
                            None => {
                                let names: Vec<String> = PixelFormat::NAMES
                                    .iter()
                                    .map(|(n, _)| format!("{n:?}"))
                                    .collect();
                                return Err(self.err(
                                    &k("format"),
                                    format!("{f:?} is not one of {}", names.join(", ")),
                                ));
                            }
                        }
                    },
                }
            }
            other => {
                return Err(self.err(
                    &k("source"),
                    format!("{other:?} is not one of \"images\", \"v4l2\""),
                ));
            }
        };
        let positive = |key: &str, v: f64, max: f64| {
            if v > 0.0 && v <= max {
                Ok(v)
            } else {
                Err(self.err(&k(key), format!("{v} is out of range (0, {max}]")))
            }
        };
        let reopen_min_ms = self.range(
            &k("reopen_min_ms"),
            c.reopen_min_ms.unwrap_or(500),
            10,
            600_000,
        )? as u64;
        let reopen_max_ms = self.range(
            &k("reopen_max_ms"),
            c.reopen_max_ms.unwrap_or(30_000),
            10,
            3_600_000,
        )? as u64;
        if reopen_max_ms < reopen_min_ms {
            return Err(self.err(
                &k("reopen_max_ms"),
                format!("must be >= {}", k("reopen_min_ms")),
            ));
        }
        let change_threshold = c.change_threshold.unwrap_or(0.0);
        if !(0.0..=255.0).contains(&change_threshold) {
            return Err(self.err(
                &k("change_threshold"),
                format!("{change_threshold} is out of range 0..=255"),
            ));
        }
        Ok(CameraSettings {
            name,
            source,
            max_age_ms: self.range(&k("max_age_ms"), c.max_age_ms.unwrap_or(2000), 1, 3_600_000)?
                as u64,
            stall_secs: positive("stall_secs", c.stall_secs.unwrap_or(5.0), 3600.0)?,
            reopen_min_ms,
            reopen_max_ms,
            change_threshold: change_threshold as f32,
            heartbeat_secs: positive("heartbeat_secs", c.heartbeat_secs.unwrap_or(60.0), 86_400.0)?,
        })
    }

    fn v4l2_device(&self, key: &str, v: Value) -> Result<V4l2Device, ConfigError> {
        if let Ok(i) = v.clone().into_int() {
            return u32::try_from(i)
                .map(V4l2Device::Index)
                .map_err(|_| self.err(key, format!("{i} is not a valid device index")));
        }
        match v.into_string() {
            Ok(s) if s.starts_with('/') => Ok(V4l2Device::Path(PathBuf::from(s))),
            Ok(s) => Err(self.err(key, format!("{s:?} must be an index or a /dev path"))),
            Err(e) => Err(self.err(key, e)),
        }
    }
}

/// The host name, made safe as an MQTT topic level.
fn default_device_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.is_empty() {
        "edgesight".into()
    } else {
        id
    }
}

/// Settings from TOML text (unit tests of other modules).
#[cfg(test)]
pub(crate) fn from_toml(text: &str) -> Settings {
    let d = tempfile::tempdir().expect("tempdir");
    let f = d.path().join("c.toml");
    std::fs::write(&f, text).expect("write the test config");
    Settings::load_with_env(&f, vec![]).expect("valid test config")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key lists are the raw structs' own: every section of the file is listed, and
    /// `loop` (a renamed field) is a camera key.
    #[test]
    fn known_keys_come_from_the_raw_structs() {
        use serde_aux::serde_introspection::serde_introspect;
        let sections: Vec<&str> = known().iter().map(|(s, _)| *s).collect();
        let mut want = serde_introspect::<RawConfig>().to_vec();
        let mut got = sections.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        let camera = known().iter().find(|(s, _)| *s == "camera").unwrap().1;
        assert!(
            camera.contains(&"loop") && !camera.contains(&"looped"),
            "{camera:?}"
        );
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    const MIN: &str = "[model]\npath = \"m.onnx\"\n[[camera]]\nname = \"front\"\npath = \"x\"\n";

    #[test]
    fn defaults_fill_in() {
        let d = tempfile::tempdir().unwrap();
        let f = write(d.path(), "c.toml", &format!("[device]\nid = \"pi\"\n{MIN}"));
        let s = Settings::load_with_env(&f, vec![]).unwrap();
        assert_eq!(s.mqtt.client_id, "edgesight-pi");
        assert_eq!(s.mqtt.port, 1883);
        assert_eq!(s.base_topic(), "edgesight/pi");
        assert!(matches!(
            s.camera[0].source,
            SourceSettings::Images {
                fps: 5.0,
                looped: true,
                ..
            }
        ));
    }

    #[test]
    fn dropins_then_env_override_in_order() {
        let d = tempfile::tempdir().unwrap();
        let f = write(d.path(), "c.toml", &format!("[mqtt]\nport = 1000\n{MIN}"));
        write(
            d.path(),
            "config.d/10-a.toml",
            "[mqtt]\nport = 2000\nhost = \"a\"\n",
        );
        write(d.path(), "config.d/20-b.toml", "[mqtt]\nport = 3000\n");
        write(d.path(), "config.d/ignored.txt", "[mqtt]\nport = 9\n");
        let s = Settings::load_with_env(&f, vec![]).unwrap();
        assert_eq!((s.mqtt.port, s.mqtt.host.as_str()), (3000, "a"));
        let env = vec![("EDGESIGHT__MQTT__PORT".to_string(), "4000".to_string())];
        let s = Settings::load_with_env(&f, env).unwrap();
        assert_eq!(s.mqtt.port, 4000);
    }

    #[test]
    fn password_is_read_and_never_rendered() {
        let d = tempfile::tempdir().unwrap();
        let pw = write(d.path(), "pw", "hunter2\n");
        let f = write(
            d.path(),
            "c.toml",
            &format!(
                "[mqtt]\nusername = \"u\"\npassword_file = \"{}\"\n{MIN}",
                pw.display()
            ),
        );
        let s = Settings::load_with_env(&f, vec![]).unwrap();
        assert_eq!(s.mqtt.password.as_ref().unwrap().expose(), "hunter2");
        assert!(!s.to_redacted_toml().contains("hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
