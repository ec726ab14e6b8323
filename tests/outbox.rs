//! No detection lost: detection events go through the durable outbox to a real broker
//! (in-process rumqttd, or Mosquitto when EDGESIGHT_TEST_BROKER is set) across broker
//! outages, a SIGKILL of the daemon while the broker is away, and corrupt outbox files.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use edgesight::config::{Fsync, Settings};
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

/// A subscriber to `device`'s detection events.
async fn detections(host: &str, port: u16, device: &str) -> UnboundedReceiver<common::Msg> {
    let filter = format!("edgesight/{device}/+/detection");
    common::subscribe(host, port, &format!("{device}-sub"), &filter).await
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
    assert!(
        matches!(v["camera"].as_str(), Some("front" | "back")),
        "{v}"
    );
    assert_eq!(
        v["id"].as_str().unwrap().split(':').nth(1),
        v["camera"].as_str(),
        "{v}"
    );
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

/// First arrivals must keep each detection's life in order (start, updates, end) and each
/// camera's detections in the order they started. (Across cameras the outbox keeps the
/// order events were accepted in, which is not the order of their start times.)
fn assert_in_order(got: &[(String, String)]) {
    let mut first = Vec::new();
    let mut seen = HashSet::new();
    for e in got {
        if seen.insert(e.clone()) {
            first.push(e.clone());
        }
    }
    let mut state: HashMap<&str, &str> = HashMap::new();
    let mut last_start: HashMap<&str, u64> = HashMap::new();
    for (id, kind) in &first {
        let camera = id.split(':').nth(1).unwrap();
        let started: u64 = id.rsplit(':').next().unwrap().parse().unwrap();
        let prev = state.insert(id, kind);
        match kind.as_str() {
            "start" => {
                assert!(prev.is_none(), "{id}: start after {prev:?}");
                let last = last_start.entry(camera).or_default();
                assert!(
                    started >= *last,
                    "{id} started before {camera}'s previous detection"
                );
                *last = started;
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
    let mut rx = detections(&host, port, &device).await;
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

/// Two cameras share the outbox: through ten outages every event of either arrives, and
/// each camera's keep their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_cameras_share_the_outbox_and_keep_their_order_through_outages() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("two-{}", std::process::id());
    let proxy = common::Proxy::new(&host, port);
    proxy.up().await;
    let f = config(dir.path(), proxy.port, &device);
    let text = std::fs::read_to_string(&f).unwrap().replace(
        "[detection]",
        &format!(
            "[[camera]]\nname = \"back\"\npath = \"{}/tests/fixtures/samples\"\nfps = 15\nloop = true\n[detection]",
            common::root().display()
        ),
    );
    std::fs::write(&f, text).unwrap();
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    assert_eq!(settings.camera.len(), 2);
    let mut rx = detections(&host, port, &device).await;
    let outage = async || {
        proxy.down();
        tokio::time::sleep(Duration::from_millis(400)).await;
        proxy.up().await;
    };
    let outbox = settings.outbox.dir.clone();
    let stats = run_through_ten_outages(settings, outage).await;
    let events = assert_every_event_arrived(&stats, &outbox, &mut rx, &device).await;
    for camera in ["front", "back"] {
        let n = events
            .iter()
            .filter(|(id, _)| id.split(':').nth(1) == Some(camera))
            .count();
        assert!(n >= 4, "{camera}: {n} events");
    }
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
) -> HashSet<(String, String)> {
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
    want.union(&left).cloned().collect()
}

/// Mosquitto SIGKILLed 20 times, and the daemon SIGKILLed 3 times while the broker is
/// down. A broker killed with SIGKILL loses what it had not saved, so the daemon's losses
/// are told from the broker's by a tap on the daemon's line (common::Proxy::tapped): what
/// the broker acknowledged is the daemon's job done. Ours: every record a killed daemon
/// left on disk was acknowledged by the broker later or is still waiting, and the last
/// run's count adds up (recovered + accepted = delivered + waiting). The broker's: acknowledged but
/// never at the subscriber (reported, not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_and_the_daemon_sigkilled_lose_nothing_of_ours() {
    let mosquitto = "/usr/sbin/mosquitto";
    assert!(
        Path::new(mosquitto).exists(),
        "{mosquitto} is needed (Debian package mosquitto; tools/test.sh installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let conf = dir.path().join("mosquitto.conf");
    // Saved after every change: SIGKILL then costs the broker as little as it can.
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n\
             persistence true\npersistence_location {}/\n\
             autosave_interval 1\nautosave_on_changes true\n",
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
    let device = format!("sigkill-{}", std::process::id());
    let mut rx = common::subscribe_with(
        "127.0.0.1",
        port,
        &format!("{device}-sub"),
        &format!("edgesight/{device}/+/detection"),
        true,
    )
    .await;
    // A clean stop once, so the subscriber's session is on disk before the SIGKILLs.
    let _ = Command::new("kill").arg(broker.0.id().to_string()).status();
    let _ = broker.0.wait();
    broker = Killed(start());
    let proxy = common::Proxy::tapped("127.0.0.1", port);
    proxy.up().await;
    let f = config(dir.path(), proxy.port, &device);
    let text = std::fs::read_to_string(&f).unwrap();
    std::fs::write(&f, text.replace("level = \"warn\"", "level = \"info\"")).unwrap();
    let outbox = dir.path().join("outbox");
    let mut daemon = common::Daemon::start(&f);
    let mut on_disk_at_kills = HashSet::new();
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        broker.0.kill().unwrap(); // SIGKILL: no save, no goodbye
        let _ = broker.0.wait();
        if [3, 10, 17].contains(&i) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            daemon.child.kill().unwrap();
            daemon.child.wait().unwrap();
            on_disk_at_kills.extend(records_in(&outbox));
            daemon = common::Daemon::start(&f);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        broker = Killed(start());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemon.signal("TERM");
    assert!(daemon.child.wait().unwrap().success(), "SIGTERM exits 0");
    let log = daemon.wait_for_log("stopped;");
    let count = |what: &str| -> u64 {
        let at = log.rfind("outbox: accepted").expect("summary");
        let tail = &log[at..];
        let i = tail.find(&format!("{what} ")).unwrap() + what.len() + 1;
        tail[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (accepted, delivered, waiting) = (count("accepted"), count("delivered"), count("waiting"));
    let left = records_in(&outbox);
    let id = |p: &[u8]| {
        let v: Value = serde_json::from_slice(p).unwrap();
        (
            v["id"].as_str().unwrap().to_string(),
            v["type"].as_str().unwrap().to_string(),
        )
    };
    let acked: HashSet<(String, String)> = proxy
        .acked
        .as_ref()
        .unwrap()
        .lock()
        .unwrap()
        .iter()
        .filter(|(topic, _)| topic.ends_with("/detection"))
        .map(|(_, p)| id(p))
        .collect();
    // Ours. The last run also delivered what the killed one left on disk.
    let recovered: u64 = log
        .split(" undelivered record(s) from a previous run")
        .next()
        .filter(|_| log.contains("from a previous run"))
        .and_then(|head| head.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert_eq!(
        accepted + recovered,
        delivered + waiting,
        "the last run's outbox adds up"
    );
    assert_eq!(left.len() as u64, waiting, "what waits is on disk");
    let ours: Vec<_> = on_disk_at_kills
        .iter()
        .filter(|e| !acked.contains(*e) && !left.contains(*e))
        .collect();
    assert!(
        ours.is_empty(),
        "records of a killed daemon never delivered: {ours:?}"
    );
    assert!(
        on_disk_at_kills.len() >= 3,
        "the outages left records: {on_disk_at_kills:?}"
    );
    // What reached the subscriber: everything that arrives within 5 s of quiet.
    let mut got = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        if m.topic.ends_with("/detection") {
            got.push(event(&m, &device));
        }
    }
    let received: HashSet<_> = got.iter().cloned().collect();
    assert_in_order(&got);
    let broker_lost = acked.difference(&received).count();
    println!(
        "20 broker SIGKILLs, 3 daemon SIGKILLs: {} events acknowledged by the broker, {} \
         received ({} duplicates), {} lost by the broker, 0 by us ({} left on disk at the \
         kills, all delivered later; {} waiting at the end)",
        acked.len(),
        received.len(),
        got.len() - received.len(),
        broker_lost,
        on_disk_at_kills.len(),
        left.len()
    );
    assert!(acked.len() >= 20, "steady events: {}", acked.len());
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
    let mut rx = detections(&host, port, &device).await;
    let daemon = common::Daemon::start(&f);
    let got = receive_all(&mut rx, &device, &buffered).await;
    daemon.stop(); // SIGTERM, exit 0
    assert_in_order(&got);
}

/// A planted detection record: a "start" of id `<device>:front:0:<n>`.
fn planted(device: &str, seq: u64, topic: &str, n: u64) -> Vec<u8> {
    let payload = format!(
        r#"{{"v":1,"id":"{device}:front:0:{n}","type":"start","device":"{device}","camera":"front","label":"circle","class":0,"score":0.9,"max_score":0.9,"started_at":"x","frames":2}}"#
    );
    encode(&Record {
        seq,
        topic: topic.to_string(),
        payload: payload.into_bytes(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_poison_outbox_files_are_quarantined_and_the_rest_delivered() {
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
    let name = |seq: u64| outbox.join(format!("{seq:020}.rec"));
    let write = |seq: u64, bytes: &[u8]| std::fs::write(name(seq), bytes).unwrap();
    // Good records 1, 3, 4 and 11, each behind something that once stopped or stalled
    // the outbox.
    for seq in [1, 3, 4, 11] {
        write(seq, &planted(&device, seq, &topic, seq));
    }
    let mut flipped = planted(&device, 2, &topic, 2);
    let n = flipped.len();
    flipped[n - 5] ^= 0x01;
    write(2, &flipped);
    write(5, &planted(&device, 5, &topic, 5)[..20]); // truncated
    write(6, b"not a record at all, just garbage bytes");
    write(7, &planted(&device, 7, &format!("{topic}/+"), 7)); // the client refuses it
    write(8, &planted(&device, 8, "", 8)); // the broker drops the connection
    write(9, &planted(&device, 9, "edgesight/\0/x", 9));
    write(u64::MAX, &planted(&device, u64::MAX, &topic, 10)); // numbering would wrap
    std::fs::create_dir(name(10)).unwrap(); // cannot be read as a file
    std::fs::write(outbox.join(format!("{:020}.tmp", 12)), b"torn").unwrap();
    let mut rx = common::subscribe(
        &host,
        port,
        &format!("{device}-sub"),
        &format!("edgesight/{device}/#"),
    )
    .await;
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    let shutdown = CancellationToken::new();
    // A failed assertion must end the daemon too, or the runtime's drop waits forever for
    // the inference thread.
    let _stop_on_panic = shutdown.clone().drop_guard();
    let run = tokio::spawn(edgesight::run(settings, shutdown.clone()));
    let want: HashSet<(String, String)> = [1, 3, 4, 11]
        .iter()
        .map(|s| (format!("{device}:front:0:{s}"), "start".to_string()))
        .collect();
    let got = receive_all(&mut rx, &device, &want).await;
    let bad = ["2", "5", "7", "8", "9", "10"];
    assert!(
        !got.iter()
            .any(|e| bad.iter().any(|b| e.0.ends_with(&format!(":{b}")))),
        "{got:?}"
    );
    shutdown.cancel();
    let stats = run.await.unwrap().unwrap();
    let ob = stats.outbox.get().unwrap();
    // 2 (checksum), 5 (truncated), 6 (garbage), 7, 8, 9 (poison topics), 10 (unreadable)
    // and u64::MAX (its number) moved aside, counted.
    assert_eq!(
        ob.quarantined.load(Ordering::Relaxed),
        8,
        "{}",
        stats.summary()
    );
    assert_eq!(ob.depth(), 0);
    let q = outbox.join("quarantine");
    for seq in [2, 5, 6, 7, 8, 9, 10, u64::MAX] {
        assert!(
            q.join(format!("{seq:020}.rec")).exists(),
            "{seq} quarantined"
        );
    }
    assert!(
        !outbox.join(format!("{:020}.tmp", 12)).exists(),
        "torn write removed"
    );
    for seq in [1, 3, 4, 11] {
        assert!(!name(seq).exists(), "{seq} delivered: removed");
    }
}

/// Two writers in one directory shared sequence numbers and deleted each other's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_outbox_is_refused_and_the_first_goes_on() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("twice-{}", std::process::id());
    let f = config(dir.path(), port, &device);
    let mut rx = detections(&host, port, &device).await;
    let mut first = common::Daemon::start(&f);
    let m = common::next(&mut rx, "the first daemon's detection").await;
    let (id, _) = event(&m, &device);

    let mut second = Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .args(["run", "--config"])
        .arg(&f)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A liveness bound, not a timing claim: a second writer that is let in runs for ever.
    let mut refused = None;
    for _ in 0..600 {
        refused = second.try_wait().unwrap();
        if refused.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if refused.is_none() {
        let _ = second.kill();
    }
    let second = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(78), "{err}");
    let outbox = dir.path().join("outbox");
    assert!(
        err.contains(&format!("outbox.dir (in {})", f.display()))
            && err.contains(&outbox.display().to_string())
            && err.contains(&format!("pid {}", first.child.id())),
        "{err}"
    );
    // The first one noticed nothing: it keeps delivering, numbering its own records.
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "first still runs"
    );
    loop {
        let m = common::next(&mut rx, "a later detection").await;
        if event(&m, &device).0 != id {
            break;
        }
    }
    first.stop();
}

/// A reload hands the outbox to the next pipeline (one writer, one sender at a time): what
/// was buffered before three reloads is delivered after them, in order; a reload onto an
/// outbox directory another process holds is rejected and the running one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_hand_the_outbox_over_and_refuse_a_directory_in_use() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("handover-{}", std::process::id());
    let proxy = common::Proxy::new(&host, port); // down: events pile up in the outbox
    let f = config(dir.path(), proxy.port, &device);
    let good = std::fs::read_to_string(&f)
        .unwrap()
        .replace("level = \"warn\"", "level = \"info\"");
    std::fs::write(&f, &good).unwrap();
    let outbox = dir.path().join("outbox");
    let d = common::Daemon::start(&f);
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if outbox.is_dir() && records_in(&outbox).len() >= 4 {
            break;
        }
    }
    for n in 1..=3 {
        d.signal("HUP");
        loop {
            let log = d.wait_for_log("restarting the pipeline");
            if log.matches("restarting the pipeline").count() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Another process holds this directory: the reload onto it is refused.
    let held = dir.path().join("held");
    let _lock = edgesight::mqtt::outbox::DiskStore::open(&held, Fsync::Never).unwrap();
    let moved = good.replace(
        &format!("{}/outbox", dir.path().display()),
        &held.display().to_string(),
    );
    assert_ne!(moved, good);
    std::fs::write(&f, moved).unwrap();
    d.signal("HUP");
    let log = d.wait_for_log("reload rejected");
    assert!(
        log.contains("outbox.dir") && log.contains("in use"),
        "{log}"
    );
    std::fs::write(&f, &good).unwrap();

    let buffered = records_in(&outbox);
    assert!(buffered.len() >= 4, "{buffered:?}");
    let mut rx = detections(&host, port, &device).await;
    proxy.up().await;
    let got = receive_all(&mut rx, &device, &buffered).await;
    assert_in_order(&got);
    let log = d.wait_for_log("restarting the pipeline");
    assert!(!log.contains("still running after the drain"), "{log}");
    d.stop();
}

/// A broker that stops answering (the connection open, nothing acknowledged) holds the
/// shutdown for `DRAIN_TIMEOUT`, not for ever, and loses nothing: SIGTERM still exits 0,
/// and the events it did not acknowledge stay on disk, delivered by the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_holds_the_shutdown_only_for_the_drain_time() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("frozen-{}", std::process::id());
    let proxy = common::Proxy::new(&host, port);
    proxy.up().await;
    let f = config(dir.path(), proxy.port, &device);
    let outbox = dir.path().join("outbox");
    let mut rx = detections(&host, port, &device).await;
    let mut daemon = common::Daemon::start_with_env(&f, &[("EDGESIGHT__LOG__LEVEL", "info")]);
    let first = event(
        &common::next(&mut rx, "a first detection event").await,
        &device,
    );
    proxy.freeze();
    // Events keep coming while nothing is acknowledged.
    let mut pending = HashSet::new();
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        pending = records_in(&outbox);
        if pending.len() >= 4 {
            break;
        }
    }
    assert!(pending.len() >= 4, "{pending:?}");
    daemon.signal("TERM");
    // A liveness bound: the drain's caps add up to about 11 s; without them the keep-alive
    // gives up after about 60 s.
    let code = daemon.exit_code_within(Duration::from_secs(30)).await;
    let log = daemon.log();
    assert_eq!(code, Some(0), "no exit 0 within 30 s: {log}");
    assert!(log.contains("kept for the next run"), "{log}");
    let kept = records_in(&outbox);
    assert!(
        pending.is_subset(&kept),
        "lost {:?}",
        pending.difference(&kept)
    );

    proxy.down();
    proxy.thaw();
    proxy.up().await;
    let daemon = common::Daemon::start(&f);
    let got = receive_all(&mut rx, &device, &kept).await;
    daemon.stop();
    assert_in_order(&[vec![first], got].concat());
}
