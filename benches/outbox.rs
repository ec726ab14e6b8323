//! Outbox throughput per fsync policy, against a real broker (rumqttd in-process, loopback):
//!
//! * written: events/s `Outbox::push` accepts with no sender running (the disk alone);
//! * delivered: events/s end to end with the sender running: written, published at QoS 1,
//!   PUBACK received, file deleted;
//! * bytes/event: what the process made the kernel send to the block device during the
//!   delivered run (/proc/self/io, after a final sync), per event: the data-block part of
//!   the flash wear an SD card sees.
//!
//! ```text
//! cargo bench --bench outbox            # the table in BENCHMARKS.md
//! cargo bench --bench outbox -- 5000    # events per run (default 2000)
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgesight::config::{Fsync, Settings};
use edgesight::mqtt::outbox::{DiskStore, Outbox};
use tokio_util::sync::CancellationToken;

/// A realistic detection event: 214 bytes of JSON.
fn payload(i: usize) -> Vec<u8> {
    format!(
        r#"{{"v":1,"id":"pi-kitchen:front:281:{}","type":"start","device":"pi-kitchen","camera":"front","label":"tabby","class":281,"score":0.812,"max_score":0.834,"started_at":"2026-11-30T08:00:01.250Z","frames":3}}"#,
        1_764_489_601_250u64 + i as u64
    )
    .into_bytes()
}

/// Bytes this process caused to be written to storage so far: dirtied page-cache bytes
/// (`write_bytes`) minus those deleted before they reached the disk
/// (`cancelled_write_bytes`). File-system metadata (the ext4 journal) is not included.
fn write_bytes() -> i64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| -> i64 {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    field("write_bytes:") - field("cancelled_write_bytes:")
}

fn settings(dir: &std::path::Path, port: u16, fsync: &str) -> Settings {
    let f = dir.join("bench.toml");
    let interval = if fsync == "interval" {
        "fsync_interval_ms = 1000\n"
    } else {
        ""
    };
    std::fs::write(
        &f,
        format!(
            "[device]\nid = \"bench\"\n[mqtt]\nport = {port}\nclient_id = \"bench-{fsync}\"\n\
             [model]\npath = \"none.onnx\"\n[[camera]]\nname = \"front\"\npath = \"none\"\n\
             [outbox]\ndir = \"{}\"\nfsync = \"{fsync}\"\n{interval}window = 32\n",
            dir.join("outbox").display()
        ),
    )
    .expect("write the bench config");
    Settings::load_with_env(&f, vec![]).expect("bench config")
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    edgesight::mqtt::start_embedded_broker("127.0.0.1", port).expect("rumqttd");
    // On the disk the target directory is on, not a tmpfs.
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-outbox");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "{n} events of {} bytes, window 32, loopback rumqttd\n",
        payload(0).len()
    );
    println!("| fsync | written (events/s) | delivered (events/s) | bytes written per event |");
    println!("|---|---:|---:|---:|");
    for fsync in ["always", "interval", "never"] {
        let dir = base.join(fsync);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bench dir");
        let s = settings(&dir, port, fsync);
        let policy: Fsync = s.outbox.fsync;

        // Written: the disk alone.
        let (store, _) = DiskStore::open(&dir.join("write-only"), policy).expect("store");
        let ob = Outbox::new(Box::new(store), vec![], n + 1, 1 << 30);
        let t0 = Instant::now();
        for i in 0..n {
            ob.push("bench/front/detection".into(), payload(i)).unwrap();
        }
        ob.sync();
        let written = n as f64 / t0.elapsed().as_secs_f64();
        drop(ob);
        let _ = std::fs::remove_dir_all(dir.join("write-only"));

        // Delivered: written, sent, acknowledged, deleted.
        let (store, _) = DiskStore::open(&s.outbox.dir, policy).expect("store");
        let ob = Arc::new(Outbox::new(Box::new(store), vec![], n + 1, 1 << 30));
        let stop = CancellationToken::new();
        let settings = Arc::new(s);
        let io0 = write_bytes();
        let t0 = Instant::now();
        let delivered = rt.block_on(async {
            let sender = tokio::spawn(edgesight::mqtt::outbox::drive(
                ob.clone(),
                settings.clone(),
                stop.clone(),
                Duration::from_secs(5),
            ));
            let producer = {
                let ob = ob.clone();
                tokio::task::spawn_blocking(move || {
                    for i in 0..n {
                        ob.push("bench/front/detection".into(), payload(i)).unwrap();
                    }
                })
            };
            producer.await.expect("producer");
            while ob.counters.delivered.load(Ordering::Relaxed) < n as u64 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let rate = n as f64 / t0.elapsed().as_secs_f64();
            stop.cancel();
            let _ = sender.await;
            rate
        });
        ob.sync();
        // Whatever the kernel still holds dirty for us reaches the disk now.
        let _ = std::process::Command::new("sync").status();
        let per_event = (write_bytes() - io0) as f64 / n as f64;
        println!("| {policy} | {written:.0} | {delivered:.0} | {per_event:.0} |");
    }
}
