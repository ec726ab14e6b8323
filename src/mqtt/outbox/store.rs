//! Where the outbox's records persist: the record format (magic, CRC32, seq, topic,
//! payload), [`DiskStore`] (one file per record, written to a temporary name, fsynced per
//! policy, renamed; the directory locked against a second writer) and [`MemStore`]
//! (nothing kept: the fallback, and for tests). What can never be delivered is [`poison`].

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::config::Fsync;

/// One message waiting for its PUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Record {
    pub(crate) fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + HEADER
    }
}

/// Where records persist. Errors are reported, never fatal: the outbox keeps the record in
/// memory and carries on.
pub trait Store: Send {
    /// Persist `rec` as durably as the store's policy says before returning.
    fn put(&mut self, rec: &Record) -> io::Result<()>;
    /// Forget `seq` (acknowledged, or dropped to stay within bounds).
    fn remove(&mut self, seq: u64) -> io::Result<()>;
    /// Move `seq` aside for ever (a record the client or broker refuses); where it went.
    fn quarantine(&mut self, seq: u64) -> io::Result<PathBuf>;
    /// Make durable what the policy deferred (called on a timer).
    fn sync(&mut self) -> io::Result<()>;
    /// A reload's new fsync policy, for the records written from now on.
    fn set_fsync(&mut self, _: Fsync) {}
    fn describe(&self) -> String;
}

/// Keeps nothing: records live only in the outbox's queue.
#[derive(Debug, Default)]
pub struct MemStore;

impl Store for MemStore {
    fn put(&mut self, _: &Record) -> io::Result<()> {
        Ok(())
    }
    fn remove(&mut self, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn quarantine(&mut self, _: u64) -> io::Result<PathBuf> {
        Ok(PathBuf::from("(memory)"))
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

// File layout, little-endian: magic, crc32 of everything after it, seq, topic length,
// payload length, topic, payload.
const MAGIC: &[u8; 4] = b"ESO1";
pub(crate) const HEADER: usize = 4 + 4 + 8 + 2 + 4;
const EXT: &str = "rec";

pub fn encode(rec: &Record) -> Vec<u8> {
    let mut body = Vec::with_capacity(rec.size());
    body.extend_from_slice(&rec.seq.to_le_bytes());
    body.extend_from_slice(&(rec.topic.len() as u16).to_le_bytes());
    body.extend_from_slice(&(rec.payload.len() as u32).to_le_bytes());
    body.extend_from_slice(rec.topic.as_bytes());
    body.extend_from_slice(&rec.payload);
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// What is wrong with a record file (the reason it is quarantined).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated: {0} bytes")]
    Truncated(usize),
    #[error("bad magic")]
    Magic,
    #[error("checksum mismatch")]
    Checksum,
    #[error("length mismatch: {got} bytes for topic {topic} + payload {payload}")]
    Length {
        got: usize,
        topic: usize,
        payload: usize,
    },
    #[error("topic is not UTF-8")]
    Topic,
}

/// The record in `bytes`, or what is wrong with it.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    if bytes.len() < HEADER {
        return Err(DecodeError::Truncated(bytes.len()));
    }
    if &bytes[..4] != MAGIC {
        return Err(DecodeError::Magic);
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap_or_default());
    let body = &bytes[8..];
    if crc32fast::hash(body) != crc {
        return Err(DecodeError::Checksum);
    }
    let seq = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
    let tlen = u16::from_le_bytes(body[8..10].try_into().unwrap_or_default()) as usize;
    let plen = u32::from_le_bytes(body[10..14].try_into().unwrap_or_default()) as usize;
    let rest = &body[14..];
    if rest.len() != tlen + plen {
        return Err(DecodeError::Length {
            got: rest.len(),
            topic: tlen,
            payload: plen,
        });
    }
    let topic = std::str::from_utf8(&rest[..tlen])
        .map_err(|_| DecodeError::Topic)?
        .to_string();
    Ok(Record {
        seq,
        topic,
        payload: rest[tlen..].to_vec(),
    })
}

/// Sequence numbers at or past this are refused as poison: the numbering continues after
/// the highest one found, and must never wrap (the queue is searched by sequence number).
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// Why a record can never be delivered: the client or the broker would refuse it every
/// time, and a sender that resent it for ever would block every record behind it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Poison {
    #[error("empty topic")]
    EmptyTopic,
    #[error("topic contains a NUL character")]
    Nul,
    #[error("topic contains a wildcard (+ or #)")]
    Wildcard,
    #[error("sequence number {0} out of range")]
    Seq(u64),
    #[error("{0} bytes: larger than an MQTT packet may be")]
    TooLarge(usize),
}

/// What is wrong with `rec` for ever, if anything (MQTT 3.1.1 §4.7.3, §1.5.3).
pub fn poison(rec: &Record) -> Option<Poison> {
    let t = &rec.topic;
    if t.is_empty() {
        Some(Poison::EmptyTopic)
    } else if t.contains('\0') {
        Some(Poison::Nul)
    } else if t.contains(['+', '#']) {
        Some(Poison::Wildcard)
    } else if rec.seq >= MAX_SEQ {
        Some(Poison::Seq(rec.seq))
    } else if publish_size(rec) > crate::config::MQTT_MAX_PACKET {
        Some(Poison::TooLarge(publish_size(rec)))
    } else {
        None
    }
}

/// The PUBLISH packet's size, header included (at most 5 + 2 + 2 bytes of it).
fn publish_size(rec: &Record) -> usize {
    rec.topic.len() + rec.payload.len() + 9
}

/// Why an outbox directory cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process (a second daemon on the same directory) holds it: two writers
    /// would share sequence numbers and delete each other's records.
    #[error("{} is in use by another edgesight process{}", dir.display(), holder.map_or(String::new(), |p| format!(" (pid {p})")))]
    Locked { dir: PathBuf, holder: Option<u32> },
    #[error("{}: {source}", dir.display())]
    Io { dir: PathBuf, source: io::Error },
}

impl OpenError {
    fn io(dir: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
        move |source| OpenError::Io {
            dir: dir.to_path_buf(),
            source,
        }
    }
}

/// The file-system calls that change what a crash leaves behind, as the write path makes
/// them. [`RealFs`] is `std::fs`; the outbox's power-loss model (`powerloss.rs`, a test)
/// stands behind it to crash the write path after every step.
pub trait Fs: Send + std::fmt::Debug {
    /// Create `path` (or truncate it) holding `bytes`; with `sync`, its data is on stable
    /// storage before this returns (its directory entry is not: see [`Fs::sync_dir`]).
    fn create(&mut self, path: &Path, bytes: &[u8], sync: bool) -> io::Result<()>;
    /// Make the data of an existing file durable.
    fn sync_file(&mut self, path: &Path) -> io::Result<()>;
    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()>;
    /// Make `dir`'s entries (creations, renames, removals) durable.
    fn sync_dir(&mut self, dir: &Path) -> io::Result<()>;
    fn remove(&mut self, path: &Path) -> io::Result<()>;
}

#[derive(Debug)]
pub struct RealFs;

impl Fs for RealFs {
    fn create(&mut self, path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
        let mut f = fs::File::create(path)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_data()?;
        }
        Ok(())
    }

    fn sync_file(&mut self, path: &Path) -> io::Result<()> {
        fs::File::open(path)?.sync_data()
    }

    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
        fs::File::open(dir)?.sync_all()
    }

    fn remove(&mut self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
}

/// One file per record in `dir`; unreadable ones moved to `dir/quarantine/`. Holds an
/// exclusive lock on `dir/lock` while open.
#[derive(Debug)]
pub struct DiskStore {
    dir: PathBuf,
    fsync: Fsync,
    /// Where the write path's calls go (the power-loss model swaps it).
    pub(super) fs: Box<dyn Fs>,
    /// Files renamed into place but not yet fsynced (`Fsync::Interval`).
    unsynced: Vec<PathBuf>,
    /// The flock on `dir/lock`: released when the store is dropped (or the process dies).
    _lock: fs::File,
}

/// What opening a [`DiskStore`] found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Valid records, oldest first.
    pub records: Vec<Record>,
    /// Corrupt or poison files moved aside (or, when even that failed, left where they
    /// were and not replayed), with the reason.
    pub quarantined: Vec<(PathBuf, String)>,
    /// Directory entries that could not be read at all: skipped, left in place.
    pub skipped: Vec<(PathBuf, String)>,
    /// The next sequence number to use: after every record name found.
    pub next_seq: u64,
    /// Why the directory cannot be written now (a full or read-only disk): records are
    /// recovered anyway, and new ones kept in memory until it can.
    pub unwritable: Option<io::Error>,
}

const LOCK: &str = "lock";
const QUARANTINE: &str = "quarantine";

impl DiskStore {
    /// Open (creating) `dir`, lock it, and read back every record a previous run left.
    /// Only a missing or unlistable directory, or another holder of the lock, fails the
    /// open: a file that cannot be read is skipped, and a full disk still replays.
    pub fn open(dir: &Path, fsync: Fsync) -> Result<(DiskStore, Recovered), OpenError> {
        fs::create_dir_all(dir).map_err(OpenError::io(dir))?;
        let lock = lock(dir)?;
        let mut rec = Recovered {
            unwritable: probe(dir).err(),
            ..Recovered::default()
        };
        let mut highest = 0;
        for (seq, path) in list(dir, &mut rec).map_err(OpenError::io(dir))? {
            highest = highest.max(seq);
            match read_record(&path, seq) {
                Ok(r) => rec.records.push(r),
                Err(why) => rec.quarantined.push((path, why)),
            }
        }
        rec.next_seq = highest + 1;
        let store = DiskStore {
            dir: dir.to_path_buf(),
            fsync,
            fs: Box::new(RealFs),
            unsynced: Vec::new(),
            _lock: lock,
        };
        for (path, why) in &mut rec.quarantined {
            match store.move_aside(path) {
                Ok(to) => *path = to,
                Err(e) => why.push_str(&format!("; left in place, cannot move it: {e}")),
            }
        }
        Ok((store, rec))
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.{EXT}"))
    }

    /// Move `path` into `quarantine/`; the new path.
    fn move_aside(&self, path: &Path) -> io::Result<PathBuf> {
        let q = self.dir.join(QUARANTINE);
        fs::create_dir_all(&q)?;
        let to = q.join(path.file_name().unwrap_or_default());
        fs::rename(path, &to)?;
        Ok(to)
    }
}

/// Take the directory's lock, or say who holds it. The holder's pid is written into the
/// file for that message only; the lock itself is the flock.
fn lock(dir: &Path) -> Result<fs::File, OpenError> {
    use std::io::{Read, Seek};
    let path = dir.join(LOCK);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(OpenError::io(dir))?;
    match f.try_lock() {
        Ok(()) => {
            // Best effort (a full disk may refuse it): only the message uses it.
            let _ = f
                .set_len(0)
                .and_then(|()| f.rewind())
                .and_then(|()| writeln!(f, "{}", std::process::id()));
            Ok(f)
        }
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            Err(OpenError::Locked {
                dir: dir.to_path_buf(),
                holder: pid.trim().parse().ok(),
            })
        }
        Err(fs::TryLockError::Error(e)) => Err(OpenError::io(dir)(e)),
    }
}

/// Fail as [`DiskStore::open`] would if another process holds `dir` (creating it); the
/// lock is released again at once.
pub fn ensure_free(dir: &Path) -> Result<(), OpenError> {
    fs::create_dir_all(dir).map_err(OpenError::io(dir))?;
    lock(dir).map(drop)
}

/// Can a record be written here now?
fn probe(dir: &Path) -> io::Result<()> {
    let probe = dir.join(".probe");
    let written = fs::write(&probe, b"probe");
    let _ = fs::remove_file(&probe);
    written
}

/// The record files in `dir`, oldest first. Torn temporary files are removed; entries that
/// cannot be read, and names that are not a sequence number, are noted in `rec`.
fn list(dir: &Path, rec: &mut Recovered) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = match entry {
            Ok(e) => e.path(),
            Err(e) => {
                rec.skipped
                    .push((dir.to_path_buf(), format!("entry unreadable: {e}")));
                continue;
            }
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".tmp") {
            // A crash between write and rename: never accepted, never published.
            let _ = fs::remove_file(&path);
            continue;
        }
        if path.extension().is_none_or(|x| x != EXT) {
            continue;
        }
        match path
            .file_stem()
            .and_then(|s| s.to_str()?.parse::<u64>().ok())
        {
            Some(seq) if seq < MAX_SEQ => files.push((seq, path)),
            Some(seq) => rec.quarantined.push((path, Poison::Seq(seq).to_string())),
            None => rec.quarantined.push((path, "unexpected file name".into())),
        }
    }
    files.sort();
    Ok(files)
}

/// The record in `path`, named `seq`, or why it cannot be replayed.
fn read_record(path: &Path, seq: u64) -> Result<Record, String> {
    let bytes = fs::read(path).map_err(|e| format!("unreadable: {e}"))?;
    let r = decode(&bytes).map_err(|e| e.to_string())?;
    if r.seq != seq {
        return Err(format!("holds seq {} under the name of {seq}", r.seq));
    }
    match poison(&r) {
        Some(p) => Err(format!("poison: {p}")),
        None => Ok(r),
    }
}

impl Store for DiskStore {
    fn put(&mut self, rec: &Record) -> io::Result<()> {
        let path = self.path(rec.seq);
        let tmp = path.with_extension("tmp");
        let always = self.fsync == Fsync::Always;
        // Written whole under a temporary name, then renamed: a crash leaves the record
        // complete or absent (a torn `.tmp` is removed when the store opens).
        let written = self
            .fs
            .create(&tmp, &encode(rec), always)
            .and_then(|()| self.fs.rename(&tmp, &path));
        if let Err(e) = written {
            let _ = self.fs.remove(&tmp);
            return Err(e);
        }
        match self.fsync {
            // The rename is durable only once the directory is.
            Fsync::Always => self.fs.sync_dir(&self.dir)?,
            Fsync::Interval(_) => self.unsynced.push(path),
            Fsync::Never => {}
        }
        Ok(())
    }

    fn remove(&mut self, seq: u64) -> io::Result<()> {
        // No fsync: an acknowledged record that reappears after a crash is delivered twice,
        // which at-least-once allows.
        match self.fs.remove(&self.path(seq)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn quarantine(&mut self, seq: u64) -> io::Result<PathBuf> {
        self.move_aside(&self.path(seq))
    }

    fn sync(&mut self) -> io::Result<()> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        for p in std::mem::take(&mut self.unsynced) {
            // Already acknowledged and removed: nothing to make durable.
            match self.fs.sync_file(&p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.fs.sync_dir(&self.dir)
    }

    fn set_fsync(&mut self, fsync: Fsync) {
        self.fsync = fsync;
    }

    fn describe(&self) -> String {
        format!("{} (fsync {})", self.dir.display(), self.fsync)
    }
}
