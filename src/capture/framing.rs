//! Cutting a byte stream into frames: JPEGs split on their markers (a program's MJPEG
//! stdout, an HTTP multipart body), or raw 4:2:0 frames of a fixed size.
//!
//! Pure and incremental: bytes are appended to the framer's buffer as they arrive, and
//! [`Framer::next_piece`] hands out each whole frame as the buffer's own allocation (the bytes
//! after it, at most one read, are what is copied), so a frame is never copied on its way
//! to inference. A JPEG is parsed marker by marker, segment lengths included, so an EOI
//! inside an EXIF thumbnail does not end the frame and multipart boundaries between frames
//! are skipped as what they are: bytes outside any JPEG. The buffer is bounded by the
//! largest frame accepted ([`MAX_JPEG`] or the raw frame size) plus one read.

use crate::frame::{RawFormat, RawFrame};

/// The largest JPEG accepted (a 4K frame at the highest quality is ~8 MiB). A longer one
/// is dropped and counted: a stream that never ends a frame cannot grow the buffer.
pub const MAX_JPEG: usize = 16 << 20;

/// The largest frame size accepted from a stream: a JPEG's header sets the size its frame
/// is decoded at, so a header past these (up to 65535x65535, 12 GB of RGB) is refused
/// before anything is decoded. 8192 per side, as the configuration allows, and 8K's area.
pub const MAX_SIDE: u32 = 8192;
pub const MAX_PIXELS: u64 = 7680 * 4320;

/// How much is read at a time (a pipe holds 64 KiB).
pub const READ_CHUNK: usize = 64 << 10;

/// What [`Framer::next_piece`] found.
#[derive(Debug, PartialEq)]
pub enum Piece {
    Frame(RawFrame),
    /// Bytes that looked like a frame and were not one; the framer has moved past them.
    Broken(Broken),
}

/// Why a piece of the stream was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("a JPEG cut short: a new frame started before its end marker")]
    Truncated,
    #[error("a JPEG with a damaged marker segment (byte {0:#04x} where a marker belongs)")]
    BadMarker(u8),
    #[error("a JPEG without a frame header (SOF) before its end")]
    NoFrameHeader,
    #[error("a JPEG longer than {} MiB", MAX_JPEG >> 20)]
    Oversized,
    #[error("a JPEG whose header says {0}x{1} (at most {MAX_SIDE} a side and 8K's area)")]
    BadSize(u32, u32),
    /// Ends the stream: whatever the source writes, it is not MJPEG.
    #[error("no JPEG start in the last {} MiB of the stream: is it MJPEG?", MAX_JPEG >> 20)]
    NotJpeg,
}

impl Broken {
    /// Whether the stream should be given up on (reopened) rather than read on.
    pub fn ends_stream(&self) -> bool {
        matches!(self, Broken::NotJpeg)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Looking for a start of image (FF D8 FF).
    Seek,
    /// At a marker, between segments.
    Marker,
    /// Inside entropy-coded data after a start of scan: the next marker ends it.
    Scan,
}

/// Cuts frames out of a stream; see the module comment.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Jpeg(Jpeg),
    Raw {
        format: RawFormat,
        width: u32,
        height: u32,
        len: usize,
    },
}

#[derive(Debug)]
struct Jpeg {
    state: State,
    /// Parse position in the buffer; in `Marker` and `Scan` the frame starts at 0 (in
    /// `Seek` nothing before the start marker is kept).
    pos: usize,
    /// The frame's size from its SOF segment.
    size: Option<(u32, u32)>,
    /// Bytes dropped while seeking since the last frame.
    skipped: usize,
    /// Length of the last frame: the next buffer is reserved at this size, so a frame's
    /// bytes are not moved while it arrives.
    last_len: usize,
}

impl Framer {
    pub fn jpeg() -> Framer {
        Framer {
            buf: Vec::with_capacity(READ_CHUNK * 2),
            kind: Kind::Jpeg(Jpeg {
                state: State::Seek,
                pos: 0,
                size: None,
                skipped: 0,
                last_len: 0,
            }),
        }
    }

    /// Raw frames of `format` (NV12 or I420), `width` x `height` (even).
    pub fn raw(format: RawFormat, width: u32, height: u32) -> Framer {
        // The 4:2:0 length, for a format given that has none (MJPEG is not raw).
        let px = width as usize * height as usize;
        let len = format.frame_len(width, height).unwrap_or(px + px / 2);
        Framer {
            buf: Vec::with_capacity(len + READ_CHUNK),
            kind: Kind::Raw {
                format,
                width,
                height,
                len,
            },
        }
    }

    /// The buffer to append what was read to, with room for one [`READ_CHUNK`] more.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        let want = match &self.kind {
            Kind::Jpeg(j) => j.last_len.max(READ_CHUNK),
            Kind::Raw { len, .. } => *len,
        };
        if self.buf.capacity() - self.buf.len() < READ_CHUNK {
            self.buf
                .reserve(READ_CHUNK.max(want.saturating_sub(self.buf.len())));
        }
        &mut self.buf
    }

    /// The next whole frame or broken piece, or `None` until more bytes arrive.
    pub fn next_piece(&mut self) -> Option<Piece> {
        match &mut self.kind {
            Kind::Raw {
                format,
                width,
                height,
                len,
            } => {
                if self.buf.len() < *len {
                    return None;
                }
                Some(Piece::Frame(RawFrame {
                    format: *format,
                    width: *width,
                    height: *height,
                    data: take_front(&mut self.buf, *len, *len + READ_CHUNK),
                }))
            }
            Kind::Jpeg(j) => j.next(&mut self.buf),
        }
    }

    /// Bytes buffered and not yet handed out (for tests and the bound).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// The first `n` bytes of `buf` as their own vector without copying them: the rest moves
/// to a new buffer of `capacity` (at least its length).
fn take_front(buf: &mut Vec<u8>, n: usize, capacity: usize) -> Vec<u8> {
    let mut rest = Vec::with_capacity(capacity.max(buf.len() - n));
    rest.extend_from_slice(&buf[n..]);
    buf.truncate(n);
    std::mem::replace(buf, rest)
}

/// Start-of-frame markers that carry the frame's size (all SOFn but DHT, JPG and DAC).
fn is_sof(m: u8) -> bool {
    matches!(m, 0xC0..=0xCF) && !matches!(m, 0xC4 | 0xC8 | 0xCC)
}

/// What one parsing step of a JPEG stream came to.
enum Step {
    /// Parse on.
    Go,
    /// More bytes are needed.
    Wait,
    Out(Piece),
}

impl Jpeg {
    fn next(&mut self, buf: &mut Vec<u8>) -> Option<Piece> {
        loop {
            if self.state != State::Seek && self.pos > MAX_JPEG {
                return Some(self.resync(buf, self.pos.min(buf.len()), Broken::Oversized));
            }
            let step = match self.state {
                State::Seek => self.seek(buf),
                State::Marker => self.marker(buf),
                State::Scan => self.scan(buf),
            };
            match step {
                Step::Go => {}
                Step::Wait => return None,
                Step::Out(piece) => return Some(piece),
            }
        }
    }

    /// Drop what comes before the next start of image.
    fn seek(&mut self, buf: &mut Vec<u8>) -> Step {
        let Some(at) = memchr::memmem::find(buf, &[0xFF, 0xD8, 0xFF]) else {
            // Keep the last two bytes: they may be the start of a marker.
            let drop = buf.len().saturating_sub(2);
            self.skipped += drop;
            buf.drain(..drop);
            if self.skipped > MAX_JPEG {
                self.skipped = 0;
                return Step::Out(Piece::Broken(Broken::NotJpeg));
            }
            return Step::Wait;
        };
        self.skipped += at;
        buf.drain(..at);
        self.pos = 2;
        self.size = None;
        self.state = State::Marker;
        Step::Go
    }

    /// The marker at `pos`: the end of the frame, or a segment to step over.
    fn marker(&mut self, buf: &mut Vec<u8>) -> Step {
        let Some(&[ff, m]) = buf.get(self.pos..self.pos + 2) else {
            return Step::Wait;
        };
        if ff != 0xFF {
            return Step::Out(self.resync(buf, 1, Broken::BadMarker(ff)));
        }
        match m {
            0xFF => self.pos += 1, // fill byte
            0xD9 => return Step::Out(self.frame(buf)),
            // A new frame began: the one before was cut short.
            0xD8 => return Step::Out(self.resync(buf, self.pos, Broken::Truncated)),
            0x01 | 0xD0..=0xD7 => self.pos += 2,
            _ => {
                let Some(seg) = buf.get(self.pos + 2..self.pos + 4) else {
                    return Step::Wait;
                };
                let len = u16::from_be_bytes([seg[0], seg[1]]) as usize;
                if len < 2 {
                    return Step::Out(self.resync(buf, 1, Broken::BadMarker(m)));
                }
                if is_sof(m) {
                    // SOF: length, precision, height, width.
                    let Some(h) = buf.get(self.pos + 5..self.pos + 9) else {
                        return Step::Wait;
                    };
                    let height = u16::from_be_bytes([h[0], h[1]]) as u32;
                    let width = u16::from_be_bytes([h[2], h[3]]) as u32;
                    if width == 0
                        || height == 0
                        || width.max(height) > MAX_SIDE
                        || width as u64 * height as u64 > MAX_PIXELS
                    {
                        let why = Broken::BadSize(width, height);
                        return Step::Out(self.resync(buf, 1, why));
                    }
                    self.size = Some((width, height));
                }
                self.pos += 2 + len;
                if m == 0xDA {
                    self.state = State::Scan;
                }
            }
        }
        Step::Go
    }

    /// Entropy-coded data: on to the next marker that is not part of it.
    fn scan(&mut self, buf: &mut [u8]) -> Step {
        let rest = buf.get(self.pos..).unwrap_or_default();
        let Some(i) = memchr::memchr(0xFF, rest) else {
            self.pos = self.pos.max(buf.len());
            return Step::Wait;
        };
        let at = self.pos + i;
        let Some(&next) = buf.get(at + 1) else {
            self.pos = at;
            return Step::Wait;
        };
        match next {
            // Stuffed 0xFF, restart markers, fill: still the scan.
            0x00 | 0xD0..=0xD7 => self.pos = at + 2,
            0xFF => self.pos = at + 1,
            _ => {
                self.pos = at;
                self.state = State::Marker;
            }
        }
        Step::Go
    }

    /// The frame ending at the EOI at `pos`.
    fn frame(&mut self, buf: &mut Vec<u8>) -> Piece {
        let end = self.pos + 2;
        self.state = State::Seek;
        self.pos = 0;
        self.skipped = 0;
        let Some((width, height)) = self.size.take() else {
            buf.drain(..end);
            return Piece::Broken(Broken::NoFrameHeader);
        };
        self.last_len = end;
        Piece::Frame(RawFrame {
            format: RawFormat::Mjpeg,
            width,
            height,
            data: take_front(buf, end, end + READ_CHUNK),
        })
    }

    /// Drop the first `n` bytes (at least the start marker of the broken frame) and look
    /// for the next frame.
    fn resync(&mut self, buf: &mut Vec<u8>, n: usize, why: Broken) -> Piece {
        buf.drain(..n.min(buf.len()));
        self.state = State::Seek;
        self.pos = 0;
        self.size = None;
        Piece::Broken(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small real JPEG of `w` x `h` (the image crate's encoder).
    fn jpeg(w: u32, h: u32, shade: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([shade, (x * 7) as u8, (y * 13) as u8])
        });
        RawFrame::from_rgb(&img, RawFormat::Mjpeg).data
    }

    /// `jpeg` with an APP1 segment holding a whole thumbnail JPEG (its own SOI and EOI),
    /// as cameras write EXIF.
    fn with_thumbnail(j: &[u8]) -> Vec<u8> {
        let thumb = jpeg(8, 8, 1);
        let len = (thumb.len() + 2 + 6) as u16;
        let mut out = j[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(b"Exif\0\0");
        out.extend_from_slice(&thumb);
        out.extend_from_slice(&j[2..]);
        out
    }

    /// Feed `stream` in pieces of `chunk` bytes; every piece out, in order.
    fn run(stream: &[u8], chunk: usize) -> Vec<Result<(u32, u32, usize), Broken>> {
        let mut f = Framer::jpeg();
        let mut out = Vec::new();
        for c in stream.chunks(chunk) {
            f.buffer().extend_from_slice(c);
            while let Some(p) = f.next_piece() {
                out.push(match p {
                    Piece::Frame(r) => Ok((r.width, r.height, r.data.len())),
                    Piece::Broken(b) => Err(b),
                });
            }
            assert!(f.buffered() <= MAX_JPEG + 2 * READ_CHUNK);
        }
        out
    }

    /// Data-driven: each stream, fed whole and in pieces of every awkward size, gives the
    /// frames and the broken pieces listed.
    #[test]
    fn streams_split_into_their_frames() {
        let (a, b) = (jpeg(32, 24, 10), jpeg(16, 48, 200));
        let exif = with_thumbnail(&a);
        let cat = |parts: &[&[u8]]| parts.concat();
        let boundary = b"\r\n--frame\r\nContent-Type: image/jpeg\r\nContent-Length: 1234\r\n\r\n";
        // Cut inside the scan (a cut in a header segment may swallow the next frame).
        let cut = &a[..a.len() - 10];
        // The second segment's marker (after APP0) loses its 0xFF.
        let mut bad_marker = b.clone();
        let second = 4 + u16::from_be_bytes([b[4], b[5]]) as usize;
        bad_marker[second] = 0x12;
        let mut huge = b.clone();
        let sof = b.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        huge[sof + 5..sof + 9].copy_from_slice(&[0xFF; 4]);
        type Case<'a> = (&'a str, Vec<u8>, Vec<Result<(u32, u32, usize), Broken>>);
        let cases: Vec<Case> = vec![
            (
                "two frames",
                cat(&[&a, &b]),
                vec![Ok((32, 24, a.len())), Ok((16, 48, b.len()))],
            ),
            (
                "multipart boundaries between them",
                cat(&[boundary, &a, boundary, &b, boundary]),
                vec![Ok((32, 24, a.len())), Ok((16, 48, b.len()))],
            ),
            (
                "an EXIF thumbnail's end marker does not end the frame",
                cat(&[&exif, &b]),
                vec![Ok((32, 24, exif.len())), Ok((16, 48, b.len()))],
            ),
            (
                "a frame cut short, then a whole one",
                cat(&[cut, &b]),
                vec![Err(Broken::Truncated), Ok((16, 48, b.len()))],
            ),
            (
                "garbage between frames",
                cat(&[&a, b"junk\xFF\x00\xFF\xD8", &b]),
                vec![
                    Ok((32, 24, a.len())),
                    Err(Broken::Truncated),
                    Ok((16, 48, b.len())),
                ],
            ),
            (
                "a damaged segment marker, then a whole frame",
                cat(&[&bad_marker, &a]),
                vec![Err(Broken::BadMarker(0x12)), Ok((32, 24, a.len()))],
            ),
            (
                "a header claiming 65535x65535",
                cat(&[&huge, &a]),
                vec![Err(Broken::BadSize(65535, 65535)), Ok((32, 24, a.len()))],
            ),
            (
                "SOI and EOI alone",
                cat(&[b"\xFF\xD8\xFF\xD9", &a]),
                vec![Err(Broken::NoFrameHeader), Ok((32, 24, a.len()))],
            ),
        ];
        for (what, stream, want) in cases {
            for chunk in [stream.len(), 1, 2, 3, 7, 100] {
                assert_eq!(run(&stream, chunk), want, "{what}, in pieces of {chunk}");
            }
        }
    }

    #[test]
    fn frames_are_the_jpegs_themselves_and_decode() {
        let a = jpeg(32, 24, 10);
        let mut f = Framer::jpeg();
        f.buffer().extend_from_slice(&[&a[..], &a[..]].concat());
        for _ in 0..2 {
            let Some(Piece::Frame(r)) = f.next_piece() else {
                panic!("a frame")
            };
            assert_eq!(r.data, a);
            r.check().expect("a whole frame passes the frame checks");
        }
        assert_eq!(f.next_piece(), None);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn a_stream_that_never_ends_a_frame_or_never_starts_one_stays_bounded() {
        // A start marker and a scan that never ends.
        let mut f = Framer::jpeg();
        let a = jpeg(32, 24, 10);
        let sos = a.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        f.buffer().extend_from_slice(&a[..sos + 14]);
        let mut broken = Vec::new();
        for _ in 0..(MAX_JPEG / READ_CHUNK + 4) {
            f.buffer().extend_from_slice(&[0x55; READ_CHUNK]);
            broken.extend(std::iter::from_fn(|| f.next_piece()));
            assert!(f.buffered() <= MAX_JPEG + 2 * READ_CHUNK);
        }
        assert_eq!(broken, vec![Piece::Broken(Broken::Oversized)]);
        // Text where MJPEG was expected: said once per MAX_JPEG, and nothing kept.
        let mut f = Framer::jpeg();
        let mut said = 0;
        for _ in 0..(MAX_JPEG / READ_CHUNK + 4) {
            f.buffer().extend_from_slice(&[b'x'; READ_CHUNK]);
            while let Some(p) = f.next_piece() {
                assert_eq!(p, Piece::Broken(Broken::NotJpeg));
                assert!(Broken::NotJpeg.ends_stream());
                said += 1;
            }
            assert!(f.buffered() <= 2);
        }
        assert_eq!(said, 1);
    }

    #[test]
    fn raw_frames_are_cut_at_their_size() {
        let mut f = Framer::raw(RawFormat::Nv12, 4, 2);
        f.buffer().extend_from_slice(&(0..30).collect::<Vec<u8>>());
        let Some(Piece::Frame(r)) = f.next_piece() else {
            panic!("a frame")
        };
        assert_eq!((r.format, r.width, r.height), (RawFormat::Nv12, 4, 2));
        assert_eq!(r.data, (0..12).collect::<Vec<u8>>());
        let Some(Piece::Frame(r)) = f.next_piece() else {
            panic!("a second frame")
        };
        assert_eq!(r.data, (12..24).collect::<Vec<u8>>());
        assert_eq!(f.next_piece(), None);
        assert_eq!(f.buffered(), 6);
    }
}
