//! Capture: every camera source, supervised, delivering into its latest-frame slot.
//!
//! * [`slots`]: the hand-off to inference ([`Slots`], [`Frame`]).
//! * [`supervisor`]: one async task per V4L2 or stream camera: open with back-off, stall
//!   detection, pacing, status reports. Runs against any [`Backend`].
//! * [`v4l2`]: the V4L2 backend (nokhwa), device resolution, `edgesight cameras`.
//! * [`stream`]: the byte-stream backend: a child program's stdout ([`child`]: `pipe`,
//!   `picamera`, `rtsp`) or an HTTP multipart stream ([`http`]), cut into frames by
//!   [`framing`].
//! * [`images`]: the image-file source, on its own OS thread.
//!
//! May use: config, util, stats, frame. Never mqtt or infer: status changes leave through
//! the [`StatusSink`] the daemon hands in.

pub mod child;
pub mod framing;
pub mod http;
pub mod images;
pub mod slots;
pub mod stream;
pub mod supervisor;
pub mod v4l2;

pub use slots::{Frame, Slots};
pub use stream::{StreamBackend, StreamRequest};
pub use supervisor::supervise;
pub use v4l2::{V4l2Backend, describe, resolve};

pub use crate::stats::status::{CameraStatus, StatusSink};

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{CameraSettings, PixelFormat, SourceSettings, V4l2Device};
use crate::frame::{RawFormat, RawFrame};
use crate::stats::Stats;

/// What a camera's source (supervisor or image thread) needs from the daemon.
pub struct CameraCtx {
    pub index: usize,
    pub settings: CameraSettings,
    pub slots: Arc<Slots>,
    pub stats: Arc<Stats>,
    pub status: StatusSink,
    pub cancel: CancellationToken,
}

impl CameraCtx {
    pub(crate) fn report(&self, status: &CameraStatus) {
        self.stats.camera(self.index).set_state(status.state);
        (self.status)(status);
    }
}

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

/// A capture failure, in words that name the device (and the fix, where there is one).
/// The supervisor only reports these (log and status topic); the variants keep each
/// message in one place and let a backend's caller tell "unplugged" from "refused".
/// Causes are part of the message rather than `source()`: the status topic carries one
/// line, not a chain.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A configured by-id link (or path) that leads nowhere.
    #[error("{}: {err} (camera unplugged?)", .link.display())]
    Unresolved { link: PathBuf, err: std::io::Error },
    #[error("{} is not a /dev/videoN node", .0.display())]
    NotVideoNode(PathBuf),
    #[error("{}: no such device (unplugged?)", .0.display())]
    NoDevice(PathBuf),
    #[error(
        "{}: permission denied; the user running edgesight needs to be in the 'video' \
         group (the packaged service has SupplementaryGroups=video)",
        .0.display()
    )]
    PermissionDenied(PathBuf),
    /// Any other failure to open the node.
    #[error("{}: {err}", .node.display())]
    Open { node: PathBuf, err: std::io::Error },
    #[error("{} ({card}) cannot capture video (a metadata or output node)", .node.display())]
    NotCapture { node: PathBuf, card: String },
    #[error("{}: no mode in format \"{format}\" (it offers: {offered})", .node.display())]
    NoMode {
        node: PathBuf,
        format: &'static str,
        offered: String,
    },
    /// The device or its driver refused a step (`what`: "open", "listing modes", ...).
    #[error("{}: {what}: {err}", .node.display())]
    Device {
        node: PathBuf,
        what: String,
        err: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A running stream failed to deliver a frame.
    #[error("{0}")]
    Read(Box<dyn std::error::Error + Send + Sync>),
    /// The driver marked the buffer as corrupt (`V4L2_BUF_FLAG_ERROR`): this frame is
    /// dropped and counted, the stream goes on.
    #[error("the driver flagged frame {sequence} as corrupt (V4L2_BUF_FLAG_ERROR)")]
    Flagged { sequence: u32 },
    /// The reader thread is gone (it ends after reporting the error that stopped it).
    #[error("capture thread ended{}", if *.opening { " while opening" } else { "" })]
    ThreadEnded { opening: bool },
    #[error("cannot start a capture thread: {0}")]
    Spawn(std::io::Error),
    /// The directory that lists the devices could not be read.
    #[error("{}: {err}", .dir.display())]
    List { dir: PathBuf, err: std::io::Error },
    /// A stream source's program is not installed.
    #[error("{programs}: not found on PATH{}", if .hint.is_empty() { String::new() } else { format!("; {}", .hint) })]
    MissingProgram {
        programs: String,
        hint: &'static str,
    },
    #[error("cannot start {program}: {err}")]
    StartProgram {
        program: String,
        err: std::io::Error,
    },
    /// A stream source's program closed its output.
    #[error("{program} ended ({status}){}", .last.as_ref().map(|l| format!(": {l}")).unwrap_or_default())]
    Exited {
        program: String,
        status: String,
        last: Option<String>,
    },
    /// An HTTP camera's failure; `url` is shown without its password.
    #[error("{url}: {what}")]
    Http { url: String, what: String },
    /// Bytes of a stream that were not a whole frame: dropped and counted, the stream goes
    /// on (unless it carries no JPEG at all).
    #[error("{0}")]
    Damaged(framing::Broken),
}

impl CaptureError {
    /// Whether the stream it came from is over. A buffer the driver flagged, or a damaged
    /// piece of a byte stream, is one bad frame: the stream goes on.
    pub fn ends_stream(&self) -> bool {
        match self {
            CaptureError::Flagged { .. } => false,
            CaptureError::Damaged(b) => b.ends_stream(),
            _ => true,
        }
    }
}

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
            _ => None,
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

/// The reader threads of one camera still alive, abandoned ones included: a driver that
/// never returns from its blocking read keeps the thread (and its file descriptor) until
/// it does. The supervisor stops reopening past [`supervisor::MAX_READERS`].
#[derive(Debug, Clone, Default)]
pub struct Readers(Arc<AtomicUsize>);

/// One reader counted in, until it drops (at the end of the reader's thread).
#[derive(Debug)]
pub struct ReaderGuard(Arc<AtomicUsize>);

impl Readers {
    pub fn live(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
    pub fn enter(&self) -> ReaderGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        ReaderGuard(self.0.clone())
    }
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A source of cameras: V4L2 through nokhwa, byte streams, or a script in tests.
pub trait Backend: Send + Sync + 'static {
    /// What a camera asks the backend for.
    type Request: Send + Sync + 'static;
    type Stream: FrameStream;
    /// How long an open may take before it counts as failed (a wedged driver, a camera
    /// program that never delivers a frame).
    const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
    /// Open the camera `request` names in the closest mode it offers, streaming. A reader
    /// that may outlive the stream (a blocking thread) holds one of `readers`' guards.
    fn open(
        &self,
        name: &str,
        request: &Self::Request,
        readers: &Readers,
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
        RawFormat::Nv12 | RawFormat::I420 => 2,
        RawFormat::Rgb | RawFormat::Bgr => 3,
        RawFormat::Gray => 4,
    };
    let wanted = |f: RawFormat| RawFormat::wanted(format).is_none_or(|r| r == f);
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
}
