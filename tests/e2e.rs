//! End to end: the library's `run` on the `images` source, publishing to a real broker
//! (in-process rumqttd, or Mosquitto when EDGESIGHT_TEST_BROKER is set), observed by a real
//! MQTT subscriber.

mod common;

use std::time::Duration;

use edgesight::config::Settings;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn config(dir: &std::path::Path, host: &str, port: u16, device: &str, looped: bool) -> Settings {
    let f = common::config_file(dir, host, port, device, &common::samples_camera(10, looped));
    Settings::load_with_env(&f, vec![]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_is_classified_and_published_in_order() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("e2e-{}", std::process::id());
    let settings = config(dir.path(), &host, port, &device, false);
    let mut rx = common::subscribe(&host, port, "e2e-sub", &format!("edgesight/{device}/#")).await;

    let files =
        edgesight::capture::images::image_files(common::fixture("samples").to_str().unwrap())
            .unwrap();
    let stats = tokio::spawn(edgesight::run(settings, CancellationToken::new()));

    let m = common::next(&mut rx, "online").await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_str()),
        (
            format!("edgesight/{device}/availability").as_str(),
            "online"
        )
    );

    let topic = format!("edgesight/{device}/front/classification");
    let mut frames = Vec::new();
    let mut camera = Vec::new();
    let mut right = 0;
    loop {
        let m = common::next(&mut rx, "classification or offline").await;
        if m.topic == format!("edgesight/{device}/availability") {
            assert_eq!(m.payload, "offline");
            break;
        }
        if m.topic.starts_with(&format!("edgesight/{device}/front/"))
            && !m.topic.ends_with("/classification")
        {
            camera.push((m.topic.rsplit('/').next().unwrap().to_string(), m.payload));
            continue;
        }
        assert_eq!(m.topic, topic);
        common::check_schema("classification", &m.payload);
        let v: Value = serde_json::from_str(&m.payload).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["device"], device.as_str());
        assert_eq!(v["camera"], "front");
        assert_eq!(v["model"], "shapes_int8_qlinear.onnx");
        assert_eq!(
            v["seq"].as_u64().unwrap(),
            frames.len() as u64 + 1,
            "seq consecutive from 1"
        );
        let ts = v["ts"].as_str().unwrap();
        assert!(
            ts.ends_with('Z') && ts.len() == 24 && &ts[19..20] == ".",
            "RFC 3339 ms UTC: {ts}"
        );
        // Measured, not a placeholder: a real run takes some time, and not minutes.
        let ms = v["inference_ms"].as_f64().unwrap();
        assert!(ms > 0.0 && ms < 60_000.0, "inference_ms {ms}");
        let top = v["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let scores: Vec<f64> = top.iter().map(|p| p["score"].as_f64().unwrap()).collect();
        assert!(
            scores.windows(2).all(|w| w[0] >= w[1]),
            "sorted: {scores:?}"
        );
        let file = std::path::PathBuf::from(v["file"].as_str().unwrap());
        if top[0]["label"] == common::class_of(&file).as_str() {
            right += 1;
        }
        frames.push(v["frame"].as_u64().unwrap());
    }
    // The camera's retained availability and status: online and streaming while it
    // played, offline and ended (with the reason) once the images ran out.
    let avail: Vec<&str> = camera
        .iter()
        .filter(|(t, _)| t == "availability")
        .map(|(_, p)| p.as_str())
        .collect();
    assert_eq!(avail.first(), Some(&"online"), "{camera:?}");
    assert_eq!(avail.last(), Some(&"offline"), "{camera:?}");
    let status: Vec<Value> = camera
        .iter()
        .filter(|(t, _)| t == "status")
        .map(|(_, p)| {
            common::check_schema("status", p);
            serde_json::from_str(p).unwrap()
        })
        .collect();
    assert_eq!(status[0]["state"], "streaming");
    assert_eq!(status[0]["online"], true);
    assert_eq!(status[0]["camera"], "front");
    let last = status.last().unwrap();
    assert_eq!(
        (&last["state"], &last["reason"]),
        (&"ended".into(), &"end of images".into())
    );

    let stats = stats.await.unwrap().unwrap();
    let cam = stats.camera(0);
    let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let skipped = g(&cam.skipped) as usize;
    // A stalled machine may skip a frame (a newer one replaced it in the latest-frame
    // slot) or find it stale (older than max_age_ms when inference reached it: CI's
    // Mosquitto run once had one). Every frame is either classified and published, or
    // counted for why it was not - never silently lost.
    let counted = [
        ("skipped", g(&cam.skipped)),
        ("stale", g(&cam.stale)),
        ("bad", g(&cam.bad_frames)),
        ("paused", g(&cam.paused_frames)),
        ("gated", g(&cam.gated)),
        ("inference errors", g(&stats.inference_errors)),
        ("publishes dropped", g(&stats.publish_dropped)),
    ];
    assert_eq!(
        g(&cam.captured) as usize,
        files.len(),
        "every file captured"
    );
    assert_eq!(
        frames.len() + counted.iter().map(|(_, n)| *n as usize).sum::<usize>(),
        files.len(),
        "published + counted = frames; published {}, counted {counted:?}",
        frames.len()
    );
    assert!(
        frames.windows(2).all(|w| w[0] < w[1]),
        "frames in capture order"
    );
    // How many are skipped depends on the machine's load; a loaded CI machine still
    // classifies most of the frames of a 64x64 model at this rate, and a bug that skips
    // them all (or most) must not pass.
    assert!(
        frames.len() * 2 >= files.len(),
        "{} of {} frames classified, {skipped} skipped",
        frames.len(),
        files.len()
    );
    assert!(
        right * 100 >= frames.len() * 95,
        "{right}/{} labelled right",
        frames.len()
    );
    assert_eq!(
        stats
            .publish_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// Closing a connection with the broker's last PUBACKs unread makes our end reset it, and
/// Mosquitto then dropped our last classifications and `offline` unread (its will said
/// `offline` instead): CI lost the last frame of the test above that way. Each of the
/// daemon's connections (telemetry and outbox) writes DISCONNECT and leaves the close to
/// the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_leaves_the_close_to_the_broker() {
    let (host, port) = common::broker();
    let proxy = common::Proxy::new(&host, port);
    proxy.up().await;
    let dir = tempfile::tempdir().unwrap();
    let device = format!("hangup-{}", std::process::id());
    let settings = config(dir.path(), "127.0.0.1", proxy.port, &device, false);
    assert!(
        settings.uses_outbox(),
        "the outbox's connection is checked too"
    );
    let stats = tokio::time::timeout(
        Duration::from_secs(60),
        edgesight::run(settings, CancellationToken::new()),
    )
    .await
    .expect("a run of the samples ends")
    .unwrap();
    // Both relays of a connection end soon after the run (the daemon's side when it
    // returned at the latest); the bound is only liveness.
    let hangups = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let h = proxy.hangups.lock().unwrap().clone();
            if h.len() >= 2 && h.iter().all(|(_, c)| c.len() == 2) {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "connections not closed: {:?}",
            proxy.hangups.lock().unwrap()
        )
    });
    // One connection each: the outbox's connect is not interrupted (it was once, by its
    // store's timer, and connected twice).
    let mut ids: Vec<&str> = hangups.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            format!("edgesight-{device}"),
            format!("edgesight-{device}-outbox")
        ],
        "{hangups:?}"
    );
    for (_, c) in &hangups {
        assert_eq!(c, &["broker", "client"], "who hung up first: {hangups:?}");
    }
    assert_eq!(
        stats
            .publish_lost
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    proxy.down();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_trigger_finishes_and_publishes_offline() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("stop-{}", std::process::id());
    let settings = config(dir.path(), &host, port, &device, true);
    let mut rx = common::subscribe(&host, port, "stop-sub", &format!("edgesight/{device}/#")).await;
    let shutdown = CancellationToken::new();
    // A failed assertion must end the daemon too, or the runtime's drop waits forever for
    // the inference thread.
    let _stop_on_panic = shutdown.clone().drop_guard();
    let run = tokio::spawn(edgesight::run(settings, shutdown.clone()));
    let mut classified = 0;
    while classified < 3 {
        let m = common::next(&mut rx, "classification").await;
        if m.topic.ends_with("/classification") {
            classified += 1;
        }
    }
    shutdown.cancel();
    let stats = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("run returns after the trigger")
        .unwrap()
        .unwrap();
    let published = stats
        .camera(0)
        .classified
        .load(std::sync::atomic::Ordering::Relaxed);
    // Everything classified before the trigger still arrives, then `offline`. The camera's
    // own availability/status messages interleave with classifications in any order (they
    // take a different path to the client), so only the device topic ends the wait.
    let device_availability = format!("edgesight/{device}/availability");
    loop {
        let m = common::next(&mut rx, "offline").await;
        if m.topic.ends_with("/classification") {
            classified += 1;
            continue;
        }
        if m.topic != device_availability {
            continue;
        }
        assert_eq!(m.payload, "offline");
        break;
    }
    assert_eq!(classified, published);

    // Retained: a late subscriber still learns the device is offline.
    let mut late = common::subscribe(
        &host,
        port,
        "late-sub",
        &format!("edgesight/{device}/availability"),
    )
    .await;
    let m = common::next(&mut late, "retained offline").await;
    assert!(m.retain);
    assert_eq!(m.payload, "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classification_goes_on_without_a_broker() {
    // Nothing listens on this port: run must classify, count the drops, and stop cleanly.
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = config(dir.path(), "127.0.0.1", port, "nobroker", false);
    settings.mqtt.queue = 4;
    let stats = tokio::time::timeout(
        Duration::from_secs(60),
        edgesight::run(settings, CancellationToken::new()),
    )
    .await
    .expect("run ends when the images end")
    .unwrap();
    let c = stats.camera(0);
    let classified = c.classified.load(std::sync::atomic::Ordering::Relaxed);
    assert!(classified > 0);
    let dropped = stats
        .publish_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    // The queue holds 4: the camera's retained availability and status (queued when it
    // started streaming) and the first 2 classifications. Every later classification is
    // dropped and counted; later status changes are not counts of loss (the latest is
    // kept and re-sent on connect).
    assert_eq!(
        dropped,
        classified - 2,
        "all but the 2 that fit the queue are dropped and counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_messages_and_on_change_classifications() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("stats-{}", std::process::id());
    let f = common::config_file(
        dir.path(),
        &host,
        port,
        &device,
        &common::samples_camera(10, false),
    );
    let text = std::fs::read_to_string(&f)
        .unwrap()
        .replace("qos = 1\n", "qos = 1\nstats_interval_secs = 1\n")
        + "[classification]\npublish = \"on_change\"\n";
    std::fs::write(&f, text).unwrap();
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    let mut rx =
        common::subscribe(&host, port, "stats-sub", &format!("edgesight/{device}/#")).await;
    let run = tokio::spawn(edgesight::run(settings, CancellationToken::new()));
    let (mut labels, mut stats_msgs) = (Vec::new(), Vec::new());
    loop {
        let m = common::next(&mut rx, "classification, stats or offline").await;
        if m.topic == format!("edgesight/{device}/availability") && m.payload == "offline" {
            break;
        }
        if m.topic.ends_with("/classification") {
            let v: Value = serde_json::from_str(&m.payload).unwrap();
            labels.push(v["top"][0]["label"].as_str().unwrap().to_string());
        } else if m.topic == format!("edgesight/{device}/stats") {
            common::check_schema("stats", &m.payload);
            stats_msgs.push(serde_json::from_str::<Value>(&m.payload).unwrap());
        }
    }
    let stats = run.await.unwrap().unwrap();
    let classified = stats
        .camera(0)
        .classified
        .load(std::sync::atomic::Ordering::Relaxed);
    // on_change: a message only when the top label changes, so never the same label twice
    // in a row, and far fewer messages than frames (the samples come 6 per class).
    assert!(labels.windows(2).all(|w| w[0] != w[1]), "{labels:?}");
    assert!(
        labels.len() >= 7 && (labels.len() as u64) < classified,
        "{labels:?}"
    );
    // Stats every second while it ran (about 4 s).
    assert!(!stats_msgs.is_empty());
    let s = stats_msgs.last().unwrap();
    assert_eq!(s["v"], 1);
    assert_eq!(s["device"], device.as_str());
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["mqtt"]["connected"], true);
    let front = &s["cameras"]["front"];
    assert!(front["classified"].as_u64().unwrap() > 0, "{s}");
    assert!(front["fps"].as_f64().unwrap() > 0.0, "{s}");
    let (p50, p95) = (
        front["inference_ms_p50"].as_f64().unwrap(),
        front["inference_ms_p95"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p95 >= p50, "{s}");
    assert!(s["rss_mb"].as_f64().unwrap() > 1.0);
    assert_eq!(s["outbox"]["dropped"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovery_is_published_and_answers_ha_birth() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("ha-{}", std::process::id());
    let f = common::config_file(
        dir.path(),
        &host,
        port,
        &device,
        &common::samples_camera(2, true),
    );
    let text = std::fs::read_to_string(&f).unwrap() + "[homeassistant]\ndiscovery = true\n";
    std::fs::write(&f, text).unwrap();
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    let topic = format!("homeassistant/device/edgesight_{device}/config");
    let mut rx = common::subscribe(&host, port, &format!("{device}-sub"), &topic).await;
    let shutdown = CancellationToken::new();
    // A failed assertion must end the daemon too, or the runtime's drop waits forever for
    // the inference thread.
    let _stop_on_panic = shutdown.clone().drop_guard();
    let run = tokio::spawn(edgesight::run(settings, shutdown.clone()));
    let m = common::next(&mut rx, "discovery").await;
    common::check_schema("discovery", &m.payload);
    let v: Value = serde_json::from_str(&m.payload).unwrap();
    assert_eq!(v["dev"]["ids"][0], format!("edgesight_{device}"));
    let cmps = v["cmps"].as_object().unwrap();
    let label = &cmps[&format!("edgesight_{device}_front_label")];
    assert_eq!(
        label["state_topic"],
        format!("edgesight/{device}/front/classification")
    );
    assert_eq!(
        label["availability"][1]["topic"],
        format!("edgesight/{device}/front/availability")
    );
    // Home Assistant restarted: its birth message brings the discovery message again.
    common::publish(
        &host,
        port,
        &format!("{device}-ha"),
        "homeassistant/status",
        b"online",
    )
    .await;
    let again = common::next(&mut rx, "discovery after HA's birth message").await;
    assert_eq!(again.payload, m.payload);
    // Retained: a late subscriber gets it too.
    let mut late = common::subscribe(&host, port, &format!("{device}-late"), &topic).await;
    assert!(common::next(&mut late, "retained discovery").await.retain);
    shutdown.cancel();
    run.await.unwrap().unwrap();
}

/// Retained are exactly the topics that say what is true now: the device's and each
/// camera's availability, each camera's status, and the discovery document; a late
/// subscriber gets each of them, flagged retained and current (a camera that ended after
/// the connect shows it). Classifications and stats are events: a late subscriber never
/// gets an old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_topics_are_retained_and_events_are_not() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("ret-{}", std::process::id());
    // "front" loops; "once" plays six images and ends while the daemon runs on.
    let cameras = common::samples_camera(5, true)
        + "[[camera]]\nname = \"once\"\npath = \"{samples}/circle\"\nfps = 10\nloop = false\n";
    let f = common::config_file(dir.path(), &host, port, &device, &cameras);
    let text = std::fs::read_to_string(&f).unwrap() + "[homeassistant]\ndiscovery = true\n";
    std::fs::write(&f, text).unwrap();
    common::set_mqtt(&f, "stats_interval_secs = 1");
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    let base = format!("edgesight/{device}");
    let mut rx =
        common::subscribe(&host, port, &format!("{device}-sub"), &format!("{base}/#")).await;
    let shutdown = CancellationToken::new();
    let _stop_on_panic = shutdown.clone().drop_guard();
    let run = tokio::spawn(edgesight::run(settings, shutdown.clone()));
    // Classifications and a stats message published, and "once" ended.
    let (mut classified, mut stats, mut ended) = (false, false, false);
    while !(classified && stats && ended) {
        let m = common::next(&mut rx, "classifications, stats, and once's end").await;
        classified |= m.topic.ends_with("/classification");
        stats |= m.topic == format!("{base}/stats");
        ended |= m.topic == format!("{base}/once/status") && m.payload.contains("\"ended\"");
    }
    let retained = [
        (format!("{base}/availability"), "online"),
        (format!("{base}/front/availability"), "online"),
        (format!("{base}/front/status"), "\"state\":\"streaming\""),
        (format!("{base}/once/availability"), "offline"),
        (format!("{base}/once/status"), "\"state\":\"ended\""),
        (
            format!("homeassistant/device/edgesight_{device}/config"),
            "front_label",
        ),
    ];
    for (i, (topic, now)) in retained.iter().enumerate() {
        let mut late = common::subscribe(&host, port, &format!("{device}-late-{i}"), topic).await;
        let m = common::next(&mut late, &format!("retained {topic}")).await;
        assert_eq!(&m.topic, topic);
        assert!(m.retain, "{topic} is not retained");
        assert!(m.payload.contains(now), "{topic}: {}", m.payload);
    }
    // Events: a late subscriber's first message on them is a fresh one, never retained.
    for (i, topic) in [
        format!("{base}/front/classification"),
        format!("{base}/stats"),
    ]
    .iter()
    .enumerate()
    {
        let mut late = common::subscribe(&host, port, &format!("{device}-ev-{i}"), topic).await;
        let m = common::next(&mut late, &format!("a fresh {topic}")).await;
        assert!(!m.retain, "{topic} was retained: {}", m.payload);
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();
}

/// Change gating: a camera showing the same scene frame after frame is classified once,
/// then gated (counted, not classified) until the heartbeat; the stats message says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_scene_is_gated_and_counted() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("gate-{}", std::process::id());
    let cameras = "[[camera]]\nname = \"still\"\npath = \"{samples}/cross/01.jpg\"\nfps = 10\n\
                   change_threshold = 4\nheartbeat_secs = 3600\n";
    let f = common::config_file(dir.path(), &host, port, &device, cameras);
    common::set_mqtt(&f, "stats_interval_secs = 1");
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    let base = format!("edgesight/{device}");
    let mut rx =
        common::subscribe(&host, port, &format!("{device}-sub"), &format!("{base}/#")).await;
    let shutdown = CancellationToken::new();
    let _stop_on_panic = shutdown.clone().drop_guard();
    let run = tokio::spawn(edgesight::run(settings, shutdown.clone()));
    // Wait for a stats message after at least 10 frames of the one image.
    let cam = loop {
        let v = next_on(&mut rx, &format!("{base}/stats")).await;
        let cam = v["cameras"]["still"].clone();
        if cam["captured"].as_u64().unwrap_or(0) >= 10 {
            break cam;
        }
    };
    let (captured, classified, gated, skipped) = (
        cam["captured"].as_u64().unwrap(),
        cam["classified"].as_u64().unwrap(),
        cam["gated"].as_u64().unwrap(),
        cam["skipped"].as_u64().unwrap(),
    );
    assert_eq!(classified, 1, "the same scene classified again: {cam}");
    assert!(gated >= 8, "{cam}");
    // Every frame is accounted for: classified, gated, skipped, or the one in flight.
    assert!(
        captured.abs_diff(classified + gated + skipped) <= 1,
        "{cam}"
    );
    shutdown.cancel();
    run.await.unwrap().unwrap();
}

/// Next message on `topic` (others are skipped), parsed.
async fn next_on(rx: &mut tokio::sync::mpsc::UnboundedReceiver<common::Msg>, topic: &str) -> Value {
    // A liveness bound, not a timing assertion: other topics keep coming, so `next`'s own
    // bound never fires while this one waits in vain.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = common::next(rx, topic).await;
        assert!(
            std::time::Instant::now() < deadline,
            "no message on {topic} within 60 s (others came)"
        );
        if m.topic == topic {
            if topic.ends_with("/cmd/result") {
                common::check_schema("cmd-result", &m.payload);
            }
            return serde_json::from_str(&m.payload).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pause_snapshot_resume_reload_and_reject_bad_input() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("cmd-{}", std::process::id());
    let f = common::config_file(
        dir.path(),
        &host,
        port,
        &device,
        &common::samples_camera(10, true),
    );
    let good = std::fs::read_to_string(&f).unwrap() + "[commands]\nenabled = true\n";
    std::fs::write(&f, &good).unwrap();
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    let base = format!("edgesight/{device}");
    let result = format!("{base}/cmd/result");
    let mut rx =
        common::subscribe(&host, port, &format!("{device}-sub"), &format!("{base}/#")).await;
    let shutdown = CancellationToken::new();
    // A failed assertion must end the daemon too, or the runtime's drop waits forever for
    // the inference thread.
    let _stop_on_panic = shutdown.clone().drop_guard();
    let run = tokio::spawn(edgesight::run(settings, shutdown.clone()));
    let cmd = |verb: &str, payload: &str| {
        let (host, topic, payload) = (
            host.clone(),
            format!("{base}/cmd/{verb}"),
            payload.to_string(),
        );
        let id = format!("{device}-cmd-{verb}");
        async move { common::publish(&host, port, &id, &topic, payload.as_bytes()).await }
    };
    next_on(&mut rx, &format!("{base}/front/classification")).await;

    // Bad input: an error reply each, and nothing changes.
    for (verb, payload, error) in [
        ("reboot", "", "unknown command"),
        ("pause", "{bad", "malformed JSON"),
        ("pause", "{\"camera\":\"side\"}", "unknown camera"),
        (
            "pause",
            &format!("{{\"id\":\"{}\"}}", "x".repeat(5000)),
            "exceeds",
        ),
    ] {
        cmd(verb, payload).await;
        let r = next_on(&mut rx, &result).await;
        assert_eq!(
            (r["verb"].as_str(), r["ok"].as_bool()),
            (Some(verb), Some(false)),
            "{r}"
        );
        assert!(r["error"].as_str().unwrap().contains(error), "{r}");
    }

    // Pause: once it is acknowledged (the reply goes out after the pause is set; the daemon
    // publishes both on one connection, in order), at most the frame in flight is still
    // classified. Until then frames keep coming, as many as the command's trip through
    // the broker takes. The snapshot (taken by the inference thread after the pause)
    // proves it has moved on; then nothing until resume.
    cmd("pause", "{\"camera\":\"front\",\"id\":1}").await;
    let mut between = 0;
    let mut snapshot = None;
    let mut asked = false;
    loop {
        let m = common::next(&mut rx, "pause, snapshot and their replies").await;
        if m.topic.ends_with("/classification") {
            between += usize::from(asked);
            assert!(snapshot.is_none(), "classified while paused");
        } else if m.topic == result {
            common::check_schema("cmd-result", &m.payload);
            let r: Value = serde_json::from_str(&m.payload).unwrap();
            assert_eq!(r["ok"], true, "{r}");
            if r["verb"] == "pause" {
                assert_eq!(
                    (r["id"].clone(), r["cameras"][0].clone()),
                    (1.into(), "front".into())
                );
                cmd("snapshot", "{\"id\":\"s\"}").await;
                asked = true;
            } else if r["verb"] == "snapshot" {
                assert!(asked);
                assert!(r["bytes"].as_u64().unwrap() > 100, "{r}");
                break;
            }
        } else if m.topic == format!("{base}/front/snapshot") {
            snapshot = Some(m);
        }
    }
    assert!(
        between <= 1,
        "{between} classified after the pause was acknowledged"
    );
    // The snapshot is a JPEG of the camera's frame (the fixture samples are 128x128).
    let jpeg = snapshot.expect("the JPEG comes before its reply").bytes;
    let img = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg)
        .expect("the snapshot decodes as a JPEG");
    assert_eq!((img.width(), img.height()), (128, 128));
    cmd("resume", "").await;
    loop {
        let m = common::next(&mut rx, "resume reply, then classifications").await;
        if m.topic.ends_with("/classification") {
            break;
        }
        if m.topic == result {
            assert_eq!(
                serde_json::from_str::<Value>(&m.payload).unwrap()["verb"],
                "resume"
            );
        }
    }

    // Reload with a bad file: rejected, the old configuration keeps running.
    std::fs::write(&f, good.replace("port = ", "port = \"x\"\n#")).unwrap();
    cmd("reload", "").await;
    let r = next_on(&mut rx, &result).await;
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("mqtt.port"), "{r}");
    next_on(&mut rx, &format!("{base}/front/classification")).await;
    // A good change: top_k 3 -> 1, applied without a restart.
    std::fs::write(&f, good.replace("[model]\n", "[model]\ntop_k = 1\n")).unwrap();
    cmd("reload", "").await;
    let r = next_on(&mut rx, &result).await;
    assert_eq!(
        (r["verb"].clone(), r["ok"].clone()),
        ("reload".into(), true.into()),
        "{r}"
    );
    // A liveness bound: classifications keep coming whether or not the reload applied.
    let applied = async {
        loop {
            let v = next_on(&mut rx, &format!("{base}/front/classification")).await;
            if v["top"].as_array().unwrap().len() == 1 {
                break;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), applied)
        .await
        .expect("the reload (top_k 3 -> 1) applied within 60 s");
    shutdown.cancel();
    run.await.unwrap().unwrap();
}

/// The discovery schema catches a component Home Assistant would drop (an event without
/// its event types).
#[test]
#[should_panic(expected = "violates")]
fn schemas_reject_an_event_entity_without_event_types() {
    common::check_schema(
        "discovery",
        r#"{"dev":{"ids":["edgesight_pi"],"name":"edgesight pi","mf":"edgesight","mdl":"m","sw":"0.1.0"},
            "o":{"name":"edgesight","sw":"0.1.0"},"qos":1,
            "cmps":{"edgesight_pi_front_detection":{"p":"event","name":"front detection",
              "unique_id":"edgesight_pi_front_detection","default_entity_id":"event.edgesight_pi_front_detection",
              "state_topic":"edgesight/pi/front/detection","value_template":"{{ value_json.type }}",
              "availability":[{"topic":"a"},{"topic":"b"}],"availability_mode":"all"}}}"#,
    );
}

/// The schemas are strict enough to catch a broken payload (so the checks above mean
/// something): each of these must be rejected.
#[test]
#[should_panic(expected = "violates")]
fn schemas_reject_an_end_without_ended_at() {
    common::check_schema(
        "detection",
        r#"{"v":1,"id":"pi:front:3:1700000000000","type":"end","device":"pi","camera":"front",
            "label":"cat","class":3,"score":0.2,"max_score":0.9,
            "started_at":"2026-11-30T08:00:00.000Z","frames":9}"#,
    );
}

/// One sample file per class, in the samples' order.
fn one_per_class() -> Vec<(String, std::path::PathBuf)> {
    let files =
        edgesight::capture::images::image_files(common::fixture("samples").to_str().unwrap())
            .unwrap();
    let mut out: Vec<(String, std::path::PathBuf)> = Vec::new();
    for f in files {
        let class = common::class_of(&f);
        if out.iter().all(|(c, _)| *c != class) {
            out.push((class, f));
        }
    }
    out
}

/// Four 640x480 frames of 2 x 2 tiles: the top-left tile is always the first class (a
/// thing that stays, so its region starts a detection), the others change from frame to
/// frame. Returns the frames' directory and, per frame, the four tiles' classes.
fn tiled_frames(dir: &std::path::Path) -> (std::path::PathBuf, Vec<[String; 4]>) {
    use image::imageops::{self, FilterType};
    let classes = one_per_class();
    let out = dir.join("tiled");
    std::fs::create_dir_all(&out).unwrap();
    let mut truth = Vec::new();
    for f in 0..4 {
        let pick = [0, 1 + f % 6, 1 + (f + 2) % 6, 1 + (f + 4) % 6];
        let mut frame = image::RgbImage::new(640, 480);
        for (k, &c) in pick.iter().enumerate() {
            let img = image::open(&classes[c].1).unwrap().into_rgb8();
            let tile = imageops::resize(&img, 320, 240, FilterType::Triangle);
            let (x, y) = ((k as i64 % 2) * 320, (k as i64 / 2) * 240);
            imageops::replace(&mut frame, &tile, x, y);
        }
        frame.save(out.join(format!("frame{f}.png"))).unwrap();
        truth.push(pick.map(|c| classes[c].0.clone()));
    }
    (out, truth)
}

/// A camera watching four regions of its frame, two on the int8 fixture model and two on
/// a second model (the fp32 fixture), one daemon: every region's classification names its
/// region and model and is its tile's class; the region that holds one thing starts a
/// detection on its own topic (its id names the region); discovery lists the regions'
/// entities; the stats message counts each region; every payload fits its schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_on_two_models_are_classified_as_their_tiles() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("regions-{}", std::process::id());
    let (frames, truth) = tiled_frames(dir.path());
    let r = common::root();
    let cameras = format!(
        "[[model]]\nname = \"small\"\npath = \"{r}/tests/fixtures/models/shapes_fp32.onnx\"\n\
         labels = \"{r}/tests/fixtures/labels.txt\"\ntop_k = 1\n\
         [[camera]]\nname = \"front\"\npath = \"{}\"\nfps = 5\n\
         [[camera.region]]\nname = \"tl\"\nwidth = 320\nheight = 240\n\
         [[camera.region]]\nname = \"tr\"\nx = 0.5\nwidth = 0.5\nheight = 0.5\n\
         [[camera.region]]\nname = \"bl\"\ny = 240\nwidth = 320\nheight = 240\nmodel = \"small\"\n\
         [[camera.region]]\nname = \"br\"\nx = 0.5\ny = 0.5\nwidth = 0.5\nheight = 0.5\nmodel = \"small\"\n\
         [homeassistant]\ndiscovery = true\n",
        frames.display(),
        r = r.display()
    );
    let f = common::config_file(dir.path(), &host, port, &device, &cameras);
    // The fixture's [model] becomes the first [[model]], "big".
    let text = std::fs::read_to_string(&f).unwrap();
    let text = text.replace("[model]\n", "[[model]]\nname = \"big\"\n");
    let text = text.replace("qos = 1\n", "qos = 1\nstats_interval_secs = 1\n");
    std::fs::write(&f, text).unwrap();
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    let base = format!("edgesight/{device}");
    let mut rx =
        common::subscribe(&host, port, &format!("{device}-sub"), &format!("{base}/#")).await;
    // Only ours: a shared broker (Mosquitto in CI) holds other tests' retained discovery.
    let ha = format!("homeassistant/device/edgesight_{device}/config");
    let mut disc = common::subscribe(&host, port, &format!("{device}-ha"), &ha).await;
    let stop = CancellationToken::new();
    let run = tokio::spawn(edgesight::run(settings, stop.clone()));

    let names = ["tl", "tr", "bl", "br"];
    let mut seen = [0usize; 4];
    let (mut detection, mut stats) = (None, None);
    while seen.iter().any(|n| *n < 8) || detection.is_none() || stats.is_none() {
        let m = common::next(&mut rx, "region classifications, a detection, stats").await;
        let Some(rest) = m.topic.strip_prefix(&format!("{base}/")) else {
            continue;
        };
        let v: Value = match serde_json::from_str(&m.payload) {
            Ok(v) => v,
            Err(_) => continue, // availability
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["front", region, "classification"] => {
                common::check_schema("classification", &m.payload);
                let k = names.iter().position(|n| n == region).unwrap();
                assert_eq!(
                    (&v["camera"], &v["region"]),
                    (&"front".into(), &(*region).into())
                );
                let model = if k < 2 {
                    "shapes_int8_qlinear.onnx"
                } else {
                    "shapes_fp32.onnx"
                };
                assert_eq!(v["model"], model, "{region}");
                assert_eq!(
                    v["top"].as_array().unwrap().len(),
                    if k < 2 { 3 } else { 1 }
                );
                let file = v["file"].as_str().unwrap();
                let f: usize = file[file.len() - 5..file.len() - 4].parse().unwrap();
                assert_eq!(
                    v["top"][0]["label"],
                    truth[f][k].as_str(),
                    "{region} of {file}"
                );
                seen[k] += 1;
            }
            ["front", region, "detection"] => {
                common::check_schema("detection", &m.payload);
                assert_eq!(*region, "tl", "only the top-left tile stays: {v}");
                assert_eq!(v["region"], "tl");
                assert_eq!(v["label"], truth[0][0].as_str());
                let id = v["id"].as_str().unwrap();
                assert!(id.starts_with(&format!("{device}:front/tl:")), "{id}");
                detection = Some(v);
            }
            ["stats"] => {
                common::check_schema("stats", &m.payload);
                let regions = &v["cameras"]["front"]["regions"];
                let counted = names
                    .iter()
                    .all(|n| regions[n]["classified"].as_u64() > Some(0));
                if counted {
                    stats = Some(v);
                }
            }
            _ => {}
        }
    }
    let d = common::next(&mut disc, "discovery").await;
    common::check_schema("discovery", &d.payload);
    let dv: Value = serde_json::from_str(&d.payload).unwrap();
    let dev = format!("edgesight_{device}");
    for n in names {
        let label = &dv["cmps"][format!("{dev}_front__{n}_label")];
        assert_eq!(
            label["state_topic"],
            format!("{base}/front/{n}/classification")
        );
    }
    assert!(dv["cmps"].get(format!("{dev}_front_label")).is_none());
    stop.cancel();
    let stats = run.await.unwrap().unwrap();
    let cam = stats.camera(0);
    let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    // The camera counts frames; each region its crops, every one of them classified.
    for r in &cam.regions {
        assert_eq!(g(&r.classified), g(&cam.classified), "{}", r.name);
        assert_eq!(g(&r.bad), 0);
    }
    let models: Vec<(&str, u64)> = stats
        .models
        .iter()
        .map(|(n, h)| (n.as_str(), h.snapshot().1))
        .collect();
    let crops = 2 * g(&cam.classified);
    assert_eq!(models, [("big", crops), ("small", crops)]);
}

/// `enable` / `disable` over MQTT on a camera with two regions: a region switched off is
/// no longer classified, a label switched off leaves the region's classifications and
/// ends its open detection; the camera's retained status shows what is off; the switches
/// outlive a restart (the state file), everything comes back on with `enable`, and a
/// damaged state file is set aside while the daemon runs with everything on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switches_turn_regions_and_labels_off_and_survive_a_restart() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("switch-{}", std::process::id());
    let (frames, truth) = tiled_frames(dir.path());
    let held = truth[0][0].clone(); // the top-left tile's class in every frame
    let cameras = format!(
        "[[camera]]\nname = \"front\"\npath = \"{}\"\nfps = 10\n\
         [[camera.region]]\nname = \"tl\"\nwidth = 320\nheight = 240\n\
         [[camera.region]]\nname = \"tr\"\nx = 320\nwidth = 320\nheight = 240\n\
         [commands]\nenabled = true\n",
        frames.display()
    );
    let f = common::config_file(dir.path(), &host, port, &device, &cameras);
    let base = format!("edgesight/{device}");
    let (result, status) = (format!("{base}/cmd/result"), format!("{base}/front/status"));
    let (tl, tr) = (
        format!("{base}/front/tl/classification"),
        format!("{base}/front/tr/classification"),
    );
    let cmd = |payload: String, verb: &'static str| {
        let (host, topic) = (host.clone(), format!("{base}/cmd/{verb}"));
        let id = format!("{device}-cmd");
        async move { common::publish(&host, port, &id, &topic, payload.as_bytes()).await }
    };
    let start = || {
        let stop = CancellationToken::new();
        let settings = Settings::load_with_env(&f, vec![]).unwrap();
        (stop.clone(), tokio::spawn(edgesight::run(settings, stop)))
    };
    let mut rx =
        common::subscribe(&host, port, &format!("{device}-sub"), &format!("{base}/#")).await;

    let (stop, run) = start();
    let _stop_on_panic = stop.clone().drop_guard();
    // The held tile starts a detection before anything is switched.
    loop {
        let v = next_on(&mut rx, &format!("{base}/front/tl/detection")).await;
        if v["type"] == "start" {
            assert_eq!(v["label"], held.as_str());
            break;
        }
    }
    // tr off: its frame in flight may still come, then none while tl goes on.
    cmd(r#"{"camera":"front","region":"tr"}"#.into(), "disable").await;
    let (r, s) = reply_and_status(&mut rx, &result, &status).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["off"]["tr"],
        serde_json::json!({"classification": true, "detection": true})
    );
    assert_eq!(s["off"]["tr"]["detection"], true, "{s}");
    assert_eq!(
        late(&mut rx, &tl, &tr, 5).await,
        0,
        "tr classified while off"
    );

    // The held label off in tl's classifications and detections: its open detection ends,
    // and tl's classifications go on without it.
    let label = |what: &str| {
        format!(r#"{{"camera":"front","region":"tl","label":"{held}","what":"{what}"}}"#)
    };
    cmd(label("classification"), "disable").await;
    assert_eq!(next_on(&mut rx, &result).await["ok"], true);
    cmd(label("detection"), "disable").await;
    assert_eq!(next_on(&mut rx, &result).await["ok"], true);
    let end = loop {
        let v = next_on(&mut rx, &format!("{base}/front/tl/detection")).await;
        if v["type"] == "end" {
            break v;
        }
    };
    assert_eq!(end["label"], held.as_str());
    for _ in 0..3 {
        let v = next_on(&mut rx, &tl).await;
        let labels: Vec<&str> = v["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["label"].as_str().unwrap())
            .collect();
        assert!(!labels.contains(&held.as_str()), "{labels:?}");
    }
    // A label tl's model lacks: refused, nothing changes.
    cmd(
        r#"{"camera":"front","region":"tl","label":"dog"}"#.into(),
        "disable",
    )
    .await;
    let r = next_on(&mut rx, &result).await;
    assert!(r["error"].as_str().unwrap().contains("not a label"), "{r}");
    stop.cancel();
    run.await.unwrap().unwrap();

    // A restart: the switches come back from the state file, before any frame (the first
    // run's last status, offline, may still be on its way).
    let (stop, run) = start();
    let _stop_on_panic = stop.clone().drop_guard();
    let s = loop {
        let s = next_on(&mut rx, &status).await;
        if s["online"] == true {
            break s;
        }
    };
    assert_eq!(s["off"]["tr"]["classification"], true, "{s}");
    assert_eq!(
        s["off"]["tl"]["labels"][held.as_str()]["detection"],
        true,
        "{s}"
    );
    assert_eq!(
        late(&mut rx, &tl, &tr, 4).await,
        0,
        "tr classified after the restart"
    );
    // Everything back on: the region, then the label.
    cmd(r#"{"camera":"front"}"#.into(), "enable").await;
    next_on(&mut rx, &result).await;
    cmd(
        format!(r#"{{"camera":"front","label":"{held}"}}"#),
        "enable",
    )
    .await;
    let (r, s) = reply_and_status(&mut rx, &result, &status).await;
    assert_eq!(r["off"], serde_json::json!({}), "{r}");
    assert!(s.get("off").is_none(), "{s}");
    next_on(&mut rx, &tr).await;
    stop.cancel();
    run.await.unwrap().unwrap();

    // A damaged state file: set aside, the run starts with everything on.
    let state = dir.path().join("switches.json");
    std::fs::write(&state, b"{\"v\":1,\"cameras\":{\"front\":[1,2,3]}}").unwrap();
    let (stop, run) = start();
    let _stop_on_panic = stop.clone().drop_guard();
    // A tr classification of the second run may still be on its way and come before this
    // run has read the state file (seen under qemu-arm on a loaded machine): take tr's
    // messages until the file is set aside (a liveness bound, as in `next_on`), then one
    // more, which this run classified with everything on.
    let bad = dir.path().join("switches.json.bad");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !bad.exists() {
        next_on(&mut rx, &tr).await;
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            bad.display()
        );
    }
    next_on(&mut rx, &tr).await;
    assert!(!state.exists());
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// Messages on `other` after the first of `n` on `topic` (the frame in flight may still
/// carry one of `other` before it).
async fn late(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<common::Msg>,
    topic: &str,
    other: &str,
    n: usize,
) -> usize {
    let (mut seen, mut late) = (0, 0);
    while seen < n {
        let m = common::next(rx, topic).await;
        if m.topic == topic {
            seen += 1;
        } else if m.topic == other && seen >= 1 {
            late += 1;
        }
    }
    late
}

/// A command's reply and the camera status it republishes, in whichever order they come;
/// the status checked against its schema.
async fn reply_and_status(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<common::Msg>,
    result: &str,
    status: &str,
) -> (Value, Value) {
    let (mut r, mut s) = (None, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while r.is_none() || s.is_none() {
        let m = common::next(rx, "a reply and a status").await;
        assert!(
            std::time::Instant::now() < deadline,
            "no reply and status in 60 s"
        );
        if m.topic == result {
            common::check_schema("cmd-result", &m.payload);
            r = Some(serde_json::from_str(&m.payload).unwrap());
        } else if m.topic == status {
            common::check_schema("status", &m.payload);
            s = Some(serde_json::from_str(&m.payload).unwrap());
        }
    }
    (r.unwrap_or_default(), s.unwrap_or_default())
}

/// Event snapshots and hard examples: a region's detection start publishes its crop as
/// JPEG on `<camera>/<region>/snapshot`; the saved snapshots and hard examples (JPEG plus
/// JSON sidecar) stay within their folders' bounds, the oldest deleted and counted in the
/// stats message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_hard_examples_stay_within_their_bounds() {
    let (host, port) = common::broker();
    let dir = tempfile::tempdir().unwrap();
    let device = format!("keep-{}", std::process::id());
    let (frames, _) = tiled_frames(dir.path());
    let cameras = format!(
        "[[camera]]\nname = \"front\"\npath = \"{}\"\nfps = 20\n\
         [[camera.region]]\nname = \"tl\"\nwidth = 320\nheight = 240\nsnapshots = \"publish\"\n\
         [[camera.region]]\nname = \"tr\"\nx = 320\nwidth = 320\nheight = 240\n\
         snapshots = \"save\"\nhard_examples = true\n\
         [detection]\nmin_frames = 1\nend_frames = 1\n\
         [snapshots]\nmax_files = 2\n\
         [hard_examples]\nmin_score = 0.0\nmax_score = 1.0\nmin_interval_secs = 0.001\nmax_files = 3\n",
        frames.display()
    );
    let f = common::config_file(dir.path(), &host, port, &device, &cameras);
    let text = std::fs::read_to_string(&f).unwrap();
    std::fs::write(
        &f,
        text.replace("qos = 1\n", "qos = 1\nstats_interval_secs = 1\n"),
    )
    .unwrap();
    let base = format!("edgesight/{device}");
    let mut rx =
        common::subscribe(&host, port, &format!("{device}-sub"), &format!("{base}/#")).await;
    let stop = CancellationToken::new();
    let _stop_on_panic = stop.clone().drop_guard();
    let settings = Settings::load_with_env(&f, vec![]).unwrap();
    let run = tokio::spawn(edgesight::run(settings, stop.clone()));
    let (mut snapshot, mut stats) = (None, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while snapshot.is_none() || stats.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot and stats in 60 s"
        );
        let m = common::next(&mut rx, "a snapshot and stats").await;
        if m.topic == format!("{base}/front/tl/snapshot") {
            snapshot = Some(m.bytes);
        } else if m.topic == format!("{base}/stats") {
            common::check_schema("stats", &m.payload);
            let v: Value = serde_json::from_str(&m.payload).unwrap();
            let done = |k: &str, n: u64| v[k]["deleted"].as_u64().is_some_and(|d| d >= n);
            if done("snapshots", 2) && done("hard_examples", 3) {
                stats = Some(v);
            }
        }
        assert!(
            m.topic != format!("{base}/front/tr/snapshot"),
            "tr saves its snapshots, it does not publish them"
        );
    }
    stop.cancel();
    run.await.unwrap().unwrap();
    let img = image::load_from_memory(&snapshot.unwrap()).unwrap();
    assert_eq!((img.width(), img.height()), (320, 240), "the region's crop");
    let v = stats.unwrap();
    assert_eq!(
        (
            v["snapshots"]["files"].as_u64(),
            v["hard_examples"]["files"].as_u64()
        ),
        (Some(2), Some(3))
    );
    let list = |name: &str, ext: &str| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir.path().join(name))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect();
        v.sort();
        v
    };
    assert_eq!(list("snapshots", "jpg").len(), 2);
    let (jpgs, sidecars) = (list("hard-examples", "jpg"), list("hard-examples", "json"));
    assert_eq!((jpgs.len(), sidecars.len()), (3, 3));
    for (j, s) in jpgs.iter().zip(&sidecars) {
        assert_eq!(j.file_stem(), s.file_stem(), "a JPEG and its sidecar");
        let side: Value = serde_json::from_slice(&std::fs::read(s).unwrap()).unwrap();
        assert_eq!(
            (&side["camera"], &side["region"]),
            (&"front".into(), &"tr".into())
        );
        assert!(
            side["why"].as_array().unwrap().contains(&"unsure".into()),
            "{side}"
        );
        assert_eq!(side["model"], "default");
        let img = image::open(j).unwrap();
        assert_eq!((img.width(), img.height()), (320, 240));
        let label = side["top"][0]["label"].as_str().unwrap();
        assert!(
            j.to_str()
                .unwrap()
                .ends_with(&format!("_front_tr_{label}.jpg")),
            "{j:?}"
        );
    }
}
