//! Frame sources. Each camera's capture runs on its own OS thread (decoding and, for V4L2,
//! nokhwa's blocking `frame()` must never stall the async runtime or the other cameras) and
//! hands frames to the pipeline through a latest-frame slot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use image::RgbImage;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pipeline::Slots;
use crate::settings::{CameraSettings, PixelFormat, SourceSettings, V4l2Device};
use crate::stats::{CameraState, Stats};

/// One captured, decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub image: RgbImage,
    pub captured_at: SystemTime,
    /// Per-camera capture counter from 1; gaps at the consumer are skipped frames.
    pub number: u64,
    /// The file it came from (image sources), for logs and the message's `file` field.
    /// Shared, so a looping source names its frames without allocating.
    pub file: Option<Arc<str>>,
}

/// The images a `path` names: a file, a directory (searched recursively) or a glob;
/// JPEG and PNG only, in path order.
pub fn image_files(pattern: &str) -> Result<Vec<PathBuf>> {
    let is_image = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
    };
    let p = Path::new(pattern);
    let mut files = Vec::new();
    if p.is_file() {
        files.push(p.to_path_buf());
    } else if p.is_dir() {
        let mut stack = vec![p.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read directory {}", dir.display()))?;
            for e in rd {
                let path = e
                    .with_context(|| format!("cannot read directory {}", dir.display()))?
                    .path();
                if path.is_dir() {
                    stack.push(path);
                } else if is_image(&path) {
                    files.push(path);
                }
            }
        }
    } else {
        let paths = glob::glob(pattern).with_context(|| format!("invalid glob {pattern:?}"))?;
        files.extend(
            paths
                .filter_map(|r| r.ok())
                .filter(|p| p.is_file() && is_image(p)),
        );
    }
    files.sort();
    if files.is_empty() {
        bail!("no JPEG or PNG images at {pattern:?}");
    }
    Ok(files)
}

/// Start the capture thread for camera `index`. It stops when `cancel` fires, or when a
/// non-looping image source runs out.
pub fn spawn_capture(
    index: usize,
    camera: CameraSettings,
    slots: Arc<Slots>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("capture-{}", camera.name))
        .spawn(move || {
            let result = match &camera.source {
                SourceSettings::Images { path, fps, looped } => images_loop(
                    index,
                    &camera.name,
                    path,
                    *fps,
                    *looped,
                    &slots,
                    &stats,
                    &cancel,
                ),
                SourceSettings::V4l2 { .. } => v4l2_loop(index, &camera, &slots, &stats, &cancel),
            };
            if let Err(e) = result {
                tracing::error!("camera {}: {e:#}", camera.name);
            }
            stats.camera(index).set_state(CameraState::Ended);
            slots.source_finished();
        })
}

/// Sleep until `deadline` unless cancelled first; returns false when cancelled.
fn sleep_until(deadline: Instant, cancel: &CancellationToken) -> bool {
    // Short naps keep shutdown prompt without a wake-up channel per thread.
    while !cancel.is_cancelled() {
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
    }
    false
}

#[allow(clippy::too_many_arguments)]
fn images_loop(
    index: usize,
    name: &str,
    path: &str,
    fps: f64,
    looped: bool,
    slots: &Slots,
    stats: &Stats,
    cancel: &CancellationToken,
) -> Result<()> {
    let files: Vec<(PathBuf, Arc<str>)> = image_files(path)?
        .into_iter()
        .map(|p| {
            let name: Arc<str> = p.display().to_string().into();
            (p, name)
        })
        .collect();
    info!(
        "camera {name}: {} image(s) from {path:?} at {fps} fps{}",
        files.len(),
        if looped { ", looping" } else { "" }
    );
    let period = Duration::from_secs_f64(1.0 / fps);
    let cam = stats.camera(index);
    let mut next = Instant::now();
    let mut number = 0u64;
    loop {
        let mut decoded_any = false;
        for (f, name) in &files {
            if !sleep_until(next, cancel) {
                return Ok(());
            }
            next += period;
            // Fell far behind (e.g. the machine was suspended): restart the schedule
            // rather than bursting to catch up.
            if Instant::now() > next + period * 4 {
                next = Instant::now() + period;
            }
            let image = match image::open(f) {
                Ok(img) => img.into_rgb8(),
                Err(e) => {
                    cam.errors.fetch_add(1, Ordering::Relaxed);
                    warn!("camera {name}: skipping {}: {e}", f.display());
                    continue;
                }
            };
            decoded_any = true;
            number += 1;
            stats.frame_captured(index);
            let frame = Frame {
                image,
                captured_at: SystemTime::now(),
                number,
                file: Some(name.clone()),
            };
            if slots.put(index, frame) {
                cam.skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !looped {
            info!("camera {name}: end of images (loop = false)");
            return Ok(());
        }
        if !decoded_any {
            bail!(
                "none of the {} image(s) at {path:?} could be decoded",
                files.len()
            );
        }
    }
}

/// The nokhwa camera index for a configured device; `/dev/videoN` (or a link to it) -> N.
fn camera_index(device: &V4l2Device) -> Result<nokhwa::utils::CameraIndex> {
    use nokhwa::utils::CameraIndex;
    match device {
        V4l2Device::Index(i) => Ok(CameraIndex::Index(*i)),
        V4l2Device::Path(p) => {
            let real = std::fs::canonicalize(p)
                .with_context(|| format!("camera device {}", p.display()))?;
            let n = real
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("video"))
                .and_then(|n| n.parse::<u32>().ok())
                .with_context(|| {
                    format!("camera device {} is not a /dev/videoN node", real.display())
                })?;
            Ok(CameraIndex::Index(n))
        }
    }
}

/// The camera mode to ask for: among the modes the camera offers in a format we decode
/// (and the configured one, unless `auto`), the closest resolution, then the closest frame
/// rate, then (for `auto`) MJPEG before YUYV before the rest: MJPEG needs the least USB
/// bandwidth, YUYV the least CPU.
pub fn choose_mode(
    modes: &[nokhwa::utils::CameraFormat],
    width: u32,
    height: u32,
    fps: u32,
    format: PixelFormat,
) -> Option<nokhwa::utils::CameraFormat> {
    use nokhwa::utils::FrameFormat;
    let rank = |f: FrameFormat| match f {
        FrameFormat::MJPEG => 0,
        FrameFormat::YUYV => 1,
        FrameFormat::NV12 => 2,
        FrameFormat::RAWRGB => 3,
        FrameFormat::GRAY => 4,
        _ => 9,
    };
    let wanted = |f: FrameFormat| match format {
        PixelFormat::Auto => rank(f) < 9,
        PixelFormat::Mjpeg => f == FrameFormat::MJPEG,
        PixelFormat::Yuyv => f == FrameFormat::YUYV,
    };
    modes
        .iter()
        .filter(|m| wanted(m.format()))
        .min_by_key(|m| {
            (
                m.width().abs_diff(width) + m.height().abs_diff(height),
                m.frame_rate().abs_diff(fps),
                rank(m.format()),
            )
        })
        .copied()
}

fn open_camera(camera: &CameraSettings) -> Result<nokhwa::Camera> {
    use nokhwa::pixel_format::RgbFormat;
    use nokhwa::utils::{RequestedFormat, RequestedFormatType};
    let SourceSettings::V4l2 {
        device,
        width,
        height,
        fps,
        format,
    } = &camera.source
    else {
        bail!("not a v4l2 camera");
    };
    let index = camera_index(device)?;
    let none = RequestedFormat::new::<RgbFormat>(RequestedFormatType::None);
    let mut cam = nokhwa::Camera::new(index.clone(), none)
        .with_context(|| format!("opening V4L2 camera {index}"))?;
    let modes = cam
        .compatible_camera_formats()
        .with_context(|| format!("listing the modes of V4L2 camera {index}"))?;
    let mode = choose_mode(&modes, *width, *height, *fps, *format).with_context(|| {
        format!(
            "V4L2 camera {index} offers no {format:?} mode we can decode (it has: {})",
            modes
                .iter()
                .map(|m| m.format().to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    cam.set_camera_requset(RequestedFormat::new::<RgbFormat>(
        RequestedFormatType::Exact(mode),
    ))
    .with_context(|| format!("setting V4L2 camera {index} to {mode}"))?;
    cam.open_stream()
        .with_context(|| format!("starting the stream of V4L2 camera {index}"))?;
    let f = cam.camera_format();
    info!(
        "camera {}: opened {} ({}) at {}x{} {} fps {} (asked for {width}x{height} {fps} fps {format:?})",
        camera.name,
        index,
        cam.info().human_name(),
        f.width(),
        f.height(),
        f.frame_rate(),
        f.format()
    );
    Ok(cam)
}

fn v4l2_loop(
    index: usize,
    camera: &CameraSettings,
    slots: &Slots,
    stats: &Stats,
    cancel: &CancellationToken,
) -> Result<()> {
    use nokhwa::pixel_format::RgbFormat;
    let cam_stats = stats.camera(index);
    let name = &camera.name;
    let mut backoff = Duration::from_millis(500);
    let mut number = 0u64;
    while !cancel.is_cancelled() {
        let mut cam = match open_camera(camera) {
            Ok(c) => c,
            Err(e) => {
                cam_stats.set_state(CameraState::Waiting);
                cam_stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!("camera {name}: {e:#}; retrying in {backoff:?}");
                if !sleep_until(Instant::now() + backoff, cancel) {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_millis(500);
        // Open counts as streaming: a camera that opens and then never delivers is stalled.
        stats.streaming(index);
        while !cancel.is_cancelled() {
            let image = cam.frame().and_then(|buf| buf.decode_image::<RgbFormat>());
            match image {
                Ok(image) => {
                    number += 1;
                    stats.frame_captured(index);
                    let frame = Frame {
                        image,
                        captured_at: SystemTime::now(),
                        number,
                        file: None,
                    };
                    if slots.put(index, frame) {
                        cam_stats.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    cam_stats.set_state(CameraState::Waiting);
                    cam_stats.errors.fetch_add(1, Ordering::Relaxed);
                    warn!("camera {name}: capture failed: {e}; reopening");
                    break;
                }
            }
        }
        let _ = cam.stop_stream();
    }
    Ok(())
}

/// `edgesight cameras`: every V4L2 camera with its modes, as text.
pub fn list_cameras() -> Result<String> {
    use nokhwa::pixel_format::RgbFormat;
    use nokhwa::utils::{ApiBackend, RequestedFormat, RequestedFormatType};
    let infos = match nokhwa::query(ApiBackend::Video4Linux) {
        Ok(i) => i,
        Err(e) => return Ok(format!("no V4L2 cameras found ({e})\n")),
    };
    if infos.is_empty() {
        return Ok("no V4L2 cameras found\n".into());
    }
    let mut out = String::new();
    for info in infos {
        out.push_str(&format!(
            "{}: {} ({})\n",
            info.index(),
            info.human_name(),
            info.description()
        ));
        let req = RequestedFormat::new::<RgbFormat>(RequestedFormatType::None);
        match nokhwa::Camera::new(info.index().clone(), req)
            .and_then(|mut c| c.compatible_camera_formats())
        {
            Ok(mut modes) => {
                modes.sort_by_key(|m| {
                    (
                        m.format().to_string(),
                        m.width(),
                        m.height(),
                        m.frame_rate(),
                    )
                });
                for m in modes {
                    out.push_str(&format!(
                        "    {:<6} {}x{} @ {} fps\n",
                        m.format().to_string(),
                        m.width(),
                        m.height(),
                        m.frame_rate()
                    ));
                }
            }
            Err(e) => out.push_str(&format!("    cannot list modes: {e}\n")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nokhwa::utils::{CameraFormat, FrameFormat, Resolution};

    fn m(f: FrameFormat, w: u32, h: u32, fps: u32) -> CameraFormat {
        CameraFormat::new(Resolution::new(w, h), f, fps)
    }

    #[test]
    fn mode_negotiation_picks_the_closest_decodable_mode() {
        use FrameFormat::*;
        let usb = [
            m(MJPEG, 1920, 1080, 30),
            m(MJPEG, 640, 480, 30),
            m(YUYV, 640, 480, 30),
            m(YUYV, 640, 480, 15),
            m(YUYV, 320, 240, 30),
        ];
        // vivid offers no MJPEG at all.
        let vivid = [
            m(YUYV, 3840, 2160, 2),
            m(YUYV, 640, 480, 25),
            m(NV12, 640, 480, 25),
        ];
        type Case<'a> = (
            &'a [CameraFormat],
            (u32, u32, u32, PixelFormat),
            Option<CameraFormat>,
        );
        let cases: &[Case] = &[
            (
                &usb,
                (640, 480, 30, PixelFormat::Auto),
                Some(m(MJPEG, 640, 480, 30)),
            ),
            (
                &usb,
                (640, 480, 15, PixelFormat::Yuyv),
                Some(m(YUYV, 640, 480, 15)),
            ),
            (
                &usb,
                (1280, 720, 30, PixelFormat::Auto),
                Some(m(MJPEG, 640, 480, 30)),
            ),
            (
                &usb,
                (1920, 1080, 5, PixelFormat::Yuyv),
                Some(m(YUYV, 640, 480, 15)),
            ),
            (
                &usb,
                (300, 200, 30, PixelFormat::Auto),
                Some(m(YUYV, 320, 240, 30)),
            ),
            (
                &vivid,
                (640, 480, 30, PixelFormat::Auto),
                Some(m(YUYV, 640, 480, 25)),
            ),
            (&vivid, (640, 480, 30, PixelFormat::Mjpeg), None),
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
