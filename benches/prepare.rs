//! Per-frame preparation time, one-pass (`RawFrame::prepare`) against the naive path
//! (decode the whole frame to RGB, then resize, then normalise), side by side in one run,
//! for every pixel format at 640x480 and 1920x1080 into a 224x224 input.
//!
//!     cargo bench --bench prepare            # the table in BENCHMARKS.md
//!     cargo bench --bench prepare -- 20      # runs per case (default 30)

mod common;

use common::{median_ms, scene};
use edgesight::config::{Preprocess, ResizeMode};
use edgesight::frame::preprocess::{InputSpec, Layout};
use edgesight::frame::{RawFormat, RawFrame};

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
        let img = scene(w, h, 4, 3);
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
