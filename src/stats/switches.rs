//! What commands switched off, per view of a camera (a region, or the whole frame) and per
//! label: the view's classification messages, its detection events, or both (then it is
//! not classified at all); a label's place in the view's classifications, or its
//! detections. Kept across restarts in `<device.state_dir>/switches.json`, written whole
//! under a temporary name and renamed, so a crash leaves the old file or the new one.
//!
//! Keyed by names, not indices: a reload that adds or reorders cameras, regions or labels
//! keeps every switch on what it named, and a switch on a name the configuration no longer
//! has is kept in the file (it applies again if the name comes back).
//!
//! May use: util, config. File I/O (std only) for the one state file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole frame's key among a camera's views (a camera has regions or the whole
/// frame, never both, so a region of that name cannot meet it).
pub const FRAME: &str = "frame";

/// What is off, for a view or a label; both false is the default (on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct What {
    pub classification: bool,
    pub detection: bool,
}

impl What {
    pub fn is_on(&self) -> bool {
        !self.classification && !self.detection
    }
}

/// What is off of one view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewOff {
    #[serde(flatten)]
    pub view: What,
    /// Per label (by name), what is off for it.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, What>,
}

impl ViewOff {
    pub fn is_on(&self) -> bool {
        self.view.is_on() && self.labels.is_empty()
    }
}

/// Every switch, by camera name and view name ([`FRAME`] or the region's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Switches {
    pub v: u32,
    pub cameras: BTreeMap<String, BTreeMap<String, ViewOff>>,
}

/// Which switch a command sets: a view, or one of its labels; classification, detection
/// or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    pub camera: String,
    pub view: String,
    pub label: Option<String>,
    pub what: What,
    /// Off (true) or back on.
    pub off: bool,
}

/// The state file is a few hundred bytes; one larger than this is not ours to read.
const MAX_FILE: u64 = 1 << 20;

/// Why the switches file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SwitchesError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {len} bytes, more than a switches file holds ({MAX_FILE})")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path}: not a switches file: {source}")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl Switches {
    /// `<state_dir>/switches.json`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("switches.json")
    }

    /// The switches in `path`; none when it does not exist.
    pub fn load(path: &Path) -> Result<Switches, SwitchesError> {
        let io = |source| SwitchesError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Switches::new()),
            Err(e) => return Err(io(e)),
        };
        let len = file.metadata().map_err(io)?.len();
        if len > MAX_FILE {
            return Err(SwitchesError::TooLarge {
                path: path.to_path_buf(),
                len,
            });
        }
        let mut text = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE), &mut text)
            .map_err(io)?;
        serde_json::from_slice(&text).map_err(|source| SwitchesError::Malformed {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Write to `path`: a temporary file beside it, synced, renamed over it, the directory
    /// synced (the directory is made if missing).
    pub fn save(&self, path: &Path) -> Result<(), SwitchesError> {
        let io = |source| SwitchesError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).unwrap_or_default();
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(io)
    }

    pub fn new() -> Switches {
        Switches {
            v: 1,
            cameras: BTreeMap::new(),
        }
    }

    /// What is off of `camera`'s view `view`.
    pub fn view(&self, camera: &str, view: &str) -> Option<&ViewOff> {
        self.cameras.get(camera)?.get(view)
    }

    /// Set `s`; entries that end up all on are removed, so the file holds only what is off.
    pub fn set(&mut self, s: &Switch) {
        let views = self.cameras.entry(s.camera.clone()).or_default();
        let off = views.entry(s.view.clone()).or_default();
        let what = match &s.label {
            Some(l) => off.labels.entry(l.clone()).or_default(),
            None => &mut off.view,
        };
        if s.what.classification {
            what.classification = s.off;
        }
        if s.what.detection {
            what.detection = s.off;
        }
        off.labels.retain(|_, w| !w.is_on());
        views.retain(|_, v| !v.is_on());
        self.cameras.retain(|_, v| !v.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch(view: &str, label: Option<&str>, what: (bool, bool), off: bool) -> Switch {
        Switch {
            camera: "yard".into(),
            view: view.into(),
            label: label.map(String::from),
            what: What {
                classification: what.0,
                detection: what.1,
            },
            off,
        }
    }

    /// Switches set and cleared in turn: the state holds exactly what is off, and a state
    /// with everything back on is empty (the file then says so).
    #[test]
    fn switches_hold_only_what_is_off() {
        let mut s = Switches::new();
        s.set(&switch("gate", None, (false, true), true));
        s.set(&switch("gate", Some("person"), (true, true), true));
        s.set(&switch("feeder", None, (true, true), true));
        let gate = s.view("yard", "gate").unwrap();
        assert_eq!(
            (gate.view.classification, gate.view.detection),
            (false, true)
        );
        assert_eq!(
            gate.labels["person"],
            What {
                classification: true,
                detection: true
            }
        );
        assert!(s.view("yard", "feeder").unwrap().view.classification);
        s.set(&switch("gate", Some("person"), (true, false), false));
        assert!(!s.view("yard", "gate").unwrap().labels["person"].classification);
        s.set(&switch("gate", Some("person"), (false, true), false));
        s.set(&switch("gate", None, (true, true), false));
        s.set(&switch("feeder", None, (true, true), false));
        assert_eq!(s, Switches::new());
    }

    /// Saved and loaded back equal; a missing file is no switches; a file that is not
    /// ours (garbage, too large, unknown fields) is an error naming it, never a panic.
    #[test]
    fn the_file_round_trips_and_bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = Switches::path(dir.path());
        assert_eq!(Switches::load(&path).unwrap(), Switches::new());
        let mut s = Switches::new();
        s.set(&switch("frame", Some("cat"), (false, true), true));
        s.save(&path).unwrap();
        assert_eq!(Switches::load(&path).unwrap(), s);
        let bad: [&[u8]; 4] = [
            b"\x00\xff garbage",
            b"{\"v\":1,\"cameras\":{\"yard\":{\"gate\":{\"detection\":\"yes\"}}}}",
            b"{\"v\":1,\"cameras\":{},\"extra\":1}",
            &[b' '; (MAX_FILE + 1) as usize],
        ];
        for text in bad {
            std::fs::write(&path, text).unwrap();
            let e = Switches::load(&path).unwrap_err().to_string();
            assert!(e.contains("switches.json"), "{e}");
        }
    }
}
