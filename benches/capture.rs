//! Capture-side CPU per frame for 1280x720 MJPEG: the stream path (a program's stdout
//! through a real OS pipe, widened and read as the daemon reads it, and cut by the JPEG
//! framer; also with the kernel's default 64 KiB pipe) against what
//! the V4L2 path does with each MJPEG frame (copy the `bytesused` the driver filled out
//! of the mmap'd buffer into the frame's own vector, as the patched nokhwa backend does),
//! and the preparation into a 224x224 input both are followed by. CPU time of the
//! reading thread only (CLOCK_THREAD_CPUTIME_ID): the writer, which stands for the camera
//! program, is not ours.
//!
//!     cargo bench --bench capture            # the table in BENCHMARKS.md
//!     cargo bench --bench capture -- 600     # frames per case (default 300)

use std::io::Write;
use std::os::fd::AsRawFd;

use edgesight::capture::child::widen_pipe;
use edgesight::capture::framing::{Framer, Piece};
use edgesight::config::{Preprocess, ResizeMode};
use edgesight::frame::preprocess::{InputSpec, Layout};
use edgesight::frame::{RawFormat, RawFrame};

fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Camera-like 1280x720 JPEGs: a gradient scene with sensor noise, a few variants.
fn frames(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|k| {
            let mut seed = 0x2545_f491_u32 ^ k as u32;
            let img = image::RgbImage::from_fn(1280, 720, |x, y| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let noise = (seed % 24) as u8;
                image::Rgb([
                    (x / 5) as u8 ^ noise,
                    (y / 3) as u8 ^ noise,
                    ((x + y) / 8) as u8 ^ noise,
                ])
            });
            RawFrame::from_rgb(&img, RawFormat::Mjpeg).data
        })
        .collect()
}

/// The stream path: a writer thread (the camera program) writing `n` frames into a pipe
/// (widened as the daemon widens a camera program's stdout, or the kernel's 64 KiB), and
/// this thread reading and framing them. Our CPU per frame, and a few frames.
fn stream_path(jpegs: &[Vec<u8>], n: usize, wide: bool) -> (f64, Vec<RawFrame>) {
    let (rx, mut tx) = std::io::pipe().expect("pipe");
    if wide {
        widen_pipe(&rx);
    }
    let stream = jpegs.to_vec();
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            if tx.write_all(&stream[i % stream.len()]).is_err() {
                return;
            }
        }
    });
    let mut framer = Framer::jpeg();
    // Frames are dropped once handed on, as inference drops them; a few are kept for the
    // preparation below.
    let mut got = Vec::new();
    let mut count = 0;
    let t0 = thread_cpu_ns();
    while count < n {
        // As tokio's read_buf does: straight into the buffer's spare room, unzeroed.
        let buf = framer.buffer();
        let spare = buf.spare_capacity_mut();
        // SAFETY: read writes at most spare.len() bytes into memory we own; set_len
        // covers only what it wrote.
        let read = unsafe { libc::read(rx.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
        assert!(read > 0, "read: {}", std::io::Error::last_os_error());
        unsafe { buf.set_len(buf.len() + read as usize) };
        while let Some(p) = framer.next_piece() {
            match p {
                Piece::Frame(f) => {
                    count += 1;
                    if got.len() < jpegs.len() {
                        got.push(f);
                    }
                }
                Piece::Broken(b) => panic!("{b}"),
            }
        }
    }
    let ns = (thread_cpu_ns() - t0) as f64 / n as f64;
    writer.join().expect("writer");
    (ns, got)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let jpegs = frames(4);
    let avg = jpegs.iter().map(Vec::len).sum::<usize>() / jpegs.len();
    println!("1280x720 MJPEG, {avg} bytes a frame on average, {n} frames per case\n");
    let (stream_ns, got) = stream_path(&jpegs, n, true);
    let (narrow_ns, _) = stream_path(&jpegs, n, false);

    // The V4L2 path's per-frame work on an MJPEG buffer: copy out what the driver filled.
    let mmap = vec![0u8; 1280 * 720 * 2];
    let mmaps: Vec<Vec<u8>> = jpegs
        .iter()
        .map(|j| {
            let mut m = mmap.clone();
            m[..j.len()].copy_from_slice(j);
            m
        })
        .collect();
    let t0 = thread_cpu_ns();
    let mut copied = 0usize;
    for i in 0..n {
        let k = i % mmaps.len();
        let used = jpegs[k].len();
        let frame = std::hint::black_box(&mmaps[k])[..used].to_vec();
        copied += std::hint::black_box(frame).len();
    }
    let v4l2_ns = (thread_cpu_ns() - t0) as f64 / n as f64;
    std::hint::black_box(copied);

    // What follows both: the frame prepared for a 224x224 model.
    let spec = InputSpec {
        width: 224,
        height: 224,
        layout: Layout::Nchw,
        normalization: Preprocess::Torchvision.normalization(),
        resize: ResizeMode::CenterCrop,
    };
    let m = n.min(60);
    let t0 = thread_cpu_ns();
    for f in got.iter().cycle().take(m) {
        std::hint::black_box(f.prepare(&spec).expect("prepare"));
    }
    let prep_ns = (thread_cpu_ns() - t0) as f64 / m as f64;

    println!("| capture path | CPU per frame (reading thread) |");
    println!("|---|---|");
    println!(
        "| stream: pipe widened to 1 MiB (as the daemon does) + JPEG framer | {:.1} us |",
        stream_ns / 1e3
    );
    println!(
        "| stream: the kernel's default 64 KiB pipe + JPEG framer | {:.1} us |",
        narrow_ns / 1e3
    );
    println!(
        "| V4L2 MJPEG: copy of bytesused out of the buffer (DQBUF/QBUF ioctls not included) | {:.1} us |",
        v4l2_ns / 1e3
    );
    println!(
        "| then, either way: prepare for 224x224 (DCT-scaled decode, crop, normalise) | {:.2} ms |",
        prep_ns / 1e6
    );
}
