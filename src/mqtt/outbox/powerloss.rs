//! The outbox's power-loss model: a record that `put` accepted with `fsync = "always"`
//! survives a power cut at every step of the write path, and one cut mid-write is
//! recovered whole or not at all.
//!
//! [`Model`] stands behind the store's [`Fs`]: it keeps what the running process sees
//! apart from what stable storage holds. A file's data reaches storage when it is synced;
//! a directory's entries (creations, renames, removals) when the directory is synced, and
//! before that any prefix of them, in order (a journalling file system commits metadata
//! in order). The cut happens after step k of a workload, for every k; every state
//! storage may then hold (each prefix of the unsynced entries, with the unsynced data lost
//! or written) is laid out in a real directory and opened by the real recovery,
//! [`DiskStore::open`].

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::store::{DiskStore, Fs, Record, Store};
use crate::config::Fsync;

#[derive(Debug, Clone)]
enum Op {
    Link(String, usize),
    Rename(String, String),
    Unlink(String),
}

impl Op {
    fn apply(&self, entries: &mut BTreeMap<String, usize>) {
        match self {
            Op::Link(name, inode) => {
                entries.insert(name.clone(), *inode);
            }
            Op::Rename(from, to) => {
                if let Some(inode) = entries.remove(from) {
                    entries.insert(to.clone(), inode);
                }
            }
            Op::Unlink(name) => {
                entries.remove(name);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Model {
    /// Per inode: (data the process sees, data on storage).
    inodes: Vec<(Vec<u8>, Vec<u8>)>,
    /// Directory entries the process sees, and those on storage.
    live: BTreeMap<String, usize>,
    durable: BTreeMap<String, usize>,
    /// Entry changes since the directory was last synced, in order.
    pending: Vec<Op>,
    steps: usize,
    /// The power is cut after this many steps: later calls fail and change nothing.
    cut_after: usize,
}

impl Model {
    /// Count one step; Err once the power is gone.
    fn step(&mut self) -> io::Result<()> {
        if self.steps >= self.cut_after {
            return Err(io::Error::other("power lost"));
        }
        self.steps += 1;
        Ok(())
    }

    /// Every state storage may hold after the cut.
    fn crash_states(&self) -> Vec<BTreeMap<String, Vec<u8>>> {
        let mut states = Vec::new();
        for prefix in 0..=self.pending.len() {
            let mut entries = self.durable.clone();
            for op in &self.pending[..prefix] {
                op.apply(&mut entries);
            }
            for written_back in [false, true] {
                let files = entries
                    .iter()
                    .map(|(name, &i)| {
                        let (live, stable) = &self.inodes[i];
                        (
                            name.clone(),
                            if written_back { live } else { stable }.clone(),
                        )
                    })
                    .collect();
                states.push(files);
            }
        }
        states
    }
}

/// The store's [`Fs`] handle on a shared [`Model`].
#[derive(Debug)]
struct ModelFs(Arc<Mutex<Model>>);

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, path.display().to_string())
}

impl Fs for ModelFs {
    fn create(&mut self, path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        m.step()?;
        let inode = m.inodes.len();
        m.inodes.push((bytes.to_vec(), Vec::new()));
        m.live.insert(name(path), inode);
        m.pending.push(Op::Link(name(path), inode));
        if sync {
            m.step()?;
            m.inodes[inode].1 = bytes.to_vec();
        }
        Ok(())
    }

    fn sync_file(&mut self, path: &Path) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        m.step()?;
        let inode = *m.live.get(&name(path)).ok_or_else(|| not_found(path))?;
        m.inodes[inode].1 = m.inodes[inode].0.clone();
        Ok(())
    }

    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        m.step()?;
        let op = Op::Rename(name(from), name(to));
        if !m.live.contains_key(&name(from)) {
            return Err(not_found(from));
        }
        op.apply(&mut m.live);
        m.pending.push(op);
        Ok(())
    }

    fn sync_dir(&mut self, _: &Path) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        m.step()?;
        let pending = std::mem::take(&mut m.pending);
        for op in &pending {
            op.apply(&mut m.durable);
        }
        Ok(())
    }

    fn remove(&mut self, path: &Path) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        m.step()?;
        if m.live.remove(&name(path)).is_none() {
            return Err(not_found(path));
        }
        m.pending.push(Op::Unlink(name(path)));
        Ok(())
    }
}

fn record(seq: u64) -> Record {
    Record {
        seq,
        topic: "edgesight/d/cam/detection".into(),
        payload: format!("{{\"seq\":{seq}}}").into_bytes(),
    }
}

/// What the workload did before the power went.
struct Done {
    /// Accepted by `put` and not acknowledged since: must survive.
    kept: Vec<u64>,
    /// Accepted, or being written when the power went: may be found.
    written: Vec<u64>,
}

/// The workload: four records written, the first acknowledged (removed) in between; the
/// power cut after `cut_after` steps.
fn run(fsync: Fsync, cut_after: usize) -> (Done, Arc<Mutex<Model>>) {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = DiskStore::open(dir.path(), fsync).unwrap();
    let model = Arc::new(Mutex::new(Model {
        cut_after,
        ..Model::default()
    }));
    store.fs = Box::new(ModelFs(model.clone()));
    let mut done = Done {
        kept: Vec::new(),
        written: Vec::new(),
    };
    for seq in 1..=4 {
        if seq == 3 {
            if store.remove(1).is_err() {
                break;
            }
            done.kept.retain(|&s| s != 1);
        }
        done.written.push(seq);
        if store.put(&record(seq)).is_err() {
            break;
        }
        done.kept.push(seq);
    }
    (done, model)
}

/// Lay `files` out in a fresh directory and recover it as the next run would. What a
/// check finds wrong, or None.
fn recover_and_check(files: &BTreeMap<String, Vec<u8>>, done: &Done) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let (_, rec) = DiskStore::open(dir.path(), Fsync::Always).unwrap();
    if !rec.quarantined.is_empty() {
        return Some(format!("quarantined {:?}", rec.quarantined));
    }
    let found: BTreeMap<u64, &Record> = rec.records.iter().map(|r| (r.seq, r)).collect();
    // An acknowledged record may come back (delivered twice is at-least-once).
    for &seq in &done.kept {
        match found.get(&seq) {
            Some(r) if **r == record(seq) => {}
            other => return Some(format!("accepted record {seq} recovered as {other:?}")),
        }
    }
    for (seq, r) in &found {
        if **r != record(*seq) || !done.written.contains(seq) {
            return Some(format!("recovered {r:?}, never written"));
        }
    }
    if done.kept.iter().any(|&s| s >= rec.next_seq) {
        return Some(format!("next_seq {} reuses an accepted seq", rec.next_seq));
    }
    None
}

/// Every cut point of the workload, every state storage may hold then: what is wrong.
fn failures(fsync: Fsync) -> Vec<String> {
    let (_, whole) = run(fsync, usize::MAX);
    let total = whole.lock().unwrap().steps;
    assert!(total >= 9, "the workload's steps: {total}");
    let mut wrong = Vec::new();
    for cut_after in 0..=total {
        let (done, model) = run(fsync, cut_after);
        for (i, files) in model.lock().unwrap().crash_states().iter().enumerate() {
            if let Some(why) = recover_and_check(files, &done) {
                wrong.push(format!("cut after step {cut_after}, state {i}: {why}"));
            }
        }
    }
    wrong
}

#[test]
fn records_written_with_fsync_always_survive_a_power_cut_at_every_step() {
    let wrong = failures(Fsync::Always);
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The model can tell: without the syncs, accepted records are lost at some cut point
/// (what `fsync = "never"` trades for speed, as documented).
#[test]
fn without_fsync_the_same_model_loses_accepted_records() {
    let wrong = failures(Fsync::Never);
    assert!(
        wrong.iter().any(|w| w.contains("accepted record")),
        "{wrong:#?}"
    );
}
