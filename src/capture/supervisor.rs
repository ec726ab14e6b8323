//! The camera supervisor: one async task per V4L2 or stream camera owns its life.
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
use crate::capture::{Backend, CameraCtx, FrameStream, Readers};
use crate::stats::CameraState;
use crate::stats::status::CameraStatus;
use crate::util::{Backoff, worth_logging};

/// Sleep `d` unless cancelled first; false when cancelled.
async fn nap(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}

/// Reader threads one camera may have alive, abandoned ones included. Each abandoned
/// reader is stuck in the driver with a thread and a file descriptor; past this the camera
/// is not reopened (and says why) until one of them returns.
pub const MAX_READERS: usize = 3;

/// Run one V4L2 or stream camera until `ctx.cancel`: open, stream into the camera's slot,
/// and on an error or a stall report `offline` and reopen with back-off. Never returns
/// early: a camera that never opens keeps retrying (slowly) and stops nothing else.
pub async fn supervise<B: Backend>(backend: Arc<B>, request: B::Request, ctx: CameraCtx) {
    let mut s = Supervisor {
        name: ctx.settings.name.clone(),
        stall: ctx.settings.stall_after(),
        min_gap: Duration::from_secs_f64(0.9 / ctx.settings.source.fps()),
        backoff: Backoff::new(
            Duration::from_millis(ctx.settings.reopen_min_ms),
            Duration::from_millis(ctx.settings.reopen_max_ms),
        ),
        status: CameraStatus::starting(),
        number: 0,
        last_reason: String::new(),
        ctx: &ctx,
    };
    let readers = Readers::default();
    ctx.report(&s.status);
    while !ctx.cancel.is_cancelled() {
        if readers.live() >= MAX_READERS {
            let why = format!(
                "{} capture threads are stuck in the driver (a read that never returned); \
                 not reopening until one of them returns",
                readers.live()
            );
            if !s.wait_to_reopen(why).await {
                break;
            }
            continue;
        }
        let open = backend.open(&s.name, &request, &readers);
        let opened = tokio::select! {
            r = tokio::time::timeout(B::OPEN_TIMEOUT, open) => r,
            _ = ctx.cancel.cancelled() => break,
        };
        let cs = ctx.stats.camera(ctx.index);
        let reason = match opened {
            Ok(Ok(stream)) => match s.stream(stream).await {
                Some(why) => why,
                None => break,
            },
            Ok(Err(e)) => {
                cs.errors.fetch_add(1, Ordering::Relaxed);
                e.to_string()
            }
            Err(_) => {
                cs.errors.fetch_add(1, Ordering::Relaxed);
                format!("open did not finish within {:?}", B::OPEN_TIMEOUT)
            }
        };
        if !s.wait_to_reopen(reason).await {
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

/// One camera's supervisor state between opens.
struct Supervisor<'a> {
    ctx: &'a CameraCtx,
    name: String,
    stall: Duration,
    /// Frames closer together than this are paced out (the camera runs faster than `fps`).
    min_gap: Duration,
    backoff: Backoff,
    status: CameraStatus,
    /// Frames captured since the start, across reopens.
    number: u64,
    last_reason: String,
}

impl Supervisor<'_> {
    /// Stream an open camera into its slot until an error, a stall (`Some(why)`) or the
    /// cancel (`None`). Dropping the stream on return stops (or abandons) the capture.
    async fn stream<S: FrameStream>(&mut self, mut stream: S) -> Option<String> {
        let ctx = self.ctx;
        let cs = ctx.stats.camera(ctx.index);
        let mode = stream.mode();
        info!("camera {}: opened in {mode}", self.name);
        let mut last_accepted: Option<Instant> = None;
        let mut first = true;
        loop {
            let next = tokio::select! {
                r = tokio::time::timeout(self.stall, stream.next_frame()) => r,
                _ = ctx.cancel.cancelled() => return None,
            };
            let raw = match next {
                Err(_) => {
                    cs.stalls.fetch_add(1, Ordering::Relaxed);
                    return Some(format!("stalled: no frame for {:?}", self.stall));
                }
                Ok(Err(e)) if !e.ends_stream() => {
                    // One corrupt buffer, not a broken stream.
                    let n = cs.bad_frames.fetch_add(1, Ordering::Relaxed) + 1;
                    if worth_logging(n) {
                        warn!("camera {}: {e}; dropped ({n} bad frames so far)", self.name);
                    }
                    continue;
                }
                Ok(Err(e)) => {
                    cs.errors.fetch_add(1, Ordering::Relaxed);
                    return Some(format!("capture failed: {e}"));
                }
                Ok(Ok(raw)) => raw,
            };
            if first {
                first = false;
                self.online(&mode.to_string());
            }
            self.number += 1;
            ctx.stats.frame_captured(ctx.index);
            // Pacing: the camera may run faster than the configured fps.
            let now = Instant::now();
            if last_accepted.is_some_and(|t| now - t < self.min_gap) {
                cs.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            last_accepted = Some(now);
            let frame = Frame {
                raw,
                captured_at: SystemTime::now(),
                captured: now.into_std(),
                number: self.number,
                file: None,
            };
            if ctx.slots.put(ctx.index, frame) {
                cs.skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The first frame after an open: the camera is online.
    fn online(&mut self, mode: &str) {
        self.backoff.reset();
        self.status = CameraStatus {
            state: CameraState::Streaming,
            online: true,
            reason: None,
            mode: Some(mode.to_string()),
            attempts: 0,
            retry_in_ms: None,
        };
        self.ctx.report(&self.status);
        info!("camera {}: online", self.name);
    }

    /// Report the camera offline with `reason` and wait out the back-off; false when
    /// cancelled meanwhile.
    async fn wait_to_reopen(&mut self, reason: String) -> bool {
        let delay = self.backoff.step();
        self.status = CameraStatus {
            state: CameraState::Waiting,
            online: false,
            reason: Some(reason.clone()),
            mode: None,
            attempts: self.status.attempts + 1,
            retry_in_ms: Some(delay.as_millis() as u64),
        };
        self.ctx.report(&self.status);
        // Say it once per distinct reason; a camera left unplugged for a day must not
        // fill the journal.
        if reason != self.last_reason {
            warn!(
                "camera {}: offline: {reason}; retrying with back-off",
                self.name
            );
            self.last_reason = reason;
        }
        nap(delay, &self.ctx.cancel).await
    }
}
