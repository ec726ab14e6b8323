//! No detection lost: detection events go through the durable outbox to a real broker
//! (in-process rumqttd, or Mosquitto when EDGESIGHT_TEST_BROKER is set) across broker
//! outages, a SIGKILL of the daemon while the broker is away, and corrupt outbox files.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use edgesight::config::Settings;
use edgesight::mqtt::outbox::{Record, decode, encode};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

/// The samples looped at 20 fps, detections after 2 frames, ended by 2, quick reconnects.
fn config(dir: &Path, port: u16, device: &str) -> std::path::PathBuf {
    let f = common::config_file(
        dir,
        "127.0.0.1",
        port,
        device,
        &common::samples_camera(20, true),
    );
    let text = std::fs::read_to_string(&f).unwrap().replace(
        "qos = 1\n",
        "qos = 1\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n",
    ) + "[detection]\nmin_frames = 2\nend_frames = 2\n";
    std::fs::write(&f, text).unwrap();
    f
}

/// (id, type) of a detection message, checking its shape on the way.
fn event(m: &common::Msg, device: &str) -> (String, String) {
    let v: Value = serde_json::from_str(&m.payload).unwrap();
    // The planted records of the corrupt-file test are not real events.
    if v["started_at"] != "x" {
        common::check_schema("detection", &m.payload);
    }
    assert_eq!(v["v"], 1);
    assert_eq!(v["device"], device);
    assert_eq!(v["camera"], "front");
    assert!(v["label"].as_str().is_some_and(|l| !l.is_empty()), "{v}");
    assert!(v["score"].as_f64().is_some() && v["max_score"].as_f64().is_some());
    assert!(v["frames"].as_u64().is_some_and(|n| n >= 1));
    let kind = v["type"].as_str().unwrap().to_string();
    assert_eq!(v.get("ended_at").is_some(), kind == "end", "{v}");
    (v["id"].as_str().unwrap().to_string(), kind)
}

/// Receive detection messages until every one of `want` has arrived; returns all
/// received, duplicates included, in arrival order.
async fn receive_all(
    rx: &mut UnboundedReceiver<common::Msg>,
    device: &str,
    want: &HashSet<(String, String)>,
) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    while !want.is_subset(&seen) {
        let m = common::next(rx, "detection event").await;
        if !m.topic.ends_with("/detection") {
            continue;
        }
        let e = event(&m, device);
        seen.insert(e.clone());
        got.push(e);
    }
    got
}

/// First arrivals must keep each detection's life in order (start, updates, end) and the
/// detections in the order they started.
fn assert_in_order(got: &[(String, String)]) {
    let mut first = Vec::new();
    let mut seen = HashSet::new();
    for e in got {
        if seen.insert(e.clone()) {
            first.push(e.clone());
        }
    }
    let mut state: HashMap<&str, &str> = HashMap::new();
    let mut last_start = 0u64;
    for (id, kind) in &first {
        let started: u64 = id.rsplit(':').next().unwrap().parse().unwrap();
        let prev = state.insert(id, kind);
        match kind.as_str() {
            "start" => {
                assert!(prev.is_none(), "{id}: start after {prev:?}");
                assert!(
                    started >= last_start,
                    "{id} started before the previous detection"
                );
                last_start = started;
            }
            _ => assert!(
                matches!(prev, Some("start" | "update")),
                "{id}: {kind} after {prev:?}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_outages_lose_no_detection_event() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("outage-{}", std::process::id());
    let proxy = common::Proxy::new(&host, port);
    proxy.up().await;
    let f = config(dir.path(), proxy.port, &device);
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    let mut rx = common::subscribe(
        &host,
        port,
        &format!("{device}-sub"),
        &format!("edgesight/{device}/+/detection"),
    )
    .await;
    // The link to the broker is cut (every connection closed, the port refusing) and
    // restored.
    let outage = async || {
        proxy.down();
        tokio::time::sleep(Duration::from_millis(400)).await;
        proxy.up().await;
    };
    let outbox = settings.outbox.dir.clone();
    let stats = run_through_ten_outages(settings, outage).await;
    assert_every_event_arrived(&stats, &outbox, &mut rx, &device).await;
}

/// Run the daemon while detections keep coming, with `outage` ten times, 0.7 s apart;
/// then stop it and return its counters.
async fn run_through_ten_outages(
    settings: Settings,
    mut outage: impl AsyncFnMut(),
) -> std::sync::Arc<edgesight::stats::Stats> {
    let shutdown = CancellationToken::new();
    // A failed assertion must end the daemon too, or the runtime's drop waits forever for
    // the inference thread.
    let _stop_on_panic = shutdown.clone().drop_guard();
    let run = tokio::spawn(edgesight::run(settings, shutdown.clone()));
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        outage().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("run returns after the trigger")
        .unwrap()
        .unwrap()
}

/// After a run with outages: every event the outbox accepted arrived at the subscriber at
/// least once, in order, or is still in the outbox (and on disk) for the next run; none
/// dropped; every detection that started ended (the shutdown closes open ones).
async fn assert_every_event_arrived(
    stats: &edgesight::stats::Stats,
    outbox: &std::path::Path,
    rx: &mut UnboundedReceiver<common::Msg>,
    device: &str,
) {
    let ob = stats.outbox.get().expect("detection is on by default");
    let accepted = ob.accepted.load(Ordering::Relaxed);
    assert!(accepted >= 10, "steady events: {accepted}");
    assert_eq!(ob.dropped.load(Ordering::Relaxed), 0);
    // What the drain did not deliver is still in the outbox (on disk): it counts too.
    let (_, on_disk) =
        edgesight::mqtt::outbox::DiskStore::open(outbox, edgesight::config::Fsync::Never).unwrap();
    assert_eq!(
        on_disk.records.len(),
        ob.depth(),
        "the outbox's depth is what is on disk"
    );
    let left: HashSet<(String, String)> = on_disk
        .records
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.payload).unwrap();
            (
                v["id"].as_str().unwrap().into(),
                v["type"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(stats.reconnects.load(Ordering::Relaxed) >= 10);
    assert_eq!(ob.quarantined.load(Ordering::Relaxed), 0);
    // Every accepted event arrives at least once, except any still waiting in the outbox.
    let delivered = ob.delivered.load(Ordering::Relaxed);
    assert_eq!(delivered + left.len() as u64, accepted);
    let mut want = HashSet::new();
    let mut got = Vec::new();
    while (want.difference(&left).count() as u64) < delivered {
        let m = common::next(rx, "detection event").await;
        if m.topic.ends_with("/detection") {
            let e = event(&m, device);
            want.insert(e.clone());
            got.push(e);
        }
    }
    assert_in_order(&got);
    // Every detection that started has ended (the shutdown closes open ones).
    let starts: HashSet<&String> = want
        .iter()
        .chain(left.iter())
        .filter(|e| e.1 == "start")
        .map(|e| &e.0)
        .collect();
    let ends: HashSet<&String> = want
        .iter()
        .chain(left.iter())
        .filter(|e| e.1 == "end")
        .map(|e| &e.0)
        .collect();
    assert_eq!(starts, ends);
    println!(
        "{accepted} events, {} received ({} duplicates after reconnects), {} left in the outbox",
        got.len(),
        got.len() - want.len(),
        left.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_killed_and_restarted_ten_times_loses_no_detection_event() {
    // A broker of our own to kill: Debian's Mosquitto (the README's test command installs
    // it), persistence on, so a persistent session outlives its restarts.
    let mosquitto = "/usr/sbin/mosquitto";
    assert!(
        Path::new(mosquitto).exists(),
        "{mosquitto} is needed (Debian package mosquitto; tools/test.sh installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n\
             persistence true\npersistence_location {}/\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let start = || {
        let child = Command::new(mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let up = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(25));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "mosquitto listening on {port}");
        child
    };
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut broker = Killed(start());
    let device = format!("killed-{}", std::process::id());
    let mut rx = common::subscribe_with(
        "127.0.0.1",
        port,
        &format!("{device}-sub"),
        &format!("edgesight/{device}/+/detection"),
        true,
    )
    .await;
    let f = config(dir.path(), port, &device);
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    let outage = async || {
        // SIGTERM: Mosquitto saves its sessions (and their queued messages) and exits.
        let _ = Command::new("kill").arg(broker.0.id().to_string()).status();
        let _ = broker.0.wait();
        tokio::time::sleep(Duration::from_millis(300)).await;
        broker = Killed(start());
    };
    let outbox = settings.outbox.dir.clone();
    let stats = run_through_ten_outages(settings, outage).await;
    assert_every_event_arrived(&stats, &outbox, &mut rx, &device).await;
}

/// The records an outbox directory holds, as (id, type).
fn records_in(dir: &Path) -> HashSet<(String, String)> {
    let mut out = HashSet::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "rec") {
            let r = decode(&std::fs::read(&p).unwrap()).unwrap();
            let v: Value = serde_json::from_slice(&r.payload).unwrap();
            out.insert((
                v["id"].as_str().unwrap().into(),
                v["type"].as_str().unwrap().into(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_the_broker_is_down_then_restart_delivers_the_buffered_events() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("kill-{}", std::process::id());
    let proxy = common::Proxy::new(&host, port); // down: the daemon's broker is away
    let f = config(dir.path(), proxy.port, &device);
    let outbox = dir.path().join("outbox");
    let mut daemon = common::Daemon::start(&f);
    let mut buffered = HashSet::new();
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if outbox.is_dir() {
            buffered = records_in(&outbox);
            if buffered.len() >= 6 {
                break;
            }
        }
    }
    daemon.child.kill().unwrap(); // SIGKILL: no drain, no goodbye
    daemon.child.wait().unwrap();
    // What the disk holds after the kill (events accepted after our last look count too).
    let buffered = records_in(&outbox)
        .union(&buffered)
        .cloned()
        .collect::<HashSet<_>>();
    assert!(buffered.len() >= 6, "{buffered:?}");

    proxy.up().await;
    let mut rx = common::subscribe(
        &host,
        port,
        &format!("{device}-sub"),
        &format!("edgesight/{device}/+/detection"),
    )
    .await;
    let daemon = common::Daemon::start(&f);
    let got = receive_all(&mut rx, &device, &buffered).await;
    daemon.stop(); // SIGTERM, exit 0
    assert_in_order(&got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_outbox_file_is_quarantined_and_the_rest_delivered() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("corrupt-{}", std::process::id());
    let f = config(dir.path(), port, &device);
    let f = {
        // This run makes no detections of its own: only the planted records go out.
        let text = std::fs::read_to_string(&f)
            .unwrap()
            .replace("min_frames = 2\n", "min_frames = 10000\n");
        std::fs::write(&f, text).unwrap();
        f
    };
    let outbox = dir.path().join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    let topic = format!("edgesight/{device}/front/detection");
    for seq in 1..=4u64 {
        let payload = format!(
            r#"{{"v":1,"id":"{device}:front:0:{seq}","type":"start","device":"{device}","camera":"front","label":"circle","class":0,"score":0.9,"max_score":0.9,"started_at":"x","frames":2}}"#
        );
        let mut bytes = encode(&Record {
            seq,
            topic: topic.clone(),
            payload: payload.into_bytes(),
        });
        if seq == 2 {
            let n = bytes.len();
            bytes[n - 5] ^= 0x01;
        }
        std::fs::write(outbox.join(format!("{seq:020}.rec")), bytes).unwrap();
    }
    let mut rx = common::subscribe(
        &host,
        port,
        &format!("{device}-sub"),
        &format!("edgesight/{device}/+/detection"),
    )
    .await;
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    let shutdown = CancellationToken::new();
    // A failed assertion must end the daemon too, or the runtime's drop waits forever for
    // the inference thread.
    let _stop_on_panic = shutdown.clone().drop_guard();
    let run = tokio::spawn(edgesight::run(settings, shutdown.clone()));
    let want: HashSet<(String, String)> = [1, 3, 4]
        .iter()
        .map(|s| (format!("{device}:front:0:{s}"), "start".to_string()))
        .collect();
    let got = receive_all(&mut rx, &device, &want).await;
    assert!(!got.iter().any(|e| e.0.ends_with(":2")), "{got:?}");
    shutdown.cancel();
    let stats = run.await.unwrap().unwrap();
    let ob = stats.outbox.get().unwrap();
    assert_eq!(ob.quarantined.load(Ordering::Relaxed), 1);
    assert_eq!(ob.depth(), 0);
    assert!(
        outbox
            .join("quarantine")
            .join(format!("{:020}.rec", 2))
            .exists()
    );
    assert!(
        !outbox.join(format!("{:020}.rec", 1)).exists(),
        "delivered: removed"
    );
}
