//! Every topic the daemon uses, in one place: `<prefix>/<device>/...`.

use crate::config::Settings;

pub const ONLINE: &str = "online";
pub const OFFLINE: &str = "offline";

pub fn availability_topic(settings: &Settings) -> String {
    format!("{}/availability", settings.base_topic())
}

/// `<prefix>/<device>/<camera>/<leaf>`.
pub fn camera_topic(settings: &Settings, camera: &str, leaf: &str) -> String {
    format!("{}/{camera}/{leaf}", settings.base_topic())
}

/// `<prefix>/<device>/<camera>/<region>/<leaf>` for a region of a camera, else
/// [`camera_topic`].
pub fn view_topic(settings: &Settings, camera: &str, region: Option<&str>, leaf: &str) -> String {
    match region {
        Some(r) => format!("{}/{camera}/{r}/{leaf}", settings.base_topic()),
        None => camera_topic(settings, camera, leaf),
    }
}

/// `<prefix>/<device>/cmd/` — commands arrive under it, replies go to `result`.
pub fn cmd_prefix(settings: &Settings) -> String {
    format!("{}/cmd/", settings.base_topic())
}

pub fn result_topic(settings: &Settings) -> String {
    format!("{}result", cmd_prefix(settings))
}

/// `<prefix>/<device>/stats`.
pub fn stats_topic(settings: &Settings) -> String {
    format!("{}/stats", settings.base_topic())
}
