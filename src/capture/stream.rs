//! Byte-stream cameras: a child program's stdout (`pipe`, and the `picamera` and `rtsp`
//! presets, which are command lines we know) or an HTTP multipart stream (`http-mjpeg`).
//! Behind the same [`Backend`] as V4L2, so the supervisor gives them the same life: open
//! with back-off, stall detection, pacing, status. Frames are cut by [`Framer`] and stay
//! MJPEG (or raw 4:2:0) until inference prepares them, like a V4L2 camera's.

use std::path::PathBuf;
use std::time::Duration;

use tracing::info;

use crate::capture::child::{ChildProgram, find_program};
use crate::capture::framing::{Framer, Piece};
use crate::capture::http::{self, HttpStream};
use crate::capture::{Backend, CaptureError, FrameStream, Mode, Readers};
use crate::config::{CameraSettings, SourceSettings, SourceUrl, StreamFormat};
use crate::frame::{RawFormat, RawFrame};

/// Where a stream camera's bytes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// The first of `programs` found on PATH, run with `args`.
    Program {
        programs: Vec<String>,
        args: Vec<String>,
        /// What to install when none is found.
        hint: &'static str,
    },
    Http(SourceUrl),
}

/// What a stream camera is asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRequest {
    pub origin: Origin,
    pub format: StreamFormat,
    /// The raw formats' frame size.
    pub size: Option<(u32, u32)>,
    pub fps: f64,
    /// Strings that must never be logged (a URL's password, in the forms a program may
    /// print it).
    pub secrets: Vec<String>,
}

/// The programs the `picamera` preset runs: rpicam-apps' name since Raspberry Pi OS
/// bookworm, and the name before it.
pub const PICAMERA_PROGRAMS: [&str; 2] = ["rpicam-vid", "libcamera-vid"];
const PICAMERA_HINT: &str = "install rpicam-apps (Raspberry Pi OS: apt install rpicam-apps)";
const FFMPEG_HINT: &str = "install ffmpeg (apt install ffmpeg)";

impl StreamRequest {
    /// The request for a stream camera; `None` for V4L2 and image sources.
    pub fn from_settings(c: &CameraSettings) -> Option<StreamRequest> {
        let mjpeg = |origin, fps, secrets| StreamRequest {
            origin,
            format: StreamFormat::Mjpeg,
            size: None,
            fps,
            secrets,
        };
        Some(match &c.source {
            SourceSettings::Images { .. } | SourceSettings::V4l2 { .. } => return None,
            SourceSettings::Pipe {
                command,
                format,
                width,
                height,
                fps,
            } => StreamRequest {
                origin: Origin::Program {
                    programs: command.0[..1].to_vec(),
                    args: command.0[1..].to_vec(),
                    hint: "",
                },
                format: *format,
                size: width.zip(*height),
                fps: *fps,
                // A command line may hold a camera's URL with its password too.
                secrets: command.secrets(),
            },
            SourceSettings::Picamera {
                width,
                height,
                format,
                fps,
                ..
            } => StreamRequest {
                origin: Origin::Program {
                    programs: PICAMERA_PROGRAMS.map(String::from).to_vec(),
                    args: picamera_args(&c.source),
                    hint: PICAMERA_HINT,
                },
                format: *format,
                size: Some((*width, *height)),
                fps: *fps,
                secrets: Vec::new(),
            },
            SourceSettings::Rtsp { url, .. } => mjpeg(
                Origin::Program {
                    programs: vec!["ffmpeg".into()],
                    args: ffmpeg_rtsp_args(&c.source),
                    hint: FFMPEG_HINT,
                },
                c.source.fps(),
                url.secrets(),
            ),
            SourceSettings::HttpMjpeg { url, fps } => {
                mjpeg(Origin::Http(url.clone()), *fps, url.secrets())
            }
        })
    }

    /// The program that would run, or why none can: for `edgesight check` and each open.
    pub fn program(&self) -> Result<Option<PathBuf>, CaptureError> {
        let Origin::Program { programs, hint, .. } = &self.origin else {
            return Ok(None);
        };
        programs
            .iter()
            .find_map(|p| find_program(p))
            .map(Some)
            .ok_or_else(|| CaptureError::MissingProgram {
                programs: programs.join(" or "),
                hint,
            })
    }

    fn framer(&self) -> Framer {
        match (self.format, self.size) {
            (StreamFormat::Nv12, Some((w, h))) => Framer::raw(RawFormat::Nv12, w, h),
            (StreamFormat::Yuv420, Some((w, h))) => Framer::raw(RawFormat::I420, w, h),
            // Validation requires a size for the raw formats.
            _ => Framer::jpeg(),
        }
    }
}

/// `rpicam-vid` (or `libcamera-vid`, same options) writing MJPEG or YUV420 to stdout,
/// forever, without a preview window.
fn picamera_args(source: &SourceSettings) -> Vec<String> {
    let SourceSettings::Picamera {
        camera,
        width,
        height,
        fps,
        format,
        args,
    } = source
    else {
        return Vec::new();
    };
    let codec = match format {
        StreamFormat::Yuv420 => "yuv420",
        _ => "mjpeg",
    };
    let mut v: Vec<String> = ["-t", "0", "-n", "--codec", codec]
        .map(String::from)
        .to_vec();
    v.extend([
        "--camera".into(),
        camera.to_string(),
        "--width".into(),
        width.to_string(),
        "--height".into(),
        height.to_string(),
        "--framerate".into(),
        fps.to_string(),
    ]);
    v.extend(args.iter().cloned());
    v.extend(["-o".into(), "-".into()]);
    v
}

/// ffmpeg reading an RTSP stream and writing MJPEG at `fps` (scaled when a size is set)
/// to stdout. Only errors on stderr: a lossy network makes warnings at frame rate.
fn ffmpeg_rtsp_args(source: &SourceSettings) -> Vec<String> {
    let SourceSettings::Rtsp {
        url,
        transport,
        width,
        height,
        fps,
        args,
    } = source
    else {
        return Vec::new();
    };
    let mut v: Vec<String> = ["-nostdin", "-hide_banner", "-loglevel", "error"]
        .map(String::from)
        .to_vec();
    v.extend(["-rtsp_transport".into(), transport.name().into()]);
    v.extend(args.iter().cloned());
    v.extend(["-i".into(), url.expose().into(), "-an".into()]);
    let mut filter = format!("fps={fps}");
    if let (Some(w), Some(h)) = (width, height) {
        filter.push_str(&format!(",scale={w}:{h}"));
    }
    v.extend(["-vf".into(), filter]);
    v.extend(["-f", "mjpeg", "-q:v", "3", "-"].map(String::from));
    v
}

/// Stream cameras: child programs and HTTP.
#[derive(Debug, Default)]
pub struct StreamBackend;

enum Feed {
    // Boxed: one per open camera, and the two differ in size.
    Child(Box<ChildProgram>),
    Http(HttpStream),
}

impl Feed {
    async fn read(&mut self, buf: &mut Vec<u8>) -> Result<usize, CaptureError> {
        match self {
            Feed::Child(c) => c.read(buf).await.map_err(|e| CaptureError::Read(e.into())),
            Feed::Http(h) => h.read(buf).await,
        }
    }

    async fn ended(&mut self) -> CaptureError {
        match self {
            Feed::Child(c) => c.ended().await,
            Feed::Http(h) => h.ended(),
        }
    }
}

/// An open stream camera.
pub struct SourceStream {
    feed: Feed,
    framer: Framer,
    mode: Mode,
    /// The frame read while opening (it told the mode).
    first: Option<RawFrame>,
}

impl SourceStream {
    /// The next frame or broken piece from the feed.
    async fn read_frame(feed: &mut Feed, framer: &mut Framer) -> Result<RawFrame, CaptureError> {
        loop {
            match framer.next_piece() {
                Some(Piece::Frame(f)) => return Ok(f),
                Some(Piece::Broken(b)) => return Err(CaptureError::Damaged(b)),
                None => {}
            }
            if feed.read(framer.buffer()).await? == 0 {
                return Err(feed.ended().await);
            }
        }
    }
}

impl Backend for StreamBackend {
    type Request = StreamRequest;
    type Stream = SourceStream;
    /// An open lasts until the first frame: for an RTSP camera that is ffmpeg probing the
    /// stream (5 s by default) and waiting for a key frame (H.264 cameras send one every
    /// 2-10 s), more than a V4L2 open ever needs.
    const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

    /// Start the program (or connect) and read up to the first whole frame, which gives
    /// the mode; broken pieces before it are skipped.
    async fn open(
        &self,
        name: &str,
        request: &StreamRequest,
        _readers: &Readers,
    ) -> Result<SourceStream, CaptureError> {
        let mut feed = match &request.origin {
            Origin::Program { args, .. } => {
                let path = request.program()?.unwrap_or_default();
                Feed::Child(Box::new(ChildProgram::spawn(
                    name,
                    &path,
                    args,
                    &request.secrets,
                )?))
            }
            Origin::Http(url) => {
                info!("camera {name}: connecting to {url}");
                Feed::Http(http::open(url, request.fps).await?)
            }
        };
        let mut framer = request.framer();
        let first = loop {
            match SourceStream::read_frame(&mut feed, &mut framer).await {
                Ok(f) => break f,
                Err(e) if !e.ends_stream() => continue,
                Err(e) => return Err(e),
            }
        };
        let mode = Mode {
            format: first.format,
            width: first.width,
            height: first.height,
            fps: request.fps.round().max(1.0) as u32,
        };
        Ok(SourceStream {
            feed,
            framer,
            mode,
            first: Some(first),
        })
    }
}

impl FrameStream for SourceStream {
    fn mode(&self) -> Mode {
        self.mode
    }

    async fn next_frame(&mut self) -> Result<RawFrame, CaptureError> {
        if let Some(f) = self.first.take() {
            return Ok(f);
        }
        SourceStream::read_frame(&mut self.feed, &mut self.framer).await
    }
}

/// libcamera's cameras as `rpicam-hello --list-cameras` (or `libcamera-hello`) lists
/// them, for `edgesight cameras`; `None` where neither program is installed.
pub fn list_libcamera() -> Option<String> {
    let program = ["rpicam-hello", "libcamera-hello"]
        .iter()
        .find_map(|p| find_program(p))?;
    let out = std::process::Command::new(&program)
        .arg("--list-cameras")
        .stdin(std::process::Stdio::null())
        .output();
    let text = match out {
        Ok(o) => {
            let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
            if !o.status.success() {
                t.push_str(&String::from_utf8_lossy(&o.stderr));
            }
            t
        }
        Err(e) => format!("cannot run: {e}\n"),
    };
    Some(format!(
        "libcamera ({} --list-cameras; use source = \"picamera\", camera = N):\n{text}",
        program.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CommandLine, RtspTransport, SourceUrl};

    fn camera(source: SourceSettings) -> CameraSettings {
        CameraSettings::with_defaults("c", source)
    }

    fn args(r: &StreamRequest) -> String {
        match &r.origin {
            Origin::Program { programs, args, .. } => {
                format!("{} {}", programs.join("|"), args.join(" "))
            }
            Origin::Http(u) => u.expose().to_string(),
        }
    }

    /// Data-driven: each preset's command line, as the program documents its options.
    #[test]
    fn presets_run_the_documented_command_lines() {
        let url = SourceUrl::parse("rtsp://admin:s3cret@10.0.0.7:554/live", &["rtsp"]).unwrap();
        let cases = [
            (
                SourceSettings::Picamera {
                    camera: 1,
                    width: 1280,
                    height: 720,
                    fps: 5.0,
                    format: StreamFormat::Mjpeg,
                    args: vec!["--hflip".into()],
                },
                "rpicam-vid|libcamera-vid -t 0 -n --codec mjpeg --camera 1 --width 1280 \
                 --height 720 --framerate 5 --hflip -o -",
                vec![],
            ),
            (
                SourceSettings::Picamera {
                    camera: 0,
                    width: 640,
                    height: 480,
                    fps: 2.5,
                    format: StreamFormat::Yuv420,
                    args: vec![],
                },
                "rpicam-vid|libcamera-vid -t 0 -n --codec yuv420 --camera 0 --width 640 \
                 --height 480 --framerate 2.5 -o -",
                vec![],
            ),
            (
                SourceSettings::Rtsp {
                    url: url.clone(),
                    transport: RtspTransport::Tcp,
                    width: Some(640),
                    height: Some(360),
                    fps: 2.5,
                    args: vec![],
                },
                "ffmpeg -nostdin -hide_banner -loglevel error -rtsp_transport tcp \
                 -i rtsp://admin:s3cret@10.0.0.7:554/live -an -vf fps=2.5,scale=640:360 \
                 -f mjpeg -q:v 3 -",
                vec!["s3cret".to_string()],
            ),
            (
                SourceSettings::Pipe {
                    command: CommandLine(vec!["my-cam".into(), "--out".into(), "-".into()]),
                    format: StreamFormat::Yuv420,
                    width: Some(64),
                    height: Some(48),
                    fps: 5.0,
                },
                "my-cam --out -",
                vec![],
            ),
            (
                SourceSettings::Pipe {
                    command: CommandLine(
                        "ffmpeg -i rtsp://cam:p%3Ass@10.0.0.9/h264 -f mjpeg -"
                            .split(' ')
                            .map(String::from)
                            .collect(),
                    ),
                    format: StreamFormat::Mjpeg,
                    width: None,
                    height: None,
                    fps: 5.0,
                },
                "ffmpeg -i rtsp://cam:p%3Ass@10.0.0.9/h264 -f mjpeg -",
                vec!["p%3Ass".to_string(), "p:ss".to_string()],
            ),
        ];
        for (source, want, secrets) in cases {
            let r = StreamRequest::from_settings(&camera(source)).unwrap();
            assert_eq!(args(&r), want);
            assert_eq!(r.secrets, secrets);
        }
        let v4l2 = SourceSettings::Images {
            path: "x".into(),
            fps: 1.0,
            looped: true,
        };
        assert_eq!(StreamRequest::from_settings(&camera(v4l2)), None);
    }

    #[test]
    fn a_missing_program_is_named_with_what_to_install() {
        let r = StreamRequest {
            origin: Origin::Program {
                programs: vec!["edgesight-no-such-vid".into(), "nor-this-one".into()],
                args: vec![],
                hint: PICAMERA_HINT,
            },
            format: StreamFormat::Mjpeg,
            size: None,
            fps: 5.0,
            secrets: vec![],
        };
        let e = r.program().unwrap_err().to_string();
        assert!(e.contains("edgesight-no-such-vid or nor-this-one"), "{e}");
        assert!(e.contains("rpicam-apps"), "{e}");
    }
}
