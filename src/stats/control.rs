//! The control mailbox: what commands ask of a camera (pause, a snapshot) and the
//! inference stage carries out. Kept apart from the counters so that the only thing the
//! command side can change is what this type offers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

/// Requests per camera, by index.
#[derive(Debug)]
pub struct Control {
    cameras: Vec<CameraControl>,
}

#[derive(Debug, Default)]
pub struct CameraControl {
    paused: AtomicBool,
    /// A snapshot was asked for: `Some(the request's id)`, taken by the inference thread.
    snapshot: Mutex<Option<Option<Value>>>,
}

impl Control {
    pub fn new(cameras: usize) -> Self {
        Control {
            cameras: (0..cameras).map(|_| CameraControl::default()).collect(),
        }
    }

    pub fn camera(&self, i: usize) -> &CameraControl {
        &self.cameras[i]
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

    /// The pending snapshot request, if any (`Some(id)`), clearing it.
    pub fn take_snapshot(&self) -> Option<Option<Value>> {
        self.snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}
