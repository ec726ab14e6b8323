//! Per-frame preparation time, one-pass (`RawFrame::prepare`) against the naive path
//! (decode the whole frame to RGB, then resize, then normalise), side by side in one run,
//! for every pixel format at 640x480 and 1920x1080 into a 224x224 input.
//!
//!     cargo bench --bench prepare            # the table in BENCHMARKS.md
//!     cargo bench --bench prepare -- 20      # runs per case (default 30)

use std::time::Instant;

use edgesight::config::{Preprocess, ResizeMode};
use edgesight::frame::preprocess::{InputSpec, Layout};
use edgesight::frame::{RawFormat, RawFrame};
use image::RgbImage;
use image::imageops::{self, FilterType};

/// A camera-like scene: the fixture samples tiled and blown up, plus sensor noise (which
/// is what makes real MJPEG frames expensive to entropy-decode).
fn scene(w: u32, h: u32) -> RgbImage {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = edgesight::capture::images::image_files(
        root.join("tests/fixtures/samples")
            .to_str()
            .unwrap_or_default(),
    )
    .expect("fixture samples");
    let tiles: Vec<RgbImage> = files
        .iter()
        .take(12)
        .map(|f| image::open(f).expect("sample").into_rgb8())
        .collect();
    let mosaic = RgbImage::from_fn(64 * 4, 64 * 3, |x, y| {
        *tiles[(y / 64 * 4 + x / 64) as usize].get_pixel(x % 64, y % 64)
    });
    let mut img = imageops::resize(&mosaic, w, h, FilterType::Triangle);
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

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    let spec = InputSpec {
        width: 224,
        height: 224,
        layout: Layout::Nchw,
        normalization: Preprocess::Torchvision.normalization(),
        resize: ResizeMode::CenterCrop,
    };
    println!("| frame | format | bytes | naive ms | one-pass ms | speed-up |");
    println!("|---|---|---:|---:|---:|---:|");
    for (w, h) in [(640, 480), (1920, 1080)] {
        let img = scene(w, h);
        for format in RawFormat::ALL {
            let raw = RawFrame::from_rgb(&img, format);
            let naive = median_ms(runs, || {
                let rgb = raw.to_rgb().expect("decodes");
                std::hint::black_box(spec.tensor(&rgb));
            });
            let ours = median_ms(runs, || {
                std::hint::black_box(raw.prepare(&spec).expect("prepares"));
            });
            println!(
                "| {w}x{h} | {format} | {} | {naive:.2} | {ours:.2} | {:.1}x |",
                raw.data.len(),
                naive / ours
            );
        }
    }
}
