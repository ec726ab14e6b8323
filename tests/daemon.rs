//! The real binary as systemd or a terminal runs it: `edgesight run`, stopped by SIGTERM
//! or SIGINT, must drain, publish `offline` and exit 0.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_drain_and_exit_0() {
    let (host, port) = common::broker();
    for signal in ["TERM", "INT"] {
        let device = format!("sig{signal}-{}", std::process::id()).to_lowercase();
        let dir = tempfile::tempdir().unwrap();
        let cfg = common::config_file(
            dir.path(),
            &host,
            port,
            &device,
            &common::samples_camera(20, true),
        );
        let mut rx = common::subscribe(
            &host,
            port,
            &format!("{device}-sub"),
            &format!("edgesight/{device}/#"),
        )
        .await;
        let child = Command::new(env!("CARGO_BIN_EXE_edgesight"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("EDGESIGHT__LOG__LEVEL", "info") // the signal's log line is at info
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut n = 0;
        while n < 2 {
            if common::next(&mut rx, "classification")
                .await
                .topic
                .ends_with("/classification")
            {
                n += 1;
            }
        }
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "SIG{signal}: {stderr}");
        assert!(
            stderr.contains(&format!("SIG{signal}: shutting down")),
            "{stderr}"
        );
        // The camera goes offline first, then the device.
        let mut camera_offline = false;
        loop {
            let m = common::next(&mut rx, "offline").await;
            if m.topic == format!("edgesight/{device}/front/availability") && m.payload == "offline"
            {
                camera_offline = true;
            }
            if m.topic == format!("edgesight/{device}/availability") && m.payload == "offline" {
                break;
            }
        }
        assert!(
            camera_offline,
            "SIG{signal}: no camera offline before the device's"
        );
        // Nothing after offline: whatever the daemon queued behind it before DISCONNECT
        // (it has exited, so all of it) would be here. A retained message our subscriber
        // is sent again (it reconnected: a busy machine) is not the daemon's. Shown to fail
        // by publishing once more after `queue_offline` in the drain.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            let replay = m.retain && (m.payload == "offline" || m.topic.ends_with("/status"));
            assert!(
                replay,
                "SIG{signal}: {} {:?} after the device's offline",
                m.topic, m.payload
            );
        }
    }
}

fn settings(
    dir: &std::path::Path,
    host: &str,
    port: u16,
    device: &str,
    cameras: &str,
) -> edgesight::config::Settings {
    let f = common::config_file(dir, host, port, device, cameras);
    edgesight::config::Settings::load_with_env(&f, vec![]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_status_watchdog_and_stopping() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let cams = common::samples_camera(20, true);
    let s = settings(
        dir.path(),
        &host,
        port,
        &format!("notify-{}", std::process::id()),
        &cams,
    );
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let notifier = edgesight::daemon::notify::Notifier::new(
        Some(sock_path.display().to_string()),
        Some("400000".into()), // 0.4 s: a ping every 0.2 s while healthy
        None,
    );
    // systemd's side: collect every datagram until STOPPING=1; say when 3 pings arrived.
    let (pinged_tx, pinged_rx) = tokio::sync::oneshot::channel();
    let listener = std::thread::spawn(move || {
        let (mut seen, mut pinged_tx, mut buf) = (Vec::new(), Some(pinged_tx), vec![0u8; 4096]);
        loop {
            let n = sock.recv(&mut buf).expect("a notification within 20 s");
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let stop = m.starts_with("STOPPING=1");
            seen.push(m);
            if seen.iter().filter(|m| *m == "WATCHDOG=1").count() == 3
                && let Some(tx) = pinged_tx.take()
            {
                let _ = tx.send(());
            }
            if stop {
                return seen;
            }
        }
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(edgesight::run_with_notifier(s, shutdown.clone(), notifier));
    pinged_rx.await.expect("three watchdog pings");
    shutdown.cancel();
    run.await.unwrap().unwrap();
    let seen = listener.join().unwrap();
    assert!(seen[0].starts_with("READY=1\n"), "READY first: {seen:?}");
    assert!(
        seen.iter()
            .any(|m| m.starts_with("STATUS=1 camera(s), 1 streaming")),
        "{seen:?}"
    );
    assert!(seen.last().unwrap().starts_with("STOPPING=1"));
}

#[test]
fn only_a_streaming_camera_that_stops_delivering_is_stalled() {
    use edgesight::stats::{CameraState, Stats};
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let cams = "[[camera]]\nname = \"a\"\npath = \"x\"\nfps = 5\n\
                [[camera]]\nname = \"b\"\npath = \"x\"\nfps = 0.1\n\
                [[camera]]\nname = \"c\"\nsource = \"v4l2\"\n\
                [[camera]]\nname = \"d\"\nsource = \"v4l2\"\nstall_secs = 60\n";
    let s = settings(dir.path(), "127.0.0.1", 1, "stall", cams);
    let stats = Stats::new(s.camera.iter().map(|c| c.name.clone()));
    // (state, last frame at ms, now ms) -> stalled?  Limits: a 5 s, b 30 s (3 periods),
    // c 10 s (its supervisor's stall_secs 5, then 5 s for it to report), d 65 s (the
    // same with stall_secs 60: the supervisor reopens it before the watchdog may care).
    let cases = [
        (0, CameraState::Streaming, 1_000, 5_900, false),
        (0, CameraState::Streaming, 1_000, 6_100, true),
        (1, CameraState::Streaming, 1_000, 30_000, false),
        (1, CameraState::Streaming, 1_000, 31_100, true),
        (2, CameraState::Waiting, 0, 600_000, false),
        (2, CameraState::Ended, 0, 600_000, false),
        (2, CameraState::Starting, 0, 600_000, false),
        (2, CameraState::Streaming, 1_000, 10_900, false),
        (2, CameraState::Streaming, 1_000, 11_100, true),
        (3, CameraState::Streaming, 1_000, 31_000, false),
        (3, CameraState::Streaming, 1_000, 65_900, false),
        (3, CameraState::Streaming, 1_000, 66_100, true),
    ];
    for (i, state, last, now, want) in cases {
        for c in 0..4 {
            stats.camera(c).set_state(CameraState::Ended);
        }
        stats.camera(i).set_state(state);
        stats.camera(i).last_frame_ms.store(last, Ordering::Relaxed);
        let got = edgesight::daemon::watchdog::stalled(&s, &stats, now);
        assert_eq!(
            got == vec![i],
            want,
            "camera {i} {state:?} last {last} now {now}: {got:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_config_and_keeps_running_on_a_bad_one() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("hup-{}", std::process::id());
    let cfg = common::config_file(
        dir.path(),
        &host,
        port,
        &device,
        &common::samples_camera(10, true),
    );
    let good = std::fs::read_to_string(&cfg).unwrap();
    let topic = format!("edgesight/{device}/front/classification");
    let mut rx = common::subscribe(&host, port, &format!("{device}-sub"), &topic).await;
    let top_len = |m: common::Msg| {
        let v: serde_json::Value = serde_json::from_str(&m.payload).unwrap();
        v["top"].as_array().unwrap().len()
    };
    let d = common::Daemon::start(&cfg);
    assert_eq!(top_len(common::next(&mut rx, "classification").await), 3);

    // A broken file: rejected with the reason, the daemon goes on as it was.
    std::fs::write(&cfg, good.replace("[model]\n", "[model]\ntop_k = 0\n")).unwrap();
    d.signal("HUP");
    let log = d.wait_for_log("reload rejected");
    assert!(log.contains("model.top_k"), "{log}");
    while rx.try_recv().is_ok() {}
    assert_eq!(top_len(common::next(&mut rx, "classification").await), 3);

    // Every crafted model (tests/common/crafted.rs; one panics inside tract while it
    // loads, util::panics): each reload is rejected naming what is wrong, and the running
    // daemon (whose panic hook aborts on any other panic) goes on classifying.
    let fixture = format!(
        "{}/tests/fixtures/models/shapes_int8_qlinear.onnx",
        common::root().display()
    );
    assert!(good.contains(&fixture));
    for (n, c) in common::crafted::CASES.iter().enumerate() {
        let crafted = common::crafted::write(dir.path(), c);
        std::fs::write(&cfg, good.replace(&fixture, crafted.to_str().unwrap())).unwrap();
        d.signal("HUP");
        // The first rejection above, then one per crafted model.
        let log = loop {
            let log = d.wait_for_log("reload rejected");
            if log.matches("reload rejected").count() > n + 1 {
                break log;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let last = log.rsplit("reload rejected").next().unwrap();
        assert!(last.contains(c.error), "{}: {last}", c.name);
        while rx.try_recv().is_ok() {}
        assert_eq!(
            top_len(common::next(&mut rx, "classification after a crafted model").await),
            3,
            "{}",
            c.name
        );
    }

    // A good change (top_k 3 -> 1): applied in place.
    std::fs::write(&cfg, good.replace("[model]\n", "[model]\ntop_k = 1\n")).unwrap();
    d.signal("HUP");
    while top_len(common::next(&mut rx, "classification after the reload").await) != 1 {}
    d.stop();
}

/// Cameras pointed at what is not a camera (/dev/null, a path that is no video node):
/// each is offline with the reason in its retained status, and the daemon and its other
/// camera go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cameras_on_dev_null_are_offline_with_a_reason_and_the_rest_runs() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("null-{}", std::process::id());
    let cameras = format!(
        "{}[[camera]]\nname = \"null\"\nsource = \"v4l2\"\ndevice = \"/dev/null\"\n\
         [[camera]]\nname = \"zero\"\nsource = \"v4l2\"\ndevice = \"/dev/zero\"\n",
        common::samples_camera(10, true)
    );
    let cfg = common::config_file(dir.path(), &host, port, &device, &cameras);
    let base = format!("edgesight/{device}");
    let mut rx =
        common::subscribe(&host, port, &format!("{device}-sub"), &format!("{base}/#")).await;
    let d = common::Daemon::start(&cfg);
    let mut why = std::collections::BTreeMap::new();
    let mut classified = 0;
    while why.len() < 2 || classified < 3 {
        let m = common::next(&mut rx, "statuses and classifications").await;
        if m.topic == format!("{base}/front/classification") {
            classified += 1;
        }
        for cam in ["null", "zero"] {
            if m.topic == format!("{base}/{cam}/status") {
                let v: serde_json::Value = serde_json::from_str(&m.payload).unwrap();
                if let Some(r) = v["reason"].as_str() {
                    assert_eq!(v["online"], false, "{v}");
                    why.insert(cam, r.to_string());
                }
            }
            assert_ne!(m.topic, format!("{base}/{cam}/classification"));
        }
    }
    assert!(
        why["null"].contains("/dev/null is not a /dev/videoN node"),
        "{why:?}"
    );
    assert!(
        why["zero"].contains("/dev/zero is not a /dev/videoN node"),
        "{why:?}"
    );
    d.stop();
}

/// A file that does not decode is skipped, counted, and logged under the camera's name
/// (the file's own name once shadowed it in the log line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_image_is_logged_under_its_cameras_name() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::copy(
        common::fixture("samples/triangle/01.jpg"),
        images.join("a-good.jpg"),
    )
    .unwrap();
    std::fs::write(images.join("b-broken.jpg"), b"not a jpeg at all").unwrap();
    let device = format!("broken-image-{}", std::process::id());
    let cameras = format!(
        "[[camera]]\nname = \"porch\"\npath = \"{}\"\nfps = 20\n",
        images.display()
    );
    let cfg = common::config_file(dir.path(), &host, port, &device, &cameras);
    let d = common::Daemon::start(&cfg);
    let log = d.wait_for_log("skipping");
    let line = log.lines().find(|l| l.contains("skipping")).unwrap();
    assert!(line.contains("camera porch: skipping"), "{line}");
    assert!(line.contains("b-broken.jpg"), "{line}");
    d.stop();
}

/// The embedded broker carries packets as large as the daemon's own limit (a snapshot
/// may be up to ~1 MiB): it once capped them at 256 KiB and dropped the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_carries_packets_up_to_the_daemons_limit() {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let port = common::free_port();
    edgesight::mqtt::start_embedded_broker("127.0.0.1", port).unwrap();
    let topic = "big/snapshot";
    let mut rx = common::subscribe("127.0.0.1", port, "big-sub", topic).await;
    let mut opts = MqttOptions::new("big-pub", "127.0.0.1", port);
    let max = edgesight::mqtt::MAX_PACKET;
    opts.set_max_packet_size(max, max);
    let (client, mut el) = AsyncClient::new(opts, 8);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let payload = vec![b'x'; max - 4096];
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.clone())
        .await
        .unwrap();
    let m = common::next(&mut rx, "the large message").await;
    assert_eq!(m.payload.len(), payload.len());
}

/// `edgesight run` on a model it cannot load exits 78 (EX_CONFIG, which the unit does not
/// restart) naming the model, having published nothing: not even `online`, so nobody sees
/// a device come up that was never going to classify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_a_bad_model_exits_78_and_publishes_nothing() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("badmodel-{}", std::process::id());
    let cfg = common::config_file(
        dir.path(),
        &host,
        port,
        &device,
        &common::samples_camera(5, true),
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("shapes_int8_qlinear.onnx", "unsupported_op.onnx");
    std::fs::write(&cfg, text).unwrap();
    let mut rx = common::subscribe(&host, port, &format!("{device}-sub"), "edgesight/#").await;
    let origin = format!("model.path (in {})", cfg.display());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_edgesight"))
            .args(["run", "--config"])
            .arg(&cfg)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("unsupported_op.onnx") && stderr.contains(&origin),
        "{stderr}"
    );
    // Anything it had published would have reached the subscriber by now, in order
    // before the broker saw the connection close; give the broker a moment to forward.
    let extra = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            let m = rx.recv().await.expect("subscriber ended");
            if m.topic.contains(&device) {
                return m;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "published: {:?}", extra.map(|m| m.topic));
}

/// A camera's retained state is current after a reconnect: the broker is cut off (a relay
/// in between goes down), the camera's state changes meanwhile (its images run out) while
/// the client's queue is full, and once the line is back a newcomer reads the new state,
/// not the one from before the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_camera_state_is_current_after_a_reconnect() {
    let (host, port) = common::broker();
    let proxy = common::Proxy::new(&host, port);
    proxy.up().await;
    let dir = tempfile::tempdir().unwrap();
    let device = format!("recon-{}", std::process::id());
    // "once" plays its six images at 2 fps: it ends three seconds in, during the cut.
    let cameras = common::samples_camera(5, true)
        + "[[camera]]\nname = \"once\"\npath = \"{samples}/circle\"\nfps = 2\nloop = false\n";
    let cfg = common::config_file(dir.path(), "127.0.0.1", proxy.port, &device, &cameras);
    // A small client queue, which front's classifications fill during the cut: once's
    // last status cannot wait in it, only the daemon's own record of what it retains
    // (re-sent after every connect) can bring it to the broker.
    common::set_mqtt(&cfg, "queue = 4");
    let status = format!("edgesight/{device}/once/status");
    let mut rx = common::subscribe(&host, port, &format!("{device}-sub"), &status).await;
    let d = common::Daemon::start_with_env(&cfg, &[("EDGESIGHT__LOG__LEVEL", "info")]);
    loop {
        let m = common::next(&mut rx, "once streaming").await;
        if m.payload.contains("\"streaming\"") {
            break;
        }
    }
    proxy.down();
    d.wait_for_log("camera once: end of images");
    proxy.up().await;
    // Through the restored line: the daemon re-sends what it retains.
    loop {
        let m = common::next(&mut rx, "once ended, after the reconnect").await;
        if m.payload.contains("\"ended\"") {
            break;
        }
    }
    let mut late = common::subscribe(&host, port, &format!("{device}-late"), &status).await;
    let m = common::next(&mut late, "retained once status").await;
    assert!(m.retain && m.payload.contains("\"ended\""), "{}", m.payload);
    d.stop();
}

/// systemd's side of `$NOTIFY_SOCKET`: every datagram, in order.
struct NotifySocket {
    rx: std::sync::mpsc::Receiver<String>,
}

impl NotifySocket {
    fn bind(path: &std::path::Path) -> NotifySocket {
        let sock = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        });
        NotifySocket { rx }
    }

    fn next(&self) -> String {
        self.rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a notification within 30 s")
    }

    /// Read until a WATCHDOG=1; panics after `limit` STATUS lines without one.
    fn ping_within(&self, limit: usize) {
        let mut statuses = 0;
        loop {
            let m = self.next();
            if m == "WATCHDOG=1" {
                return;
            }
            statuses += m.starts_with("STATUS=") as usize;
            assert!(statuses < limit, "no WATCHDOG=1 in {limit} STATUS lines");
        }
    }

    /// Forget what arrived so far.
    fn skip_queued(&self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// After the fault began: `n` STATUS lines arrive with no WATCHDOG=1 among them.
    /// What was queued, and the tick in flight when the fault began (its STATUS, then
    /// perhaps its ping, maybe still to come), are skipped: up to the second STATUS.
    fn withheld_for(&self, n: usize, why: &str) {
        self.skip_queued();
        for _ in 0..2 {
            while !self.next().starts_with("STATUS=") {}
        }
        for k in 0..n {
            loop {
                let m = self.next();
                assert_ne!(m, "WATCHDOG=1", "pinged {k} ticks into {why}");
                if m.starts_with("STATUS=") {
                    break;
                }
            }
        }
    }
}

/// The watchdog is the daemon's answer to a hang no error reports: the real binary, its
/// inference thread held still (ptrace, as a deadlock would leave it), then its camera's
/// capture thread, gets no WATCHDOG=1 while either lasts, and pings again after.
#[test]
fn a_wedged_inference_thread_or_stalled_camera_withholds_the_watchdog() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("wedge-{}", std::process::id());
    let cfg = common::config_file(
        dir.path(),
        &host,
        port,
        &device,
        &common::samples_camera(20, true),
    );
    let sock_path = dir.path().join("notify.sock");
    let sock = NotifySocket::bind(&sock_path);
    let daemon = common::Daemon::start_with_env(
        &cfg,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"), // a tick every 0.2 s
        ],
    );
    let pid = daemon.child.id();
    assert!(sock.next().starts_with("READY=1"));
    for _ in 0..3 {
        sock.ping_within(10);
    }

    let wedge = common::Wedge::thread(pid, "inference");
    sock.withheld_for(5, "a wedged inference thread");
    daemon.wait_for_log("watchdog withheld: inference not waking");
    drop(wedge);
    sock.ping_within(10);

    // The images thread: no frame for 5 s (the stall limit at 20 fps) is a stall.
    let wedge = common::Wedge::thread(pid, "images-front");
    let log = daemon.wait_for_log("stalled camera(s): [\"front\"]");
    assert!(log.contains("watchdog withheld: inference alive"), "{log}");
    sock.withheld_for(5, "a stalled camera");
    drop(wedge);
    sock.ping_within(10);
    daemon.stop();
}

/// A wedged inference thread must not hold the shutdown: SIGTERM still ends the process
/// (exit 0) with the device's retained `offline` published, the thread left behind after
/// `DRAIN_TIMEOUT`. (When inference ran as a `spawn_blocking` task awaited without a cap,
/// this hung until systemd's stop timeout killed the process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_wedged_inference_thread_still_drains() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("wedged-stop-{}", std::process::id());
    let cfg = common::config_file(
        dir.path(),
        &host,
        port,
        &device,
        &common::samples_camera(20, true),
    );
    let mut rx = common::subscribe(
        &host,
        port,
        &format!("{device}-sub"),
        &format!("edgesight/{device}/#"),
    )
    .await;
    let mut daemon = common::Daemon::start(&cfg);
    while !common::next(&mut rx, "a classification")
        .await
        .topic
        .ends_with("/classification")
    {}
    let wedge = common::Wedge::thread(daemon.child.id(), "inference");
    daemon.signal("TERM");
    // A liveness bound: the drain's caps add up to about 11 s.
    let code = daemon.exit_code_within(Duration::from_secs(30)).await;
    let log = daemon.log();
    assert_eq!(code, Some(0), "no exit 0 within 30 s: {log}");
    assert!(log.contains("inference still busy"), "{log}");
    let avail = format!("edgesight/{device}/availability");
    loop {
        let m = common::next(&mut rx, "the device's offline").await;
        if m.topic == avail && m.payload == "offline" {
            break;
        }
    }
    drop(wedge);
}

/// What rumqttc held when the connection broke (clean session: its queue and its
/// unacknowledged publishes) is lost, and counted: the stats message's `mqtt.lost` is the
/// sum of what the log reported lost, and not zero after a frozen line is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_lost_with_a_broken_connection_are_counted() {
    let (host, port) = common::broker();
    let proxy = common::Proxy::new(&host, port);
    proxy.up().await;
    let dir = tempfile::tempdir().unwrap();
    let device = format!("lost-{}", std::process::id());
    let cfg = common::config_file(
        dir.path(),
        "127.0.0.1",
        proxy.port,
        &device,
        &common::samples_camera(20, true),
    );
    common::set_mqtt(&cfg, "stats_interval_secs = 1");
    let mut rx = common::subscribe(
        &host,
        port,
        &format!("{device}-sub"),
        &format!("edgesight/{device}/#"),
    )
    .await;
    let d = common::Daemon::start(&cfg);
    while !common::next(&mut rx, "a classification")
        .await
        .topic
        .ends_with("/classification")
    {}
    // Classifications go out and nothing comes back; then the line is cut.
    proxy.freeze();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.down();
    let log = d.wait_for_log("queued message(s)); retrying");
    proxy.thaw();
    proxy.up().await;
    let reported: u64 = log
        .lines()
        .filter_map(|l| {
            l.split("(lost ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(reported > 0, "{log}");
    let stats = format!("edgesight/{device}/stats");
    loop {
        let m = common::next(&mut rx, "a stats message after the reconnect").await;
        if m.topic == stats {
            let v: serde_json::Value = serde_json::from_str(&m.payload).unwrap();
            if v["mqtt"]["reconnects"].as_u64() >= Some(1) {
                assert_eq!(
                    v["mqtt"]["lost"].as_u64(),
                    Some(reported),
                    "{}\n{}",
                    m.payload,
                    d.log()
                );
                break;
            }
        }
    }
    d.stop();
}

/// The process's panic policy (`util::panics::abort_on_panic`, which `main` installs): a
/// panic on any thread, here one like a pipeline stage's, aborts the whole process
/// (SIGABRT, which the unit's `Restart=on-failure` restarts) after printing where it
/// was; one inside `catching` (a model load) is an error instead. This test runs itself
/// again as the process that panics.
#[test]
fn a_panic_on_any_thread_aborts_the_process() {
    use std::os::unix::process::ExitStatusExt;
    const CHILD: &str = "EDGESIGHT_TEST_PANIC_CHILD";
    if std::env::var_os(CHILD).is_some() {
        edgesight::util::panics::abort_on_panic();
        let caught = edgesight::util::panics::catching("loading a model", || panic!("bad file"));
        println!("caught: {}", caught.unwrap_err());
        let _ = std::thread::Builder::new()
            .name("stage".into())
            .spawn(|| panic!("a stage's bug"))
            .unwrap()
            .join();
        println!("still running after a stage panicked");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_panic_on_any_thread_aborts_the_process",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("thread 'stage'") && stderr.contains("a stage's bug"),
        "{stderr}"
    );
    assert!(
        stdout.contains("caught: a panic while loading a model") && stdout.contains("bad file"),
        "{stdout}"
    );
    assert!(!stdout.contains("still running"), "{stdout}");
}

/// A frame that waited longer than `max_age_ms` for the model is dropped and counted
/// stale, not classified late: inference held still (a frame waits in the camera's slot),
/// then the camera (so no fresher frame replaces it), then inference let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_older_than_max_age_is_counted_stale_not_classified() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("stale-{}", std::process::id());
    let cameras = common::samples_camera(20, true) + "max_age_ms = 300\n";
    let cfg = common::config_file(dir.path(), &host, port, &device, &cameras);
    common::set_mqtt(&cfg, "stats_interval_secs = 1");
    let stats = format!("edgesight/{device}/stats");
    let mut rx = common::subscribe(&host, port, &format!("{device}-sub"), &stats).await;
    let d = common::Daemon::start(&cfg);
    let pid = d.child.id();
    common::next(&mut rx, "a first stats message").await;
    let inference = common::Wedge::thread(pid, "inference");
    tokio::time::sleep(Duration::from_millis(500)).await; // a frame is in the slot
    let camera = common::Wedge::thread(pid, "images-front");
    tokio::time::sleep(Duration::from_secs(1)).await; // and it is 1 s old
    drop(inference);
    let log = d.wait_for_log("stale so far");
    assert!(log.contains("(max_age_ms 300); not classified"), "{log}");
    loop {
        let m = common::next(&mut rx, "stats counting the stale frame").await;
        let v: serde_json::Value = serde_json::from_str(&m.payload).unwrap();
        if v["cameras"]["front"]["stale"].as_u64() >= Some(1) {
            break;
        }
    }
    drop(camera);
    d.stop();
}

/// GET `path` on 127.0.0.1:`port` with hyper's client: (status, content type, body).
async fn http_get(port: u16, path: &str) -> (u16, String, String) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "127.0.0.1")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let kind = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, kind, String::from_utf8(body.to_vec()).unwrap())
}

/// The samples of an OpenMetrics text, `name{labels}` -> value, checking its grammar on
/// the way: every sample's family has a TYPE and a HELP line before it, names are
/// Prometheus names, values numbers, and the text ends with `# EOF`.
fn parse_openmetrics(text: &str) -> std::collections::HashMap<String, f64> {
    let valid = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    let mut typed = std::collections::HashSet::new();
    let mut helped = std::collections::HashSet::new();
    let mut samples = std::collections::HashMap::new();
    assert!(text.ends_with("# EOF\n"), "{text}");
    for line in text.lines().filter(|l| *l != "# EOF") {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                valid(name) && ["counter", "gauge", "histogram"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split_once(' ').unwrap().0.to_string());
        } else {
            let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
            let name = key.split('{').next().unwrap();
            assert!(valid(name), "{line}");
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(
                typed.contains(family) && helped.contains(family),
                "{line}: no TYPE/HELP"
            );
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            samples.insert(key.to_string(), v);
        }
    }
    samples
}

/// `[metrics] listen`: `/metrics`, scraped by a real HTTP client, parses as OpenMetrics
/// text and agrees with the stats message: a camera that has ended (its counters final)
/// reads the same in both; the inference histogram's buckets add up; anything but
/// `GET /metrics` is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_and_agree_with_the_stats_message() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("metrics-{}", std::process::id());
    let cameras = common::samples_camera(10, true)
        + "[[camera]]\nname = \"once\"\npath = \"{samples}/circle\"\nfps = 10\nloop = false\n";
    let cfg = common::config_file(dir.path(), &host, port, &device, &cameras);
    let listen = common::free_port();
    common::set_mqtt(&cfg, "stats_interval_secs = 1");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}[metrics]\nlisten = \"127.0.0.1:{listen}\"\n"),
    )
    .unwrap();
    let stats = format!("edgesight/{device}/stats");
    let mut rx = common::subscribe(&host, port, &format!("{device}-sub"), &stats).await;
    let d = common::Daemon::start(&cfg);
    // A stats message written after `once` ended: its counters are final.
    let once = loop {
        let m = common::next(&mut rx, "stats with once ended").await;
        let v: serde_json::Value = serde_json::from_str(&m.payload).unwrap();
        if v["cameras"]["once"]["state"] == "ended" {
            break v["cameras"]["once"].clone();
        }
    };
    let (status, kind, body) = http_get(listen, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    let m = parse_openmetrics(&body);
    for (metric, field) in [
        ("captured", "captured"),
        ("classified", "classified"),
        ("skipped", "skipped"),
        ("stale", "stale"),
        ("gated", "gated"),
        ("bad", "bad_frames"),
    ] {
        let key = format!("edgesight_frames_{metric}_total{{camera=\"once\"}}");
        assert_eq!(m.get(&key).copied(), once[field].as_f64(), "{key}\n{body}");
    }
    assert_eq!(m["edgesight_frames_classified_total{camera=\"once\"}"], 6.0);
    let model = "model=\"default\"";
    let count = m[&format!("edgesight_inference_seconds_count{{{model}}}")];
    let inf = m[&format!("edgesight_inference_seconds_bucket{{le=\"+Inf\",{model}}}")];
    assert!(count >= 6.0 && inf == count, "{body}");
    assert_eq!(m["edgesight_mqtt_connected"], 1.0);
    assert!(m["process_resident_memory_bytes"] > 1e6);
    assert!(m.contains_key("edgesight_outbox_depth"), "{body}");
    let (status, _, _) = http_get(listen, "/").await;
    assert_eq!(status, 404);
    d.stop();
}

/// A reload takes over every model whose settings and files are unchanged (the loaded
/// classifier itself, not a second load; a rename alone changes nothing) and loads the
/// rest: a model whose settings changed, one whose file was replaced in place.
#[test]
fn a_reload_loads_only_the_models_that_changed() {
    use edgesight::daemon::reload::Models;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let int8 = common::fixture("models/shapes_int8_qlinear.onnx");
    for f in ["a", "b", "c"] {
        std::fs::copy(&int8, dir.path().join(format!("{f}.onnx"))).unwrap();
    }
    let cfg = dir.path().join("c.toml");
    let write = |b_top_k: u32, a_name: &str| {
        let d = dir.path().display();
        let text = format!(
            "[[model]]\nname = \"{a_name}\"\npath = \"{d}/a.onnx\"\n\
             [[model]]\nname = \"b\"\npath = \"{d}/b.onnx\"\ntop_k = {b_top_k}\n\
             [[model]]\nname = \"c\"\npath = \"{d}/c.onnx\"\n\
             [[camera]]\nname = \"front\"\npath = \"x\"\n"
        );
        std::fs::write(&cfg, text).unwrap();
        edgesight::config::Settings::load_with_env(&cfg, vec![]).unwrap()
    };
    let first = Models::load(&write(3, "a"), &Models::default()).unwrap();
    // b's top_k changes, c's file is replaced by the float model, a is renamed.
    std::fs::copy(
        common::fixture("models/shapes_fp32.onnx"),
        dir.path().join("c.onnx"),
    )
    .unwrap();
    let second = Models::load(&write(1, "renamed"), &first).unwrap();
    let kept: Vec<(&str, bool)> = first
        .iter()
        .zip(second.iter())
        .map(|(x, y)| {
            let same = Arc::ptr_eq(&x.classifier, &y.classifier);
            (y.settings.name.as_str(), same)
        })
        .collect();
    assert_eq!(kept, [("renamed", true), ("b", false), ("c", false)]);
    let c = &second.iter().nth(2).unwrap().classifier;
    assert!(c.is_float(), "c is the replaced file's model");
    // Nothing changed: everything is kept.
    let third = Models::load(&write(1, "renamed"), &second).unwrap();
    assert!(
        second
            .iter()
            .zip(third.iter())
            .all(|(x, y)| Arc::ptr_eq(&x.classifier, &y.classifier))
    );
}
