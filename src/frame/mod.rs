//! Raw camera frames (the bytes a V4L2 camera hands over, in its pixel format) and their
//! one-pass preparation into the model's input tensor.
//!
//! The naive path decodes every frame to a full-resolution RGB image, then resizes it, then
//! normalises it: three passes over megabytes for a 224x224 input. Here:
//! - MJPEG is decoded at a reduced scale (libjpeg's DCT scaling, 1/2, 1/4 or 1/8) chosen so
//!   the decoded crop window is still at least the input size, then resampled;
//! - YUYV, NV12, GRAY and RGB are converted one source row at a time, each row filtered
//!   horizontally to the input width at once, and accumulated vertically into the output;
//!   no full-resolution RGB copy exists;
//! - the filter is the same triangle (bilinear with antialiasing) with the same weights as
//!   the reference path ([`RawFrame::to_rgb`] then [`InputSpec::tensor`]), so the two agree
//!   to within rounding for the uncompressed formats and to within DCT-scaling error for
//!   MJPEG (tests/prepare.rs measures both).
//!
//! Also here: [`preprocess`] (the model's input geometry and normalisation, and the
//! reference path) and [`snapshot`] (a frame as a JPEG within a size limit).
//!
//! May use: config, util. Pure: no tokio, rumqttc or nokhwa.

pub mod preprocess;
pub mod snapshot;

use image::RgbImage;
use tract_onnx::prelude::Tensor;

use crate::config::{PixelFormat, Rect};
use crate::frame::preprocess::InputSpec;

/// Pixel formats we decode; the names are V4L2's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RawFormat {
    Mjpeg,
    /// YUV 4:2:2 packed, Y0 U Y1 V.
    Yuyv,
    /// YUV 4:2:0: a Y plane, then one interleaved U V plane at half resolution.
    Nv12,
    /// YUV 4:2:0: Y, U and V planes, U and V at half resolution (YU12; what
    /// `rpicam-vid --codec yuv420` writes). No V4L2 camera is opened in it.
    I420,
    Gray,
    /// RGB24.
    Rgb,
    /// BGR24.
    Bgr,
}

impl RawFormat {
    /// The one format a configured `format` asks for; `None` for `auto`.
    pub fn wanted(f: PixelFormat) -> Option<RawFormat> {
        use RawFormat as R;
        match f {
            PixelFormat::Auto => None,
            PixelFormat::Mjpeg => Some(R::Mjpeg),
            PixelFormat::Yuyv => Some(R::Yuyv),
            PixelFormat::Nv12 => Some(R::Nv12),
            PixelFormat::Gray => Some(R::Gray),
            PixelFormat::Rgb => Some(R::Rgb),
            PixelFormat::Bgr => Some(R::Bgr),
        }
    }

    pub const ALL: [RawFormat; 7] = [
        RawFormat::Mjpeg,
        RawFormat::Yuyv,
        RawFormat::Nv12,
        RawFormat::I420,
        RawFormat::Gray,
        RawFormat::Rgb,
        RawFormat::Bgr,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RawFormat::Mjpeg => "MJPEG",
            RawFormat::Yuyv => "YUYV",
            RawFormat::Nv12 => "NV12",
            RawFormat::I420 => "YU12",
            RawFormat::Gray => "GREY",
            RawFormat::Rgb => "RGB3",
            RawFormat::Bgr => "BGR3",
        }
    }

    /// YUV formats, which preparation filters as Y, U, V before converting.
    pub fn is_yuv(self) -> bool {
        matches!(self, RawFormat::Yuyv | RawFormat::Nv12 | RawFormat::I420)
    }

    /// Bytes of an uncompressed `width` x `height` frame; `None` for MJPEG.
    pub fn frame_len(self, width: u32, height: u32) -> Option<usize> {
        let px = width as usize * height as usize;
        match self {
            RawFormat::Mjpeg => None,
            RawFormat::Yuyv => Some(px * 2),
            RawFormat::Nv12 | RawFormat::I420 => Some(px + px / 2),
            RawFormat::Gray => Some(px),
            RawFormat::Rgb | RawFormat::Bgr => Some(px * 3),
        }
    }
}

impl std::fmt::Display for RawFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a frame could not be used. Each names the frame's format and size.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("{format} frame {width}x{height}: {got} bytes, expected {expected}")]
    Size {
        format: RawFormat,
        width: u32,
        height: u32,
        got: usize,
        expected: usize,
    },
    #[error("{format} frame {width}x{height}: empty")]
    Empty {
        format: RawFormat,
        width: u32,
        height: u32,
    },
    #[error("{format} frame {width}x{height}: width and height must be even")]
    OddSize {
        format: RawFormat,
        width: u32,
        height: u32,
    },
    /// A cut asked of the frame that is not inside it (or empty).
    #[error("{format} frame {width}x{height}: {rect:?} is not inside it")]
    Outside {
        format: RawFormat,
        width: u32,
        height: u32,
        rect: Rect,
    },
    #[error("MJPEG frame {width}x{height} ({bytes} bytes): {reason}")]
    Jpeg {
        width: u32,
        height: u32,
        bytes: usize,
        reason: JpegFault,
    },
}

/// What is wrong with an MJPEG frame.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JpegFault {
    #[error("truncated or not a JPEG (no SOI/EOI marker)")]
    Incomplete,
    #[error("decoder returned a short image")]
    ShortImage,
    /// The header claims more than the camera's mode: decoding it would allocate what
    /// the header says (a 65535x65535 header is 12 GB of RGB), so it is refused unread.
    #[error("header says {width}x{height}, larger than the frame's {max_width}x{max_height}")]
    Oversized {
        width: usize,
        height: usize,
        max_width: u32,
        max_height: u32,
    },
    /// libjpeg's own words (it reports errors by unwinding; see `decode_jpeg`).
    #[error("{0}")]
    Decoder(String),
}

/// One frame as the camera delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct RawFrame {
    pub format: RawFormat,
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl From<RgbImage> for RawFrame {
    fn from(img: RgbImage) -> Self {
        let (width, height) = img.dimensions();
        RawFrame {
            format: RawFormat::Rgb,
            width,
            height,
            data: img.into_raw(),
        }
    }
}

/// BT.601 limited range, in the integer form V4L2 drivers and nokhwa use.
#[inline]
fn yuv_to_rgb(y: i32, u: i32, v: i32) -> [u8; 3] {
    let c = (y - 16) * 298;
    let d = u - 128;
    let e = v - 128;
    [
        ((c + 409 * e + 128) >> 8).clamp(0, 255) as u8,
        ((c - 100 * d - 208 * e + 128) >> 8).clamp(0, 255) as u8,
        ((c + 516 * d + 128) >> 8).clamp(0, 255) as u8,
    ]
}

/// The inverse of [`yuv_to_rgb`] (for recorded frames in tests and benchmarks).
#[inline]
fn rgb_to_yuv(p: [u8; 3]) -> [u8; 3] {
    let [r, g, b] = p.map(i32::from);
    [
        (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16).clamp(0, 255) as u8,
        (((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128).clamp(0, 255) as u8,
        (((112 * r - 94 * g - 18 * b + 128) >> 8) + 128).clamp(0, 255) as u8,
    ]
}

/// A JPEG's SOI marker at the start and EOI at the end (UVC cameras may pad with zeros
/// after it). libjpeg "decodes" a truncated frame by padding it with grey and a warning;
/// we would rather drop it than classify half a picture.
fn jpeg_is_complete(data: &[u8]) -> bool {
    let end = data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    data.starts_with(&[0xFF, 0xD8]) && data[..end].ends_with(&[0xFF, 0xD9])
}

/// A decoded JPEG: width, height, packed RGB.
type Decoded = (u32, u32, Vec<u8>);

/// How far a JPEG header may exceed the frame's mode: some cameras round up to whole
/// 16-pixel blocks (1920x1088 for 1080p).
const JPEG_SLACK: u32 = 16;

/// Decode a JPEG at `numerator`/8 of its size to packed RGB: (width, height, bytes),
/// refusing one whose header is larger than `max` (the frame's mode) before anything is
/// allocated for it. Only the rows above `rows` (in the frame's full-size rows; None: all)
/// are decoded: the decoder stops there, and the image returned is that tall.
///
/// libjpeg reports fatal errors by unwinding out of the C code (mozjpeg's design); we
/// catch that here, so a garbage frame is an error, not a crash. This is why the release
/// profile keeps `panic = "unwind"` and `main` installs a hook that aborts on real panics.
fn decode_jpeg(
    data: &[u8],
    numerator: u8,
    max: (u32, u32),
    rows: Option<u32>,
) -> Result<Decoded, JpegFault> {
    let run = || -> std::io::Result<Result<Decoded, JpegFault>> {
        let mut d = mozjpeg::Decompress::new_mem(data)?;
        let (width, height) = d.size();
        if width > (max.0 + JPEG_SLACK) as usize || height > (max.1 + JPEG_SLACK) as usize {
            return Ok(Err(JpegFault::Oversized {
                width,
                height,
                max_width: max.0,
                max_height: max.1,
            }));
        }
        d.scale(numerator);
        let mut d = d.rgb()?;
        let (w, h) = (d.width() as u32, d.height() as u32);
        let Some(rows) = rows.map(|r| scaled(r, numerator as u32).min(h)) else {
            let px = d.read_scanlines::<u8>()?;
            d.finish()?;
            return Ok(Ok((w, h, px)));
        };
        // Stopping early is safe: the frame's check saw its end marker, and dropping the
        // decompressor releases libjpeg's state without finishing.
        let mut px = vec![0u8; w as usize * rows as usize * 3];
        d.read_scanlines_into::<u8>(&mut px)?;
        Ok(Ok((w, rows, px)))
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(JpegFault::Decoder(e.to_string())),
        Err(payload) => Err(JpegFault::Decoder(
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".into()),
        )),
    }
}

/// Output size of a libjpeg decode at `numerator`/8: ceil(size * n / 8).
fn scaled(size: u32, numerator: u32) -> u32 {
    (size * numerator).div_ceil(8)
}

/// `r` (in the frame's full-size pixels) in a decode at `numerator`/8 that came out
/// `size` (rows past the lowest cut not decoded): the scaled rectangle covering it,
/// clipped to the decode; None if nothing of it is left (a JPEG smaller than its mode).
fn scaled_rect(r: Rect, numerator: u32, size: (u32, u32)) -> Option<Rect> {
    let span = |at: u32, len: u32, limit: u32| {
        let a = (at as u64 * numerator as u64 / 8) as u32;
        let b = scaled(at + len, numerator).min(limit);
        (b > a).then(|| (a, b - a))
    };
    let (x, width) = span(r.x, r.width, size.0)?;
    let (y, height) = span(r.y, r.height, size.1)?;
    Some(Rect {
        x,
        y,
        width,
        height,
    })
}

/// One part of a frame to prepare for a model: a rectangle of the frame (None: all of
/// it), and the model's input.
#[derive(Debug, Clone, Copy)]
pub struct Cut<'a> {
    pub rect: Option<Rect>,
    pub spec: &'a InputSpec,
}

impl RawFrame {
    /// Size and shape checks for the uncompressed formats; MJPEG is checked when decoded.
    pub fn check(&self) -> Result<(), FrameError> {
        let (format, width, height) = (self.format, self.width, self.height);
        if width == 0 || height == 0 {
            return Err(FrameError::Empty {
                format,
                width,
                height,
            });
        }
        let planar = matches!(format, RawFormat::Nv12 | RawFormat::I420);
        if matches!(format, RawFormat::Yuyv) && width % 2 != 0
            || planar && (width % 2 != 0 || height % 2 != 0)
        {
            return Err(FrameError::OddSize {
                format,
                width,
                height,
            });
        }
        if let Some(expected) = format.frame_len(width, height) {
            // Some drivers pad the buffer; fewer bytes than a frame is a broken frame.
            if self.data.len() < expected {
                return Err(FrameError::Size {
                    format,
                    width,
                    height,
                    got: self.data.len(),
                    expected,
                });
            }
        }
        if format == RawFormat::Mjpeg && !jpeg_is_complete(&self.data) {
            return Err(self.jpeg_error(JpegFault::Incomplete));
        }
        Ok(())
    }

    fn jpeg_error(&self, reason: JpegFault) -> FrameError {
        FrameError::Jpeg {
            width: self.width,
            height: self.height,
            bytes: self.data.len(),
            reason,
        }
    }

    /// The whole frame as RGB: the reference (naive) path.
    pub fn to_rgb(&self) -> Result<RgbImage, FrameError> {
        self.check()?;
        let (w, h) = (self.width as usize, self.height as usize);
        let mut out = vec![0u8; w * h * 3];
        match self.format {
            RawFormat::Mjpeg => {
                let (dw, dh, px) = decode_jpeg(&self.data, 8, (self.width, self.height), None)
                    .map_err(|e| self.jpeg_error(e))?;
                return RgbImage::from_raw(dw, dh, px)
                    .ok_or_else(|| self.jpeg_error(JpegFault::ShortImage));
            }
            _ => {
                for y in 0..h {
                    self.row_rgb_u8(y, 0, w, &mut out[y * w * 3..(y + 1) * w * 3]);
                }
            }
        }
        RgbImage::from_raw(self.width, self.height, out).ok_or_else(|| FrameError::Size {
            format: self.format,
            width: self.width,
            height: self.height,
            got: self.data.len(),
            expected: self.format.frame_len(self.width, self.height).unwrap_or(0),
        })
    }

    /// Pixels `x0..x0+n` of row `y` as packed RGB (uncompressed formats; checked frame).
    fn row_rgb_u8(&self, y: usize, x0: usize, n: usize, out: &mut [u8]) {
        let w = self.width as usize;
        let d = &self.data;
        match self.format {
            RawFormat::Rgb => out.copy_from_slice(&d[(y * w + x0) * 3..(y * w + x0 + n) * 3]),
            RawFormat::Bgr => {
                let src = &d[(y * w + x0) * 3..(y * w + x0 + n) * 3];
                for (o, p) in out.chunks_exact_mut(3).zip(src.chunks_exact(3)) {
                    o.copy_from_slice(&[p[2], p[1], p[0]]);
                }
            }
            RawFormat::Gray => {
                for (o, g) in out.chunks_exact_mut(3).zip(&d[y * w + x0..y * w + x0 + n]) {
                    o.fill(*g);
                }
            }
            RawFormat::Yuyv => {
                // Whole Y0 U Y1 V groups from the pair holding x0, then drop a leading pixel.
                let row = &d[y * w * 2 + (x0 & !1) * 2..(y + 1) * w * 2];
                let px = row.chunks_exact(4).flat_map(|q| {
                    let (u, v) = (q[1] as i32, q[3] as i32);
                    [yuv_to_rgb(q[0] as i32, u, v), yuv_to_rgb(q[2] as i32, u, v)]
                });
                for (o, p) in out.chunks_exact_mut(3).zip(px.skip(x0 & 1)) {
                    o.copy_from_slice(&p);
                }
            }
            RawFormat::Nv12 => {
                let ys = &d[y * w + (x0 & !1)..(y + 1) * w];
                let uv_row = w * self.height as usize + (y / 2) * w;
                let uv = &d[uv_row + (x0 & !1)..uv_row + w];
                let px = ys
                    .chunks_exact(2)
                    .zip(uv.chunks_exact(2))
                    .flat_map(|(y2, c)| {
                        let (u, v) = (c[0] as i32, c[1] as i32);
                        [
                            yuv_to_rgb(y2[0] as i32, u, v),
                            yuv_to_rgb(y2[1] as i32, u, v),
                        ]
                    });
                for (o, p) in out.chunks_exact_mut(3).zip(px.skip(x0 & 1)) {
                    o.copy_from_slice(&p);
                }
            }
            RawFormat::I420 => {
                let (us, vs) = self.i420_chroma_rows(y);
                for (i, o) in out[..n * 3].chunks_exact_mut(3).enumerate() {
                    let x = x0 + i;
                    let (u, v) = (us[x / 2] as i32, vs[x / 2] as i32);
                    o.copy_from_slice(&yuv_to_rgb(d[y * w + x] as i32, u, v));
                }
            }
            RawFormat::Mjpeg => unreachable!("MJPEG rows come from the decoder"),
        }
    }

    /// Pixels `x0..x0+n` of row `y` of a YUYV or NV12 frame as packed Y, U, V: the
    /// chroma of each pixel's pair, as [`RawFrame::row_rgb_u8`] uses it, unconverted.
    fn row_yuv_u8(&self, y: usize, x0: usize, n: usize, out: &mut [u8]) {
        let w = self.width as usize;
        let d = &self.data;
        match self.format {
            RawFormat::Yuyv => {
                let row = &d[y * w * 2..(y + 1) * w * 2];
                for (i, o) in out[..n * 3].chunks_exact_mut(3).enumerate() {
                    let x = x0 + i;
                    let p = (x & !1) * 2;
                    o.copy_from_slice(&[row[x * 2], row[p + 1], row[p + 3]]);
                }
            }
            RawFormat::Nv12 => {
                let ys = &d[y * w..(y + 1) * w];
                let uv_row = w * self.height as usize + (y / 2) * w;
                let uv = &d[uv_row..uv_row + w];
                for (i, o) in out[..n * 3].chunks_exact_mut(3).enumerate() {
                    let x = x0 + i;
                    o.copy_from_slice(&[ys[x], uv[x & !1], uv[(x & !1) + 1]]);
                }
            }
            RawFormat::I420 => {
                let ys = &d[y * w..(y + 1) * w];
                let (us, vs) = self.i420_chroma_rows(y);
                for (i, o) in out[..n * 3].chunks_exact_mut(3).enumerate() {
                    let x = x0 + i;
                    o.copy_from_slice(&[ys[x], us[x / 2], vs[x / 2]]);
                }
            }
            _ => self.row_rgb_u8(y, x0, n, out),
        }
    }

    /// The U and V rows an I420 frame's row `y` uses (checked frames only).
    fn i420_chroma_rows(&self, y: usize) -> (&[u8], &[u8]) {
        let (w, h) = (self.width as usize, self.height as usize);
        let (cw, ch) = (w / 2, h / 2);
        let u = w * h + (y / 2) * cw;
        let v = w * h + cw * ch + (y / 2) * cw;
        (&self.data[u..u + cw], &self.data[v..v + cw])
    }

    /// `img` re-encoded as a frame of `format` (recorded frames for tests and benchmarks).
    /// YUYV and NV12 average chroma over each pixel pair / 2x2 block, as cameras do.
    pub fn from_rgb(img: &RgbImage, format: RawFormat) -> RawFrame {
        let (width, height) = img.dimensions();
        let (w, h) = (width as usize, height as usize);
        let px = |x: usize, y: usize| img.get_pixel(x as u32, y as u32).0;
        let data = match format {
            RawFormat::Rgb => img.as_raw().clone(),
            RawFormat::Bgr => img
                .pixels()
                .flat_map(|p| [p.0[2], p.0[1], p.0[0]])
                .collect(),
            RawFormat::Gray => (0..h)
                .flat_map(|y| (0..w).map(move |x| (y, x)))
                .map(|(y, x)| rgb_to_yuv(px(x, y))[0])
                .collect(),
            RawFormat::Yuyv => {
                let mut d = Vec::with_capacity(w * h * 2);
                for y in 0..h {
                    for x in (0..w & !1).step_by(2) {
                        let (a, b) = (rgb_to_yuv(px(x, y)), rgb_to_yuv(px(x + 1, y)));
                        let avg = |i: usize| (a[i] as u16 + b[i] as u16).div_ceil(2) as u8;
                        d.extend_from_slice(&[a[0], avg(1), b[0], avg(2)]);
                    }
                }
                d
            }
            RawFormat::Nv12 | RawFormat::I420 => {
                let mut d: Vec<u8> = (0..h)
                    .flat_map(|y| (0..w).map(move |x| (y, x)))
                    .map(|(y, x)| rgb_to_yuv(px(x, y))[0])
                    .collect();
                let (mut us, mut vs) = (Vec::new(), Vec::new());
                for y in (0..h & !1).step_by(2) {
                    for x in (0..w & !1).step_by(2) {
                        let q = [px(x, y), px(x + 1, y), px(x, y + 1), px(x + 1, y + 1)]
                            .map(rgb_to_yuv);
                        let avg = |c: usize| {
                            let s: u32 = q.iter().map(|p| p[c] as u32).sum();
                            ((s + 2) / 4) as u8
                        };
                        if format == RawFormat::Nv12 {
                            d.extend_from_slice(&[avg(1), avg(2)]);
                        } else {
                            us.push(avg(1));
                            vs.push(avg(2));
                        }
                    }
                }
                d.extend_from_slice(&us);
                d.extend_from_slice(&vs);
                d
            }
            RawFormat::Mjpeg => {
                let mut d = Vec::new();
                let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut d, 85);
                // Encoding an in-memory RGB image into a Vec cannot fail.
                let _ = enc.encode_image(img);
                d
            }
        };
        RawFrame {
            format,
            width,
            height,
            data,
        }
    }

    /// One-pass preparation: this frame straight to `spec`'s input tensor.
    pub fn prepare(&self, spec: &InputSpec) -> Result<Tensor, FrameError> {
        Ok(self.prepare_pixels(spec)?.tensor(spec))
    }

    /// The frame cropped, converted and resampled to `spec`'s input size, before
    /// normalisation (change gating looks at these).
    pub fn prepare_pixels(&self, spec: &InputSpec) -> Result<Pixels, FrameError> {
        let mut one = self.prepare_cuts(&[Cut { rect: None, spec }])?;
        Ok(one.remove(0))
    }

    /// Several parts of the frame (regions, each for its model's input), prepared from one
    /// pass over the frame: an MJPEG frame is decoded once, at the smallest DCT scale at
    /// which every cut still covers its input size (never upsampling what the camera sent
    /// at full size), and only down to the lowest cut's bottom row; the uncompressed
    /// formats convert only the rows and columns each cut covers. In the order of `cuts`.
    pub fn prepare_cuts(&self, cuts: &[Cut]) -> Result<Vec<Pixels>, FrameError> {
        self.check()?;
        let inside = |r: &Rect| {
            r.width > 0
                && r.height > 0
                && r.x as u64 + r.width as u64 <= self.width as u64
                && r.y as u64 + r.height as u64 <= self.height as u64
        };
        if let Some(rect) = cuts.iter().filter_map(|c| c.rect).find(|r| !inside(r)) {
            return Err(FrameError::Outside {
                format: self.format,
                width: self.width,
                height: self.height,
                rect,
            });
        }
        // Each cut's window: its rectangle, cropped further per its `resize`.
        let window = |spec: &InputSpec, r: Rect| {
            let (cx, cy, cw, ch) = spec.crop_window(r.width, r.height);
            Rect {
                x: r.x + cx,
                y: r.y + cy,
                width: cw,
                height: ch,
            }
        };
        if self.format != RawFormat::Mjpeg {
            let full = Rect::full(self.width, self.height);
            let all = cuts
                .iter()
                .map(|c| self.resample(c.spec, window(c.spec, c.rect.unwrap_or(full))));
            return Ok(all.collect());
        }
        let n = cuts
            .iter()
            .map(|c| {
                let r = c.rect.unwrap_or(Rect::full(self.width, self.height));
                let w = window(c.spec, r);
                let (ow, oh) = (c.spec.width, c.spec.height);
                [1u32, 2, 4, 8]
                    .into_iter()
                    .find(|&n| scaled(w.width, n) >= ow && scaled(w.height, n) >= oh)
                    .unwrap_or(8)
            })
            .max()
            .unwrap_or(8);
        let bottom = cuts
            .iter()
            .map(|c| c.rect.map(|r| r.y + r.height))
            .try_fold(0, |b, r| r.map(|r| b.max(r)));
        let (dw, dh, px) = decode_jpeg(&self.data, n as u8, (self.width, self.height), bottom)
            .map_err(|e| self.jpeg_error(e))?;
        if px.len() < dw as usize * dh as usize * 3 {
            return Err(self.jpeg_error(JpegFault::ShortImage));
        }
        let rgb = RawFrame {
            format: RawFormat::Rgb,
            width: dw,
            height: dh,
            data: px,
        };
        cuts.iter()
            .map(|c| {
                // A region's window is placed in full-size pixels, then scaled: its edges
                // land within half a scaled pixel of where they are in the frame. The
                // whole frame is cropped in the decode's own pixels.
                let w = match c.rect {
                    None => window(c.spec, Rect::full(dw, dh)),
                    Some(r) => scaled_rect(window(c.spec, r), n, (dw, dh))
                        .ok_or_else(|| self.jpeg_error(JpegFault::ShortImage))?,
                };
                Ok(rgb.resample(c.spec, w))
            })
            .collect()
    }

    /// Convert and resample `window` (inside the frame) to `spec`'s input size; an
    /// uncompressed, checked frame.
    fn resample(&self, spec: &InputSpec, window: Rect) -> Pixels {
        let (ow, oh) = (spec.width as usize, spec.height as usize);
        let (cx, cy) = (window.x as usize, window.y as usize);
        let (cw, ch) = (window.width as usize, window.height as usize);
        let hx = Taps::new(cw, ow);
        let vy = Taps::new(ch, oh);
        // For each source row of the window, the output rows it contributes to, flattened:
        // row sy's (output row, weight) pairs are uses[first[sy]..first[sy + 1]]. Two
        // allocations per frame, not one per source row.
        let mut first = vec![0u32; ch + 1];
        for oy in 0..oh {
            for k in 0..vy.of(oy).len() {
                first[vy.start[oy] as usize + k + 1] += 1;
            }
        }
        for sy in 0..ch {
            first[sy + 1] += first[sy];
        }
        let mut uses = vec![(0u32, 0f32); first[ch] as usize];
        let mut fill = first.clone();
        for oy in 0..oh {
            for (k, w) in vy.of(oy).iter().enumerate() {
                let at = &mut fill[vy.start[oy] as usize + k];
                uses[*at as usize] = (oy as u32, *w);
                *at += 1;
            }
        }
        // YUV formats are filtered as Y, U, V and converted once per *output* pixel: the
        // conversion is affine, so this equals converting first, except where the reference
        // clamps an out-of-gamut pixel; and it saves converting every source pixel.
        let yuv = self.format.is_yuv();
        let mut row = vec![0u8; cw * 3];
        let mut hrow = vec![0f32; ow * 3];
        let mut out = vec![0f32; ow * oh * 3];
        for sy in 0..ch {
            let targets = &uses[first[sy] as usize..first[sy + 1] as usize];
            if targets.is_empty() {
                continue;
            }
            if yuv {
                self.row_yuv_u8(cy + sy, cx, cw, &mut row);
            } else {
                self.row_rgb_u8(cy + sy, cx, cw, &mut row);
            }
            for ox in 0..ow {
                let s = hx.start[ox] as usize * 3;
                let (mut r, mut g, mut b) = (0f32, 0f32, 0f32);
                for (w, p) in hx.of(ox).iter().zip(row[s..].chunks_exact(3)) {
                    r += w * p[0] as f32;
                    g += w * p[1] as f32;
                    b += w * p[2] as f32;
                }
                hrow[ox * 3..ox * 3 + 3].copy_from_slice(&[r, g, b]);
            }
            for &(oy, w) in targets {
                let dst = &mut out[oy as usize * ow * 3..(oy as usize + 1) * ow * 3];
                for (d, s) in dst.iter_mut().zip(&hrow) {
                    *d += w * s;
                }
            }
        }
        if yuv {
            for p in out.chunks_exact_mut(3) {
                let (c, d, e) = (298.0 * (p[0] - 16.0), p[1] - 128.0, p[2] - 128.0);
                p[0] = (c + 409.0 * e) / 256.0;
                p[1] = (c - 100.0 * d - 208.0 * e) / 256.0;
                p[2] = (c + 516.0 * d) / 256.0;
            }
        }
        // Round and clamp as the reference path's 8-bit resize does.
        out.iter_mut()
            .for_each(|v| *v = v.round().clamp(0.0, 255.0));
        Pixels {
            width: spec.width,
            height: spec.height,
            rgb: out,
        }
    }
}

/// A frame at the model's input size: packed RGB, 0..=255, as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<f32>,
}

/// Side of the grey thumbnail change gating compares.
pub const THUMB: usize = 16;

impl Pixels {
    pub fn tensor(&self, spec: &InputSpec) -> Tensor {
        spec.normalize_pixels(self.rgb.chunks_exact(3).map(|p| [p[0], p[1], p[2]]))
    }

    /// A `THUMB` x `THUMB` grey thumbnail (block means of the luma): cheap to compare,
    /// and blind to sensor noise that a per-pixel difference would see.
    pub fn thumbnail(&self) -> Vec<f32> {
        let (w, h) = (self.width as usize, self.height as usize);
        let mut sum = vec![0f32; THUMB * THUMB];
        let mut count = vec![0u32; THUMB * THUMB];
        for y in 0..h {
            let ty = y * THUMB / h;
            for x in 0..w {
                let p = &self.rgb[(y * w + x) * 3..(y * w + x) * 3 + 3];
                let t = ty * THUMB + x * THUMB / w;
                sum[t] += 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
                count[t] += 1;
            }
        }
        sum.iter()
            .zip(&count)
            .map(|(s, n)| if *n > 0 { s / *n as f32 } else { 0.0 })
            .collect()
    }
}

/// Triangle-filter taps for resampling `src` samples to `dst`, with the weights of the
/// `image` crate's `FilterType::Triangle` (support scaled by the ratio when shrinking).
struct Taps {
    start: Vec<u32>,
    /// `per` weights per output sample (zero-padded).
    weights: Vec<f32>,
    per: usize,
    len: Vec<u32>,
}

impl Taps {
    fn new(src: usize, dst: usize) -> Taps {
        let ratio = src as f32 / dst as f32;
        let sratio = ratio.max(1.0);
        let support = sratio; // the triangle's support is 1
        let per = (2.0 * support).ceil() as usize + 2;
        let mut t = Taps {
            start: Vec::with_capacity(dst),
            weights: vec![0.0; dst * per],
            per,
            len: Vec::with_capacity(dst),
        };
        for o in 0..dst {
            let center = (o as f32 + 0.5) * ratio;
            let left = ((center - support).floor() as i64).clamp(0, src as i64 - 1) as usize;
            let right =
                ((center + support).ceil() as i64).clamp(left as i64 + 1, src as i64) as usize;
            let right = right.min(left + per);
            let c = center - 0.5;
            let ws = &mut t.weights[o * per..o * per + (right - left)];
            let mut sum = 0.0;
            for (k, w) in ws.iter_mut().enumerate() {
                let x = ((left + k) as f32 - c) / sratio;
                *w = (1.0 - x.abs()).max(0.0);
                sum += *w;
            }
            if sum > 0.0 {
                ws.iter_mut().for_each(|w| *w /= sum);
            }
            t.start.push(left as u32);
            t.len.push((right - left) as u32);
        }
        t
    }

    fn of(&self, o: usize) -> &[f32] {
        &self.weights[o * self.per..o * self.per + self.len[o] as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuv_round_trip_is_close() {
        for p in [[0, 0, 0], [255, 255, 255], [200, 30, 90], [12, 240, 128]] {
            let [y, u, v] = rgb_to_yuv(p);
            let back = yuv_to_rgb(y as i32, u as i32, v as i32);
            for c in 0..3 {
                assert!(back[c].abs_diff(p[c]) <= 3, "{p:?} -> {back:?}");
            }
        }
    }

    #[test]
    fn taps_sum_to_one_and_stay_inside() {
        for (src, dst) in [(1920, 224), (64, 64), (100, 7), (7, 100), (1080, 224)] {
            let t = Taps::new(src, dst);
            for o in 0..dst {
                let s: f32 = t.of(o).iter().sum();
                assert!((s - 1.0).abs() < 1e-4, "{src}->{dst} at {o}: {s}");
                assert!(t.start[o] as usize + t.of(o).len() <= src);
            }
        }
    }

    /// Data-driven: broken frames of every kind are refused with an error naming them.
    #[test]
    fn broken_frames_are_errors_not_crashes() {
        let img = RgbImage::from_fn(32, 16, |x, y| image::Rgb([x as u8 * 8, y as u8 * 16, 77]));
        let jpeg = RawFrame::from_rgb(&img, RawFormat::Mjpeg).data;
        let mut garbage_body = jpeg.clone();
        for b in &mut garbage_body[20..jpeg.len() - 2] {
            *b = 0xAB;
        }
        // The same JPEG whose SOF header claims 65000x65000 (a 12 GB decode; libjpeg stops at 65500).
        let mut huge_header = jpeg.clone();
        let sof = huge_header
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("baseline SOF");
        huge_header[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
        let bigger = RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let bigger = RawFrame::from_rgb(&bigger, RawFormat::Mjpeg).data;
        let cases: Vec<(RawFormat, Vec<u8>, &str)> = vec![
            (
                RawFormat::Mjpeg,
                jpeg[..jpeg.len() / 2].to_vec(),
                "truncated",
            ),
            (RawFormat::Mjpeg, vec![0x12; 500], "no SOI/EOI"),
            (RawFormat::Mjpeg, vec![], "truncated"),
            (RawFormat::Mjpeg, garbage_body, "MJPEG frame 32x16"),
            (RawFormat::Mjpeg, huge_header, "header says 65000x65000"),
            (RawFormat::Mjpeg, bigger, "header says 64x64"),
            (RawFormat::Yuyv, vec![0; 32 * 16 * 2 - 1], "expected 1024"),
            (RawFormat::Nv12, vec![0; 10], "expected 768"),
            (RawFormat::Rgb, vec![0; 5], "expected 1536"),
            (RawFormat::Gray, vec![], "expected 512"),
        ];
        let spec = InputSpec {
            width: 8,
            height: 8,
            layout: crate::frame::preprocess::Layout::Nchw,
            normalization: crate::config::Preprocess::Raw.normalization(),
            resize: crate::config::ResizeMode::Stretch,
        };
        for (format, data, want) in cases {
            let f = RawFrame {
                format,
                width: 32,
                height: 16,
                data,
            };
            let e = f.prepare(&spec).expect_err(&format!("{format} {want}"));
            let msg = e.to_string();
            assert!(msg.contains(want), "{format}: {msg:?} lacks {want:?}");
            assert!(f.to_rgb().is_err(), "{format}: reference path accepted it");
        }
        let empty = RawFrame {
            format: RawFormat::Rgb,
            width: 0,
            height: 16,
            data: vec![],
        };
        assert_eq!(
            empty.prepare(&spec).unwrap_err().to_string(),
            "RGB3 frame 0x16: empty"
        );
    }
}
