//! Real cameras: V4L2 through nokhwa. Device resolution (by-id links followed at every
//! open), probing (permissions, non-capture nodes), mode listing for `edgesight cameras`,
//! and the reader thread that turns nokhwa's blocking `frame()` into a [`FrameStream`].

use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot};
use tracing::info;

use crate::capture::{
    Backend, CameraInfo, CaptureError, FrameStream, Mode, Readers, Request, choose_mode,
};
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
    // The decoder type only filters the formats nokhwa agrees to open (frames are taken
    // raw, see the reader): LumaFormat's list has them all, RgbFormat's lacks GREY.
    use nokhwa::pixel_format::LumaFormat as AnyFormat;
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
    let none = RequestedFormat::new::<AnyFormat>(RequestedFormatType::None);
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
    // The mode is one nokhwa listed, so it has a nokhwa format.
    let format = to_nokhwa(mode.format).ok_or_else(|| CaptureError::NoMode {
        node: node.clone(),
        format: f.name(),
        offered: mode.format.to_string(),
    })?;
    let exact = CameraFormat::new(Resolution::new(mode.width, mode.height), format, mode.fps);
    cam.set_camera_requset(RequestedFormat::new::<AnyFormat>(
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

/// A failed `frame()`. The patched backend (vendor/nokhwa-bindings-linux) cuts each frame
/// to the bytes the driver filled and refuses a buffer flagged V4L2_BUF_FLAG_ERROR with
/// its FLAGGED marker: that is one bad frame, and the stream goes on; anything else ends
/// the stream.
fn read_error(e: nokhwa::NokhwaError) -> CaptureError {
    if let nokhwa::NokhwaError::ReadFrameError(m) = &e
        && let Some(sequence) = m
            .strip_prefix(nokhwa_bindings_linux::FLAGGED)
            .and_then(|n| n.parse().ok())
    {
        return CaptureError::Flagged { sequence };
    }
    CaptureError::Read(e.into())
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

impl V4l2Backend {
    /// Every capture device with its modes (blocking; for `edgesight cameras`).
    pub fn list(&self) -> Result<Vec<CameraInfo>, CaptureError> {
        list_v4l2()
    }
}

impl Backend for V4l2Backend {
    type Request = Request;
    type Stream = V4l2Stream;

    async fn open(
        &self,
        name: &str,
        request: &Request,
        readers: &Readers,
    ) -> Result<V4l2Stream, CaptureError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        // Two frames in flight at most: the supervisor keeps only the newest anyway.
        let (tx, rx) = mpsc::channel(2);
        let (thread_name, name, request) =
            (format!("v4l2-{name}"), name.to_string(), request.clone());
        let guard = readers.enter();
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                // Counted until this thread ends, however long the driver keeps it.
                let _guard = guard;
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
                        Err(e) => Err(read_error(e)),
                    };
                    let failed = matches!(&item, Err(e) if e.ends_stream());
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
    use nokhwa::pixel_format::LumaFormat as AnyFormat;
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
                let req = RequestedFormat::new::<AnyFormat>(RequestedFormatType::None);
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

/// nokhwa's name for a format, and back (I420 comes from pipe sources only).
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

fn to_nokhwa(f: RawFormat) -> Option<nokhwa::utils::FrameFormat> {
    use nokhwa::utils::FrameFormat as F;
    Some(match f {
        RawFormat::Mjpeg => F::MJPEG,
        RawFormat::Yuyv => F::YUYV,
        RawFormat::Nv12 => F::NV12,
        RawFormat::Gray => F::GRAY,
        RawFormat::Rgb => F::RAWRGB,
        RawFormat::Bgr => F::RAWBGR,
        RawFormat::I420 => return None,
    })
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

    /// v4l's mmap stream hands on the whole buffer: a frame cut short over a longer
    /// earlier one ended with the earlier frame's tail and EOI, and looked whole. The
    /// patched backend cuts it to what the driver filled (then it is refused), and a buffer
    /// the driver flagged is a counted bad frame, not the end of the stream.
    #[test]
    fn frames_are_cut_to_what_the_driver_filled_and_flagged_ones_refused() {
        use nokhwa_bindings_linux::delivered;
        use v4l::buffer::{Flags, Metadata};
        let noise = |seed: u32| {
            image::RgbImage::from_fn(64, 48, |x, y| {
                let v = (x * 7 + y * 13 + seed).wrapping_mul(2_654_435_761) >> 24;
                image::Rgb([v as u8, (v >> 1) as u8, (v * 3) as u8])
            })
        };
        let jpeg = |img| RawFrame::from_rgb(&img, RawFormat::Mjpeg).data;
        let (old, new) = (jpeg(noise(1)), jpeg(noise(2)));
        let cut = new.len() / 2;
        // The mmap buffer is as large as the largest frame can be; the driver wrote the
        // earlier frame, then `cut` bytes of this one over it.
        let mut mmap = vec![0u8; old.len().max(new.len()) + 4096];
        mmap[..old.len()].copy_from_slice(&old);
        let mut buffer = mmap.clone();
        buffer[..cut].copy_from_slice(&new[..cut]);
        let frame = |data: &[u8]| RawFrame {
            format: RawFormat::Mjpeg,
            width: 64,
            height: 48,
            data: data.to_vec(),
        };
        assert!(
            frame(&buffer).check().is_ok(),
            "the whole buffer looks whole"
        );
        let meta = |bytesused: usize, flags: Flags| Metadata {
            bytesused: bytesused as u32,
            flags,
            sequence: 7,
            ..Metadata::default()
        };
        let got = delivered(&buffer, &meta(cut, Flags::MAPPED)).unwrap();
        assert_eq!(got.len(), cut);
        let e = frame(got).check().unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // A whole frame passes at its own length; a count of 0 means the whole buffer.
        let mut whole = mmap.clone();
        whole[..new.len()].copy_from_slice(&new);
        let got = delivered(&whole, &meta(new.len(), Flags::MAPPED)).unwrap();
        assert_eq!(got, &new[..]);
        assert!(frame(got).check().is_ok());
        assert_eq!(
            delivered(&whole, &meta(0, Flags::MAPPED)).unwrap().len(),
            whole.len()
        );
        assert_eq!(
            delivered(&whole, &meta(1 << 30, Flags::MAPPED)).unwrap(),
            &whole[..]
        );
        let flagged = delivered(&whole, &meta(new.len(), Flags::ERROR)).unwrap_err();
        let e = read_error(flagged);
        assert!(matches!(e, CaptureError::Flagged { sequence: 7 }), "{e}");
        let other = read_error(nokhwa::NokhwaError::ReadFrameError("No such device".into()));
        assert!(matches!(other, CaptureError::Read(_)), "{other}");
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
