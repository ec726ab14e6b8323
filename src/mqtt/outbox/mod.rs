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
//!
//! May use: config, util, stats, and the mqtt client options (crate::mqtt::client).

#[cfg(test)]
mod powerloss;
mod queue;
mod sender;
mod store;

pub use queue::{Outbox, Renumbered};
pub use sender::drive;
pub use store::{
    DecodeError, DiskStore, MAX_SEQ, MemStore, OpenError, Poison, Record, Recovered, Store, decode,
    encode, ensure_free, poison,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Fsync, OutboxSettings};
    use std::fs;
    use std::sync::atomic::Ordering;
    use store::HEADER;

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
        drop(st); // its lock
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
            ob.push(format!("t/{i}"), vec![0; 10]).unwrap();
        }
        let topics: Vec<String> = ob.snapshot().iter().map(|r| r.topic.clone()).collect();
        assert_eq!(topics, vec!["t/2", "t/3", "t/4"]);
        assert_eq!(ob.counters.dropped.load(Ordering::Relaxed), 2);

        let size = rec(0).size();
        let ob = Outbox::new(Box::new(MemStore), vec![], 100, 2 * (HEADER + 3 + 100));
        for i in 0..4 {
            ob.push(format!("t/{i}"), vec![0; 100]).unwrap();
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
        let seqs: Vec<u64> = (0..4)
            .map(|i| ob.push(format!("t/{i}"), vec![1]).unwrap())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        ob.ack(3);
        ob.ack(1);
        ob.ack(3); // again: stale
        assert_eq!(ob.counters.stale_acks.load(Ordering::Relaxed), 1);
        assert_eq!(ob.next_from(0).unwrap().seq, 2);
        assert_eq!(ob.next_from(3).unwrap().seq, 4);
        drop(ob); // its lock
        let (_, r) = DiskStore::open(d.path(), Fsync::Never).unwrap();
        let left: Vec<u64> = r.records.iter().map(|r| r.seq).collect();
        assert_eq!(left, vec![2, 4]);
        // A restart continues the numbering after what it recovered.
        let (st, r) = DiskStore::open(d.path(), Fsync::Never).unwrap();
        let ob = Outbox::new(Box::new(st), r.records, 100, 1 << 20);
        assert_eq!(ob.push("t/x".into(), vec![]), Ok(5));
    }

    #[test]
    fn a_disk_failing_later_keeps_records_in_memory_counted_and_deliverable() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("outbox");
        let (st, _) = DiskStore::open(&dir, Fsync::Always).unwrap();
        let ob = Outbox::new(Box::new(st), vec![], 100, 1 << 20);
        let a = ob.push("t/a".into(), vec![1]).unwrap();
        fs::remove_dir_all(&dir).unwrap(); // the card is gone
        let b = ob.push("t/b".into(), vec![2]).unwrap();
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
        let ob = Outbox::open(&s).unwrap();
        assert_eq!(ob.describe(), "memory");
        assert_eq!(ob.counters.memory_fallback.load(Ordering::Relaxed), 1);
        ob.push("t".into(), vec![1]).unwrap();
        assert_eq!(ob.depth(), 1);
    }

    fn settings(dir: &std::path::Path) -> OutboxSettings {
        OutboxSettings {
            dir: dir.to_path_buf(),
            fsync: Fsync::Always,
            ..OutboxSettings::default()
        }
    }

    fn seqs(ob: &Outbox) -> Vec<u64> {
        ob.snapshot().iter().map(|r| r.seq).collect()
    }

    fn files(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".rec"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_second_writer_on_one_directory_is_refused_naming_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let first = Outbox::open(&settings(d.path())).unwrap();
        first.push("t/a".into(), vec![1]).unwrap();
        // flock is per open file: a second open in this process is a second writer too.
        let err = Outbox::open(&settings(d.path())).unwrap_err();
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&d.path().display().to_string())
                && msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(ensure_free(d.path()).is_err());
        drop(first);
        ensure_free(d.path()).unwrap();
        let second = Outbox::open(&settings(d.path())).unwrap();
        assert_eq!(second.depth(), 1, "the first writer's record is replayed");
    }

    #[test]
    fn what_cannot_be_read_or_moved_is_skipped_and_the_rest_replayed() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut st, _) = DiskStore::open(d.path(), Fsync::Never).unwrap();
            for s in 1..=4 {
                st.put(&rec(s)).unwrap();
            }
        }
        // Record 2 cannot be read (a directory under its name), and the quarantine
        // cannot be made (a file is in its way): both used to make the run memory-only.
        fs::remove_file(d.path().join(format!("{:020}.rec", 2))).unwrap();
        fs::create_dir(d.path().join(format!("{:020}.rec", 2))).unwrap();
        fs::write(d.path().join("quarantine"), b"in the way").unwrap();
        let ob = Outbox::open(&settings(d.path())).unwrap();
        assert_ne!(ob.describe(), "memory");
        assert_eq!(seqs(&ob), vec![1, 3, 4]);
        assert_eq!(ob.counters.quarantined.load(Ordering::Relaxed), 1);
        // The numbering goes on after every name found, the unreadable one included.
        assert_eq!(ob.push("t/5".into(), vec![]), Ok(5));
        assert!(d.path().join(format!("{:020}.rec", 5)).exists());
    }

    #[test]
    fn poison_records_are_quarantined_at_open_and_refused_by_push() {
        let d = tempfile::tempdir().unwrap();
        let put = |seq: u64, topic: &str| {
            let r = Record {
                seq,
                topic: topic.into(),
                payload: vec![1],
            };
            fs::write(d.path().join(format!("{seq:020}.rec")), encode(&r)).unwrap();
        };
        put(1, "t/ok");
        put(2, "t/+");
        put(3, "t/#");
        put(4, "");
        put(5, "t/\0");
        put(6, "t/ok2");
        put(u64::MAX, "t/max"); // the next number would wrap
        put(MAX_SEQ, "t/max");
        let ob = Outbox::open(&settings(d.path())).unwrap();
        assert_eq!(seqs(&ob), vec![1, 6]);
        assert_eq!(ob.counters.quarantined.load(Ordering::Relaxed), 6);
        assert_eq!(files(&d.path().join("quarantine")).len(), 6);
        assert_eq!(ob.push("t/next".into(), vec![]), Ok(7));
        for bad in ["a/+/b", "#", "", "a\0"] {
            assert!(ob.push(bad.into(), vec![]).is_err(), "{bad:?} accepted");
        }
        let big = vec![0; crate::config::MQTT_MAX_PACKET];
        assert!(matches!(
            ob.push("t/big".into(), big),
            Err(Poison::TooLarge(_))
        ));
        assert_eq!(seqs(&ob), vec![1, 6, 7]);
        assert_eq!(ob.counters.quarantined.load(Ordering::Relaxed), 11);
    }

    #[test]
    fn the_sender_quarantines_a_poison_record_instead_of_stalling_on_it() {
        let d = tempfile::tempdir().unwrap();
        let ob = Outbox::open(&settings(d.path())).unwrap();
        ob.push("t/a".into(), vec![1]).unwrap();
        ob.quarantine(1, &Poison::Wildcard);
        assert_eq!(ob.depth(), 0);
        assert_eq!(files(d.path()), Vec::<String>::new());
        assert_eq!(files(&d.path().join("quarantine")).len(), 1);
    }

    #[test]
    fn records_the_disk_refused_are_written_once_it_takes_them_again() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("outbox");
        let ob = Outbox::open(&settings(&dir)).unwrap();
        ob.push("t/a".into(), vec![1]).unwrap();
        fs::remove_dir_all(&dir).unwrap(); // full, or gone for a while
        ob.push("t/b".into(), vec![2]).unwrap();
        ob.push("t/c".into(), vec![3]).unwrap();
        assert_eq!(ob.counters.memory_fallback.load(Ordering::Relaxed), 2);
        assert!(ob.sync().is_none());
        assert_eq!(ob.counters.rewritten.load(Ordering::Relaxed), 0);
        fs::create_dir(&dir).unwrap(); // back
        ob.ack(3);
        assert!(ob.sync().is_none());
        assert_eq!(ob.counters.rewritten.load(Ordering::Relaxed), 1);
        assert_eq!(files(&dir), vec![format!("{:020}.rec", 2)]);
    }

    #[test]
    fn a_directory_that_opens_late_goes_first_and_memory_records_follow_it() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("outbox");
        {
            let (mut st, _) = DiskStore::open(&dir, Fsync::Never).unwrap();
            st.put(&rec(7)).unwrap();
        }
        // Unusable at start (a file where the directory should be).
        let blocked = d.path().join("blocked");
        fs::rename(&dir, &blocked).unwrap();
        fs::write(&dir, b"").unwrap();
        let ob = Outbox::open(&settings(&dir)).unwrap();
        assert_eq!(ob.describe(), "memory");
        let a = ob.push("t/a".into(), vec![1]).unwrap();
        let b = ob.push("t/b".into(), vec![2]).unwrap();
        assert!(ob.sync().is_none(), "still unusable");
        fs::remove_file(&dir).unwrap();
        fs::rename(&blocked, &dir).unwrap();
        let renumbered = ob.sync().expect("opened");
        assert_eq!(renumbered[&a], 8);
        assert_eq!(renumbered[&b], 9);
        assert_eq!(seqs(&ob), vec![7, 8, 9]);
        assert_ne!(ob.describe(), "memory");
        assert_eq!(
            files(&dir),
            (7..=9).map(|s| format!("{s:020}.rec")).collect::<Vec<_>>()
        );
        assert_eq!(ob.push("t/c".into(), vec![3]), Ok(10));
    }
}
