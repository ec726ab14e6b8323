//! The control mailbox: what commands ask of a camera (pause, a snapshot) and the
//! inference stage carries out, and the switches commands set (regions and labels off,
//! [`super::switches`]). Kept apart from the counters so that the only thing the command
//! side can change is what this type offers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::Value;

use crate::stats::status::CameraStatus;
use crate::stats::switches::Switches;

/// Requests per camera, by index, and the switches.
#[derive(Debug)]
pub struct Control {
    cameras: Vec<CameraControl>,
    switches: Mutex<Switches>,
    /// Bumped on every change of `switches`, so readers see a change without a lock.
    generation: AtomicU64,
}

#[derive(Debug, Default)]
pub struct CameraControl {
    paused: AtomicBool,
    /// A snapshot was asked for: `Some(the request's id)`, taken by the inference thread.
    snapshot: Mutex<Option<Option<Value>>>,
    /// The camera's last status, for publishing it again when its switches change.
    status: Mutex<Option<CameraStatus>>,
}

impl Control {
    pub fn new(cameras: usize) -> Self {
        Self::with_switches(cameras, Switches::new())
    }

    /// A mailbox for `cameras` cameras starting from `switches` (the state file's).
    pub fn with_switches(cameras: usize, switches: Switches) -> Self {
        Control {
            cameras: (0..cameras).map(|_| CameraControl::default()).collect(),
            switches: Mutex::new(switches),
            generation: AtomicU64::new(0),
        }
    }

    pub fn camera(&self, i: usize) -> &CameraControl {
        &self.cameras[i]
    }

    /// The switches now.
    pub fn switches(&self) -> Switches {
        self.switches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the switches (the command server, once the state file holds them).
    pub fn set_switches(&self, switches: Switches) {
        *self.switches.lock().unwrap_or_else(|p| p.into_inner()) = switches;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Changes with every [`Control::set_switches`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl CameraControl {
    /// Paused cameras' frames are taken and dropped (counted), not classified.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Ask for the next frame as a snapshot; `id` is echoed in the reply. A second request
    /// before the next frame replaces the first.
    pub fn request_snapshot(&self, id: Option<Value>) {
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    /// Remember the camera's latest status (see [`CameraControl::status`]).
    pub fn set_status(&self, status: &CameraStatus) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(status.clone());
    }

    /// The camera's latest status, once it has one.
    pub fn status(&self) -> Option<CameraStatus> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The pending snapshot request, if any (`Some(id)`), clearing it.
    pub fn take_snapshot(&self) -> Option<Option<Value>> {
        self.snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}
