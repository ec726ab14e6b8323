//! `edgesight bench`: how fast a model runs on this machine, as one JSON object. The
//! side-by-side comparison with onnxruntime (tools/bench_models.py) feeds it the same
//! input tensor and reads the model's output back from the JSON.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tract_onnx::prelude::*;

use crate::config::ModelSettings;
use crate::model::{Classifier, Kernels};
use crate::util::{peak_rss_mb, round3};

/// `edgesight bench`'s options (parsed by clap in main.rs).
#[derive(Debug, clap::Args)]
pub struct BenchOptions {
    #[arg(long)]
    pub model: PathBuf,
    /// Threads for the matrix products.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// The model's input as raw little-endian f32 in the model's input layout (default: a
    /// synthetic test card, colour gradients, prepared like a camera frame).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Include the model's raw output vector (for comparison with another runtime).
    #[arg(long)]
    pub outputs: bool,
    /// Include time per operator type.
    #[arg(long)]
    pub profile: bool,
    /// Run the model as tract alone would (no int8 rewrites), for comparison.
    #[arg(long)]
    pub no_int8_rewrites: bool,
    /// Which int8 conv kernel runs: "best" (what the daemon uses), "tract" (tract's own
    /// convolutions), or one this CPU has (portable, the slow reference; avx512vnni, neon,
    /// neondot, amx).
    #[arg(long, default_value = "best")]
    pub int8_kernel: String,
    /// Which f32 conv kernel runs (fp32 models): "best", "tract", or one this CPU has
    /// (portable; avx512).
    #[arg(long, default_value = "best")]
    pub f32_kernel: String,
}

pub fn bench(opts: &BenchOptions) -> Result<Value> {
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if !(1..=64).contains(&opts.threads) {
        bail!("--threads {}: out of range 1..=64", opts.threads);
    }
    let settings = ModelSettings {
        threads: opts.threads,
        ..ModelSettings::for_file(opts.model.clone())
    };
    let kernels = kernels_named(opts)?;
    let classifier = Classifier::load_with_kernel(&settings, !opts.no_int8_rewrites, kernels)?;
    let spec = *classifier.input_spec();
    let input = match &opts.input {
        Some(path) => input_file(path, &spec.shape())?,
        None => spec.normalize(&test_card(spec.width, spec.height)),
    };

    for _ in 0..opts.warmup {
        classifier.raw_scores(input.clone())?;
    }
    let mut times = Vec::with_capacity(opts.runs);
    let mut output = Vec::new();
    for _ in 0..opts.runs {
        let t0 = Instant::now();
        output = classifier.raw_scores(input.clone())?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let top1 = (0..output.len()).max_by(|a, b| output[*a].total_cmp(&output[*b]));
    let timing = classifier.timing();
    let mut v = json!({
        "model": opts.model.display().to_string(),
        "threads": opts.threads,
        "runs": opts.runs,
        "load_ms": round3(timing.load_ms),
        "optimize_ms": round3(timing.optimize_ms),
        "median_ms": round3(median(&times)),
        "min_ms": round3(times[0]),
        "mean_ms": round3(times.iter().sum::<f64>() / times.len() as f64),
        "rss_mb": peak_rss_mb(),
        "int8_rewrites": classifier.int8_rewrites(),
        "int8_kernel": kernel_name(kernels.int8),
        "f32_kernel": kernel_name(kernels.f32),
        "top1": top1,
    });
    if opts.outputs {
        v["output"] = json!(output);
    }
    if opts.profile {
        let runs = opts.runs.min(10);
        let profile = classifier.profile(&input, runs)?;
        let total: f64 = profile.iter().map(|p| p.1).sum();
        v["profile"] = profile
            .into_iter()
            .map(|(op, ms, n)| {
                json!({"op": op, "ms": round3(ms / runs as f64), "nodes": n / runs,
                       "share": round3(ms / total)})
            })
            .collect();
    }
    Ok(v)
}

/// `--int8-kernel` and `--f32-kernel`: each best, tract (none of ours) or one this CPU
/// has.
fn kernels_named(opts: &BenchOptions) -> Result<Kernels> {
    if opts.no_int8_rewrites {
        return Ok(Kernels::tract());
    }
    Ok(Kernels {
        int8: named(
            "--int8-kernel",
            &opts.int8_kernel,
            crate::model::int8::qconv::Kernel::available(),
        )?,
        f32: named(
            "--f32-kernel",
            &opts.f32_kernel,
            crate::model::fconv::Kernel::available(),
        )?,
    })
}

/// The kernel `name` picks from `available` (the fastest last; the first is the
/// portable reference, which "best" never picks).
fn named<K: std::fmt::Debug + Copy>(
    flag: &str,
    name: &str,
    available: Vec<K>,
) -> Result<Option<K>> {
    let names: Vec<String> = available
        .iter()
        .map(|k| format!("{k:?}").to_lowercase())
        .collect();
    Ok(match name {
        "best" => available.get(1..).and_then(|v| v.last()).copied(),
        "tract" => None,
        name => {
            let Some(i) = names.iter().position(|n| n == name) else {
                bail!(
                    "{flag} {name}: this CPU has best, tract, {}",
                    names.join(", ")
                );
            };
            Some(available[i])
        }
    })
}

/// The name a kernel choice is reported by.
fn kernel_name<K: std::fmt::Debug>(k: Option<K>) -> String {
    k.map(|k| format!("{k:?}").to_lowercase())
        .unwrap_or("tract".into())
}

/// `--input`: the model's input as raw little-endian f32 (the size must match).
fn input_file(path: &Path, shape: &[usize]) -> Result<Tensor> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("input file {}: cannot read", path.display()))?;
    let want: usize = shape.iter().product::<usize>() * 4;
    if bytes.len() != want {
        bail!(
            "input file {}: {} bytes, but the model's input {shape:?} as f32 is {want}",
            path.display(),
            bytes.len()
        );
    }
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(tract_ndarray::ArrayD::from_shape_vec(shape.to_vec(), values)?.into_tensor())
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// A deterministic, non-trivial image: smooth colour gradients with a checker overlay.
fn test_card(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        let check = if (x / 16 + y / 16) % 2 == 0 { 40 } else { 0 };
        image::Rgb([
            ((x * 255 / width.max(1)) as u8).saturating_add(check),
            ((y * 255 / height.max(1)) as u8).saturating_add(check),
            (((x + y) * 127 / (width + height).max(1)) as u8).saturating_add(check),
        ])
    })
}
