//! Where the outbox's records persist: the record format (magic, CRC32, seq, topic,
//! payload), [`DiskStore`] (one file per record, written to a temporary name, fsynced per
//! policy, renamed) and [`MemStore`] (nothing kept: the fallback, and for tests).

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
    /// Make durable what the policy deferred (called on a timer).
    fn sync(&mut self) -> io::Result<()>;
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

/// One file per record in `dir`; unreadable ones moved to `dir/quarantine/`.
#[derive(Debug)]
pub struct DiskStore {
    dir: PathBuf,
    fsync: Fsync,
    /// Files renamed into place but not yet fsynced (`Fsync::Interval`).
    unsynced: Vec<PathBuf>,
}

/// What opening a [`DiskStore`] found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Valid records, oldest first.
    pub records: Vec<Record>,
    /// Corrupt files moved aside, with the reason.
    pub quarantined: Vec<(PathBuf, String)>,
}

impl DiskStore {
    /// Open (creating) `dir` and read back every record a previous run left.
    pub fn open(dir: &Path, fsync: Fsync) -> io::Result<(DiskStore, Recovered)> {
        fs::create_dir_all(dir)?;
        // Prove we can write here now, not at the first event.
        let probe = dir.join(".probe");
        fs::write(&probe, b"")?;
        fs::remove_file(&probe)?;
        let mut rec = Recovered::default();
        let mut files: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
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
                Some(seq) => files.push((seq, path)),
                None => rec.quarantined.push((path, "unexpected file name".into())),
            }
        }
        files.sort();
        for (seq, path) in files {
            let problem = match fs::read(&path) {
                Ok(bytes) => match decode(&bytes) {
                    Ok(r) if r.seq == seq => {
                        rec.records.push(r);
                        continue;
                    }
                    Ok(r) => format!("holds seq {} under the name of {seq}", r.seq),
                    Err(e) => e.to_string(),
                },
                Err(e) => format!("unreadable: {e}"),
            };
            rec.quarantined.push((path, problem));
        }
        if !rec.quarantined.is_empty() {
            let q = dir.join("quarantine");
            fs::create_dir_all(&q)?;
            for (path, _) in &mut rec.quarantined {
                let to = q.join(path.file_name().unwrap_or_default());
                fs::rename(&*path, &to)?;
                *path = to;
            }
        }
        Ok((
            DiskStore {
                dir: dir.to_path_buf(),
                fsync,
                unsynced: Vec::new(),
            },
            rec,
        ))
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.{EXT}"))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl Store for DiskStore {
    fn put(&mut self, rec: &Record) -> io::Result<()> {
        let path = self.path(rec.seq);
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        let written = f.write_all(&encode(rec)).and_then(|()| {
            if self.fsync == Fsync::Always {
                f.sync_data()?;
            }
            fs::rename(&tmp, &path)
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        match self.fsync {
            // The rename is durable only once the directory is.
            Fsync::Always => sync_dir(&self.dir)?,
            Fsync::Interval(_) => self.unsynced.push(path),
            Fsync::Never => {}
        }
        Ok(())
    }

    fn remove(&mut self, seq: u64) -> io::Result<()> {
        // No fsync: an acknowledged record that reappears after a crash is delivered twice,
        // which at-least-once allows.
        match fs::remove_file(self.path(seq)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        for p in self.unsynced.drain(..) {
            // Already acknowledged and removed: nothing to make durable.
            if let Ok(f) = fs::File::open(&p) {
                f.sync_data()?;
            }
        }
        sync_dir(&self.dir)
    }

    fn describe(&self) -> String {
        format!("{} (fsync {})", self.dir.display(), self.fsync)
    }
}
