//! What the daemon keeps on disk besides the outbox: event snapshots and hard examples,
//! each in a folder of its own under `device.state_dir`, bounded by files and bytes.
//!
//! A [`Folder`] holds *entries*: files sharing a stem (`<stem>.jpg`, and a hard example's
//! `<stem>.json` sidecar). Stems start with the capture time (`20261206T062601123Z_...`),
//! so name order is age order, across restarts too: opening a folder lists what earlier
//! runs left, and saving past a bound deletes the oldest entries first (counted). Files
//! that are not entries (a person's notes, a sub-folder of sorted examples) are neither
//! counted nor deleted.
//!
//! Writes go to a temporary name and are renamed, so a crash leaves whole files; they are
//! not fsynced (a snapshot lost to a power cut is not worth an SD card's write cycles).
//!
//! May use: util, config, stats.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use crate::stats::KeepCounters;

/// A bounded folder of entries, oldest first.
#[derive(Debug)]
pub struct Folder {
    dir: PathBuf,
    max_files: usize,
    max_bytes: u64,
    /// (stem, its files' total bytes), oldest first.
    entries: VecDeque<(String, u64)>,
    bytes: u64,
    pub counters: Arc<KeepCounters>,
}

/// The extensions an entry's files may have: only these are counted and deleted.
const EXTENSIONS: [&str; 2] = ["jpg", "json"];

impl Folder {
    /// Open (creating it) `dir`, keeping at most `max_files` entries and `max_bytes`,
    /// counting into `counters` (the stats' own); what is there already counts, and is
    /// trimmed to the bounds now.
    pub fn open(
        dir: &Path,
        max_files: usize,
        max_bytes: u64,
        counters: Arc<KeepCounters>,
    ) -> std::io::Result<Folder> {
        std::fs::create_dir_all(dir)?;
        let mut found: std::collections::BTreeMap<String, u64> = Default::default();
        for e in std::fs::read_dir(dir)?.flatten() {
            let path = e.path();
            let (Some(stem), Some(ext)) = (path.file_stem(), path.extension()) else {
                continue;
            };
            let ours = EXTENSIONS.iter().any(|x| ext == *x);
            let meta = e.metadata();
            if ours
                && let (Some(stem), Ok(m)) = (stem.to_str(), meta)
                && m.is_file()
            {
                *found.entry(stem.to_string()).or_default() += m.len();
            }
        }
        let mut f = Folder {
            dir: dir.to_path_buf(),
            max_files: max_files.max(1),
            max_bytes,
            bytes: found.values().sum(),
            entries: found.into_iter().collect(),
            counters,
        };
        f.trim(0);
        f.gauge();
        Ok(f)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Entries held, and their bytes.
    pub fn len(&self) -> (usize, u64) {
        (self.entries.len(), self.bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Save an entry: each `(extension, bytes)` as `<stem>.<extension>`, after deleting the
    /// oldest entries it would not fit beside. An entry larger than the whole bound is not
    /// saved. Returns the path of its first file.
    pub fn save(&mut self, stem: &str, files: &[(&str, &[u8])]) -> std::io::Result<PathBuf> {
        let size: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
        if size > self.max_bytes {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            return Err(std::io::Error::other(format!(
                "{size} bytes, more than the folder's bound ({} bytes)",
                self.max_bytes
            )));
        }
        self.trim(size);
        let mut first = None;
        for (ext, bytes) in files {
            let path = self.dir.join(format!("{stem}.{ext}"));
            let tmp = self.dir.join(format!(".{stem}.{ext}.tmp"));
            let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                self.remove(stem);
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            first.get_or_insert(path);
        }
        self.entries.push_back((stem.to_string(), size));
        self.bytes += size;
        self.counters.saved.fetch_add(1, Ordering::Relaxed);
        self.gauge();
        Ok(first.unwrap_or_else(|| self.dir.clone()))
    }

    /// Delete the oldest entries until one of `incoming` bytes fits beside the rest.
    fn trim(&mut self, incoming: u64) {
        let room = |f: &Folder| {
            let files = f.entries.len() + usize::from(incoming > 0);
            files <= f.max_files && f.bytes + incoming <= f.max_bytes
        };
        while !room(self) {
            let Some((stem, size)) = self.entries.pop_front() else {
                return;
            };
            self.remove(&stem);
            self.bytes = self.bytes.saturating_sub(size);
            self.counters.deleted.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn gauge(&self) {
        let c = &self.counters;
        c.files.store(self.entries.len() as u64, Ordering::Relaxed);
        c.bytes.store(self.bytes, Ordering::Relaxed);
    }

    fn remove(&self, stem: &str) {
        for ext in EXTENSIONS {
            let _ = std::fs::remove_file(self.dir.join(format!("{stem}.{ext}")));
        }
    }
}

/// `20261206T062601123Z_<parts joined by _>`: a stem that sorts by time, made of
/// characters any file system takes (others become `-`).
pub fn stem(at: SystemTime, parts: &[&str]) -> String {
    let ts = crate::util::rfc3339_ms(at).replace([':', '-', '.'], "");
    let mut s = ts;
    for p in parts {
        s.push('_');
        s.extend(p.chars().take(64).map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        }));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounds by files and by bytes: the oldest entries go first, with both their files;
    /// a reopened folder counts what is there and trims it to new bounds; foreign files
    /// stay untouched and uncounted.
    #[test]
    fn folders_stay_within_their_bounds_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("kept");
        let mut f = Folder::open(&d, 3, 1000, Arc::default()).unwrap();
        std::fs::write(d.join("notes.txt"), b"mine").unwrap();
        for i in 0..5 {
            let stem = format!("2026120{i}T000000000Z_cam");
            f.save(&stem, &[("jpg", &[0u8; 100]), ("json", b"{}")])
                .unwrap();
        }
        assert_eq!(f.len(), (3, 306));
        assert_eq!(f.counters.deleted.load(Ordering::Relaxed), 2);
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names[0], "20261202T000000000Z_cam.jpg");
        assert!(names.contains(&"notes.txt".to_string()));
        assert_eq!(names.len(), 7);
        // Bytes: a 400-byte entry in a 700-byte folder leaves room for one 102-byte entry.
        let mut f = Folder::open(&d, 100, 700, Arc::default()).unwrap();
        assert_eq!(f.len(), (3, 306));
        f.save("20261209T000000000Z_big", &[("jpg", &[0u8; 400])])
            .unwrap();
        assert_eq!(f.len(), (3, 604));
        assert!(
            f.save("20261210T000000000Z_huge", &[("jpg", &[0u8; 701])])
                .is_err()
        );
        // Reopened with a smaller bound: trimmed at once.
        let f = Folder::open(&d, 1, 700, Arc::default()).unwrap();
        assert_eq!(f.len(), (1, 400));
        assert!(d.join("notes.txt").exists());
    }

    #[test]
    fn stems_sort_by_time_and_keep_only_safe_characters() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_796_537_780_560);
        let s = stem(t, &["yard", "bird feeder/../x", "cat"]);
        assert_eq!(s, "20261206T061620560Z_yard_bird-feeder----x_cat");
    }
}
