//! The hand-off from capture to inference: one latest-frame slot per camera.
//!
//! Capture overwrites a camera's slot (the overwritten frame is counted as skipped by the
//! caller), inference takes from it. So inference always works on the newest frame and no
//! queue of stale frames can build up, whatever the model's speed. Plain std: the slot
//! is shared by OS threads (image sources, inference) and async supervisors alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::frame::RawFrame;

/// One captured frame, still in the camera's pixel format.
#[derive(Debug, Clone)]
pub struct Frame {
    pub raw: RawFrame,
    pub captured_at: SystemTime,
    /// Monotonic capture time, for the frame's age.
    pub captured: Instant,
    /// Per-camera capture counter from 1; gaps at the consumer are skipped frames.
    pub number: u64,
    /// The file it came from (image sources), for logs and the message's `file` field.
    /// Shared, so a looping source names its frames without allocating.
    pub file: Option<Arc<str>>,
}

#[derive(Debug)]
struct SlotState {
    frames: Vec<Option<Frame>>,
    live_sources: usize,
    /// Round-robin start, so a fast camera cannot starve a slow one.
    next: usize,
}

#[derive(Debug)]
pub struct Slots {
    state: Mutex<SlotState>,
    ready: Condvar,
}

impl Slots {
    pub fn new(cameras: usize) -> Self {
        Self {
            state: Mutex::new(SlotState {
                frames: (0..cameras).map(|_| None).collect(),
                live_sources: cameras,
                next: 0,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store the newest frame of camera `i`; true when it replaced one never taken.
    pub fn put(&self, i: usize, frame: Frame) -> bool {
        let replaced = self.lock().frames[i].replace(frame).is_some();
        self.ready.notify_one();
        replaced
    }

    /// One camera will produce no more frames.
    pub fn source_finished(&self) {
        let mut s = self.lock();
        s.live_sources = s.live_sources.saturating_sub(1);
        drop(s);
        self.ready.notify_all();
    }

    /// Wait for the next frame of any camera. `None` once `cancel` fires, or once every
    /// source has finished and nothing is left to classify.
    pub fn take(
        &self,
        cancel: &CancellationToken,
        heartbeat: &AtomicU64,
    ) -> Option<(usize, Frame)> {
        let mut s = self.lock();
        loop {
            heartbeat.fetch_add(1, Ordering::Relaxed);
            if cancel.is_cancelled() {
                return None;
            }
            let n = s.frames.len();
            for k in 0..n {
                let i = (s.next + k) % n;
                if let Some(f) = s.frames[i].take() {
                    s.next = (i + 1) % n;
                    return Some((i, f));
                }
            }
            if s.live_sources == 0 {
                return None;
            }
            // The timeout bounds how late a cancellation is noticed.
            s = self
                .ready
                .wait_timeout(s, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}
