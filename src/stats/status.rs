//! A camera's state as the outside world sees it, and where its changes go. Defined here,
//! below capture and mqtt, so that capture reports through a [`StatusSink`] the daemon
//! builds from mqtt without either importing the other.

use std::sync::Arc;

use serde::Serialize;

use crate::stats::CameraState;

/// A camera's state as published (retained) on `<prefix>/<device>/<camera>/status`; its
/// `online` also drives `<prefix>/<device>/<camera>/availability`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CameraStatus {
    pub state: CameraState,
    pub online: bool,
    /// Why it is not streaming (the open or capture error, or the stall).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The negotiated mode while streaming.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Failed opens since the last frame.
    pub attempts: u32,
    /// When the next open is due, while waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

impl CameraStatus {
    pub fn starting() -> Self {
        CameraStatus {
            state: CameraState::Starting,
            online: false,
            reason: None,
            mode: None,
            attempts: 0,
            retry_in_ms: None,
        }
    }
}

/// Where a camera reports its status changes (MQTT in the daemon, a log in tests).
pub type StatusSink = Arc<dyn Fn(&CameraStatus) + Send + Sync>;
