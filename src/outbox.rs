//! The durable outbox: detection events are written here before they are published, and
//! removed only when the broker's PUBACK arrives. rumqttc with a clean session forgets what
//! was in flight when a connection breaks, and a board can lose power at any moment, so
//! "at least once" is built here, not borrowed from the client.
//!
//! * [`Outbox`]: the ordered queue of unacknowledged records, bounded in count and bytes
//!   (the oldest are dropped first, counted), shared by the producer (the inference thread,
//!   which writes synchronously: a record is on disk before `push` returns, per the fsync
//!   policy) and the sender.
//! * [`Store`]: where records persist. [`DiskStore`] keeps one checksummed file per record
//!   (written to a temporary name, then renamed: a crash leaves either the whole record or
//!   none); [`MemStore`] keeps nothing (the fallback when the disk fails, and for tests).
//! * [`drive`]: the sender, on its own MQTT connection so that telemetry can never delay or
//!   reorder events, and so every PUBACK on it is ours. A window of records is in flight;
//!   after any reconnect the window restarts from the oldest unacknowledged record, so
//!   order per camera holds and the price of a broken connection is duplicates, never loss.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pipeline::worth_logging;
use crate::settings::{Fsync, OutboxSettings, Settings};

/// One message waiting for its PUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Record {
    fn size(&self) -> usize {
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
const HEADER: usize = 4 + 4 + 8 + 2 + 4;
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

/// The record in `bytes`, or what is wrong with it.
pub fn decode(bytes: &[u8]) -> Result<Record, String> {
    if bytes.len() < HEADER {
        return Err(format!("truncated: {} bytes", bytes.len()));
    }
    if &bytes[..4] != MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap_or_default());
    let body = &bytes[8..];
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    let seq = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
    let tlen = u16::from_le_bytes(body[8..10].try_into().unwrap_or_default()) as usize;
    let plen = u32::from_le_bytes(body[10..14].try_into().unwrap_or_default()) as usize;
    let rest = &body[14..];
    if rest.len() != tlen + plen {
        return Err(format!(
            "length mismatch: {} bytes for topic {tlen} + payload {plen}",
            rest.len()
        ));
    }
    let topic = std::str::from_utf8(&rest[..tlen])
        .map_err(|_| "topic is not UTF-8".to_string())?
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
                    Err(e) => e,
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

/// The outbox's counters, for stats and the shutdown summary.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    /// Oldest records dropped to stay within `max_events` / `max_bytes`.
    pub dropped: AtomicU64,
    /// Corrupt files found at start-up and moved to `quarantine/`.
    pub quarantined: AtomicU64,
    /// Records kept in memory only because the disk refused them (full, read-only...).
    pub memory_fallback: AtomicU64,
    /// PUBACKs received for records already gone (dropped, or duplicates after a resend).
    pub stale_acks: AtomicU64,
}

struct Inner {
    store: Box<dyn Store>,
    queue: VecDeque<Arc<Record>>,
    bytes: usize,
    next_seq: u64,
}

pub struct Outbox {
    inner: Mutex<Inner>,
    wake: tokio::sync::Notify,
    max_events: usize,
    max_bytes: usize,
    pub counters: Counters,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("depth", &self.depth())
            .finish()
    }
}

impl Outbox {
    /// An outbox over `store`, holding `recovered` (a previous run's records) first.
    pub fn new(
        store: Box<dyn Store>,
        recovered: Vec<Record>,
        max_events: usize,
        max_bytes: usize,
    ) -> Outbox {
        let next_seq = recovered.last().map_or(1, |r| r.seq + 1);
        let ob = Outbox {
            inner: Mutex::new(Inner {
                store,
                queue: VecDeque::new(),
                bytes: 0,
                next_seq,
            }),
            wake: tokio::sync::Notify::new(),
            max_events,
            max_bytes,
            counters: Counters::default(),
        };
        {
            let mut g = ob.lock();
            for r in recovered {
                ob.make_room(&mut g, r.size());
                g.bytes += r.size();
                g.queue.push_back(Arc::new(r));
            }
        }
        ob
    }

    /// The outbox the settings ask for: on disk, or in memory (with a warning) when the
    /// directory cannot be used.
    pub fn open(s: &OutboxSettings) -> Outbox {
        match DiskStore::open(&s.dir, s.fsync) {
            Ok((store, rec)) => {
                let q = rec.quarantined.len() as u64;
                for (path, why) in &rec.quarantined {
                    warn!(
                        "outbox: corrupt record quarantined as {}: {why}",
                        path.display()
                    );
                }
                if !rec.records.is_empty() {
                    info!(
                        "outbox: {} undelivered record(s) from a previous run in {}",
                        rec.records.len(),
                        s.dir.display()
                    );
                }
                let ob = Outbox::new(Box::new(store), rec.records, s.max_events, s.max_bytes);
                ob.counters.quarantined.store(q, Ordering::Relaxed);
                ob
            }
            Err(e) => {
                warn!(
                    "outbox.dir {}: {e}; events are kept in memory only and will not survive a restart",
                    s.dir.display()
                );
                let ob = Outbox::new(Box::new(MemStore), vec![], s.max_events, s.max_bytes);
                ob.counters.memory_fallback.store(1, Ordering::Relaxed);
                ob
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drop the oldest records until one of `size` bytes fits.
    fn make_room(&self, g: &mut Inner, size: usize) {
        while !g.queue.is_empty()
            && (g.queue.len() >= self.max_events || g.bytes + size > self.max_bytes)
        {
            let Some(old) = g.queue.pop_front() else {
                break;
            };
            g.bytes -= old.size();
            if let Err(e) = g.store.remove(old.seq) {
                warn!("outbox: cannot remove dropped record {}: {e}", old.seq);
            }
            let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if worth_logging(n) {
                warn!(
                    "outbox full ({} records, {} bytes max): dropped the oldest, {}; {n} dropped so far",
                    self.max_events, self.max_bytes, old.topic
                );
            }
        }
    }

    /// Accept a message: persisted (per the store's policy) before this returns, then
    /// handed to the sender. Returns its sequence number.
    pub fn push(&self, topic: String, payload: Vec<u8>) -> u64 {
        let mut g = self.lock();
        let seq = g.next_seq;
        g.next_seq += 1;
        let rec = Record {
            seq,
            topic,
            payload,
        };
        self.make_room(&mut g, rec.size());
        if let Err(e) = g.store.put(&rec) {
            let n = self
                .counters
                .memory_fallback
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if worth_logging(n) {
                warn!(
                    "outbox {}: cannot write record {seq}: {e}; kept in memory only ({n} so far)",
                    g.store.describe()
                );
            }
        }
        g.bytes += rec.size();
        g.queue.push_back(Arc::new(rec));
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        drop(g);
        self.wake.notify_one();
        seq
    }

    /// The first record with a sequence number at or after `seq`.
    pub fn next_from(&self, seq: u64) -> Option<Arc<Record>> {
        let g = self.lock();
        let i = g.queue.partition_point(|r| r.seq < seq);
        g.queue.get(i).cloned()
    }

    /// The broker acknowledged `seq`: forget it.
    pub fn ack(&self, seq: u64) {
        let mut g = self.lock();
        let i = g.queue.partition_point(|r| r.seq < seq);
        if g.queue.get(i).is_none_or(|r| r.seq != seq) {
            self.counters.stale_acks.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(r) = g.queue.remove(i) {
            g.bytes -= r.size();
        }
        if let Err(e) = g.store.remove(seq) {
            warn!(
                "outbox: cannot remove delivered record {seq}: {e} (it will be sent again after a restart)"
            );
        }
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// Make deferred writes durable (the `interval` fsync policy's timer).
    pub fn sync(&self) {
        let mut g = self.lock();
        if let Err(e) = g.store.sync() {
            warn!("outbox {}: fsync failed: {e}", g.store.describe());
        }
    }

    /// Records waiting for a PUBACK.
    pub fn depth(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn describe(&self) -> String {
        self.lock().store.describe()
    }

    /// Every record waiting, oldest first (tests, diagnostics).
    pub fn snapshot(&self) -> Vec<Arc<Record>> {
        self.lock().queue.iter().cloned().collect()
    }
}

/// The sender's MQTT options: the daemon's broker and credentials, its own client id.
fn options(settings: &Settings) -> MqttOptions {
    let m = &settings.mqtt;
    let mut opts = crate::mqtt::options(settings, format!("{}-outbox", m.client_id));
    opts.set_clean_session(true);
    opts
}

/// Send the outbox's records, oldest first, `window` at a time, until `stop` is cancelled;
/// then keep going for up to `drain` to deliver what is left (what is not delivered stays
/// on disk for the next run).
pub async fn drive(
    outbox: Arc<Outbox>,
    settings: Arc<Settings>,
    stop: CancellationToken,
    drain: Duration,
) {
    let s = &settings.outbox;
    let m = &settings.mqtt;
    let (client, mut el) = AsyncClient::new(options(&settings), s.window * 2 + 4);
    let mut connected = false;
    // Handed to the client, waiting for rumqttc to assign a packet id (Outgoing::Publish
    // events come in request order on this connection, which carries nothing else).
    let mut handed: VecDeque<u64> = VecDeque::new();
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut next = 0u64;
    let mut backoff = m.reconnect_min();
    let mut deadline: Option<tokio::time::Instant> = None;
    let sync_every = match s.fsync {
        Fsync::Interval(d) => d,
        _ => Duration::from_secs(3600),
    };
    let mut sync_tick = tokio::time::interval(sync_every);
    let mut last_report = Instant::now();
    loop {
        if connected {
            while handed.len() + inflight.len() < s.window {
                let Some(r) = outbox.next_from(next) else {
                    break;
                };
                if client
                    .try_publish(&r.topic, QoS::AtLeastOnce, false, r.payload.clone())
                    .is_err()
                {
                    break;
                }
                handed.push_back(r.seq);
                next = r.seq + 1;
            }
        }
        if let Some(d) = deadline {
            let done = connected && handed.is_empty() && inflight.is_empty();
            if done || !connected || tokio::time::Instant::now() >= d {
                if outbox.depth() > 0 {
                    info!(
                        "outbox: {} record(s) not yet delivered; kept for the next run",
                        outbox.depth()
                    );
                }
                if connected {
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while let Ok(ev) = el.poll().await {
                            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                                break;
                            }
                        }
                    })
                    .await;
                }
                outbox.sync();
                return;
            }
        }
        tokio::select! {
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff = m.reconnect_min();
                    // A new session knows nothing of the old one: start again from the
                    // oldest unacknowledged record.
                    next = 0;
                    handed.clear();
                    inflight.clear();
                    if outbox.depth() > 0 {
                        info!("outbox: connected; sending {} waiting record(s)", outbox.depth());
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(seq) = handed.pop_front() {
                        inflight.insert(pkid, seq);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(seq) = inflight.remove(&ack.pkid) {
                        outbox.ack(seq);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected || last_report.elapsed() > Duration::from_secs(60) {
                        warn!(
                            "outbox: {}; {} record(s) waiting, retrying in {backoff:?}",
                            crate::mqtt::describe(&e),
                            outbox.depth()
                        );
                        last_report = Instant::now();
                    }
                    connected = false;
                    // Forget the broken session: requests still queued in the client would
                    // otherwise go out after the reconnect out of our order.
                    el.clean();
                    el.pending.clear();
                    el.state.events.clear();
                    handed.clear();
                    inflight.clear();
                    if deadline.is_some() {
                        continue;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(m.reconnect_max());
                }
            },
            _ = outbox.wake.notified(), if connected => {}
            _ = sync_tick.tick() => outbox.sync(),
            _ = stop.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + drain);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64) -> Record {
        Record {
            seq,
            topic: format!("t/{seq}"),
            payload: format!("{{\"n\":{seq}}}").into_bytes(),
        }
    }

    #[test]
    fn encode_decode_round_trip_and_every_corruption_is_caught() {
        let r = rec(42);
        let bytes = encode(&r);
        assert_eq!(decode(&bytes).unwrap(), r);
        // Flip each byte in turn: every change is detected.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            assert!(decode(&b).is_err(), "byte {i} flipped went unnoticed");
        }
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncated to {n}");
        }
    }

    #[test]
    fn disk_store_recovers_in_order_and_quarantines_corrupt_files() {
        let d = tempfile::tempdir().unwrap();
        let (mut st, rec0) = DiskStore::open(d.path(), Fsync::Always).unwrap();
        assert!(rec0.records.is_empty());
        for s in 1..=5 {
            st.put(&rec(s)).unwrap();
        }
        st.remove(2).unwrap();
        // Corrupt record 4; leave a torn temporary file and a stranger behind.
        let p4 = d.path().join(format!("{:020}.rec", 4));
        let mut b = fs::read(&p4).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        fs::write(&p4, b).unwrap();
        fs::write(d.path().join("00000000000000000009.tmp"), b"torn").unwrap();
        let (_, r) = DiskStore::open(d.path(), Fsync::Always).unwrap();
        let seqs: Vec<u64> = r.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 3, 5]);
        assert_eq!(r.quarantined.len(), 1);
        assert!(
            r.quarantined[0].1.contains("checksum"),
            "{:?}",
            r.quarantined
        );
        assert!(
            d.path()
                .join("quarantine")
                .join(p4.file_name().unwrap())
                .exists()
        );
        assert!(!d.path().join("00000000000000000009.tmp").exists());
    }

    #[test]
    fn bounded_by_count_and_bytes_oldest_dropped_first() {
        let ob = Outbox::new(Box::new(MemStore), vec![], 3, 1 << 20);
        for i in 0..5 {
            ob.push(format!("t/{i}"), vec![0; 10]);
        }
        let topics: Vec<String> = ob.snapshot().iter().map(|r| r.topic.clone()).collect();
        assert_eq!(topics, vec!["t/2", "t/3", "t/4"]);
        assert_eq!(ob.counters.dropped.load(Ordering::Relaxed), 2);

        let size = rec(0).size();
        let ob = Outbox::new(Box::new(MemStore), vec![], 100, 2 * (HEADER + 3 + 100));
        for i in 0..4 {
            ob.push(format!("t/{i}"), vec![0; 100]);
        }
        assert_eq!(ob.depth(), 2);
        assert_eq!(ob.counters.dropped.load(Ordering::Relaxed), 2);
        assert!(
            ob.bytes() <= 2 * (HEADER + 3 + 100),
            "{} {size}",
            ob.bytes()
        );
    }

    #[test]
    fn acks_remove_from_disk_and_out_of_order_acks_work() {
        let d = tempfile::tempdir().unwrap();
        let (st, _) = DiskStore::open(d.path(), Fsync::Never).unwrap();
        let ob = Outbox::new(Box::new(st), vec![], 100, 1 << 20);
        let seqs: Vec<u64> = (0..4).map(|i| ob.push(format!("t/{i}"), vec![1])).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        ob.ack(3);
        ob.ack(1);
        ob.ack(3); // again: stale
        assert_eq!(ob.counters.stale_acks.load(Ordering::Relaxed), 1);
        assert_eq!(ob.next_from(0).unwrap().seq, 2);
        assert_eq!(ob.next_from(3).unwrap().seq, 4);
        let (_, r) = DiskStore::open(d.path(), Fsync::Never).unwrap();
        let left: Vec<u64> = r.records.iter().map(|r| r.seq).collect();
        assert_eq!(left, vec![2, 4]);
        // A restart continues the numbering after what it recovered.
        let (st, r) = DiskStore::open(d.path(), Fsync::Never).unwrap();
        let ob = Outbox::new(Box::new(st), r.records, 100, 1 << 20);
        assert_eq!(ob.push("t/x".into(), vec![]), 5);
    }

    #[test]
    fn a_disk_failing_later_keeps_records_in_memory_counted_and_deliverable() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("outbox");
        let (st, _) = DiskStore::open(&dir, Fsync::Always).unwrap();
        let ob = Outbox::new(Box::new(st), vec![], 100, 1 << 20);
        let a = ob.push("t/a".into(), vec![1]);
        fs::remove_dir_all(&dir).unwrap(); // the card is gone
        let b = ob.push("t/b".into(), vec![2]);
        assert_eq!(ob.counters.memory_fallback.load(Ordering::Relaxed), 1);
        assert_eq!(ob.depth(), 2, "accepted either way");
        ob.ack(a);
        ob.ack(b);
        assert_eq!(ob.counters.delivered.load(Ordering::Relaxed), 2);
        assert_eq!(ob.depth(), 0);
    }

    #[test]
    fn an_unwritable_directory_falls_back_to_memory() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let s = OutboxSettings {
            dir: file.join("outbox"),
            ..OutboxSettings::default()
        };
        let ob = Outbox::open(&s);
        assert_eq!(ob.describe(), "memory");
        assert_eq!(ob.counters.memory_fallback.load(Ordering::Relaxed), 1);
        ob.push("t".into(), vec![1]);
        assert_eq!(ob.depth(), 1);
    }
}
