//! The camera supervisor: one async task per V4L2 camera owns the camera's life.
//!
//! nokhwa's `frame()` blocks with no timeout, and its callback camera busy-spins after an
//! unplug, so the backend owns a reader thread per open camera that does nothing but
//! `frame()`. The supervisor owns everything else: opening with capped exponential
//! back-off, stall detection (no frame for `stall_secs`), pacing, and the camera's status.
//! A reader stuck in `frame()` is abandoned (it exits when the call finally returns), never
//! waited on, so one dead camera cannot hold up another or the daemon.
//!
//! The supervisor runs the same against the real V4L2 backend and a scripted one in tests
//! (tests/capture.rs, with tokio's paused clock).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::capture::slots::Frame;
use crate::capture::{Backend, CameraCtx, FrameStream, Request};
use crate::stats::CameraState;
use crate::stats::status::CameraStatus;
use crate::util::Backoff;

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
