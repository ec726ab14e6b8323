//! [`Outbox`]: the ordered queue of unacknowledged records over a [`Store`], bounded in
//! count and bytes (the oldest are dropped first, counted). Shared by the producer (the
//! inference thread, which writes synchronously) and the sender.
//!
//! What the disk refuses is kept in memory and written again on the sender's timer
//! ([`Outbox::sync`]), so a disk that fills up and recovers loses nothing a restart would
//! need; an outbox that could not open its directory at all keeps trying to.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{info, warn};

use crate::config::OutboxSettings;
use crate::mqtt::outbox::store::{
    DiskStore, MemStore, OpenError, Poison, Record, Recovered, Store, poison,
};
use crate::stats::OutboxCounters;
use crate::util::worth_logging;

struct Inner {
    store: Box<dyn Store>,
    queue: VecDeque<Arc<Record>>,
    bytes: usize,
    next_seq: u64,
    max_events: usize,
    max_bytes: usize,
    /// Accepted records the store refused: in memory only, written again by `sync`.
    unpersisted: BTreeSet<u64>,
    /// The directory to open again, when it could not be opened at start.
    reopen: Option<OutboxSettings>,
}

pub struct Outbox {
    inner: Mutex<Inner>,
    pub(super) wake: tokio::sync::Notify,
    /// The directory the settings named (the store may be memory while it is unusable).
    dir: PathBuf,
    pub counters: Arc<OutboxCounters>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("depth", &self.depth())
            .finish()
    }
}

/// Sequence numbers given to records again when a directory that could not be opened at
/// start finally opens (old -> new): the sender's window must follow them.
pub type Renumbered = HashMap<u64, u64>;

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
                max_events,
                max_bytes,
                unpersisted: BTreeSet::new(),
                reopen: None,
            }),
            wake: tokio::sync::Notify::new(),
            dir: PathBuf::new(),
            counters: Arc::default(),
        };
        {
            let mut g = ob.lock();
            for r in recovered {
                ob.make_room(&mut g, 1, r.size());
                g.bytes += r.size();
                g.queue.push_back(Arc::new(r));
            }
            ob.gauge(&g);
        }
        ob
    }

    /// The outbox the settings ask for: on disk, or in memory (with a warning, and tried
    /// again on every `sync`) when the directory cannot be used. Fails only when another
    /// process holds the directory.
    pub fn open(s: &OutboxSettings) -> Result<Outbox, OpenError> {
        match DiskStore::open(&s.dir, s.fsync) {
            Ok((store, mut rec)) => {
                report_open(&s.dir, &rec);
                let records = std::mem::take(&mut rec.records);
                let mut ob = Outbox::new(Box::new(store), records, s.max_events, s.max_bytes);
                ob.dir = s.dir.clone();
                {
                    let mut g = ob.lock();
                    g.next_seq = g.next_seq.max(rec.next_seq);
                }
                ob.count_open(&rec);
                Ok(ob)
            }
            Err(e @ OpenError::Locked { .. }) => Err(e),
            Err(e) => {
                warn!(
                    "outbox.dir {e}; events are kept in memory (the directory is tried again every few seconds)"
                );
                let mut ob = Outbox::new(Box::new(MemStore), vec![], s.max_events, s.max_bytes);
                ob.dir = s.dir.clone();
                ob.lock().reopen = Some(s.clone());
                ob.counters.memory_fallback.store(1, Ordering::Relaxed);
                Ok(ob)
            }
        }
    }

    fn count_open(&self, rec: &Recovered) {
        let c = &self.counters;
        c.quarantined
            .fetch_add(rec.quarantined.len() as u64, Ordering::Relaxed);
        c.skipped
            .fetch_add(rec.skipped.len() as u64, Ordering::Relaxed);
    }

    /// The directory the settings named.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// A reload's new bounds and fsync policy (same directory: the outbox is handed over,
    /// not opened again). New bounds apply from the next record on.
    pub fn retune(&self, s: &OutboxSettings) {
        let mut g = self.lock();
        g.max_events = s.max_events;
        g.max_bytes = s.max_bytes;
        g.store.set_fsync(s.fsync);
        if let Some(r) = &mut g.reopen {
            r.fsync = s.fsync;
        }
    }

    /// Keep the depth gauges the stats read current (under the lock, after every change).
    fn gauge(&self, g: &Inner) {
        let c = &self.counters;
        c.waiting.store(g.queue.len() as u64, Ordering::Relaxed);
        c.waiting_bytes.store(g.bytes as u64, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drop the oldest records until `count` more records of `size` bytes fit.
    fn make_room(&self, g: &mut Inner, count: usize, size: usize) {
        while !g.queue.is_empty()
            && (g.queue.len() + count > g.max_events || g.bytes + size > g.max_bytes)
        {
            let Some(old) = g.queue.pop_front() else {
                break;
            };
            g.bytes -= old.size();
            g.unpersisted.remove(&old.seq);
            if let Err(e) = g.store.remove(old.seq) {
                warn!("outbox: cannot remove dropped record {}: {e}", old.seq);
            }
            let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if worth_logging(n) {
                warn!(
                    "outbox full ({} records, {} bytes max): dropped the oldest, {}; {n} dropped so far",
                    g.max_events, g.max_bytes, old.topic
                );
            }
        }
    }

    /// Accept a message: persisted (per the store's policy) before this returns, then
    /// handed to the sender. Returns its sequence number, or why it can never be
    /// delivered (refused before it is accepted, and counted as quarantined).
    pub fn push(&self, topic: String, payload: Vec<u8>) -> Result<u64, Poison> {
        let mut g = self.lock();
        let seq = g.next_seq;
        let rec = Record {
            seq,
            topic,
            payload,
        };
        if let Some(p) = poison(&rec) {
            self.counters.quarantined.fetch_add(1, Ordering::Relaxed);
            warn!("outbox: refused a message to {:?}: {p}", rec.topic);
            return Err(p);
        }
        g.next_seq += 1;
        self.make_room(&mut g, 1, rec.size());
        if let Err(e) = g.store.put(&rec) {
            g.unpersisted.insert(seq);
            let n = self
                .counters
                .memory_fallback
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if worth_logging(n) {
                warn!(
                    "outbox {}: cannot write record {seq}: {e}; kept in memory until the disk takes it ({n} so far)",
                    g.store.describe()
                );
            }
        }
        g.bytes += rec.size();
        g.queue.push_back(Arc::new(rec));
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        self.gauge(&g);
        drop(g);
        self.wake.notify_one();
        Ok(seq)
    }

    /// The first record with a sequence number at or after `seq`.
    pub fn next_from(&self, seq: u64) -> Option<Arc<Record>> {
        let g = self.lock();
        let i = g.queue.partition_point(|r| r.seq < seq);
        g.queue.get(i).cloned()
    }

    /// Take `seq` out of the queue, if it is there.
    fn take(&self, g: &mut Inner, seq: u64) -> Option<Arc<Record>> {
        let r = g.queue.remove(position(&g.queue, seq)?)?;
        g.bytes -= r.size();
        g.unpersisted.remove(&seq);
        self.gauge(g);
        Some(r)
    }

    /// The broker acknowledged `seq`: forget it.
    pub fn ack(&self, seq: u64) {
        let mut g = self.lock();
        if self.take(&mut g, seq).is_none() {
            self.counters.stale_acks.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Err(e) = g.store.remove(seq) {
            warn!(
                "outbox: cannot remove delivered record {seq}: {e} (it will be sent again after a restart)"
            );
        }
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// `seq` can never be delivered (`why`): move it aside so it blocks nothing behind it.
    pub fn quarantine(&self, seq: u64, why: &Poison) {
        let mut g = self.lock();
        let Some(r) = self.take(&mut g, seq) else {
            return;
        };
        self.counters.quarantined.fetch_add(1, Ordering::Relaxed);
        match g.store.quarantine(seq) {
            Ok(to) => warn!(
                "outbox: record {seq} to {:?} quarantined as {}: {why}",
                r.topic,
                to.display()
            ),
            Err(e) => warn!(
                "outbox: record {seq} to {:?} dropped: {why} (cannot move it aside: {e})",
                r.topic
            ),
        }
    }

    /// The sender's timer: make deferred writes durable, write again what the disk
    /// refused, and open the directory if it could not be opened before. Returns the
    /// records renumbered by that open, if it happened (the sender restarts its window).
    pub fn sync(&self) -> Option<Renumbered> {
        let mut g = self.lock();
        let renumbered = self.reopen(&mut g);
        self.persist(&mut g);
        if let Err(e) = g.store.sync() {
            warn!("outbox {}: fsync failed: {e}", g.store.describe());
        }
        renumbered
    }

    /// Write the records the disk refused, oldest first, until it refuses again.
    fn persist(&self, g: &mut Inner) {
        while let Some(&seq) = g.unpersisted.first() {
            let Some(r) = position(&g.queue, seq).and_then(|i| g.queue.get(i).cloned()) else {
                g.unpersisted.remove(&seq);
                continue;
            };
            if g.store.put(&r).is_err() {
                return;
            }
            g.unpersisted.remove(&seq);
            let n = self.counters.rewritten.fetch_add(1, Ordering::Relaxed) + 1;
            if g.unpersisted.is_empty() {
                info!(
                    "outbox {}: the disk takes records again ({n} written late)",
                    g.store.describe()
                );
            }
        }
    }

    /// Open the directory that could not be opened at start. Its records are older than
    /// anything accepted since, so they go first; what was accepted in memory is numbered
    /// after them (and written by `persist`).
    fn reopen(&self, g: &mut Inner) -> Option<Renumbered> {
        let s = g.reopen.as_ref()?;
        let (store, rec) = DiskStore::open(&s.dir, s.fsync).ok()?;
        report_open(&s.dir, &rec);
        self.count_open(&rec);
        let mut seq = rec.next_seq;
        let mut renumbered = Renumbered::new();
        let mut queue: VecDeque<Arc<Record>> = rec.records.into_iter().map(Arc::new).collect();
        // A memory store refuses nothing: every record here is in memory only.
        g.unpersisted.clear();
        for r in std::mem::take(&mut g.queue) {
            let mut r = Arc::unwrap_or_clone(r);
            renumbered.insert(r.seq, seq);
            r.seq = seq;
            g.unpersisted.insert(seq);
            queue.push_back(Arc::new(r));
            seq += 1;
        }
        g.bytes = queue.iter().map(|r| r.size()).sum();
        g.queue = queue;
        g.next_seq = seq;
        g.store = Box::new(store);
        g.reopen = None;
        info!("outbox: {} opened", g.store.describe());
        self.make_room(g, 0, 0);
        self.gauge(g);
        Some(renumbered)
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

/// Where record `seq` is in the queue (kept in sequence order), if it is there.
fn position(queue: &VecDeque<Arc<Record>>, seq: u64) -> Option<usize> {
    let i = queue.partition_point(|r| r.seq < seq);
    queue.get(i).is_some_and(|r| r.seq == seq).then_some(i)
}

/// Log what opening `dir` found.
fn report_open(dir: &std::path::Path, rec: &Recovered) {
    for (path, why) in &rec.quarantined {
        warn!("outbox: record quarantined as {}: {why}", path.display());
    }
    for (path, why) in &rec.skipped {
        warn!("outbox: skipped {}: {why}", path.display());
    }
    if let Some(e) = &rec.unwritable {
        warn!(
            "outbox.dir {}: cannot write there now ({e}); new events are kept in memory until it can",
            dir.display()
        );
    }
    if !rec.records.is_empty() {
        info!(
            "outbox: {} undelivered record(s) from a previous run in {}",
            rec.records.len(),
            dir.display()
        );
    }
}
