//! The raw layer: the configuration as the files and the environment spell it, with every
//! key and its default defined once, here. serde reads it (`deny_unknown_fields`, the enums
//! by their names); [`super::validate`] checks ranges and the rules between keys.
//!
//! Numbers that have a range are read as `i64`, so "70000 is out of range 1..=65535" can
//! name the value instead of serde's "expected u16".

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_aux::serde_introspection::serde_introspect as fields;

use super::settings::{
    ChannelOrder, LogLevel, PixelFormat, Preprocess, PublishMode, ResizeMode, RtspTransport,
    SnapshotMode, StreamFormat, V4l2Device,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub device: RawDevice,
    pub mqtt: RawMqtt,
    /// One `[model]` table (the model named `default`) or `[[model]]` tables: read table
    /// by table, each with its key path (`model[1].path`).
    pub model: serde_json::Value,
    /// Read table by table: see [`RawCamera`].
    pub camera: Vec<serde_json::Map<String, serde_json::Value>>,
    pub log: RawLog,
    pub detection: RawDetection,
    pub outbox: RawOutbox,
    pub classification: RawClassification,
    pub homeassistant: RawHomeAssistant,
    pub commands: RawCommands,
    pub metrics: RawMetrics,
    pub snapshots: RawSnapshots,
    pub hard_examples: RawHardExamples,
}

/// `[snapshots]`: where event snapshots go and how many are kept; each camera or region
/// opts in with its `snapshots` key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSnapshots {
    pub max_files: i64,
    pub max_bytes: i64,
    pub jpeg_max_bytes: i64,
}

impl Default for RawSnapshots {
    fn default() -> Self {
        RawSnapshots {
            max_files: 500,
            max_bytes: 100 << 20,
            jpeg_max_bytes: 256 << 10,
        }
    }
}

/// `[hard_examples]`: what makes a frame worth keeping for retraining, and how many are
/// kept; each camera or region opts in with its `hard_examples` key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHardExamples {
    /// A top score in `[min_score, max_score]` is unsure.
    pub min_score: f64,
    pub max_score: f64,
    /// The top label changed from the view's previous classification.
    pub flips: bool,
    /// At most one kept per view per interval.
    pub min_interval_secs: f64,
    pub max_files: i64,
    pub max_bytes: i64,
}

impl Default for RawHardExamples {
    fn default() -> Self {
        RawHardExamples {
            min_score: 0.4,
            max_score: 0.7,
            flips: true,
            min_interval_secs: 10.0,
            max_files: 1000,
            max_bytes: 200 << 20,
        }
    }
}

/// `[metrics]`: off unless `listen` is set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDevice {
    /// Default: the host name, made safe as a topic level.
    pub id: Option<String>,
    /// Default: [`default_state_dir`].
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMqtt {
    pub host: String,
    pub port: i64,
    pub prefix: String,
    pub qos: i64,
    /// Default: `edgesight-<device id>`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub embedded_broker: bool,
    pub keep_alive_secs: i64,
    pub reconnect_min_ms: i64,
    pub reconnect_max_ms: i64,
    pub queue: i64,
    pub stats_interval_secs: i64,
    /// Default: on for port 8883.
    pub tls: Option<bool>,
    /// Default (with TLS on): the system's CA bundle.
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl Default for RawMqtt {
    fn default() -> Self {
        RawMqtt {
            host: "127.0.0.1".into(),
            port: 1883,
            prefix: "edgesight".into(),
            qos: 1,
            client_id: None,
            username: None,
            password_file: None,
            embedded_broker: false,
            keep_alive_secs: 30,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
            queue: 256,
            stats_interval_secs: 30,
            tls: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

/// One number for every channel, or one per channel.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrThree {
    One(f64),
    Each(Vec<f64>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawModel {
    /// Required in `[[model]]` tables; a single `[model]` table is `default`.
    pub name: Option<String>,
    /// Required.
    pub path: Option<PathBuf>,
    pub labels: Option<PathBuf>,
    pub preprocess: Preprocess,
    /// Each overrides the preset's value (`Normalization`).
    pub channel_order: Option<ChannelOrder>,
    pub scale: Option<f64>,
    pub mean: Option<OneOrThree>,
    pub std: Option<OneOrThree>,
    pub resize: ResizeMode,
    pub top_k: i64,
    pub threshold: f64,
    pub threads: i64,
}

impl Default for RawModel {
    fn default() -> Self {
        RawModel {
            name: None,
            path: None,
            labels: None,
            preprocess: Preprocess::Torchvision,
            channel_order: None,
            scale: None,
            mean: None,
            std: None,
            resize: ResizeMode::Stretch,
            top_k: 3,
            threshold: 0.0,
            threads: 1,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub level: LogLevel,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: LogLevel::Info,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDetection {
    pub enabled: bool,
    pub threshold: f64,
    pub hysteresis: f64,
    pub min_frames: i64,
    pub end_frames: i64,
    pub update_interval_secs: f64,
    pub labels: Vec<String>,
    pub thresholds: BTreeMap<String, f64>,
}

impl Default for RawDetection {
    fn default() -> Self {
        RawDetection {
            enabled: true,
            threshold: 0.6,
            hysteresis: 0.1,
            min_frames: 3,
            end_frames: 3,
            update_interval_secs: 10.0,
            labels: Vec::new(),
            thresholds: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum FsyncPolicy {
    Always,
    Interval,
    Never,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawOutbox {
    /// Default: `<device.state_dir>/outbox`.
    pub dir: Option<PathBuf>,
    pub fsync: FsyncPolicy,
    /// Only with `fsync = "interval"`; default 1000.
    pub fsync_interval_ms: Option<i64>,
    pub max_events: i64,
    pub max_bytes: i64,
    pub window: i64,
}

/// `fsync = "interval"` without `fsync_interval_ms`.
pub(super) const DEFAULT_FSYNC_INTERVAL_MS: i64 = 1000;

impl Default for RawOutbox {
    fn default() -> Self {
        RawOutbox {
            dir: None,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: None,
            max_events: 10_000,
            max_bytes: 16 << 20,
            window: 16,
        }
    }
}

/// `$STATE_DIRECTORY` under systemd (`StateDirectory=edgesight`), else the same place by
/// hand: `/var/lib/edgesight`.
pub(super) fn default_state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .map(|s| {
            // systemd may list several directories, colon-separated; ours is the first.
            let s = s.to_string_lossy().into_owned();
            PathBuf::from(s.split(':').next().unwrap_or("").to_string())
        })
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/var/lib/edgesight"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawClassification {
    pub publish: PublishMode,
    pub durable: bool,
}

impl Default for RawClassification {
    fn default() -> Self {
        RawClassification {
            publish: PublishMode::Every,
            durable: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHomeAssistant {
    pub discovery: bool,
    pub prefix: String,
}

impl Default for RawHomeAssistant {
    fn default() -> Self {
        RawHomeAssistant {
            discovery: false,
            prefix: "homeassistant".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCommands {
    pub enabled: bool,
    pub max_payload_bytes: i64,
    pub snapshot_max_bytes: i64,
}

impl Default for RawCommands {
    fn default() -> Self {
        RawCommands {
            enabled: false,
            max_payload_bytes: 4096,
            snapshot_max_bytes: 256 << 10,
        }
    }
}

// ------------------------------------------------------------------ cameras

/// A `[[camera]]` table is a tagged enum on `source`: the keys every source shares, and
/// the chosen source's own keys. It is read in two steps (the tag, then each half with
/// its own struct) rather than with `#[serde(tag = "source")]`, because serde reads an
/// internally tagged enum through a buffer that loses the key path ("camera[0].fps") of
/// an error, and cannot default the tag.
#[derive(Debug)]
pub(super) struct RawCamera {
    pub common: RawCameraCommon,
    pub source: RawSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum SourceKind {
    #[default]
    Images,
    V4l2,
    Pipe,
    Picamera,
    Rtsp,
    #[serde(rename = "http-mjpeg")]
    HttpMjpeg,
}

impl SourceKind {
    pub const ALL: [SourceKind; 6] = [
        SourceKind::Images,
        SourceKind::V4l2,
        SourceKind::Pipe,
        SourceKind::Picamera,
        SourceKind::Rtsp,
        SourceKind::HttpMjpeg,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Images => "images",
            SourceKind::V4l2 => "v4l2",
            SourceKind::Pipe => "pipe",
            SourceKind::Picamera => "picamera",
            SourceKind::Rtsp => "rtsp",
            SourceKind::HttpMjpeg => "http-mjpeg",
        }
    }

    /// The keys this source has besides the common ones (several sources share some).
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            SourceKind::Images => fields::<RawImages>(),
            SourceKind::V4l2 => fields::<RawV4l2>(),
            SourceKind::Pipe => fields::<RawPipe>(),
            SourceKind::Picamera => fields::<RawPicamera>(),
            SourceKind::Rtsp => fields::<RawRtsp>(),
            SourceKind::HttpMjpeg => fields::<RawHttpMjpeg>(),
        }
    }
}

#[derive(Debug)]
pub(super) enum RawSource {
    Images(RawImages),
    V4l2(RawV4l2),
    Pipe(RawPipe),
    Picamera(RawPicamera),
    Rtsp(RawRtsp),
    HttpMjpeg(RawHttpMjpeg),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCameraCommon {
    /// Required.
    pub name: Option<String>,
    pub max_age_ms: i64,
    pub stall_secs: f64,
    pub reopen_min_ms: i64,
    pub reopen_max_ms: i64,
    pub change_threshold: f64,
    pub heartbeat_secs: f64,
    /// The model the whole frame (or each region without its own) runs on. Default: the
    /// first model.
    pub model: Option<String>,
    /// `[[camera.region]]`: the parts of the frame classified, each on its own. None: the
    /// whole frame.
    pub region: Vec<RawRegion>,
    /// On a detection start: the frame (or the region's crop) as JPEG.
    pub snapshots: SnapshotMode,
    /// Keep unsure and flipping frames (or crops) for retraining.
    pub hard_examples: bool,
}

/// `[[camera.region]]`: a named rectangle of the frame, in pixels, or in fractions of the
/// frame when all four numbers are between 0 and 1.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRegion {
    /// Required.
    pub name: Option<String>,
    pub x: f64,
    pub y: f64,
    /// Required.
    pub width: Option<f64>,
    /// Required.
    pub height: Option<f64>,
    /// Default: the camera's model.
    pub model: Option<String>,
    /// Default: the camera's.
    pub snapshots: Option<SnapshotMode>,
    /// Default: the camera's.
    pub hard_examples: Option<bool>,
}

impl Default for RawCameraCommon {
    fn default() -> Self {
        RawCameraCommon {
            name: None,
            max_age_ms: 2000,
            stall_secs: 5.0,
            reopen_min_ms: 500,
            reopen_max_ms: 30_000,
            change_threshold: 0.0,
            heartbeat_secs: 60.0,
            model: None,
            region: Vec::new(),
            snapshots: SnapshotMode::Off,
            hard_examples: false,
        }
    }
}

/// `source = "images"`: a directory, glob or file of still images, played at `fps`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawImages {
    /// Required.
    pub path: Option<String>,
    #[serde(rename = "loop")]
    pub looped: bool,
    pub fps: f64,
}

impl Default for RawImages {
    fn default() -> Self {
        RawImages {
            path: None,
            looped: true,
            fps: 5.0,
        }
    }
}

/// `source = "v4l2"`: a V4L2 capture node.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawV4l2 {
    pub device: V4l2Device,
    pub width: i64,
    pub height: i64,
    /// A whole number: V4L2 frame intervals are asked for as 1/fps.
    pub fps: f64,
    pub format: PixelFormat,
}

impl Default for RawV4l2 {
    fn default() -> Self {
        RawV4l2 {
            device: V4l2Device::Index(0),
            width: 640,
            height: 480,
            fps: 30.0,
            format: PixelFormat::Auto,
        }
    }
}

/// A command line: one string (split as a POSIX shell would, without running one) or the
/// argument list itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum RawCommand {
    Line(String),
    Args(Vec<String>),
}

/// `source = "pipe"`: any program that writes MJPEG (or raw NV12 / YUV420 frames of a
/// configured size) to its stdout.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPipe {
    /// Required.
    pub command: Option<RawCommand>,
    pub format: StreamFormat,
    /// Required for the raw formats; for MJPEG each frame says its own size.
    pub width: Option<i64>,
    pub height: Option<i64>,
    /// Frames faster than this are skipped (the program sets its own rate).
    pub fps: f64,
}

impl Default for RawPipe {
    fn default() -> Self {
        RawPipe {
            command: None,
            format: StreamFormat::Mjpeg,
            width: None,
            height: None,
            fps: 5.0,
        }
    }
}

/// `source = "picamera"`: the Raspberry Pi Camera Module through libcamera
/// (`rpicam-vid`, or `libcamera-vid` on releases before bookworm), as MJPEG.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPicamera {
    /// libcamera's camera index (`rpicam-hello --list-cameras`).
    pub camera: i64,
    pub width: i64,
    pub height: i64,
    pub fps: f64,
    /// mjpeg, or yuv420: raw frames, no JPEG encoding in rpicam-vid (a Pi 5 has no
    /// hardware JPEG encoder) nor decoding here.
    pub format: StreamFormat,
    /// More arguments for rpicam-vid (e.g. `["--hflip", "--vflip"]`).
    pub args: Vec<String>,
}

impl Default for RawPicamera {
    fn default() -> Self {
        RawPicamera {
            camera: 0,
            width: 1280,
            height: 720,
            fps: 5.0,
            format: StreamFormat::Mjpeg,
            args: Vec::new(),
        }
    }
}

/// `source = "rtsp"`: an IP camera's RTSP stream, decoded and re-encoded as MJPEG by
/// ffmpeg at `fps` (and scaled to `width` x `height` when set).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRtsp {
    /// Required. May carry credentials (`rtsp://user:password@host/...`): never logged.
    pub url: Option<String>,
    pub transport: RtspTransport,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub fps: f64,
    /// More ffmpeg input arguments, placed before `-i`.
    pub args: Vec<String>,
}

impl Default for RawRtsp {
    fn default() -> Self {
        RawRtsp {
            url: None,
            transport: RtspTransport::Tcp,
            width: None,
            height: None,
            fps: 5.0,
            args: Vec::new(),
        }
    }
}

/// `source = "http-mjpeg"`: a camera serving `multipart/x-mixed-replace` JPEGs over
/// HTTP, read directly (no child process).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHttpMjpeg {
    /// Required. `http://[user:password@]host[:port]/path`; credentials are sent as HTTP
    /// basic authentication and never logged.
    pub url: Option<String>,
    pub fps: f64,
}

impl Default for RawHttpMjpeg {
    fn default() -> Self {
        RawHttpMjpeg {
            url: None,
            fps: 5.0,
        }
    }
}

// ------------------------------------------------------------------ key lists

/// Every key a section may hold, read off the raw structs themselves (serde-aux's
/// introspection lists a struct's field names as serde sees them), so a key is defined
/// once, in its raw struct. The loader checks each file against them before merging, so
/// an unknown key is reported with its file.
pub(super) fn known() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut camera = vec!["source"];
    camera.extend(fields::<RawCameraCommon>());
    for key in SourceKind::ALL.iter().flat_map(|kind| kind.keys()) {
        if !camera.contains(key) {
            camera.push(key);
        }
    }
    vec![
        ("device", fields::<RawDevice>().to_vec()),
        ("log", fields::<RawLog>().to_vec()),
        ("detection", fields::<RawDetection>().to_vec()),
        ("classification", fields::<RawClassification>().to_vec()),
        ("homeassistant", fields::<RawHomeAssistant>().to_vec()),
        ("commands", fields::<RawCommands>().to_vec()),
        ("metrics", fields::<RawMetrics>().to_vec()),
        ("snapshots", fields::<RawSnapshots>().to_vec()),
        ("hard_examples", fields::<RawHardExamples>().to_vec()),
        ("outbox", fields::<RawOutbox>().to_vec()),
        ("mqtt", fields::<RawMqtt>().to_vec()),
        ("model", fields::<RawModel>().to_vec()),
        ("camera", camera),
    ]
}
