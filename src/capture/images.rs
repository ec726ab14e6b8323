//! The image-file source. An image camera runs on its own OS thread (decoding must not
//! stall the async runtime) and hands frames to inference through its latest-frame slot,
//! as V4L2 cameras do.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::capture::CameraCtx;
use crate::capture::slots::Frame;
use crate::config::SourceSettings;
use crate::frame::RawFrame;
use crate::stats::CameraState;
use crate::stats::status::CameraStatus;

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

/// Start the thread of image camera `ctx.index`. It stops when `ctx.cancel` fires, or
/// when a non-looping source runs out.
pub fn spawn_images(ctx: CameraCtx) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("images-{}", ctx.settings.name))
        .spawn(move || {
            let SourceSettings::Images { path, fps, looped } = &ctx.settings.source else {
                return;
            };
            let report = |state, reason: Option<String>| {
                ctx.report(&CameraStatus {
                    state,
                    online: state == CameraState::Streaming,
                    reason,
                    mode: None,
                    attempts: 0,
                    retry_in_ms: None,
                });
            };
            report(CameraState::Streaming, None);
            let reason = match images_loop(&ctx, path, *fps, *looped) {
                Ok(()) if ctx.cancel.is_cancelled() => "daemon stopping".to_string(),
                Ok(()) => "end of images".to_string(),
                Err(e) => {
                    tracing::error!("camera {}: {e:#}", ctx.settings.name);
                    format!("{e:#}")
                }
            };
            report(CameraState::Ended, Some(reason));
            ctx.slots.source_finished();
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

fn images_loop(ctx: &CameraCtx, path: &str, fps: f64, looped: bool) -> Result<()> {
    let (index, name, slots, stats, cancel) = (
        ctx.index,
        &ctx.settings.name,
        &ctx.slots,
        &ctx.stats,
        &ctx.cancel,
    );
    let files: Vec<(PathBuf, Arc<str>)> = image_files(path)?
        .into_iter()
        .map(|p| {
            let shown: Arc<str> = p.display().to_string().into();
            (p, shown)
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
        for (f, shown) in &files {
            if !sleep_until(next, cancel) {
                return Ok(());
            }
            next += period;
            // Fell far behind (e.g. the machine was suspended): restart the schedule
            // rather than bursting to catch up.
            if Instant::now() > next + period * 4 {
                next = Instant::now() + period;
            }
            let raw = match image::open(f) {
                Ok(img) => RawFrame::from(img.into_rgb8()),
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
                raw,
                captured_at: SystemTime::now(),
                captured: Instant::now(),
                number,
                file: Some(shown.clone()),
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
