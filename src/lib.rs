//! edgesight: camera frames -> ONNX ResNet (tract) -> MQTT.
//!
//! The modules are layered, ground floor first (ARCHITECTURE.md, "Layering"; enforced by
//! tests/layering.rs): a module imports only modules on lower floors, and only the daemon
//! wires the stages together.
//!
//! | floor | modules |
//! |---|---|
//! | 0 | [`util`], [`config`] |
//! | 1 | [`stats`], [`frame`], [`detect`] |
//! | 2 | [`model`] |
//! | 3 | [`capture`], [`mqtt`], [`metrics`], [`keep`] (never each other) |
//! | 4 | [`infer`] |
//! | 5 | [`daemon`] |

pub mod capture;
pub mod config;
pub mod daemon;
pub mod detect;
pub mod frame;
pub mod infer;
pub mod keep;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod stats;
pub mod util;

pub use daemon::{DRAIN_TIMEOUT, load_models, run, run_with, run_with_notifier};
