//! What the benches share: a camera-like test scene and a median timer.

use std::time::Instant;

use image::RgbImage;
use image::imageops::{self, FilterType};

/// A camera-like `w` x `h` scene: `cols` x `rows` fixture samples tiled and blown up, plus
/// sensor noise (which is what makes real MJPEG frames expensive to entropy-decode).
pub fn scene(w: u32, h: u32, cols: u32, rows: u32) -> RgbImage {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let samples = root.join("tests/fixtures/samples");
    let files = edgesight::capture::images::image_files(samples.to_str().unwrap_or_default())
        .expect("fixture samples");
    let tiles: Vec<RgbImage> = files
        .iter()
        .take((cols * rows) as usize)
        .map(|f| image::open(f).expect("sample").into_rgb8())
        .collect();
    let mosaic = RgbImage::from_fn(64 * cols, 64 * rows, |x, y| {
        *tiles[(y / 64 * cols + x / 64) as usize].get_pixel(x % 64, y % 64)
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

/// The median of `runs` timings of `f` in ms, after one warm-up run.
pub fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
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
