//! Regions: time per 1080p MJPEG frame for the whole frame against 1, 4 and 8 regions,
//! preparation alone and with the model, and the one-pass cut (one decode for every
//! region) against preparing each region on its own (one decode each). Side by side, one
//! run, one thread.
//!
//!     cargo bench --bench regions                       # the fixture model (64x64)
//!     cargo bench --bench regions -- 20 MODEL.onnx      # runs per case, another model
//!
//! The table is in BENCHMARKS.md.

use std::time::Instant;

use edgesight::config::{ModelSettings, Rect};
use edgesight::frame::{Cut, RawFormat, RawFrame};
use edgesight::model::Classifier;
use image::RgbImage;
use image::imageops::{self, FilterType};

/// The fixture samples tiled over a 1080p frame with sensor noise (what makes real MJPEG
/// frames expensive to entropy-decode), as in the `prepare` bench.
fn scene() -> RgbImage {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let samples = root.join("tests/fixtures/samples");
    let files = edgesight::capture::images::image_files(samples.to_str().unwrap_or_default())
        .expect("fixture samples");
    let tiles: Vec<RgbImage> = files
        .iter()
        .take(8)
        .map(|f| image::open(f).expect("sample").into_rgb8())
        .collect();
    let mosaic = RgbImage::from_fn(64 * 4, 64 * 2, |x, y| {
        *tiles[(y / 64 * 4 + x / 64) as usize].get_pixel(x % 64, y % 64)
    });
    let mut img = imageops::resize(&mosaic, 1920, 1080, FilterType::Triangle);
    let mut seed = 0x2545_f491_u32;
    for p in img.pixels_mut() {
        for c in p.0.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            *c = (*c as i32 + (seed % 17) as i32 - 8).clamp(0, 255) as u8;
        }
    }
    img
}

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// `n` regions of the 1080p frame: a quarter of it (1), its quarters (4), or 4 x 2 tiles
/// of 480x540 (8).
fn regions(n: u32) -> Vec<Rect> {
    let (cols, w, h) = match n {
        1 | 4 => (2, 960, 540),
        _ => (4, 480, 540),
    };
    (0..n)
        .map(|k| Rect {
            x: (k % cols) * w,
            y: (k / cols) * h,
            width: w,
            height: h,
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(30);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = args
        .iter()
        .find(|a| a.ends_with(".onnx"))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("tests/fixtures/models/shapes_int8_qlinear.onnx"));
    let classifier = Classifier::load(&ModelSettings::for_file(model.clone())).expect("model");
    let spec = classifier.input_spec();
    let raw = RawFrame::from_rgb(&scene(), RawFormat::Mjpeg);
    println!(
        "model {} ({}x{}), 1920x1080 MJPEG ({} bytes), {runs} runs, medians",
        model.display(),
        spec.width,
        spec.height,
        raw.data.len()
    );
    println!(
        "| regions | prepare, one pass ms | prepare, each alone ms | with the model ms | per region ms |"
    );
    println!("|---|---:|---:|---:|---:|");
    let cases: [(&str, Vec<Option<Rect>>); 4] = [
        ("whole frame", vec![None]),
        ("1", regions(1).into_iter().map(Some).collect()),
        ("4", regions(4).into_iter().map(Some).collect()),
        ("8", regions(8).into_iter().map(Some).collect()),
    ];
    for (name, rects) in cases {
        let cuts: Vec<Cut> = rects.iter().map(|&rect| Cut { rect, spec }).collect();
        let one_pass = median_ms(runs, || {
            std::hint::black_box(raw.prepare_cuts(&cuts).expect("prepares"));
        });
        let each = median_ms(runs, || {
            for c in &cuts {
                std::hint::black_box(raw.prepare_cuts(std::slice::from_ref(c)).expect("cut"));
            }
        });
        let full = median_ms(runs, || {
            for px in raw.prepare_cuts(&cuts).expect("prepares") {
                let probs = classifier.probabilities(px.tensor(spec)).expect("runs");
                std::hint::black_box(probs);
            }
        });
        println!(
            "| {name} | {one_pass:.2} | {each:.2} | {full:.2} | {:.2} |",
            full / cuts.len() as f64
        );
    }
}
