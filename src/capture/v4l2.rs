//! Real cameras: V4L2 through nokhwa. Device resolution (by-id links followed at every
//! open), probing (permissions, non-capture nodes), mode listing for `edgesight cameras`,
//! and the reader thread that turns nokhwa's blocking `frame()` into a [`FrameStream`].

use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot};
use tracing::info;

use crate::capture::{Backend, CameraInfo, CaptureError, FrameStream, Mode, Request, choose_mode};
use crate::config::V4l2Device;
use crate::frame::{RawFormat, RawFrame};

// ------------------------------------------------------------------ V4L2 through nokhwa

/// Real cameras: V4L2 through nokhwa.
#[derive(Debug, Default)]
pub struct V4l2Backend;

/// The `/dev/videoN` node and N for a configured device. Resolved at every open, so a
/// stable `/dev/v4l/by-id/...` link follows the camera to its new index after a replug.
pub fn resolve(device: &V4l2Device) -> Result<(PathBuf, u32), CaptureError> {
    let node = match device {
        V4l2Device::Index(i) => PathBuf::from(format!("/dev/video{i}")),
        V4l2Device::Path(p) => {
            std::fs::canonicalize(p).map_err(|err| CaptureError::Unresolved {
                link: p.clone(),
                err,
            })?
        }
    };
    let n = node
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("video"))
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| CaptureError::NotVideoNode(node.clone()))?;
    Ok((node, n))
}

/// Open `node` just to ask what it is: a permission problem gets its own message (the
/// fix is the `video` group), and nodes that cannot capture video are refused by name.
fn probe(node: &Path) -> Result<v4l::capability::Capabilities, CaptureError> {
    use v4l::capability::Flags;
    let dev = v4l::Device::with_path(node).map_err(|e| open_error(node, e))?;
    let caps = dev.query_caps().map_err(|e| CaptureError::Device {
        node: node.to_path_buf(),
        what: "VIDIOC_QUERYCAP".into(),
        err: e.into(),
    })?;
    if !caps.capabilities.contains(Flags::VIDEO_CAPTURE) {
        return Err(CaptureError::NotCapture {
            node: node.to_path_buf(),
            card: caps.card,
        });
    }
    Ok(caps)
}

/// Why `node` would not open, with the fix where there is one.
fn open_error(node: &Path, err: std::io::Error) -> CaptureError {
    let node = node.to_path_buf();
    match err.kind() {
        std::io::ErrorKind::PermissionDenied => CaptureError::PermissionDenied(node),
        std::io::ErrorKind::NotFound => CaptureError::NoDevice(node),
        _ => CaptureError::Open { node, err },
    }
}

fn nokhwa_modes(cam: &mut nokhwa::Camera) -> Result<Vec<Mode>, nokhwa::NokhwaError> {
    Ok(cam
        .compatible_camera_formats()?
        .into_iter()
        .map(|m| Mode {
            format: from_nokhwa(m.format()),
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
    let at = |what: &str, e: nokhwa::NokhwaError| CaptureError::Device {
        node: node.clone(),
        what: what.into(),
        err: e.into(),
    };
    let none = RequestedFormat::new::<RgbFormat>(RequestedFormatType::None);
    let mut cam = nokhwa::Camera::new(CameraIndex::Index(n), none).map_err(|e| at("open", e))?;
    let modes = nokhwa_modes(&mut cam).map_err(|e| at("listing modes", e))?;
    let (w, h, fps, f) = (request.width, request.height, request.fps, request.format);
    let mode = choose_mode(&modes, w, h, fps, f).ok_or_else(|| {
        let offered: std::collections::BTreeSet<String> =
            modes.iter().map(|m| m.format.to_string()).collect();
        CaptureError::NoMode {
            node: node.clone(),
            format: f.name(),
            offered: offered.into_iter().collect::<Vec<_>>().join(", "),
        }
    })?;
    let exact = CameraFormat::new(
        Resolution::new(mode.width, mode.height),
        to_nokhwa(mode.format),
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
        format: from_nokhwa(got.format()),
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
            .unwrap_or_else(|| Err(CaptureError::ThreadEnded { opening: false }))
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
                        Err(e) => Err(CaptureError::Read(e.into())),
                    };
                    let failed = item.is_err();
                    // The receiver is gone once the supervisor gave up on this stream.
                    if tx.blocking_send(item).is_err() || failed {
                        break;
                    }
                }
                let _ = cam.stop_stream();
            })
            .map_err(CaptureError::Spawn)?;
        let mode = ready_rx
            .await
            .map_err(|_| CaptureError::ThreadEnded { opening: true })??;
        Ok(V4l2Stream { mode, rx })
    }
}

/// Every `/dev/videoN`, in N order, with its modes; nodes that cannot capture are listed
/// as skipped.
fn list_v4l2() -> Result<Vec<CameraInfo>, CaptureError> {
    use nokhwa::pixel_format::RgbFormat;
    use nokhwa::utils::{CameraIndex, RequestedFormat, RequestedFormatType};
    let mut nodes: Vec<(u32, PathBuf)> = std::fs::read_dir("/dev")
        .map_err(|err| CaptureError::List {
            dir: "/dev".into(),
            err,
        })?
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
            Err(e) => info.skipped = Some(e.to_string()),
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

/// nokhwa's name for a format, and back: one to one, so both are total.
fn from_nokhwa(f: nokhwa::utils::FrameFormat) -> RawFormat {
    use nokhwa::utils::FrameFormat as F;
    match f {
        F::MJPEG => RawFormat::Mjpeg,
        F::YUYV => RawFormat::Yuyv,
        F::NV12 => RawFormat::Nv12,
        F::GRAY => RawFormat::Gray,
        F::RAWRGB => RawFormat::Rgb,
        F::RAWBGR => RawFormat::Bgr,
    }
}

fn to_nokhwa(f: RawFormat) -> nokhwa::utils::FrameFormat {
    use nokhwa::utils::FrameFormat as F;
    match f {
        RawFormat::Mjpeg => F::MJPEG,
        RawFormat::Yuyv => F::YUYV,
        RawFormat::Nv12 => F::NV12,
        RawFormat::Gray => F::GRAY,
        RawFormat::Rgb => F::RAWRGB,
        RawFormat::Bgr => F::RAWBGR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let got = open_error(node, Error::new(kind, "busy")).to_string();
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
        assert!(
            e.to_string()
                .contains("/dev/null is not a /dev/videoN node"),
            "{e}"
        );
        let gone = dir.path().join("usb-Unplugged-video-index0");
        let e = resolve(&V4l2Device::Path(gone)).unwrap_err();
        assert!(e.to_string().contains("unplugged"), "{e}");
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
