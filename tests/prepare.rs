//! Frame preparation: recorded raw frames of every pixel format, made from the fixture
//! samples, go through the same path as live frames (`RawFrame::prepare`) into the real
//! int8 fixture model; and the one-pass path stays close to the reference path (full
//! decode, then resize).

mod common;

use edgesight::config::{ModelSettings, Preprocess, Rect, ResizeMode};
use edgesight::frame::preprocess::{InputSpec, Layout};
use edgesight::frame::{Cut, FrameError, RawFormat, RawFrame};
use edgesight::model::Classifier;
use image::RgbImage;
use image::imageops::{self, FilterType};

fn classifier(resize: ResizeMode) -> Classifier {
    Classifier::load(&ModelSettings {
        name: "default".into(),
        path: common::fixture("models/shapes_int8_qlinear.onnx"),
        labels: Some(common::fixture("labels.txt")),
        preprocess: Preprocess::Torchvision,
        normalization: Preprocess::Torchvision.normalization(),
        resize,
        top_k: 1,
        threshold: 0.0,
        threads: 1,
    })
    .unwrap()
}

/// Every fixture sample as (class, image), blown up to `w` x `h` like a camera frame.
fn recorded(w: u32, h: u32) -> Vec<(String, RgbImage)> {
    let files =
        edgesight::capture::images::image_files(common::fixture("samples").to_str().unwrap())
            .unwrap();
    files
        .iter()
        .map(|f| {
            let img = image::open(f).unwrap().into_rgb8();
            (
                common::class_of(f),
                imageops::resize(&img, w, h, FilterType::Triangle),
            )
        })
        .collect()
}

/// Recorded frames of each format, classified through the live path. The stretch resize
/// undoes the blow-up; 4:2:x chroma subsampling and JPEG change pixels a little: every
/// colour frame must come out as its sample's class. GRAY drops colour, and the fixture
/// model was trained on colour shapes (a shape can have the luminance of its background),
/// so for GRAY the check is that the live path decides exactly as the reference path
/// (full conversion, then resize) on every frame, and most are still right (measured
/// 35/42; bound 32/42).
#[test]
fn recorded_frames_of_every_format_are_classified_as_their_sample() {
    let c = classifier(ResizeMode::Stretch);
    let frames = recorded(640, 480);
    let mut report = Vec::new();
    for format in RawFormat::ALL {
        let mut wrong = Vec::new();
        for (class, img) in &frames {
            let raw = RawFrame::from_rgb(img, format);
            let input = raw
                .prepare(c.input_spec())
                .unwrap_or_else(|e| panic!("{format}: {e}"));
            let (top, _) = c.classify_tensor(input).unwrap();
            if format == RawFormat::Gray {
                let (reference, _) = c.classify(&raw.to_rgb().unwrap()).unwrap();
                assert_eq!(top[0].label, reference[0].label, "GRAY {class}");
            }
            if top[0].label != *class {
                wrong.push(format!("{class} -> {}", top[0].label));
            }
        }
        let right = frames.len() - wrong.len();
        report.push(format!("{format}: {right}/{} right", frames.len()));
        if format == RawFormat::Gray {
            assert!(right >= 32, "GRAY: only {right} right: {wrong:?}");
        } else {
            assert!(wrong.is_empty(), "{format}: {wrong:?}");
        }
    }
    println!("{}", report.join("\n"));
}

/// Largest and mean |one-pass - reference| over a tensor, in 0..255 pixel units.
fn diff(spec: &InputSpec, raw: &RawFrame) -> (f32, f32) {
    let fast = raw.prepare(spec).unwrap();
    tensor_diff(&fast, &spec.tensor(&raw.to_rgb().unwrap()))
}

/// Data-driven closeness of the one-pass path to the reference path. RGB, BGR and GRAY use
/// the same filter weights and differ only in float summation order before the final
/// rounding: at most 1 level. YUYV and NV12 are filtered in YUV and converted once per
/// output pixel, where the reference converts each source pixel in integers (truncating):
/// at most 1 level, a fraction of a level on average. MJPEG decoded at 1/2-1/8 scale
/// averages 8x8 blocks in the DCT domain instead of filtering pixels: a few levels at
/// most, more at sharp edges (these frames are flat shapes with hard edges, the worst
/// case). Measured: RGB/BGR/GRAY 1 level max, mean < 0.001; YUYV/NV12 max 1, mean 0.13;
/// MJPEG max 4, mean 0.19.
#[test]
fn one_pass_preparation_stays_close_to_the_reference_path() {
    // format, frame size, input size, resize, max and mean bounds
    type Case = (RawFormat, (u32, u32), (u32, u32), ResizeMode, f32, f32);
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (RawFormat::Rgb, (640, 480), (224, 224), ResizeMode::Stretch, 1.0, 0.01),
        (RawFormat::Gray, (640, 480), (224, 224), ResizeMode::CenterCrop, 1.0, 0.01),
        (RawFormat::Bgr, (640, 360), (224, 224), ResizeMode::CenterCrop, 1.0, 0.01),
        (RawFormat::Yuyv, (1920, 1080), (224, 224), ResizeMode::CenterCrop, 1.0, 0.25),
        (RawFormat::Nv12, (1920, 1080), (224, 224), ResizeMode::Stretch, 1.0, 0.25),
        (RawFormat::I420, (1280, 720), (224, 224), ResizeMode::CenterCrop, 1.0, 0.25),
        (RawFormat::Yuyv, (160, 120), (224, 224), ResizeMode::Stretch, 1.0, 0.25),
        (RawFormat::Mjpeg, (640, 480), (64, 64), ResizeMode::Stretch, 12.0, 0.5),
        (RawFormat::Mjpeg, (1920, 1080), (224, 224), ResizeMode::CenterCrop, 12.0, 0.5),
        (RawFormat::Mjpeg, (320, 240), (224, 224), ResizeMode::Stretch, 2.0, 0.1),
    ];
    let samples = recorded(64, 64);
    for &(format, (w, h), (iw, ih), resize, max_bound, mean_bound) in cases {
        let spec = InputSpec {
            width: iw,
            height: ih,
            layout: Layout::Nhwc,
            normalization: Preprocess::Raw.normalization(),
            resize,
        };
        let diffs = samples.iter().step_by(6).map(|(_, img)| {
            let frame = imageops::resize(img, w, h, FilterType::Triangle);
            diff(&spec, &RawFrame::from_rgb(&frame, format))
        });
        let what = format!("{format} {w}x{h} -> {iw}x{ih} {resize:?}");
        assert_close(&what, diffs, max_bound, mean_bound);
    }
}

/// Broken frames on the live path: the inference stage drops and counts them and goes on
/// with the next frame; nothing panics. A frame past `max_age_ms` (2 s by default) is
/// never classified, only counted.
#[test]
fn truncated_and_garbage_mjpeg_frames_are_dropped_and_counted() {
    use edgesight::capture::{Frame, Slots};
    use edgesight::infer::{Context, Inference};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::{Instant, SystemTime};

    let dir = tempfile::tempdir().unwrap();
    let cfg = common::config_file(
        dir.path(),
        "127.0.0.1",
        1,
        "bad-frames",
        &common::samples_camera(5, false),
    );
    let settings = edgesight::config::Settings::load(&cfg).unwrap();
    let c = classifier(ResizeMode::Stretch);
    let (_, img) = &recorded(640, 480)[0];
    let good = RawFrame::from_rgb(img, RawFormat::Mjpeg);
    let mut truncated = good.clone();
    truncated.data.truncate(good.data.len() / 3);
    let mut garbage = good.clone();
    let n = garbage.data.len();
    garbage.data[2..n - 2].fill(0x5A);
    let mut short_yuyv = RawFrame::from_rgb(img, RawFormat::Yuyv);
    short_yuyv.data.truncate(1000);

    let stats = Arc::new(edgesight::stats::Stats::new(["front".to_string()]));
    let slots = Arc::new(Slots::new(1));
    // No broker behind the client: publishes queue (and then count as dropped).
    let (client, _eventloop) = edgesight::mqtt::client(&settings);
    let cancel = tokio_util::sync::CancellationToken::new();
    let ctx = Context {
        models: vec![Arc::new(c)],
        settings: Arc::new(settings),
        slots: slots.clone(),
        stats: stats.clone(),
        control: Arc::new(edgesight::stats::control::Control::new(1)),
        client,
        durable: None,
        folders: Default::default(),
    };
    std::thread::scope(|s| {
        let worker = s.spawn(|| Inference::new(ctx).run(&cancel));
        let old = Instant::now() - std::time::Duration::from_secs(3);
        let frames = [
            (good.clone(), Instant::now()),
            (truncated, Instant::now()),
            (garbage, Instant::now()),
            (short_yuyv, Instant::now()),
            (good.clone(), old),
            (good, Instant::now()),
        ];
        for (i, (raw, captured)) in frames.into_iter().enumerate() {
            slots.put(
                0,
                Frame {
                    raw,
                    captured_at: SystemTime::now(),
                    captured,
                    number: i as u64 + 1,
                    file: None,
                },
            );
            // Let inference take each frame before the next replaces it.
            let cs = stats.camera(0);
            while cs.classified.load(Ordering::Relaxed)
                + cs.bad_frames.load(Ordering::Relaxed)
                + cs.stale.load(Ordering::Relaxed)
                < i as u64 + 1
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        cancel.cancel();
        worker.join().unwrap();
    });
    let cs = stats.camera(0);
    assert_eq!(cs.classified.load(Ordering::Relaxed), 2);
    assert_eq!(cs.bad_frames.load(Ordering::Relaxed), 3);
    assert_eq!(cs.stale.load(Ordering::Relaxed), 1);
}

/// Raw frames made outside the crate: ffmpeg's `testsrc2` pattern (64x48, colour bars,
/// gradients, text), converted by ffmpeg from `pattern.png` into each raw format
/// (tests/fixtures/frames/; `ffmpeg -i pattern.png -pix_fmt FMT -f rawvideo pattern.FMT`,
/// ffmpeg 5.1, BT.601 limited range as cameras send). Each is read back by our own
/// conversion and compared, pixel by pixel, with the PNG's RGB (the grey one with its
/// BT.601 luma): a swapped U and V, a wrong plane order or a wrong range would move whole
/// colours, far past the chroma subsampling's blur at edges that the bounds allow.
#[test]
fn frames_converted_by_ffmpeg_read_back_as_their_colours() {
    let dir = common::fixture("frames");
    let png = image::open(dir.join("pattern.png")).unwrap().into_rgb8();
    let (w, h) = png.dimensions();
    let spec = InputSpec {
        width: w,
        height: h,
        layout: Layout::Nhwc,
        normalization: Preprocess::Raw.normalization(),
        resize: ResizeMode::Stretch,
    };
    let luma = |p: &image::Rgb<u8>| 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
    // file, format, mean and max |difference| allowed (levels of 255); measured (ffmpeg
    // 5.1): 0/0, 0.24/0.5, 0.75/43, 2.2/38, 2.2/38 (the max at colour edges, where
    // ffmpeg and we subsample and interpolate chroma differently).
    let cases = [
        ("pattern.bgr24", RawFormat::Bgr, 0.5, 1.0),
        ("pattern.gray", RawFormat::Gray, 0.5, 1.0),
        ("pattern.yuyv422", RawFormat::Yuyv, 1.5, 60.0),
        ("pattern.nv12", RawFormat::Nv12, 3.5, 60.0),
        ("pattern.yuv420p", RawFormat::I420, 3.5, 60.0),
    ];
    for (file, format, mean_bound, max_bound) in cases {
        let frame = RawFrame {
            format,
            width: w,
            height: h,
            data: std::fs::read(dir.join(file)).unwrap(),
        };
        let px = frame.prepare_pixels(&spec).unwrap();
        let (mut sum, mut max) = (0f32, 0f32);
        for (i, p) in png.pixels().enumerate() {
            for c in 0..3 {
                let want = if format == RawFormat::Gray {
                    luma(p)
                } else {
                    p[c] as f32
                };
                let d = (px.rgb[i * 3 + c] - want).abs();
                sum += d;
                max = max.max(d);
            }
        }
        let mean = sum / (w * h * 3) as f32;
        println!("{file}: mean {mean:.2}, max {max:.1}");
        assert!(
            mean <= mean_bound && max <= max_bound,
            "{file}: mean {mean:.2}, max {max:.1}"
        );
    }
}

/// `cols` x `rows` tiles of `tile` pixels, tile `k` (row-major) from `samples[k]`: a
/// camera looking at several things at once, each region's class known.
fn tiled(samples: &[&(String, RgbImage)], cols: u32, tile: (u32, u32)) -> RgbImage {
    let rows = (samples.len() as u32).div_ceil(cols);
    let mut frame = RgbImage::new(cols * tile.0, rows * tile.1);
    for (k, (_, img)) in samples.iter().enumerate() {
        let t = imageops::resize(img, tile.0, tile.1, FilterType::Triangle);
        let (x, y) = ((k as u32 % cols) * tile.0, (k as u32 / cols) * tile.1);
        imageops::replace(&mut frame, &t, x as i64, y as i64);
    }
    frame
}

/// The rectangle of tile `k` in [`tiled`]'s layout.
fn tile_rect(k: u32, cols: u32, tile: (u32, u32)) -> Rect {
    Rect {
        x: (k % cols) * tile.0,
        y: (k / cols) * tile.1,
        width: tile.0,
        height: tile.1,
    }
}

/// A 1080p frame of 4 x 2 tiles, each a different sample, in every colour format: the
/// eight regions cut from it in one pass (one MJPEG decode) are each classified as their
/// tile, in both resize modes; and a region takes no pixel from its neighbours (a tile's
/// class would change if it did: the samples' backgrounds differ).
#[test]
fn regions_of_a_tiled_frame_are_classified_as_their_tile() {
    let samples = recorded(64, 64);
    let mut by_class: Vec<&(String, RgbImage)> = Vec::new();
    for s in &samples {
        if by_class.iter().all(|(c, _)| *c != s.0) {
            by_class.push(s);
        }
    }
    let eight: Vec<_> = by_class.iter().cycle().take(8).copied().collect();
    let (cols, tile) = (4, (480, 540));
    let frame = tiled(&eight, cols, tile);
    for resize in [ResizeMode::Stretch, ResizeMode::CenterCrop] {
        let c = classifier(resize);
        for format in RawFormat::ALL.into_iter().filter(|f| *f != RawFormat::Gray) {
            let raw = RawFrame::from_rgb(&frame, format);
            let cuts: Vec<Cut> = (0..8)
                .map(|k| Cut {
                    rect: Some(tile_rect(k, cols, tile)),
                    spec: c.input_spec(),
                })
                .collect();
            let pixels = raw.prepare_cuts(&cuts).unwrap();
            for (k, px) in pixels.iter().enumerate() {
                let (top, _) = c.classify_tensor(px.tensor(c.input_spec())).unwrap();
                let want = &eight[k].0;
                assert_eq!(&top[0].label, want, "{format} {resize:?} region {k}");
            }
        }
    }
}

/// Data-driven: a region cut on the one-pass path stays as close to the reference path
/// (the whole frame converted, the region cropped, then resized) as whole frames do
/// (bounds as in `one_pass_preparation_stays_close_to_the_reference_path`), at odd offsets
/// and sizes too, and in MJPEG where the decode stops below the region. An MJPEG region's
/// edges fall on the DCT scale's grid (8/n pixels), so an edge row may blend part of a
/// block from outside the region.
#[test]
fn a_region_is_prepared_like_the_cropped_frame() {
    // format, frame size, region, input size, max and mean bounds
    type Case = (RawFormat, (u32, u32), [u32; 4], (u32, u32), f32, f32);
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (RawFormat::Rgb, (640, 480), [101, 37, 333, 211], (64, 64), 1.0, 0.01),
        (RawFormat::Bgr, (640, 480), [0, 0, 64, 64], (64, 64), 1.0, 0.01),
        (RawFormat::Gray, (640, 480), [1, 1, 639, 479], (224, 224), 1.0, 0.01),
        (RawFormat::Yuyv, (1920, 1080), [961, 541, 700, 400], (224, 224), 1.0, 0.25),
        (RawFormat::Nv12, (1920, 1080), [17, 3, 1001, 777], (224, 224), 1.0, 0.25),
        (RawFormat::I420, (1280, 720), [640, 360, 640, 360], (64, 64), 1.0, 0.25),
        // Decoded at 1/8: each pixel is an 8x8 block's mean (a box, where the reference's
        // triangle spans ~15 pixels), and the bottom edge (540) falls mid-block, so the
        // last row blends half a block of the tile below: max 28, mean 0.72-0.86.
        (RawFormat::Mjpeg, (1920, 1080), [960, 0, 960, 540], (64, 64), 32.0, 0.9),
        (RawFormat::Mjpeg, (1920, 1080), [100, 500, 300, 300], (224, 224), 12.0, 0.6),
        (RawFormat::Mjpeg, (640, 480), [3, 5, 101, 77], (64, 64), 12.0, 0.6),
    ];
    let samples = recorded(64, 64);
    for &(format, (w, h), [x, y, rw, rh], (iw, ih), max_bound, mean_bound) in cases {
        // Each sample's frame (blown up to as much as 1920x1080, encoded, decoded whole)
        // and its cropped reference, made once for both resize modes: this test alone
        // took 131 s on armv7 under qemu when each mode made its own.
        let frames: Vec<(RawFrame, RgbImage)> = samples
            .iter()
            .step_by(6)
            .map(|(_, img)| {
                let frame = imageops::resize(img, w, h, FilterType::Triangle);
                let raw = RawFrame::from_rgb(&frame, format);
                let whole = raw.to_rgb().unwrap();
                let crop = imageops::crop_imm(&whole, x, y, rw, rh).to_image();
                (raw, crop)
            })
            .collect();
        for resize in [ResizeMode::Stretch, ResizeMode::CenterCrop] {
            let spec = InputSpec {
                width: iw,
                height: ih,
                layout: Layout::Nhwc,
                normalization: Preprocess::Raw.normalization(),
                resize,
            };
            let rect = Rect {
                x,
                y,
                width: rw,
                height: rh,
            };
            let diffs = frames.iter().map(|(raw, crop)| {
                let cut = Cut {
                    rect: Some(rect),
                    spec: &spec,
                };
                let fast = raw.prepare_cuts(&[cut]).unwrap().remove(0).tensor(&spec);
                tensor_diff(&fast, &spec.tensor(crop))
            });
            let what = format!("{format} {w}x{h} {rect:?} -> {iw}x{ih} {resize:?}");
            assert_close(&what, diffs, max_bound, mean_bound);
        }
    }
}

/// A region the frame does not hold (past an edge, empty) is an error naming the frame
/// and the rectangle, in every format; never a panic or a read out of bounds.
#[test]
fn regions_outside_the_frame_are_errors() {
    let c = classifier(ResizeMode::Stretch);
    let img = &recorded(64, 48)[0].1;
    let bad = [
        [0, 0, 65, 48],
        [60, 0, 5, 5],
        [0, 47, 1, 2],
        [0, 0, 0, 10],
        [u32::MAX, 0, 2, 2],
        [0, u32::MAX - 1, 2, 2],
    ];
    for format in RawFormat::ALL {
        let raw = RawFrame::from_rgb(img, format);
        for [x, y, width, height] in bad {
            let rect = Rect {
                x,
                y,
                width,
                height,
            };
            let cut = Cut {
                rect: Some(rect),
                spec: c.input_spec(),
            };
            match raw.prepare_cuts(&[cut]) {
                Err(e @ FrameError::Outside { .. }) => {
                    assert!(e.to_string().contains("64x48"), "{e}")
                }
                other => panic!("{format} {rect:?}: {other:?}"),
            }
        }
    }
}

/// The worst of `diffs`' maxima and the mean of their means are within the bounds
/// (printed, for BENCHMARKS-style notes).
fn assert_close(what: &str, diffs: impl Iterator<Item = (f32, f32)>, max: f32, mean: f32) {
    let (mut worst, mut sum, mut n) = (0f32, 0f32, 0);
    for (m, avg) in diffs {
        worst = worst.max(m);
        sum += avg;
        n += 1;
    }
    let avg = sum / n.max(1) as f32;
    println!("{what}: max {worst:.2}, mean {avg:.3}");
    assert!(
        worst <= max && avg <= mean,
        "{what}: max {worst}, mean {avg}"
    );
}

/// Largest and mean |a - b| over two tensors of one shape.
fn tensor_diff(a: &tract_onnx::prelude::Tensor, b: &tract_onnx::prelude::Tensor) -> (f32, f32) {
    assert_eq!(a.shape(), b.shape());
    let a = a.to_plain_array_view::<f32>().unwrap();
    let b = b.to_plain_array_view::<f32>().unwrap();
    let d: Vec<f32> = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).collect();
    let max = d.iter().copied().fold(0.0, f32::max);
    (max, d.iter().sum::<f32>() / d.len() as f32)
}
