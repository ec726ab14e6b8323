//! [`Outbox`]: the ordered queue of unacknowledged records over a [`Store`], bounded in
//! count and bytes (the oldest are dropped first, counted). Shared by the producer (the
//! inference thread, which writes synchronously) and the sender.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{info, warn};

use crate::config::OutboxSettings;
use crate::mqtt::outbox::store::{DiskStore, MemStore, Record, Store};
use crate::stats::OutboxCounters;
use crate::util::worth_logging;

struct Inner {
    store: Box<dyn Store>,
    queue: VecDeque<Arc<Record>>,
    bytes: usize,
    next_seq: u64,
}

pub struct Outbox {
    inner: Mutex<Inner>,
    pub(super) wake: tokio::sync::Notify,
    max_events: usize,
    max_bytes: usize,
    pub counters: Arc<OutboxCounters>,
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
            counters: Arc::default(),
        };
        {
            let mut g = ob.lock();
            for r in recovered {
                ob.make_room(&mut g, r.size());
                g.bytes += r.size();
                g.queue.push_back(Arc::new(r));
            }
            ob.gauge(&g);
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

    /// Keep the depth gauges the stats read current (under the lock, after every change).
    fn gauge(&self, g: &Inner) {
        let c = &self.counters;
        c.waiting.store(g.queue.len() as u64, Ordering::Relaxed);
        c.waiting_bytes.store(g.bytes as u64, Ordering::Relaxed);
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
        self.gauge(&g);
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
        self.gauge(&g);
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
