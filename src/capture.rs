//! V4L2 capture, supervised.
//!
//! nokhwa's `frame()` blocks with no timeout, and its callback camera busy-spins after an
//! unplug, so we own the threads: each open camera gets a reader thread that does nothing
//! but `frame()` and hand the raw bytes over a small channel. The camera's supervisor (an
//! async task, [`supervise`]) owns everything else: opening with capped exponential
//! back-off, stall detection (no frame for `stall_secs`), pacing, and the camera's status.
//! A reader stuck in `frame()` is abandoned (it exits when the call finally returns), never
//! waited on, so one dead camera cannot hold up another or the daemon.
//!
//! Capture sits behind [`Backend`], so the supervisor runs the same against the real V4L2
//! backend and a scripted one in tests (tests/capture.rs, with tokio's paused clock).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::frame::{RawFormat, RawFrame};
use crate::pipeline::Slots;
use crate::settings::{CameraSettings, PixelFormat, SourceSettings, V4l2Device};
use crate::source::Frame;
use crate::stats::{CameraState, Stats};

/// A capture mode: pixel format, size and frame rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub format: RawFormat,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}x{} @ {} fps",
            self.format, self.width, self.height, self.fps
        )
    }
}

/// A capture failure, in words that name the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CaptureError(pub String);

/// What a camera is asked for (a `[[camera]]` with `source = "v4l2"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub device: V4l2Device,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub format: PixelFormat,
}

impl Request {
    pub fn from_settings(c: &CameraSettings) -> Option<Request> {
        match &c.source {
            SourceSettings::V4l2 {
                device,
                width,
                height,
                fps,
                format,
            } => Some(Request {
                device: device.clone(),
                width: *width,
                height: *height,
                fps: *fps,
                format: *format,
            }),
            SourceSettings::Images { .. } => None,
        }
    }
}

/// One capture device as `edgesight cameras` lists it.
#[derive(Debug, Clone)]
pub struct CameraInfo {
    pub node: String,
    pub name: String,
    pub bus: String,
    /// Empty for nodes that cannot capture video (metadata, output): they are listed as
    /// skipped, with `skipped` saying why.
    pub modes: Vec<Mode>,
    pub skipped: Option<String>,
}

/// A source of cameras: V4L2 through nokhwa, or a script in tests.
pub trait Backend: Send + Sync + 'static {
    type Stream: FrameStream;
    /// Every capture device with its modes (blocking; for `edgesight cameras`).
    fn list(&self) -> Result<Vec<CameraInfo>, CaptureError>;
    /// Open the camera `request` names in the closest mode it offers, streaming.
    fn open(
        &self,
        name: &str,
        request: &Request,
    ) -> impl Future<Output = Result<Self::Stream, CaptureError>> + Send;
}

/// An open, streaming camera. Dropping it stops (or abandons) the capture.
pub trait FrameStream: Send + 'static {
    fn mode(&self) -> Mode;
    fn next_frame(&mut self) -> impl Future<Output = Result<RawFrame, CaptureError>> + Send;
}

/// The mode to ask for: among the modes the camera offers in a format we decode (and the
/// configured one, unless `auto`), the closest resolution, then the closest frame rate,
/// then (for `auto`) MJPEG, YUYV, NV12, RGB/BGR, GRAY in that order: MJPEG needs the least USB
/// bandwidth, YUYV the least CPU, GRAY loses colour.
pub fn choose_mode(
    modes: &[Mode],
    width: u32,
    height: u32,
    fps: u32,
    format: PixelFormat,
) -> Option<Mode> {
    let rank = |f: RawFormat| match f {
        RawFormat::Mjpeg => 0,
        RawFormat::Yuyv => 1,
        RawFormat::Nv12 => 2,
        RawFormat::Rgb | RawFormat::Bgr => 3,
        RawFormat::Gray => 4,
    };
    let wanted = |f: RawFormat| format.raw().is_none_or(|r| r == f);
    modes
        .iter()
        .filter(|m| wanted(m.format))
        .min_by_key(|m| {
            (
                m.width.abs_diff(width) + m.height.abs_diff(height),
                m.fps.abs_diff(fps),
                rank(m.format),
            )
        })
        .copied()
}

// ------------------------------------------------------------------ status

/// A camera's state as published (retained) on `<prefix>/<device>/<camera>/status`; its
/// `online` also drives `<prefix>/<device>/<camera>/availability`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CameraStatus {
    pub state: CameraState,
    pub online: bool,
    /// Why it is not streaming (the open or capture error, or the stall).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The negotiated mode while streaming.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Failed opens since the last frame.
    pub attempts: u32,
    /// When the next open is due, while waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

impl CameraStatus {
    pub fn starting() -> Self {
        CameraStatus {
            state: CameraState::Starting,
            online: false,
            reason: None,
            mode: None,
            attempts: 0,
            retry_in_ms: None,
        }
    }
}

/// Where a camera reports its status changes (MQTT in the daemon, a log in tests).
pub type StatusSink = Arc<dyn Fn(&CameraStatus) + Send + Sync>;

/// Capped exponential back-off.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }
    /// The delay to wait now; doubles the next one, up to `max`.
    pub fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// What a camera's supervisor needs from the daemon.
pub struct CameraCtx {
    pub index: usize,
    pub settings: CameraSettings,
    pub slots: Arc<Slots>,
    pub stats: Arc<Stats>,
    pub status: StatusSink,
    pub cancel: CancellationToken,
}

impl CameraCtx {
    fn report(&self, status: &CameraStatus) {
        self.stats.camera(self.index).set_state(status.state);
        (self.status)(status);
    }
}

/// Sleep `d` unless cancelled first; false when cancelled.
async fn nap(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}

/// How long an open may take before it counts as failed (a wedged driver).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Run one V4L2 camera until `ctx.cancel`: open, stream into the camera's slot, and on an
/// error or a stall report `offline` and reopen with back-off. Never returns early: a
/// camera that never opens keeps retrying (slowly) and stops nothing else.
pub async fn supervise<B: Backend>(backend: Arc<B>, request: Request, ctx: CameraCtx) {
    let name = ctx.settings.name.clone();
    let cam_stats = ctx.stats.camera(ctx.index);
    let stall = ctx.settings.stall_after();
    let min_gap = Duration::from_secs_f64(0.9 / request.fps.max(1) as f64);
    let mut backoff = Backoff::new(
        Duration::from_millis(ctx.settings.reopen_min_ms),
        Duration::from_millis(ctx.settings.reopen_max_ms),
    );
    let mut status = CameraStatus::starting();
    ctx.report(&status);
    let mut number = 0u64;
    let mut last_reason = String::new();
    while !ctx.cancel.is_cancelled() {
        let opened = tokio::select! {
            r = tokio::time::timeout(OPEN_TIMEOUT, backend.open(&name, &request)) => r,
            _ = ctx.cancel.cancelled() => break,
        };
        let reason = match opened {
            Ok(Ok(mut stream)) => {
                let mode = stream.mode();
                info!("camera {name}: opened in {mode}");
                let mut last_accepted: Option<Instant> = None;
                let mut first = true;
                let why = loop {
                    let next = tokio::select! {
                        r = tokio::time::timeout(stall, stream.next_frame()) => r,
                        _ = ctx.cancel.cancelled() => break None,
                    };
                    match next {
                        Err(_) => {
                            cam_stats.stalls.fetch_add(1, Ordering::Relaxed);
                            break Some(format!("stalled: no frame for {stall:?}"));
                        }
                        Ok(Err(e)) => {
                            cam_stats.errors.fetch_add(1, Ordering::Relaxed);
                            break Some(format!("capture failed: {e}"));
                        }
                        Ok(Ok(raw)) => {
                            if first {
                                first = false;
                                backoff.reset();
                                status = CameraStatus {
                                    state: CameraState::Streaming,
                                    online: true,
                                    reason: None,
                                    mode: Some(mode.to_string()),
                                    attempts: 0,
                                    retry_in_ms: None,
                                };
                                ctx.report(&status);
                                info!("camera {name}: online");
                            }
                            number += 1;
                            ctx.stats.frame_captured(ctx.index);
                            // Pacing: the camera may run faster than the configured fps.
                            let now = Instant::now();
                            if last_accepted.is_some_and(|t| now - t < min_gap) {
                                cam_stats.skipped.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            last_accepted = Some(now);
                            let frame = Frame {
                                raw,
                                captured_at: SystemTime::now(),
                                captured: now.into_std(),
                                number,
                                file: None,
                            };
                            if ctx.slots.put(ctx.index, frame) {
                                cam_stats.skipped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                };
                drop(stream);
                match why {
                    Some(w) => w,
                    None => break,
                }
            }
            Ok(Err(e)) => {
                cam_stats.errors.fetch_add(1, Ordering::Relaxed);
                e.0
            }
            Err(_) => {
                cam_stats.errors.fetch_add(1, Ordering::Relaxed);
                format!("open did not finish within {OPEN_TIMEOUT:?}")
            }
        };
        let delay = backoff.step();
        status = CameraStatus {
            state: CameraState::Waiting,
            online: false,
            reason: Some(reason.clone()),
            mode: None,
            attempts: status.attempts + 1,
            retry_in_ms: Some(delay.as_millis() as u64),
        };
        ctx.report(&status);
        // Say it once per distinct reason; a camera left unplugged for a day must not
        // fill the journal.
        if reason != last_reason {
            warn!("camera {name}: offline: {reason}; retrying with back-off");
            last_reason = reason;
        }
        if !nap(delay, &ctx.cancel).await {
            break;
        }
    }
    ctx.report(&CameraStatus {
        state: CameraState::Ended,
        online: false,
        reason: Some("daemon stopping".into()),
        mode: None,
        attempts: 0,
        retry_in_ms: None,
    });
}

// ------------------------------------------------------------------ V4L2 through nokhwa

/// Real cameras: V4L2 through nokhwa.
#[derive(Debug, Default)]
pub struct V4l2Backend;

/// The `/dev/videoN` node and N for a configured device. Resolved at every open, so a
/// stable `/dev/v4l/by-id/...` link follows the camera to its new index after a replug.
pub fn resolve(device: &V4l2Device) -> Result<(PathBuf, u32), CaptureError> {
    let node = match device {
        V4l2Device::Index(i) => PathBuf::from(format!("/dev/video{i}")),
        V4l2Device::Path(p) => std::fs::canonicalize(p)
            .map_err(|e| CaptureError(format!("{}: {e} (camera unplugged?)", p.display())))?,
    };
    let n = node
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("video"))
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| CaptureError(format!("{} is not a /dev/videoN node", node.display())))?;
    Ok((node, n))
}

/// Open `node` just to ask what it is: a permission problem gets its own message (the
/// fix is the `video` group), and nodes that cannot capture video are refused by name.
fn probe(node: &Path) -> Result<v4l::capability::Capabilities, CaptureError> {
    use v4l::capability::Flags;
    let dev = v4l::Device::with_path(node).map_err(|e| open_error(node, &e))?;
    let caps = dev
        .query_caps()
        .map_err(|e| CaptureError(format!("{}: VIDIOC_QUERYCAP: {e}", node.display())))?;
    if !caps.capabilities.contains(Flags::VIDEO_CAPTURE) {
        return Err(CaptureError(format!(
            "{} ({}) cannot capture video (a metadata or output node)",
            node.display(),
            caps.card
        )));
    }
    Ok(caps)
}

/// Why `node` would not open, with the fix where there is one.
fn open_error(node: &Path, e: &std::io::Error) -> CaptureError {
    CaptureError(match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "{}: permission denied; the user running edgesight needs to be in the \
             'video' group (the packaged service has SupplementaryGroups=video)",
            node.display()
        ),
        std::io::ErrorKind::NotFound => format!("{}: no such device (unplugged?)", node.display()),
        _ => format!("{}: {e}", node.display()),
    })
}

fn nokhwa_modes(cam: &mut nokhwa::Camera) -> Result<Vec<Mode>, nokhwa::NokhwaError> {
    Ok(cam
        .compatible_camera_formats()?
        .into_iter()
        .map(|m| Mode {
            format: RawFormat::from_nokhwa(m.format()),
            width: m.width(),
            height: m.height(),
            fps: m.frame_rate(),
        })
        .collect())
}

/// Open and start `request`'s camera (on the calling thread: nokhwa's camera is not Send).
fn open_blocking(name: &str, request: &Request) -> Result<(nokhwa::Camera, Mode), CaptureError> {
    use nokhwa::pixel_format::RgbFormat;
    use nokhwa::utils::{
        CameraFormat, CameraIndex, RequestedFormat, RequestedFormatType, Resolution,
    };
    let (node, n) = resolve(&request.device)?;
    probe(&node)?;
    let at = |what: &str, e: nokhwa::NokhwaError| {
        CaptureError(format!("{}: {what}: {e}", node.display()))
    };
    let none = RequestedFormat::new::<RgbFormat>(RequestedFormatType::None);
    let mut cam = nokhwa::Camera::new(CameraIndex::Index(n), none).map_err(|e| at("open", e))?;
    let modes = nokhwa_modes(&mut cam).map_err(|e| at("listing modes", e))?;
    let (w, h, fps, f) = (request.width, request.height, request.fps, request.format);
    let mode = choose_mode(&modes, w, h, fps, f).ok_or_else(|| {
        let offered: std::collections::BTreeSet<String> =
            modes.iter().map(|m| m.format.to_string()).collect();
        CaptureError(format!(
            "{}: no mode in format \"{}\" (it offers: {})",
            node.display(),
            f.name(),
            offered.into_iter().collect::<Vec<_>>().join(", ")
        ))
    })?;
    let exact = CameraFormat::new(
        Resolution::new(mode.width, mode.height),
        mode.format.to_nokhwa(),
        mode.fps,
    );
    cam.set_camera_requset(RequestedFormat::new::<RgbFormat>(
        RequestedFormatType::Exact(exact),
    ))
    .map_err(|e| at(&format!("setting {mode}"), e))?;
    cam.open_stream()
        .map_err(|e| at("starting the stream", e))?;
    // What the driver actually set may differ from what we asked for.
    let got = cam.camera_format();
    let mode = Mode {
        format: RawFormat::from_nokhwa(got.format()),
        width: got.width(),
        height: got.height(),
        fps: got.frame_rate(),
    };
    info!(
        "camera {name}: {} ({}) streaming {mode} (asked for {w}x{h} @ {fps} fps, format {})",
        node.display(),
        cam.info().human_name(),
        f.name(),
    );
    Ok((cam, mode))
}

/// An open V4L2 camera: its reader thread's channel.
pub struct V4l2Stream {
    mode: Mode,
    rx: mpsc::Receiver<Result<RawFrame, CaptureError>>,
}

impl FrameStream for V4l2Stream {
    fn mode(&self) -> Mode {
        self.mode
    }
    async fn next_frame(&mut self) -> Result<RawFrame, CaptureError> {
        self.rx
            .recv()
            .await
            .unwrap_or_else(|| Err(CaptureError("capture thread ended".into())))
    }
}

impl Backend for V4l2Backend {
    type Stream = V4l2Stream;

    fn list(&self) -> Result<Vec<CameraInfo>, CaptureError> {
        list_v4l2()
    }

    async fn open(&self, name: &str, request: &Request) -> Result<V4l2Stream, CaptureError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        // Two frames in flight at most: the supervisor keeps only the newest anyway.
        let (tx, rx) = mpsc::channel(2);
        let (thread_name, name, request) =
            (format!("v4l2-{name}"), name.to_string(), request.clone());
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let (mut cam, mode) = match open_blocking(&name, &request) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx.send(Ok(mode)).is_err() {
                    return; // the supervisor gave up waiting
                }
                loop {
                    let item = match cam.frame() {
                        Ok(buf) => {
                            let res = buf.resolution();
                            Ok(RawFrame {
                                format: mode.format,
                                width: res.width(),
                                height: res.height(),
                                data: buf.buffer().to_vec(),
                            })
                        }
                        Err(e) => Err(CaptureError(e.to_string())),
                    };
                    let failed = item.is_err();
                    // The receiver is gone once the supervisor gave up on this stream.
                    if tx.blocking_send(item).is_err() || failed {
                        break;
                    }
                }
                let _ = cam.stop_stream();
            })
            .map_err(|e| CaptureError(format!("cannot start a capture thread: {e}")))?;
        let mode = ready_rx
            .await
            .map_err(|_| CaptureError("capture thread ended while opening".into()))??;
        Ok(V4l2Stream { mode, rx })
    }
}

/// Every `/dev/videoN`, in N order, with its modes; nodes that cannot capture are listed
/// as skipped.
fn list_v4l2() -> Result<Vec<CameraInfo>, CaptureError> {
    use nokhwa::pixel_format::RgbFormat;
    use nokhwa::utils::{CameraIndex, RequestedFormat, RequestedFormatType};
    let mut nodes: Vec<(u32, PathBuf)> = std::fs::read_dir("/dev")
        .map_err(|e| CaptureError(format!("/dev: {e}")))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix("video")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    nodes.sort();
    let mut out = Vec::new();
    for (n, node) in nodes {
        let mut info = CameraInfo {
            node: node.display().to_string(),
            name: String::new(),
            bus: String::new(),
            modes: Vec::new(),
            skipped: None,
        };
        match probe(&node) {
            Ok(caps) => {
                info.name = caps.card;
                info.bus = caps.bus;
                let req = RequestedFormat::new::<RgbFormat>(RequestedFormatType::None);
                match nokhwa::Camera::new(CameraIndex::Index(n), req)
                    .and_then(|mut c| nokhwa_modes(&mut c))
                {
                    Ok(mut modes) => {
                        modes.sort_by_key(|m| (m.format.name(), m.width, m.height, m.fps));
                        info.modes = modes;
                    }
                    Err(e) => info.skipped = Some(format!("cannot list modes: {e}")),
                }
            }
            Err(e) => info.skipped = Some(e.0),
        }
        out.push(info);
    }
    Ok(out)
}

/// `edgesight cameras`: every camera with all its modes, as text.
pub fn describe(cameras: &[CameraInfo]) -> String {
    if cameras.is_empty() {
        return "no V4L2 cameras found (no /dev/video* nodes)\n".into();
    }
    let mut out = String::new();
    for c in cameras {
        match &c.skipped {
            Some(why) => out.push_str(&format!("{}: skipped: {why}\n", c.node)),
            None => {
                out.push_str(&format!("{}: {} ({})\n", c.node, c.name, c.bus));
                for m in &c.modes {
                    out.push_str(&format!("    {m}\n"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(format: RawFormat, width: u32, height: u32, fps: u32) -> Mode {
        Mode {
            format,
            width,
            height,
            fps,
        }
    }

    /// Data-driven: the documented choice from tables of offered modes.
    #[test]
    fn mode_negotiation_picks_the_closest_decodable_mode() {
        use RawFormat::*;
        let usb = [
            m(Mjpeg, 1920, 1080, 30),
            m(Mjpeg, 640, 480, 30),
            m(Yuyv, 640, 480, 30),
            m(Yuyv, 640, 480, 15),
            m(Yuyv, 320, 240, 30),
        ];
        // vivid: no MJPEG; the same sizes in several raw formats.
        let vivid = [
            m(Yuyv, 3840, 2160, 2),
            m(Yuyv, 640, 480, 25),
            m(Nv12, 640, 480, 25),
            m(Gray, 640, 480, 25),
            m(Rgb, 640, 480, 25),
            m(Rgb, 320, 180, 50),
        ];
        let ir = [m(Gray, 640, 400, 30)];
        type Case<'a> = (&'a [Mode], (u32, u32, u32, PixelFormat), Option<Mode>);
        let cases: &[Case] = &[
            (
                &usb,
                (640, 480, 30, PixelFormat::Auto),
                Some(m(Mjpeg, 640, 480, 30)),
            ),
            (
                &usb,
                (640, 480, 15, PixelFormat::Yuyv),
                Some(m(Yuyv, 640, 480, 15)),
            ),
            (
                &usb,
                (1280, 720, 30, PixelFormat::Auto),
                Some(m(Mjpeg, 640, 480, 30)),
            ),
            (
                &usb,
                (1920, 1080, 5, PixelFormat::Yuyv),
                Some(m(Yuyv, 640, 480, 15)),
            ),
            (
                &usb,
                (300, 200, 30, PixelFormat::Auto),
                Some(m(Yuyv, 320, 240, 30)),
            ),
            (&usb, (640, 480, 30, PixelFormat::Nv12), None),
            (
                &vivid,
                (640, 480, 30, PixelFormat::Auto),
                Some(m(Yuyv, 640, 480, 25)),
            ),
            (
                &vivid,
                (640, 480, 30, PixelFormat::Nv12),
                Some(m(Nv12, 640, 480, 25)),
            ),
            (
                &vivid,
                (640, 480, 30, PixelFormat::Gray),
                Some(m(Gray, 640, 480, 25)),
            ),
            (
                &vivid,
                (320, 180, 60, PixelFormat::Rgb),
                Some(m(Rgb, 320, 180, 50)),
            ),
            (&vivid, (640, 480, 30, PixelFormat::Mjpeg), None),
            (
                &ir,
                (640, 480, 30, PixelFormat::Auto),
                Some(m(Gray, 640, 400, 30)),
            ),
            (&[], (640, 480, 30, PixelFormat::Auto), None),
        ];
        for (modes, (w, h, fps, f), want) in cases {
            assert_eq!(
                choose_mode(modes, *w, *h, *fps, *f),
                *want,
                "{w}x{h}@{fps} {f:?}"
            );
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let got: Vec<u64> = (0..6).map(|_| b.step().as_millis() as u64).collect();
        assert_eq!(got, [500, 1000, 2000, 4000, 4000, 4000]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(500));
    }

    #[test]
    fn open_errors_name_the_node_and_the_fix() {
        use std::io::{Error, ErrorKind};
        let node = Path::new("/dev/video2");
        let cases = [
            (
                ErrorKind::PermissionDenied,
                "/dev/video2: permission denied; the user running edgesight needs to be in the 'video' group",
            ),
            (
                ErrorKind::NotFound,
                "/dev/video2: no such device (unplugged?)",
            ),
            (ErrorKind::ResourceBusy, "/dev/video2: busy"),
        ];
        for (kind, want) in cases {
            let got = open_error(node, &Error::new(kind, "busy")).0;
            assert!(got.starts_with(want), "{kind:?}: {got}");
        }
    }

    #[test]
    fn by_id_links_resolve_to_their_node_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("usb-Cam_123-video-index0");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        // /dev/null is no video node: refused by name, after resolving the link.
        let e = resolve(&V4l2Device::Path(link.clone())).unwrap_err();
        assert!(e.0.contains("/dev/null is not a /dev/videoN node"), "{e}");
        let gone = dir.path().join("usb-Unplugged-video-index0");
        let e = resolve(&V4l2Device::Path(gone)).unwrap_err();
        assert!(e.0.contains("unplugged"), "{e}");
        assert_eq!(
            resolve(&V4l2Device::Index(3)).unwrap(),
            (PathBuf::from("/dev/video3"), 3)
        );
        // A link to a videoN node resolves to it and its index (udev's by-id links).
        let node = dir.path().join("video7");
        std::fs::write(&node, b"").unwrap();
        let by_id = dir.path().join("usb-Cam_456-video-index0");
        std::os::unix::fs::symlink(&node, &by_id).unwrap();
        assert_eq!(resolve(&V4l2Device::Path(by_id)).unwrap(), (node, 7));
    }
}
