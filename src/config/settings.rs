//! The validated configuration: what the daemon runs on. Every value here has passed
//! [`super::validate`]; nothing past the config module sees a raw value.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest MQTT packet the daemon sends or accepts (1 MiB): the ground floor defines it
/// because the limits on configured sizes (`commands.snapshot_max_bytes`) derive from it.
pub const MQTT_MAX_PACKET: usize = 1 << 20;

/// The validated configuration the daemon runs on.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The main configuration file (drop-ins and environment are layered on top).
    #[serde(skip)]
    pub file: PathBuf,
    pub device: DeviceSettings,
    pub mqtt: MqttSettings,
    /// At least one; names unique. A single `[model]` table is the model named
    /// `default`.
    #[serde(rename = "model")]
    pub models: Vec<ModelSettings>,
    pub camera: Vec<CameraSettings>,
    pub log: LogSettings,
    pub detection: DetectionSettings,
    pub outbox: OutboxSettings,
    pub classification: ClassificationSettings,
    pub homeassistant: HomeAssistantSettings,
    pub commands: CommandSettings,
    pub metrics: MetricsSettings,
    pub snapshots: SnapshotSettings,
    pub hard_examples: HardExampleSettings,
    /// Where each value came from, for [`Settings::error_at`].
    #[serde(skip)]
    pub(super) origins: std::sync::Arc<super::sources::Sources>,
}

/// `[metrics]`: Prometheus `/metrics` over HTTP (the `metrics` module), off by default.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsSettings {
    /// Where to listen, e.g. 127.0.0.1:9898; None: no listener.
    pub listen: Option<std::net::SocketAddr>,
}

/// `[snapshots]`: event snapshots (a camera's or region's `snapshots`), kept under
/// `<device.state_dir>/snapshots/` within these bounds (the oldest deleted first).
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSettings {
    pub max_files: usize,
    pub max_bytes: u64,
    /// Each JPEG is re-encoded smaller until it fits (and so fits an MQTT packet).
    pub jpeg_max_bytes: usize,
}

/// `[hard_examples]`: frames kept for retraining (a camera's or region's
/// `hard_examples`) under `<device.state_dir>/hard-examples/`, a JPEG and a JSON sidecar
/// each, within these bounds (the oldest deleted first).
#[derive(Debug, Clone, Serialize)]
pub struct HardExampleSettings {
    pub min_score: f32,
    pub max_score: f32,
    pub flips: bool,
    pub min_interval_secs: f64,
    pub max_files: usize,
    pub max_bytes: u64,
}

/// What a camera or region does with a frame when one of its detections starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    #[default]
    Off,
    /// As JPEG on `<camera>[/<region>]/snapshot`.
    Publish,
    /// Under `<device.state_dir>/snapshots/`.
    Save,
    Both,
}

impl SnapshotMode {
    pub fn publishes(self) -> bool {
        matches!(self, SnapshotMode::Publish | SnapshotMode::Both)
    }
    pub fn saves(self) -> bool {
        matches!(self, SnapshotMode::Save | SnapshotMode::Both)
    }
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

impl<'de> Deserialize<'de> for PublishMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        match v.as_str() {
            "every" => Ok(PublishMode::Every),
            "on_change" => Ok(PublishMode::OnChange),
            other => parse_interval(other)
                .map(PublishMode::Interval)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "{other:?} is not \"every\", \"on_change\" or an interval such as \"5s\" \
                     or \"500ms\" (at most a day)"
                    ))
                }),
        }
    }
}

/// "500ms", "10s", "2m", "1h 30m" (humantime's syntax); a bare number is seconds. At most a
/// day, more than zero.
fn parse_interval(v: &str) -> Option<Duration> {
    let v = v.trim();
    let d = match v.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 => Duration::try_from_secs_f64(secs).ok()?,
        Ok(_) => return None,
        Err(_) => humantime::parse_duration(v).ok()?,
    };
    (!d.is_zero() && d <= Duration::from_secs(86_400)).then_some(d)
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

#[derive(Debug, Clone, Serialize)]
pub struct DeviceSettings {
    pub id: String,
    /// Where the daemon keeps what it must remember across restarts: the outbox (unless
    /// `outbox.dir` says otherwise) and the switches set by command (`switches.json`).
    pub state_dir: PathBuf,
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
pub struct Secret(pub(super) String);

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

/// `model.preprocess`: a named set of the normalisation keys (`channel_order`, `scale`,
/// `mean`, `std`), each of which may also be set on its own on top of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preprocess {
    /// RGB scaled to 0..1, then ImageNet mean/std (torchvision models).
    Torchvision,
    /// BGR, 0..255 minus the ImageNet channel means (Keras ResNet50 "caffe" mode).
    Caffe,
    /// RGB 0..255 as float, untouched (models that normalise inside the graph).
    Raw,
}

/// `model.channel_order`: which of the frame's channels feeds the model's first input
/// channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

/// How a pixel becomes the model's input: input channel `c` is
/// `(pixel[channel_order[c]] * scale - mean[c]) / std[c]`, the pixel 0..255. `mean` and
/// `std` are per input channel of the model, in its channel order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Normalization {
    pub channel_order: ChannelOrder,
    pub scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// The preset's values of the normalisation keys.
    pub fn normalization(self) -> Normalization {
        match self {
            Preprocess::Torchvision => Normalization {
                channel_order: ChannelOrder::Rgb,
                scale: 1.0 / 255.0,
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
            },
            // Keras "caffe" mode subtracts these from B, G, R on the 0..255 scale.
            Preprocess::Caffe => Normalization {
                channel_order: ChannelOrder::Bgr,
                scale: 1.0,
                mean: [103.939, 116.779, 123.68],
                std: [1.0; 3],
            },
            Preprocess::Raw => Normalization {
                channel_order: ChannelOrder::Rgb,
                scale: 1.0,
                mean: [0.0; 3],
                std: [1.0; 3],
            },
        }
    }
}

/// What `check` prints and the model's log line says: e.g. "RGB, x * 0.0039216, mean
/// [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]".
impl std::fmt::Display for Normalization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let order = match self.channel_order {
            ChannelOrder::Rgb => "RGB",
            ChannelOrder::Bgr => "BGR",
        };
        write!(
            f,
            "{order}, x * {}, mean {:?}, std {:?}: input = (x * scale - mean) / std",
            self.scale, self.mean, self.std
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Scale to the model input, ignoring the aspect ratio.
    Stretch,
    /// Crop the largest centred region with the model's aspect ratio, then scale.
    CenterCrop,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSettings {
    /// What cameras and regions call it (`camera.model`); a topic-level-safe name.
    pub name: String,
    pub path: PathBuf,
    pub labels: Option<PathBuf>,
    /// The preset the normalisation started from (shown; `normalization` is what runs).
    pub preprocess: Preprocess,
    /// The preset's values with the keys set on their own applied.
    #[serde(flatten)]
    pub normalization: Normalization,
    pub resize: ResizeMode,
    pub top_k: usize,
    pub threshold: f32,
    /// Threads the model runs on: our int8 convs share their channel blocks out, tract
    /// runs its matrix products in parallel; everything else runs on one of them.
    pub threads: usize,
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
    /// The model the whole frame runs on, and each region that names none.
    pub model: String,
    /// The parts of the frame classified, each on its own; empty: the whole frame.
    #[serde(rename = "region", skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<RegionSettings>,
    /// On a detection start of the whole frame.
    pub snapshots: SnapshotMode,
    pub hard_examples: bool,
}

/// `[[camera.region]]`: a named part of a camera's frame, classified on its own model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionSettings {
    /// A topic level: `<prefix>/<device>/<camera>/<region>/classification`.
    pub name: String,
    #[serde(flatten)]
    pub area: Area,
    pub model: String,
    pub snapshots: SnapshotMode,
    pub hard_examples: bool,
}

/// A rectangle of a frame in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    /// The whole of a `width` x `height` frame.
    pub fn full(width: u32, height: u32) -> Rect {
        Rect {
            x: 0,
            y: 0,
            width,
            height,
        }
    }
}

/// Where a region lies: in pixels, or in fractions of the frame (which fit any frame
/// size). Checked against a frame once its size is known ([`Area::in_frame`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Area {
    Pixels(Rect),
    Fraction {
        x: f64,
        y: f64,
        width: f64,
        height: f64,
    },
}

/// A region that does not fit the frame it is cut from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{area} is outside the {width}x{height} frame")]
pub struct OutsideFrame {
    pub area: String,
    pub width: u32,
    pub height: u32,
}

impl Area {
    /// The area in a `fw` x `fh` frame: fractions rounded to whole pixels (at least one),
    /// pixels checked to fit.
    pub fn in_frame(&self, fw: u32, fh: u32) -> Result<Rect, OutsideFrame> {
        let outside = || OutsideFrame {
            area: self.to_string(),
            width: fw,
            height: fh,
        };
        match *self {
            Area::Pixels(r) => {
                let fits = r.x as u64 + r.width as u64 <= fw as u64
                    && r.y as u64 + r.height as u64 <= fh as u64;
                fits.then_some(r).ok_or_else(outside)
            }
            Area::Fraction {
                x,
                y,
                width,
                height,
            } => {
                let span = |at: f64, len: f64, size: u32| {
                    let size = size as f64;
                    let a = (at * size).round().min(size - 1.0).max(0.0);
                    let b = ((at + len) * size).round().min(size).max(a + 1.0);
                    (a as u32, (b - a) as u32)
                };
                if fw == 0 || fh == 0 {
                    return Err(outside());
                }
                let (x, width) = span(x, width, fw);
                let (y, height) = span(y, height, fh);
                Ok(Rect {
                    x,
                    y,
                    width,
                    height,
                })
            }
        }
    }
}

/// "x 100, y 40, 300x200 pixels" or "x 0.5, y 0, 0.5x1 of the frame".
impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Area::Pixels(r) => write!(f, "x {}, y {}, {}x{} pixels", r.x, r.y, r.width, r.height),
            Area::Fraction {
                x,
                y,
                width,
                height,
            } => write!(f, "x {x}, y {y}, {width}x{height} of the frame"),
        }
    }
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
    /// A program's stdout: `command` is the argument list, `command[0]` looked up on PATH.
    Pipe {
        command: CommandLine,
        format: StreamFormat,
        /// Both set for the raw formats; for MJPEG each frame says its own size.
        width: Option<u32>,
        height: Option<u32>,
        fps: f64,
    },
    /// The Camera Module through rpicam-vid (or libcamera-vid), as MJPEG or raw YUV420.
    Picamera {
        camera: u32,
        width: u32,
        height: u32,
        fps: f64,
        format: StreamFormat,
        args: Vec<String>,
    },
    /// An RTSP camera through ffmpeg, as MJPEG.
    Rtsp {
        url: SourceUrl,
        transport: RtspTransport,
        width: Option<u32>,
        height: Option<u32>,
        fps: f64,
        args: Vec<String>,
    },
    /// `multipart/x-mixed-replace` JPEGs over HTTP, read directly.
    #[serde(rename = "http-mjpeg")]
    HttpMjpeg { url: SourceUrl, fps: f64 },
}

impl SourceSettings {
    /// The frame rate asked for: frames faster than this are skipped.
    pub fn fps(&self) -> f64 {
        match self {
            SourceSettings::V4l2 { fps, .. } => *fps as f64,
            SourceSettings::Images { fps, .. }
            | SourceSettings::Pipe { fps, .. }
            | SourceSettings::Picamera { fps, .. }
            | SourceSettings::Rtsp { fps, .. }
            | SourceSettings::HttpMjpeg { fps, .. } => *fps,
        }
    }

    /// The frame size the source is told to deliver, where a program scales to it (the
    /// Camera Module, a pipe's raw frames, RTSP with a size); None where the camera or the
    /// stream decides (V4L2 negotiates the closest mode).
    pub fn frame_size(&self) -> Option<(u32, u32)> {
        match self {
            SourceSettings::Picamera { width, height, .. } => Some((*width, *height)),
            SourceSettings::Pipe { width, height, .. }
            | SourceSettings::Rtsp { width, height, .. } => width.zip(*height),
            _ => None,
        }
    }

    /// Whether a supervisor task owns the source (opened, watched for stalls and reopened
    /// with back-off): every source but image files.
    pub fn supervised(&self) -> bool {
        !matches!(self, SourceSettings::Images { .. })
    }
}

/// What a pipe source's program writes to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamFormat {
    /// Concatenated JPEGs (what `rpicam-vid --codec mjpeg -o -` and `ffmpeg -f mjpeg -`
    /// write), split on their markers.
    Mjpeg,
    /// Raw frames of `width` x `height`: a Y plane, then interleaved U V.
    Nv12,
    /// Raw frames of `width` x `height`: Y, U and V planes (I420, what
    /// `rpicam-vid --codec yuv420` writes).
    Yuv420,
}

impl StreamFormat {
    /// The name the configuration uses.
    pub fn name(self) -> &'static str {
        match self {
            StreamFormat::Mjpeg => "mjpeg",
            StreamFormat::Nv12 => "nv12",
            StreamFormat::Yuv420 => "yuv420",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RtspTransport {
    /// Interleaved in the RTSP connection: works through NAT and firewalls.
    Tcp,
    Udp,
}

impl RtspTransport {
    pub fn name(self) -> &'static str {
        match self {
            RtspTransport::Tcp => "tcp",
            RtspTransport::Udp => "udp",
        }
    }
}

/// A camera's URL, which may carry credentials (`scheme://user:password@host/...`):
/// `Display`, `Debug` and `Serialize` show it with the password replaced, so it can be
/// logged and printed by `edgesight check`; [`SourceUrl::expose`] gives it whole.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceUrl {
    full: String,
    shown: String,
    /// Byte range of the `user[:password]` part in `full`, without the `@`.
    userinfo: Option<(usize, usize)>,
}

impl SourceUrl {
    /// Parse `scheme://[user[:password]@]host[:port][/path]`; the error says what is
    /// missing without repeating the URL (it may hold a password).
    pub fn parse(full: &str, schemes: &[&str]) -> Result<SourceUrl, String> {
        let (scheme, rest) = full
            .split_once("://")
            .ok_or("is not a URL (scheme://host/path)")?;
        if !schemes.contains(&scheme) {
            return Err(format!(
                "has scheme \"{scheme}\"; expected {}",
                schemes
                    .iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ));
        }
        if full.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("contains white space or control characters".into());
        }
        let start = scheme.len() + 3;
        let authority_end = rest.find(['/', '?', '#']).map_or(full.len(), |i| start + i);
        let authority = &full[start..authority_end];
        let userinfo = authority.rfind('@').map(|at| (start, start + at));
        let host = userinfo.map_or(authority, |(_, at)| &full[at + 1..authority_end]);
        if host.is_empty() || host.starts_with(':') {
            return Err("has no host".into());
        }
        let shown = match userinfo {
            Some((a, b)) => {
                let user = full[a..b].split(':').next().unwrap_or("");
                format!("{}{user}:***{}", &full[..a], &full[b..])
            }
            None => full.to_string(),
        };
        Ok(SourceUrl {
            full: full.to_string(),
            shown,
            userinfo,
        })
    }

    pub fn expose(&self) -> &str {
        &self.full
    }

    pub fn scheme(&self) -> &str {
        self.full.split_once("://").map_or("", |(s, _)| s)
    }

    /// The URL without its credentials.
    pub fn without_credentials(&self) -> String {
        match self.userinfo {
            Some((a, b)) => format!("{}{}", &self.full[..a], &self.full[b + 1..]),
            None => self.full.clone(),
        }
    }

    /// `host[:port]`.
    pub fn authority(&self) -> &str {
        let start = self
            .userinfo
            .map_or(self.scheme().len() + 3, |(_, b)| b + 1);
        let rest = &self.full[start..];
        &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())]
    }

    /// The path and query as a request names them (at least "/"; no fragment).
    pub fn path(&self) -> String {
        let start = self.scheme().len() + 3;
        let p = match self.full[start..].find(['/', '?', '#']) {
            Some(i) => &self.full[start + i..],
            None => "",
        };
        let p = &p[..p.find('#').unwrap_or(p.len())];
        if p.starts_with('/') {
            p.to_string()
        } else {
            format!("/{p}")
        }
    }

    /// The user and password, percent-decoded, when the URL has them.
    pub fn credentials(&self) -> Option<(String, String)> {
        let (a, b) = self.userinfo?;
        let (user, password) = full_split(&self.full[a..b]);
        Some((percent_decode(user), percent_decode(password)))
    }

    /// Every form the password may take in a program's output (as written, decoded), for
    /// scrubbing a child's messages; empty without one.
    pub fn secrets(&self) -> Vec<String> {
        url_passwords(&self.full)
    }
}

/// The passwords of the URLs with credentials (`scheme://user:password@host`) anywhere in
/// `text`, as written and percent-decoded: what must never be logged of a command line.
pub fn url_passwords(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        rest = &rest[i + 3..];
        let end = rest
            .find(|c: char| {
                c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"' || c == '\''
            })
            .unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            let (_, password) = full_split(&rest[..at]);
            for p in [password.to_string(), percent_decode(password)] {
                if !p.is_empty() && !found.contains(&p) {
                    found.push(p);
                }
            }
        }
        rest = &rest[end..];
    }
    found
}

/// `text` with every secret replaced by `***`.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_string(), |t, s| t.replace(s.as_str(), "***"))
}

/// A pipe source's command line: the program, then its arguments. `Debug` and
/// `Serialize` show it with the passwords of any URLs in it replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct CommandLine(pub Vec<String>);

impl CommandLine {
    /// The passwords of the URLs in it, in every form a program may print them.
    pub fn secrets(&self) -> Vec<String> {
        url_passwords(&self.0.join(" "))
    }

    /// The arguments as shown: URL passwords replaced.
    pub fn scrubbed(&self) -> Vec<String> {
        let secrets = self.secrets();
        self.0.iter().map(|a| scrub(a, &secrets)).collect()
    }
}

impl fmt::Debug for CommandLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.scrubbed().fmt(f)
    }
}

impl Serialize for CommandLine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.scrubbed().serialize(s)
    }
}

fn full_split(userinfo: &str) -> (&str, &str) {
    userinfo.split_once(':').unwrap_or((userinfo, ""))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown)
    }
}

impl Serialize for SourceUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.shown)
    }
}

/// `device = 0` or `device = "/dev/v4l/by-id/..."`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum V4l2Device {
    Index(u32),
    Path(PathBuf),
}

impl<'de> Deserialize<'de> for V4l2Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = V4l2Device;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a device index or a /dev path")
            }
            fn visit_u64<E: serde::de::Error>(self, i: u64) -> Result<V4l2Device, E> {
                u32::try_from(i)
                    .map(V4l2Device::Index)
                    .map_err(|_| E::custom(format!("{i} is not a valid device index")))
            }
            fn visit_i64<E: serde::de::Error>(self, i: i64) -> Result<V4l2Device, E> {
                Err(E::custom(format!("{i} is not a valid device index")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<V4l2Device, E> {
                if s.starts_with('/') {
                    Ok(V4l2Device::Path(PathBuf::from(s)))
                } else {
                    Err(E::custom(format!("{s:?} must be an index or a /dev path")))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The name the configuration uses.
    pub fn name(self) -> &'static str {
        match self {
            PixelFormat::Auto => "auto",
            PixelFormat::Mjpeg => "mjpeg",
            PixelFormat::Yuyv => "yuyv",
            PixelFormat::Nv12 => "nv12",
            PixelFormat::Gray => "gray",
            PixelFormat::Rgb => "rgb",
            PixelFormat::Bgr => "bgr",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    pub level: LogLevel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// As `tracing`'s filters spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}
