//! The payloads the inference stage publishes (docs/mqtt.md, docs/schemas/).

use serde::Serialize;

use crate::detect;
use crate::model::Prediction;

/// The `.../<camera>/classification` (or `.../<camera>/<region>/classification`) payload.
#[derive(Debug, Serialize)]
pub struct ClassificationMsg<'a> {
    pub v: u32,
    pub device: &'a str,
    pub camera: &'a str,
    /// The region of the frame classified; absent: the whole frame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<&'a str>,
    pub seq: u64,
    pub ts: String,
    pub model: &'a str,
    pub inference_ms: f64,
    pub top: Vec<Prediction>,
    /// Capture counter of the frame; a gap means frames were skipped.
    pub frame: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<&'a str>,
}

/// The `.../<camera>/detection` (or `.../<camera>/<region>/detection`) payload: one
/// event of a detection's life.
#[derive(Debug, Serialize)]
pub struct DetectionMsg<'a> {
    pub v: u32,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: detect::Kind,
    pub device: &'a str,
    pub camera: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<&'a str>,
    pub label: &'a str,
    pub class: usize,
    pub score: f32,
    pub max_score: f32,
    pub started_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    pub frames: u64,
}
