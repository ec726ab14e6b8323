//! Regions: time per 1080p MJPEG frame for the whole frame against 1, 4 and 8 regions,
//! preparation alone and with the model, and the one-pass cut (one decode for every
//! region) against preparing each region on its own (one decode each). Side by side, one
//! run, one thread.
//!
//!     cargo bench --bench regions                       # the fixture model (64x64)
//!     cargo bench --bench regions -- 20 MODEL.onnx      # runs per case, another model
//!
//! The table is in BENCHMARKS.md.

mod common;

use common::{median_ms, scene};
use edgesight::config::{ModelSettings, Rect};
use edgesight::frame::{Cut, RawFormat, RawFrame};
use edgesight::model::Classifier;

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
    let raw = RawFrame::from_rgb(&scene(1920, 1080, 4, 2), RawFormat::Mjpeg);
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
