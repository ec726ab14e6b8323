//! The one error of the config module.

use std::fmt;

/// `sysexits.h` EX_CONFIG: systemd and scripts can tell "fix the config" from a crash.
pub const EX_CONFIG: u8 = 78;

/// A configuration problem, its message naming the key path and where the value came
/// from. `main` maps it to exit code 78.
#[derive(Debug)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configuration error: {}", self.message)
    }
}

impl std::error::Error for ConfigError {}
