//! Stream cameras against real programs: ffmpeg writing MJPEG and raw YUV 4:2:0 to stdout
//! and serving multipart MJPEG over HTTP, GStreamer's RTSP server (with authentication)
//! read through the `rtsp` preset's ffmpeg, and a stand-in `rpicam-vid` on PATH for the
//! `picamera` preset (there is no Camera Module here). Each camera shows one fixture class;
//! the daemon must classify it as that class, over a real broker. Child programs killed,
//! stopped and writing damaged streams must be detected and recovered from; RTSP
//! credentials must never reach the log or the broker.
//!
//! ffmpeg and the RTSP server are required (tools/test.sh installs them): a missing one
//! fails the test loudly rather than skipping it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Daemon, Msg, next};
use tokio::sync::mpsc::UnboundedReceiver;

/// A program the test needs, or a failure saying how to get it.
fn require(program: &str, package: &str) -> PathBuf {
    edgesight::capture::child::find_program(program).unwrap_or_else(|| {
        panic!("{program} is not installed: tools/test.sh installs it (apt install {package})")
    })
}

fn sample(class: &str) -> PathBuf {
    common::fixture(&format!("samples/{class}/01.jpg"))
}

/// ffmpeg looping one sample at 5 fps in real time, then `out` (its output options).
fn ffmpeg_loop(class: &str, out: &str) -> String {
    format!(
        "{} -hide_banner -loglevel error -re -loop 1 -framerate 5 -i {} {out}",
        require("ffmpeg", "ffmpeg").display(),
        sample(class).display()
    )
}

/// Write an executable shell script at `path`.
fn write_script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// Start `command` (through sh), its output discarded.
fn serve(command: &str) -> Program {
    let child = Command::new("sh")
        .args(["-c", &format!("exec {command}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Program(child)
}

/// A process the test started, killed when the test ends however it ends.
struct Program(Child);

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the daemon on `cameras`, logging at info, with stats every second, and a
/// subscriber on everything it publishes (its own topics only: in CI the broker is one
/// Mosquitto for every test).
async fn start(
    dir: &Path,
    device: &str,
    cameras: &str,
    env: &[(&str, &str)],
) -> (Daemon, UnboundedReceiver<Msg>) {
    let (host, port) = common::broker();
    let filter = format!("edgesight/{device}/#");
    let rx = common::subscribe(&host, port, &format!("sub-{device}"), &filter).await;
    let config = common::config_file(dir, &host, port, device, cameras);
    let mut env = env.to_vec();
    env.extend([
        ("EDGESIGHT__LOG__LEVEL", "info"),
        ("EDGESIGHT__MQTT__STATS_INTERVAL_SECS", "1"),
    ]);
    (Daemon::start_with_env(&config, &env), rx)
}

/// How long a wait for one expected message may take in all, however many others
/// arrive meanwhile (a liveness bound, not a timing claim).
const DEADLINE: Duration = Duration::from_secs(60);

/// Wait for `n` classifications of `camera`, every one of them `class`; the messages
/// seen meanwhile are kept in `seen`.
async fn expect_class(
    rx: &mut UnboundedReceiver<Msg>,
    seen: &mut Vec<Msg>,
    camera: &str,
    class: &str,
    n: usize,
) {
    let what = format!("{n} classifications of {camera} as {class}");
    tokio::time::timeout(DEADLINE, classified(rx, seen, camera, class, n))
        .await
        .unwrap_or_else(|_| panic!("no {what} within {DEADLINE:?}"));
}

async fn classified(
    rx: &mut UnboundedReceiver<Msg>,
    seen: &mut Vec<Msg>,
    camera: &str,
    class: &str,
    n: usize,
) {
    let topic = format!("/{camera}/classification");
    let mut got = 0;
    while got < n {
        let m = next(rx, &format!("{camera} classified as {class}")).await;
        seen.push(m.clone());
        if !m.topic.ends_with(&topic) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&m.payload).unwrap();
        assert_eq!(v["top"][0]["label"], class, "{camera}: {}", m.payload);
        got += 1;
    }
}

/// Wait for a message on `topic_end` whose payload satisfies `pred`.
async fn expect(
    rx: &mut UnboundedReceiver<Msg>,
    seen: &mut Vec<Msg>,
    topic_end: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let wait = async {
        loop {
            let m = next(rx, what).await;
            seen.push(m.clone());
            if m.topic.ends_with(topic_end)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&m.payload)
                && pred(&v)
            {
                return v;
            }
        }
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {DEADLINE:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn ffmpeg_mjpeg_raw_yuv_http_multipart_and_snapshots_are_classified() {
    let dir = tempfile::tempdir().unwrap();
    let http_port = common::free_port();
    // ffmpeg's HTTP server: multipart/x-mixed-replace (its mpjpeg muxer), one client.
    let _server = serve(&ffmpeg_loop(
        "triangle",
        &format!(
            "-f mpjpeg -content_type 'multipart/x-mixed-replace;boundary=ffmpeg' \
             -listen 1 http://127.0.0.1:{http_port}/cam.mjpg"
        ),
    ));
    // A snapshot URL: Python's own HTTP server handing out one JPEG file per request.
    let snap_port = common::free_port();
    let _snapshots = serve(&format!(
        "python3 -m http.server --bind 127.0.0.1 {snap_port} --directory {}",
        common::fixture("samples/checker").display()
    ));
    let cameras = format!(
        "[[camera]]\nname = \"snap\"\nsource = \"http-mjpeg\"\nfps = 4\n\
         url = \"http://127.0.0.1:{snap_port}/01.jpg\"\n\
         [[camera]]\nname = \"stdout\"\nsource = \"pipe\"\ncommand = \"{}\"\n\
         [[camera]]\nname = \"raw\"\nsource = \"pipe\"\nformat = \"yuv420\"\n\
         width = 128\nheight = 128\ncommand = \"{}\"\n\
         [[camera]]\nname = \"nv12\"\nsource = \"pipe\"\nformat = \"nv12\"\n\
         width = 128\nheight = 128\ncommand = \"{}\"\n\
         [[camera]]\nname = \"http\"\nsource = \"http-mjpeg\"\n\
         url = \"http://127.0.0.1:{http_port}/cam.mjpg\"\n",
        ffmpeg_loop("cross", "-f mjpeg -q:v 3 -"),
        ffmpeg_loop("square", "-pix_fmt yuv420p -f rawvideo -"),
        ffmpeg_loop("circle", "-pix_fmt nv12 -f rawvideo -"),
    );
    let (daemon, mut rx) = start(dir.path(), "streams", &cameras, &[]).await;
    let mut seen = Vec::new();
    for (camera, class) in [
        ("stdout", "cross"),
        ("raw", "square"),
        ("nv12", "circle"),
        ("http", "triangle"),
        ("snap", "checker"),
    ] {
        expect_class(&mut rx, &mut seen, camera, class, 3).await;
    }
    // The mode each camera reports: the format and size of what it delivers.
    for (camera, mode) in [
        ("stdout", "MJPEG 128x128 @ 5 fps"),
        ("raw", "YU12 128x128 @ 5 fps"),
        ("nv12", "NV12 128x128 @ 5 fps"),
        ("http", "MJPEG 128x128 @ 5 fps"),
        ("snap", "MJPEG 128x128 @ 4 fps"),
    ] {
        let status = seen
            .iter()
            .rev()
            .find(|m| m.topic.ends_with(&format!("/{camera}/status")))
            .unwrap_or_else(|| panic!("no status for {camera}"));
        assert!(
            status.payload.contains(mode),
            "{camera}: {}",
            status.payload
        );
    }
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn rtsp_with_credentials_is_classified_and_the_password_never_shown() {
    require("ffmpeg", "ffmpeg");
    let server_script = common::root().join("tests/tools/rtsp_server.py");
    assert!(
        Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import gi; gi.require_version('GstRtspServer', '1.0')"
            ])
            .status()
            .is_ok_and(|s| s.success()),
        "GStreamer's RTSP server is not installed: tools/test.sh installs it \
         (apt install gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-good)"
    );
    let port = common::free_port();
    // A password with characters URLs must escape, as users' passwords have.
    let (user, password, wrong) = ("viewer", "p@ss:w0rd", "n0t-it");
    // A URL inside a pipe source's own command line is kept out of the log too.
    let pipe_wrong = "n0r-th1s";
    let mut server = Command::new("/usr/bin/python3")
        .arg(&server_script)
        .args([
            &port.to_string(),
            sample("circle").to_str().unwrap(),
            user,
            password,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    let _server = Program(server);
    assert_eq!(ready.trim(), "ready", "RTSP server did not start");
    let cameras = format!(
        "[[camera]]\nname = \"door\"\nsource = \"rtsp\"\n\
         url = \"rtsp://{user}:p%40ss%3Aw0rd@127.0.0.1:{port}/cam\"\n\
         [[camera]]\nname = \"yard\"\nsource = \"rtsp\"\nreopen_min_ms = 2000\n\
         url = \"rtsp://{user}:{wrong}@127.0.0.1:{port}/cam\"\n\
         [[camera]]\nname = \"porch\"\nsource = \"pipe\"\nreopen_min_ms = 2000\n\
         command = \"ffmpeg -loglevel error -i rtsp://{user}:{pipe_wrong}@127.0.0.1:{port}/cam \
         -f mjpeg -\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut rx) = start(dir.path(), "rtsp", &cameras, &[]).await;
    let mut seen = Vec::new();
    expect_class(&mut rx, &mut seen, "door", "circle", 3).await;
    // The wrong password: offline, with the server's refusal as the reason.
    let status = expect(&mut rx, &mut seen, "/yard/status", "yard refused", |v| {
        v["online"] == false && v["reason"].as_str().is_some_and(|r| r.contains("401"))
    })
    .await;
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("{user}:***@")), "{reason}");
    let status = expect(&mut rx, &mut seen, "/porch/status", "porch refused", |v| {
        v["online"] == false && v["reason"].as_str().is_some_and(|r| r.contains("401"))
    })
    .await;
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("{user}:***@")), "{reason}");
    let log = daemon.log();
    daemon.stop();
    let published: String = seen.iter().map(|m| m.payload.as_str()).collect();
    for secret in [password, "p%40ss%3Aw0rd", wrong, pipe_wrong] {
        assert!(!log.contains(secret), "{secret:?} in the log:\n{log}");
        assert!(!published.contains(secret), "{secret:?} published");
    }
    // What ffmpeg said about the refusal did reach the log, scrubbed.
    assert!(log.contains("401 Unauthorized"), "{log}");
}

/// The pid of the camera program the daemon started last for `camera`, from its log.
fn last_pid(log: &str, camera: &str) -> Option<u32> {
    log.lines()
        .filter(|l| l.contains(&format!("camera {camera}: started")))
        .filter_map(|l| l.rsplit_once("(pid ")?.1.strip_suffix(')')?.parse().ok())
        .next_back()
}

/// Wait until the daemon has started a program for `camera` other than `old` (a
/// liveness bound, not a timing claim).
fn wait_for_new_pid(daemon: &Daemon, camera: &str, old: Option<u32>) -> u32 {
    for _ in 0..300 {
        if let Some(pid) = last_pid(&daemon.log(), camera).filter(|p| Some(*p) != old) {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no new program for {camera}: {}", daemon.log());
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet, which holds nothing).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Wait (a liveness bound) for `pid` to be gone; whether it went.
fn ends(pid: u32) -> bool {
    for _ in 0..100 {
        if gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_stopped_or_garbling_program_is_detected_and_recovered_from() {
    let good = sample("cross");
    let bad_cmd = format!(
        // A whole frame, a frame cut short, bytes that are no JPEG, a whole frame.
        "sh -c 'while :; do cat {g}; head -c 300 {g}; printf garbage; cat {g}; sleep 0.2; done'",
        g = good.display()
    );
    let cameras = format!(
        "[[camera]]\nname = \"kid\"\nsource = \"pipe\"\nstall_secs = 1\nreopen_min_ms = 100\n\
         command = \"{}\"\n\
         [[camera]]\nname = \"garbled\"\nsource = \"pipe\"\ncommand = \"{bad_cmd}\"\n",
        ffmpeg_loop("hstripes", "-f mjpeg -q:v 3 -"),
    );
    let dir = tempfile::tempdir().unwrap();
    let (daemon, mut rx) = start(dir.path(), "recover", &cameras, &[]).await;
    let mut seen = Vec::new();
    expect_class(&mut rx, &mut seen, "kid", "hstripes", 2).await;

    // Killed: offline with the exit as the reason, started again, classifying again.
    let first = wait_for_new_pid(&daemon, "kid", None);
    signal(first, "KILL");
    expect(
        &mut rx,
        &mut seen,
        "/kid/status",
        "kid offline after SIGKILL",
        |v| {
            v["online"] == false
                && v["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("ffmpeg ended") && r.contains("signal"))
        },
    )
    .await;
    let second = wait_for_new_pid(&daemon, "kid", Some(first));
    expect_class(&mut rx, &mut seen, "kid", "hstripes", 2).await;

    // Stopped: a stall after stall_secs, the stopped program ended, a new one started.
    signal(second, "STOP");
    expect(&mut rx, &mut seen, "/kid/status", "kid stalled", |v| {
        v["reason"].as_str().is_some_and(|r| r.contains("stalled"))
    })
    .await;
    let third = wait_for_new_pid(&daemon, "kid", Some(second));
    assert_ne!(third, first);
    expect_class(&mut rx, &mut seen, "kid", "hstripes", 2).await;
    assert!(
        ends(second),
        "the stopped program {second} was left running"
    );

    // Garbled: the damaged pieces counted as bad frames, the whole frames classified.
    expect_class(&mut rx, &mut seen, "garbled", "cross", 3).await;
    expect(&mut rx, &mut seen, "/stats", "bad frames counted", |v| {
        v["cameras"]["garbled"]["bad_frames"]
            .as_u64()
            .is_some_and(|n| n > 0)
    })
    .await;
    // A reload (SIGHUP) restarts the pipeline: the programs of the old one are stopped
    // and new ones started.
    daemon.signal("HUP");
    let reloaded = wait_for_new_pid(&daemon, "kid", Some(third));
    assert!(ends(third), "the program {third} outlived the reload");
    expect_class(&mut rx, &mut seen, "kid", "hstripes", 2).await;
    let last = last_pid(&daemon.log(), "kid").unwrap();
    assert_eq!(last, reloaded);
    daemon.stop();
    // Shutdown ends the camera programs too.
    assert!(ends(last), "camera program {last} outlived the daemon");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_picamera_preset_runs_rpicam_vid_from_path() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let args_file = dir.path().join("args");
    // A stand-in rpicam-vid: records its arguments and streams a sample as the real one
    // does with `--codec mjpeg -o -` (MJPEG) or `--codec yuv420 -o -` (raw I420 frames).
    let stand_in = bin.join("rpicam-vid");
    write_script(
        &stand_in,
        &format!(
            "echo \"$@\" >> {}\ncase \"$*\" in\n\
             *\"--codec yuv420\"*) exec {} ;;\n*) exec {} ;;\nesac\n",
            args_file.display(),
            ffmpeg_loop("checker", "-pix_fmt yuv420p -f rawvideo -"),
            ffmpeg_loop("vstripes", "-f mjpeg -q:v 3 -"),
        ),
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cameras = "[[camera]]\nname = \"pi\"\nsource = \"picamera\"\nwidth = 640\nheight = 480\n\
                   fps = 5\nargs = [\"--hflip\"]\n\
                   [[camera]]\nname = \"pi-raw\"\nsource = \"picamera\"\ncamera = 1\n\
                   format = \"yuv420\"\nwidth = 128\nheight = 128\n";
    // `edgesight cameras` lists libcamera's cameras through rpicam-hello: a stand-in that
    // prints what the real one prints for a Camera Module 3.
    write_script(
        &bin.join("rpicam-hello"),
        "[ \"$1\" = --list-cameras ] || exit 2\necho 'Available cameras'\n\
         echo '0 : imx708 [4608x2592 10-bit RGGB] (/base/soc/i2c0mux/i2c@1/imx708@1a)'\n",
    );
    let listed = Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .arg("cameras")
        .env("PATH", &path)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("0 : imx708 [4608x2592"), "{listed}");
    assert!(listed.contains("source = \"picamera\""), "{listed}");
    let (daemon, mut rx) = start(dir.path(), "picam", cameras, &[("PATH", &path)]).await;
    // `check` names the program the preset will run.
    let checked = Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .args(["check", "--config"])
        .arg(dir.path().join("edgesight.toml"))
        .env("PATH", &path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{text}");
    assert!(
        text.contains(&format!("# camera pi: runs {}", stand_in.display())),
        "{text}"
    );
    let mut seen = Vec::new();
    expect_class(&mut rx, &mut seen, "pi", "vstripes", 3).await;
    expect_class(&mut rx, &mut seen, "pi-raw", "checker", 3).await;
    daemon.stop();
    let mut runs: Vec<String> = std::fs::read_to_string(&args_file)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    runs.sort();
    runs.dedup();
    assert_eq!(
        runs,
        [
            "-t 0 -n --codec mjpeg --camera 0 --width 640 --height 480 --framerate 5 --hflip -o -",
            "-t 0 -n --codec yuv420 --camera 1 --width 128 --height 128 --framerate 5 -o -",
        ]
    );
}
