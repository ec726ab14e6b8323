//! Camera loss, stall and recovery, against a scripted backend behind the same trait as
//! the V4L2 one, on tokio's paused clock: the supervisor's real code, virtual time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgesight::capture::Slots;
use edgesight::capture::{
    self, Backend, CameraCtx, CameraInfo, CameraStatus, CaptureError, FrameStream, Mode,
    ReaderGuard, Readers, Request,
};
use edgesight::config::{CameraSettings, PixelFormat, SourceSettings, V4l2Device};
use edgesight::frame::{RawFormat, RawFrame};
use edgesight::stats::{CameraState, Stats};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the next `open` does.
#[derive(Debug, Clone)]
enum Step {
    /// The open fails: the device is gone.
    Unplugged,
    /// Opens, delivers `frames` frames `every` apart, then errors (unplug) or goes silent.
    Stream {
        frames: u32,
        every: Duration,
        then_stall: bool,
    },
    /// Opens; of `frames` frames every other one is flagged corrupt by the driver; then
    /// goes silent.
    Flaky { frames: u32, every: Duration },
}

const MODES: [Mode; 2] = [
    Mode {
        format: RawFormat::Mjpeg,
        width: 1280,
        height: 720,
        fps: 30,
    },
    Mode {
        format: RawFormat::Yuyv,
        width: 640,
        height: 480,
        fps: 30,
    },
];

#[derive(Default)]
struct Fake {
    script: Mutex<VecDeque<Step>>,
    opens: Mutex<Vec<Instant>>,
    next_calls: Arc<AtomicU64>,
    /// The reader "threads" of abandoned streams that never came back from the driver.
    stuck: Stuck,
}

type Stuck = Arc<Mutex<Vec<ReaderGuard>>>;

struct FakeStream {
    mode: Mode,
    left: u32,
    every: Duration,
    then_stall: bool,
    /// Every other frame is flagged corrupt.
    flaky: bool,
    calls: Arc<AtomicU64>,
    /// Held like a V4L2 reader thread holds its guard: while it is stuck in the driver
    /// (stalled), dropping the stream leaves it in `stuck`.
    guard: Option<ReaderGuard>,
    stalled: bool,
    stuck: Stuck,
}

impl Drop for FakeStream {
    fn drop(&mut self) {
        if let (true, Some(g)) = (self.stalled, self.guard.take()) {
            self.stuck.lock().unwrap().push(g);
        }
    }
}

impl Fake {
    /// What `edgesight cameras` would list.
    fn list(&self) -> Result<Vec<CameraInfo>, CaptureError> {
        Ok(vec![
            CameraInfo {
                node: "/dev/video0".into(),
                name: "Fake USB Camera".into(),
                bus: "usb-0000:01:00.0-1".into(),
                modes: MODES.to_vec(),
                skipped: None,
            },
            CameraInfo {
                node: "/dev/video1".into(),
                name: String::new(),
                bus: String::new(),
                modes: vec![],
                skipped: Some(
                    "/dev/video1 (Fake USB Camera) cannot capture video (a metadata or output node)"
                        .into(),
                ),
            },
        ])
    }
}

impl Backend for Fake {
    type Request = Request;
    type Stream = FakeStream;

    async fn open(
        &self,
        _name: &str,
        r: &Request,
        readers: &Readers,
    ) -> Result<FakeStream, CaptureError> {
        self.opens.lock().unwrap().push(Instant::now());
        let step = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Step::Unplugged);
        let (frames, every, then_stall, flaky) = match step {
            Step::Unplugged => return Err(CaptureError::NoDevice("/dev/video0".into())),
            Step::Stream {
                frames,
                every,
                then_stall,
            } => (frames, every, then_stall, false),
            Step::Flaky { frames, every } => (frames, every, true, true),
        };
        Ok(FakeStream {
            mode: capture::choose_mode(&MODES, r.width, r.height, r.fps, r.format).ok_or_else(
                || CaptureError::NoMode {
                    node: "/dev/video0".into(),
                    format: r.format.name(),
                    offered: MODES.map(|m| m.format.to_string()).join(", "),
                },
            )?,
            left: frames,
            every,
            then_stall,
            flaky,
            calls: self.next_calls.clone(),
            guard: Some(readers.enter()),
            stalled: false,
            stuck: self.stuck.clone(),
        })
    }
}

impl FrameStream for FakeStream {
    fn mode(&self) -> Mode {
        self.mode
    }
    async fn next_frame(&mut self) -> Result<RawFrame, CaptureError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.left == 0 {
            if self.then_stall {
                // A driver that stops delivering without an error: frame() never returns.
                self.stalled = true;
                std::future::pending::<()>().await;
            }
            // What a V4L2 read returns once the camera is unplugged (ENODEV).
            let enodev = std::io::Error::from_raw_os_error(19);
            return Err(CaptureError::Read(enodev.into()));
        }
        tokio::time::sleep(self.every).await;
        self.left -= 1;
        if self.flaky && self.left % 2 == 1 {
            return Err(CaptureError::Flagged {
                sequence: self.left,
            });
        }
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([200, 40, 40]));
        Ok(RawFrame::from_rgb(&img, RawFormat::Yuyv))
    }
}

fn camera() -> CameraSettings {
    CameraSettings::with_defaults(
        "door",
        SourceSettings::V4l2 {
            device: V4l2Device::Index(0),
            width: 640,
            height: 480,
            fps: 10,
            format: PixelFormat::Auto,
        },
    )
}

type Log = Arc<Mutex<Vec<(Duration, CameraStatus)>>>;

struct Run {
    fake: Arc<Fake>,
    log: Log,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    t0: Instant,
}

fn start(script: Vec<Step>) -> Run {
    let fake = Arc::new(Fake {
        script: Mutex::new(script.into()),
        ..Default::default()
    });
    let log: Log = Arc::default();
    let stats = Arc::new(Stats::new(["door".to_string()]));
    let cancel = CancellationToken::new();
    let t0 = Instant::now();
    let sink = {
        let log = log.clone();
        Arc::new(move |s: &CameraStatus| log.lock().unwrap().push((t0.elapsed(), s.clone())))
    };
    let cam = camera();
    let ctx = CameraCtx {
        index: 0,
        settings: cam.clone(),
        slots: Arc::new(Slots::new(1)),
        stats: stats.clone(),
        status: sink,
        cancel: cancel.clone(),
    };
    let request = Request::from_settings(&cam).unwrap();
    let task = tokio::spawn(capture::supervise(fake.clone(), request, ctx));
    Run {
        fake,
        log,
        stats,
        cancel,
        task,
        t0,
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Unplug (error), replug, stall, and a long absence: the published states, when they
/// happen, and the open schedule.
#[tokio::test(start_paused = true)]
async fn loss_and_stall_are_reported_and_recovered_with_backoff() {
    let every = Duration::from_millis(100);
    let run = start(vec![
        Step::Unplugged,
        Step::Unplugged,
        Step::Stream {
            frames: 20,
            every,
            then_stall: false,
        },
        Step::Stream {
            frames: 10,
            every,
            then_stall: true,
        },
    ]);
    // Ten virtual minutes; after the script, the camera stays unplugged.
    tokio::time::sleep(Duration::from_secs(600)).await;
    run.cancel.cancel();
    run.task.await.unwrap();

    let log = run.log.lock().unwrap().clone();
    let opens: Vec<u64> = run
        .fake
        .opens
        .lock()
        .unwrap()
        .iter()
        .map(|t| ms(*t - run.t0))
        .collect();
    let states: Vec<(u64, CameraState, bool, Option<u64>)> = log
        .iter()
        .map(|(t, s)| (ms(*t), s.state, s.online, s.retry_in_ms))
        .collect();
    use CameraState::*;
    // Two failed opens (0.5 s, then 1 s back-off), online at the first frame (1.6 s),
    // the unplug after 20 frames (3.5 s) resets the back-off to 0.5 s; online again at
    // 4.1 s; 10 frames then silence: stalled 5 s after the last frame (10.0 s).
    assert_eq!(
        &states[..7],
        &[
            (0, Starting, false, None),
            (0, Waiting, false, Some(500)),
            (500, Waiting, false, Some(1000)),
            (1600, Streaming, true, None),
            (3500, Waiting, false, Some(500)),
            (4100, Streaming, true, None),
            (10000, Waiting, false, Some(500)),
        ],
        "{log:#?}"
    );
    assert_eq!(log[3].1.mode.as_deref(), Some("YUYV 640x480 @ 30 fps"));
    assert!(
        log[4]
            .1
            .reason
            .as_deref()
            .unwrap()
            .contains("No such device")
    );
    assert!(
        log[6]
            .1
            .reason
            .as_deref()
            .unwrap()
            .contains("stalled: no frame for 5s")
    );
    assert_eq!(opens[..4], [0, 500, 1500, 4000]);

    // Unplugged from 10 s on: first retry after 0.5 s (10.5 s), then the gaps double to
    // the 30 s cap and never shrink.
    assert_eq!(opens[4], 10_500);
    let gaps: Vec<u64> = opens.windows(2).skip(4).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps[..7],
        [1000, 2000, 4000, 8000, 16000, 30000, 30000],
        "{opens:?}"
    );
    assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{gaps:?}");
    // No busy loop: about 600 s / 30 s opens in ten minutes, and one next_frame per frame
    // plus one per stream end.
    assert!(opens.len() <= 30, "{} opens in 10 minutes", opens.len());
    assert_eq!(run.fake.next_calls.load(Ordering::Relaxed), 20 + 1 + 10 + 1);
    // While unplugged, each retry is published with its attempt count and delay.
    let last_waiting = log.iter().rev().find(|(_, s)| s.state == Waiting).unwrap();
    assert_eq!(last_waiting.1.retry_in_ms, Some(30_000));
    // The stall, then every failed open since.
    assert_eq!(last_waiting.1.attempts as usize, 1 + opens.len() - 4);
    // Shutdown is reported last.
    let (_, last) = log.last().unwrap();
    assert_eq!((last.state, last.online), (Ended, false));

    let cs = run.stats.camera(0);
    assert_eq!(cs.captured.load(Ordering::Relaxed), 30);
    assert_eq!(cs.stalls.load(Ordering::Relaxed), 1);
    // 2 failed opens, 1 unplug, then every failed open while unplugged.
    assert_eq!(
        cs.errors.load(Ordering::Relaxed) as usize,
        2 + 1 + (opens.len() - 4)
    );
}

/// A camera faster than its configured fps is paced: frames inside the period are counted
/// as skipped and never reach the slot.
#[tokio::test(start_paused = true)]
async fn a_fast_camera_is_paced_to_the_configured_fps() {
    let run = start(vec![Step::Stream {
        frames: 90, // 3 s at 30 fps, configured fps 10
        every: Duration::from_millis(33),
        then_stall: true,
    }]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    run.cancel.cancel();
    run.task.await.unwrap();
    let cs = run.stats.camera(0);
    assert_eq!(cs.captured.load(Ordering::Relaxed), 90);
    // Every third frame passes (a 90 ms minimum gap at 10 fps, frames 33 ms apart); the
    // slot holds one, so all but the last accepted are skipped too.
    assert_eq!(cs.skipped.load(Ordering::Relaxed), 89);
}

/// `edgesight cameras`' text for a backend: every capture node with its modes; metadata
/// nodes named and skipped.
#[test]
fn camera_listing_names_every_mode_and_skipped_node() {
    let text = capture::describe(&Fake::default().list().unwrap());
    println!("{text}");
    assert_eq!(
        text,
        "/dev/video0: Fake USB Camera (usb-0000:01:00.0-1)\n    MJPEG 1280x720 @ 30 fps\n    \
         YUYV 640x480 @ 30 fps\n/dev/video1: skipped: /dev/video1 (Fake USB Camera) cannot \
         capture video (a metadata or output node)\n"
    );
    assert_eq!(
        capture::describe(&[]),
        "no V4L2 cameras found (no /dev/video* nodes)\n"
    );
}

/// Readers stuck in the driver (abandoned after a stall, never returning) are capped:
/// past `MAX_READERS` the camera is not opened again, and says why, until one returns.
#[tokio::test(start_paused = true)]
async fn stuck_readers_are_capped_and_the_camera_waits_for_one_to_return() {
    let every = Duration::from_millis(100);
    let stall = Step::Stream {
        frames: 1,
        every,
        then_stall: true,
    };
    let mut script = vec![stall; capture::supervisor::MAX_READERS];
    // After the release: streams, stalls, and is stuck again (capped again).
    script.push(Step::Stream {
        frames: 10,
        every,
        then_stall: true,
    });
    let run = start(script);
    tokio::time::sleep(Duration::from_secs(300)).await;
    let opens = run.fake.opens.lock().unwrap().len();
    assert_eq!(
        opens,
        capture::supervisor::MAX_READERS,
        "opened past the cap"
    );
    let last = run.log.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(last.state, CameraState::Waiting);
    let why = last.reason.unwrap();
    assert!(
        why.contains("3 capture threads are stuck in the driver"),
        "{why}"
    );
    // One comes back from the driver: the camera is opened again and streams.
    run.fake.stuck.lock().unwrap().pop();
    tokio::time::sleep(Duration::from_secs(60)).await;
    run.cancel.cancel();
    run.task.await.unwrap();
    assert_eq!(run.fake.opens.lock().unwrap().len(), opens + 1);
    let log = run.log.lock().unwrap().clone();
    let streaming = log
        .iter()
        .filter(|(_, s)| s.state == CameraState::Streaming);
    assert_eq!(
        streaming.count(),
        capture::supervisor::MAX_READERS + 1,
        "{log:#?}"
    );
    assert_eq!(run.stats.camera(0).captured.load(Ordering::Relaxed), 3 + 10);
}

/// A frame the driver flags as corrupt (V4L2_BUF_FLAG_ERROR) is dropped and counted; the
/// stream is not reopened for it.
#[tokio::test(start_paused = true)]
async fn a_frame_the_driver_flags_is_dropped_counted_and_the_stream_goes_on() {
    let run = start(vec![Step::Flaky {
        frames: 10,
        every: Duration::from_millis(200),
    }]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    run.cancel.cancel();
    run.task.await.unwrap();
    let cs = run.stats.camera(0);
    assert_eq!(cs.bad_frames.load(Ordering::Relaxed), 5);
    assert_eq!(cs.captured.load(Ordering::Relaxed), 5);
    assert_eq!(cs.errors.load(Ordering::Relaxed), 0);
    assert_eq!(run.fake.opens.lock().unwrap().len(), 1);
}
