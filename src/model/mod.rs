//! The classifier: an ONNX image classifier (fp32 or int8) loaded and optimised once by
//! tract, its input geometry read from the model itself, and its labels.
//!
//! * [`int8`]: the int8 rewrites (protobuf, typed graph) and edgesight's own int8
//!   convolution.
//! * [`check`]: the ONNX graph's attributes checked before anything reads them.
//! * [`passes`], [`proto_fixes`]: workarounds for tract bugs, in its optimiser and in the
//!   file before tract reads it.
//! * [`bench`]: `edgesight bench`.
//!
//! May use: config, util, frame (the input geometry). No tokio, rumqttc or nokhwa.

pub mod bench;
pub mod check;
mod conv_geo;
mod cpu;
pub mod fconv;
mod graph;
pub mod int8;
mod onnx_graph;
pub mod passes;
pub mod pool;
pub mod proto_fixes;
mod threads;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use image::RgbImage;
use serde::Serialize;
use tract_core::internal::tract_linalg::multithread::{self, Executor};
use tract_onnx::prelude::*;

use crate::model::int8::onnx_quant::QuantizeScales;
use crate::model::passes::ChangeAxes;
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::internal::DimLike;

use crate::config::ModelSettings;
use crate::frame::preprocess::{InputSpec, Layout};

/// One entry of a classification's `top` list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub label: String,
    pub class: usize,
    pub score: f32,
}

/// A loaded, optimised, ready-to-run model. Immutable, so one instance serves every camera.
pub struct Classifier {
    plan: Arc<TypedSimplePlan>,
    spec: InputSpec,
    labels: Vec<String>,
    /// The graph ends in Softmax: outputs are already probabilities.
    outputs_probabilities: bool,
    output_shape: Vec<usize>,
    top_k: usize,
    threshold: f32,
    file_name: String,
    path: PathBuf,
    timing: LoadTiming,
    int8: Int8Rewrites,
    /// Whether tract's layout pass ran or failed on this graph and was left out.
    change_axes: ChangeAxes,
    /// No quantised operator in the file.
    float: bool,
    /// The thread pool for this model's matrix products (None: the calling thread).
    executor: Option<Executor>,
}

/// Which of edgesight's own conv kernels a model's convs run on (`None`: tract's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    pub int8: Option<crate::model::int8::qconv::Kernel>,
    pub f32: Option<crate::model::fconv::Kernel>,
}

impl Kernels {
    /// The fastest this CPU has: what the daemon uses.
    pub fn best() -> Kernels {
        Kernels {
            int8: crate::model::int8::qconv::Kernel::best(),
            f32: crate::model::fconv::Kernel::best(),
        }
    }

    /// tract's own convolutions everywhere.
    pub fn tract() -> Kernels {
        Kernels {
            int8: None,
            f32: None,
        }
    }
}

/// Start-up cost of a model: parsing the file, then optimising it into a plan.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LoadTiming {
    pub load_ms: f64,
    pub optimize_ms: f64,
}

/// What [`crate::model::int8`] changed in the graph to keep it on integer kernels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Int8Rewrites {
    /// QDQ convolutions and com.microsoft ops rewritten before parsing.
    #[serde(flatten)]
    pub proto: crate::model::int8::onnx_quant::ProtoRewrites,
    /// Quantised convolutions run by edgesight's own int8 kernel ([`crate::model::int8::qconv`]).
    pub int8_convs: usize,
    /// Quantised depthwise convolutions run exactly on tract's float depthwise kernel
    /// ([`crate::model::int8::depthwise`]).
    pub depthwise_convs: usize,
    /// Per-channel weight zero points turned into scalars.
    pub scalar_zero_points: usize,
    /// Per-channel requantisation chains fused into one op.
    pub fused_requant: usize,
    /// Residual adds (dequantise, add, ReLU, quantise) fused into one integer pass.
    pub fused_adds: usize,
    /// Of those, the ones fused further into the conv producing one of their inputs
    /// ([`crate::model::int8::qconv::fuse_conv_adds`]).
    pub conv_adds: usize,
    /// Convs that pack their output straight into the next conv's input
    /// ([`crate::model::int8::qconv::fuse_handoffs`]).
    pub conv_handoffs: usize,
    /// Max pools moved before their dequantisation, onto the integers
    /// ([`crate::model::int8::pool_quantized`]).
    pub int_pools: usize,
    /// Float residual adds (dequantise, add to the f32 skip, ReLU; quantise for the next
    /// block) fused into one pass with two outputs.
    pub residual_adds: usize,
    /// Chains of element-wise ops from an 8-bit tensor to an 8-bit tensor (a Keras
    /// BatchNorm, quantised op by op) replaced by a per-channel table
    /// ([`crate::model::int8::tables`]).
    pub channel_tables: usize,
    /// f32 -> int8 quantisations replaced by a vectorised equivalent.
    pub fast_quantize: usize,
    /// Weight computations done once at load instead of every run ([`passes::fold_weights`]).
    pub folded_weights: usize,
    /// f32 convolutions run by edgesight's own f32 kernel ([`crate::model::fconv`]).
    pub f32_convs: usize,
    /// Residual adds and ReLUs fused into those ([`crate::model::fconv::fuse_epilogues`]).
    pub f32_fused: usize,
    /// f32 max pools run by edgesight's own pool ([`crate::model::pool::own_float_pools`]).
    pub float_pools: usize,
}

impl std::fmt::Display for Int8Rewrites {
    /// What fired, for the start-up log line: "rewrites: 53 QDQ convs, ..." or
    /// "no rewrites (tract as is)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            (self.proto.qdq_convs, "QDQ convs -> QLinearConv"),
            (self.proto.contrib_ops, "com.microsoft ops expanded"),
            (self.int8_convs, "convs on edgesight's int8 kernel"),
            (
                self.depthwise_convs,
                "depthwise convs on the exact float path",
            ),
            (self.scalar_zero_points, "zero points made scalar"),
            (self.fused_requant, "requantisations fused"),
            (self.fused_adds, "residual adds fused"),
            (self.conv_adds, "of them into their convs"),
            (self.conv_handoffs, "convs packing for the next"),
            (self.int_pools, "max pools on integers"),
            (self.residual_adds, "float residual adds fused"),
            (self.channel_tables, "element-wise chains made tables"),
            (self.fast_quantize, "quantisers vectorised"),
            (self.folded_weights, "weight computations folded"),
            (self.f32_convs, "convs on edgesight's f32 kernel"),
            (self.f32_fused, "adds and ReLUs fused into them"),
            (self.float_pools, "float max pools ours"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        if parts.is_empty() {
            write!(f, "no rewrites (tract as is)")
        } else {
            write!(f, "rewrites: {}", parts.join(", "))
        }
    }
}

/// What [`parse`] found and changed in the ONNX file before tract parsed it.
struct Parsed {
    model: InferenceModel,
    rewrites: crate::model::int8::onnx_quant::ProtoRewrites,
    /// The model's quantiser scales, for [`crate::model::int8::fast_quantize`].
    quantize_scales: QuantizeScales,
    /// No quantised operator anywhere: a float model.
    float: bool,
}

/// Operators of a quantised ONNX graph (standard, and onnxruntime's com.microsoft ones,
/// whose names all start with Q).
fn is_quantised_op(n: &tract_onnx::pb::NodeProto) -> bool {
    matches!(
        n.op_type.as_str(),
        "QuantizeLinear"
            | "DequantizeLinear"
            | "DynamicQuantizeLinear"
            | "ConvInteger"
            | "MatMulInteger"
    ) || n.op_type.starts_with("QLinear")
        || (n.domain == "com.microsoft" && n.op_type.starts_with('Q'))
}

/// Read the ONNX file, rewrite its quantised forms onto integer convolutions
/// ([`crate::model::int8::onnx_quant`]), then let tract parse it.
fn parse(path: &Path, rewrite: bool) -> Result<Parsed> {
    // The graph's value_info (shapes of intermediate tensors) is a hint tract re-derives
    // from the ops anyway, and a wrong one breaks the load: onnxruntime's
    // quant_pre_process writes a symbolic batch into it that no longer unifies with the
    // batch of 1 we run (Keras ResNet50 quantised with its default dynamic batch:
    // "Failed analyse for node /Pad"; docs/models.md). The inputs' and outputs' own
    // shapes are still read.
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    let mut proto = onnx.proto_model_for_path(path)?;
    if let Some(g) = &proto.graph {
        check::check_graph(g)?;
    }
    if let Some(g) = proto.graph.as_mut() {
        crate::model::proto_fixes::apply(g);
    }
    let float = proto
        .graph
        .as_ref()
        .is_some_and(|g| !g.node.iter().any(is_quantised_op));
    let (rewrites, quantize_scales) = match proto.graph.as_mut() {
        Some(g) if rewrite => {
            let rewrites = crate::model::int8::onnx_quant::rewrite(g)?;
            (rewrites, crate::model::int8::onnx_quant::quantize_scales(g))
        }
        Some(_) => Default::default(),
        None => bail!("no graph in the file"),
    };
    // External weights (a .onnx.data beside it) are found relative to the model's folder.
    let dir = path.parent().and_then(|d| d.to_str());
    let parsed = onnx.parse(&proto, dir)?;
    if !parsed.unresolved_inputs.is_empty() {
        bail!("unresolved inputs: {:?}", parsed.unresolved_inputs);
    }
    Ok(Parsed {
        float,
        model: parsed.model,
        rewrites,
        quantize_scales,
    })
}

/// [`optimize_with`] with tract's layout pass, or, where that pass fails on the graph
/// (a tract bug, [`passes`]), without it. Returns whether it was left out.
fn optimize(
    model: InferenceModel,
    rewrite: bool,
    kernels: Kernels,
    quantize_scales: &QuantizeScales,
) -> TractResult<(TypedModel, Int8Rewrites, ChangeAxes)> {
    // The model's tensors are shared, so the copy kept for a retry is cheap.
    match optimize_with(
        model.clone(),
        rewrite,
        kernels,
        quantize_scales,
        ChangeAxes::Run,
    ) {
        Err(e) if passes::failed_in_change_axes(&e) => {
            let (typed, rewrites) =
                optimize_with(model, rewrite, kernels, quantize_scales, ChangeAxes::Skip)
                    .with_context(|| {
                        format!("also without tract's ChangeAxes pass, which failed: {e:#}")
                    })?;
            Ok((typed, rewrites, ChangeAxes::Skip))
        }
        result => result.map(|(typed, rewrites)| (typed, rewrites, ChangeAxes::Run)),
    }
}

/// Declutter, apply the int8 rewrites that must precede codegen, optimise, then fuse
/// what codegen left unfused.
fn optimize_with(
    model: InferenceModel,
    rewrite: bool,
    kernels: Kernels,
    quantize_scales: &QuantizeScales,
    change_axes: ChangeAxes,
) -> TractResult<(TypedModel, Int8Rewrites)> {
    let mut typed = model.into_typed()?;
    check::check_activations(&typed)?;
    if !rewrite {
        return Ok((
            passes::into_optimized(typed, change_axes)?,
            Int8Rewrites::default(),
        ));
    }
    // Our conv op needs its parameters as constants, and must see the convs before
    // declutter turns the 1x1 ones into einsums.
    tract_core::optim::Optimizer::prop_consts().optimize(&mut typed)?;
    let int8_convs = match kernels.int8 {
        Some(k) => crate::model::int8::qconv::replace_convs(&mut typed, k)?,
        None => 0,
    };
    let f32_convs = match kernels.f32 {
        Some(k) => crate::model::fconv::replace_convs(&mut typed, k)?,
        None => 0,
    };
    let depthwise_convs = crate::model::int8::depthwise::replace_depthwise(&mut typed)?;
    passes::declutter(&mut typed, change_axes)?;
    let scalar_zero_points = crate::model::int8::scalar_zero_points(&mut typed)?;
    let fused_adds = crate::model::int8::fuse_quantized_adds(&mut typed, quantize_scales)?;
    let conv_adds = crate::model::int8::qconv::fuse_conv_adds(&mut typed)?;
    let f32_fused = crate::model::fconv::fuse_epilogues(&mut typed)?;
    let int_pools = crate::model::int8::pool_quantized(&mut typed, quantize_scales)?;
    // After the int8 forms' pools have moved onto the integers: what is left pools floats.
    let float_pools = crate::model::pool::own_float_pools(&mut typed)?;
    let residual_adds = crate::model::int8::fuse_residual_adds(&mut typed, quantize_scales)?;
    let channel_tables =
        crate::model::int8::tables::fold_channel_tables(&mut typed, quantize_scales)?;
    let folded_weights = passes::fold_weights(&mut typed)?;
    let mut typed = passes::into_optimized(typed, change_axes)?;
    let fused_requant = crate::model::int8::fuse_requant(&mut typed)?;
    let fast_quantize = crate::model::int8::fast_quantize(&mut typed, quantize_scales)?;
    let conv_handoffs = crate::model::int8::qconv::fuse_handoffs(&mut typed)?;
    Ok((
        typed,
        Int8Rewrites {
            int8_convs,
            depthwise_convs,
            scalar_zero_points,
            fused_requant,
            fused_adds,
            conv_adds,
            conv_handoffs,
            int_pools,
            residual_adds,
            channel_tables,
            fast_quantize,
            folded_weights,
            f32_convs,
            f32_fused,
            float_pools,
            ..Default::default()
        },
    ))
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("path", &self.path)
            .field("spec", &self.spec)
            .field("output_shape", &self.output_shape)
            .finish_non_exhaustive()
    }
}

/// Operators in `model` that tract-onnx has no translation for, as "OpType (node name)".
fn unsupported_ops(model: &InferenceModel) -> Vec<String> {
    model
        .nodes()
        .iter()
        .filter_map(|n| {
            let name = n.op.name();
            let op = name.strip_prefix("Unimplemented(")?.strip_suffix(')')?;
            Some(format!("{op} (node {:?})", n.name))
        })
        .collect()
}

/// The model file parsed, with what the rest of loading relies on checked: a regular
/// file, every operator known to tract, one input.
fn parse_checked(path: &Path, int8_rewrites: bool) -> Result<Parsed> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("model file {}: cannot open", path.display()))?;
    if !meta.is_file() {
        bail!("model file {}: not a regular file", path.display());
    }
    let parsed = parse(path, int8_rewrites)
        .with_context(|| format!("model file {}: not a loadable ONNX model", path.display()))?;
    let missing = unsupported_ops(&parsed.model);
    if !missing.is_empty() {
        bail!(
            "model file {}: unsupported ONNX operator(s): {}",
            path.display(),
            missing.join(", ")
        );
    }
    let inputs = parsed.model.input_outlets()?.len();
    if inputs != 1 {
        bail!(
            "model file {}: expected one image input, found {inputs}",
            path.display()
        );
    }
    Ok(parsed)
}

/// tract's optimiser error worded for the user: the node it stopped at (when tract names
/// one), and what they can do, before tract's own account.
fn cannot_optimise(path: &Path, e: anyhow::Error) -> anyhow::Error {
    let at = e
        .chain()
        .find_map(|cause| named_node(&cause.to_string()))
        .map(|(name, op)| format!(" at node {name:?} ({op})"))
        .unwrap_or_default();
    e.context(format!(
        "model file {}: tract cannot optimise this graph{at}. Exporting the model another \
         way (another opset, the other torch.onnx exporter, BatchNorm folded into the \
         convs) may avoid the pattern; docs/models.md lists the ones known. tract says",
        path.display()
    ))
}

/// The node a tract error names, as (name, op), from its `node #12 "name" Op` form.
fn named_node(message: &str) -> Option<(String, String)> {
    let rest = &message[message.find("node #")? + "node #".len()..];
    let rest = rest
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .strip_prefix(" \"")?;
    let (name, rest) = rest.split_once('"')?;
    let op: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!op.is_empty()).then(|| (name.to_string(), op))
}

/// The optimised model's output shape, if it is one vector of (at least two) class scores.
fn class_scores_shape(typed: &TypedModel) -> Result<Vec<usize>> {
    let shape: Vec<usize> = typed
        .output_fact(0)?
        .shape
        .as_concrete()
        .ok_or_else(|| anyhow!("output shape is not fixed"))?
        .to_vec();
    let classes: usize = shape.iter().product();
    if classes < 2 || shape.iter().filter(|d| **d > 1).count() != 1 {
        bail!("output shape {shape:?} is not a single vector of class scores");
    }
    Ok(shape)
}

impl Classifier {
    /// Load, check and optimise the model named by `settings`.
    pub fn load(settings: &ModelSettings) -> Result<Classifier> {
        Classifier::load_with(settings, true)
    }

    /// [`Classifier::load`], optionally without edgesight's int8 rewrites (tract as is:
    /// for benchmarks and the tests that compare the two).
    pub fn load_with(settings: &ModelSettings, int8_rewrites: bool) -> Result<Classifier> {
        let kernels = if int8_rewrites {
            Kernels::best()
        } else {
            Kernels::tract()
        };
        Classifier::load_with_kernel(settings, int8_rewrites, kernels)
    }

    /// [`Classifier::load_with`] with the conv kernels chosen (`None`: tract's own
    /// convolutions, the other rewrites still on). For benchmarks.
    ///
    /// A panic inside tract while the file is parsed and optimised, or during one
    /// inference on a blank image run before the model is handed out, is this load's
    /// error (`util::panics`): a bad file must not take a running daemon down on reload.
    pub fn load_with_kernel(
        settings: &ModelSettings,
        int8_rewrites: bool,
        kernels: Kernels,
    ) -> Result<Classifier> {
        let path = settings.path.display();
        crate::util::panics::catching("loading the model", || {
            let c = Classifier::load_unguarded(settings, int8_rewrites, kernels)?;
            c.trial_run()
                .with_context(|| format!("model file {path}: fails on a blank image"))?;
            Ok(c)
        })
        .with_context(|| format!("model file {path}"))?
    }

    fn load_unguarded(
        settings: &ModelSettings,
        int8_rewrites: bool,
        kernels: Kernels,
    ) -> Result<Classifier> {
        let started = Instant::now();
        let path = &settings.path;
        let Parsed {
            mut model,
            rewrites: proto_rewrites,
            quantize_scales,
            float,
        } = parse_checked(path, int8_rewrites)?;
        let spec = input_spec(&model, settings)
            .with_context(|| format!("model file {}: unsupported input", path.display()))?;
        let outputs_probabilities = model
            .output_outlets()?
            .first()
            .map(|o| model.node(o.node).op.name().contains("Softmax"))
            .unwrap_or(false);
        model.set_input_fact(0, f32::fact(spec.shape()).into())?;
        let loaded = Instant::now();
        let (typed, mut int8, change_axes) =
            optimize(model, int8_rewrites, kernels, &quantize_scales)
                .map_err(|e| cannot_optimise(path, e))?;
        let output_shape =
            class_scores_shape(&typed).with_context(|| format!("model file {}", path.display()))?;
        let classes: usize = output_shape.iter().product();
        int8.proto = proto_rewrites;
        let plan = typed.into_runnable()?;
        let timing = LoadTiming {
            load_ms: (loaded - started).as_secs_f64() * 1e3,
            optimize_ms: loaded.elapsed().as_secs_f64() * 1e3,
        };
        let labels = match &settings.labels {
            Some(p) => read_labels(p, classes)?,
            None => (0..classes).map(|i| format!("class_{i}")).collect(),
        };
        Ok(Classifier {
            plan,
            spec,
            labels,
            outputs_probabilities,
            top_k: settings.top_k.min(classes),
            threshold: settings.threshold,
            file_name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.clone(),
            output_shape,
            timing,
            int8,
            change_axes,
            float,
            executor: (settings.threads > 1)
                .then(|| Executor::multithread_with_name(settings.threads, "edgesight-mm")),
        })
    }

    /// One inference on an all-zero input, on this thread (not the model's pool: see
    /// `util::panics`), checking that the output has the shape the load found.
    fn trial_run(&self) -> Result<()> {
        let input = Tensor::zero::<f32>(&self.spec.shape())?;
        let out = self.plan.run(tvec!(input.into_tvalue()))?;
        let got = out.first().map(|t| t.shape().to_vec()).unwrap_or_default();
        if got != self.output_shape {
            bail!("output shape {got:?}, expected {:?}", self.output_shape);
        }
        Ok(())
    }

    pub fn input_spec(&self) -> &InputSpec {
        &self.spec
    }
    pub fn output_shape(&self) -> &[usize] {
        &self.output_shape
    }
    pub fn file_name(&self) -> &str {
        &self.file_name
    }
    pub fn labels(&self) -> &[String] {
        &self.labels
    }
    pub fn timing(&self) -> LoadTiming {
        self.timing
    }
    pub fn int8_rewrites(&self) -> Int8Rewrites {
        self.int8
    }
    /// A float model (no quantised operator in the file): its int8 form, made by
    /// tools/quantize.py, would run faster.
    pub fn is_float(&self) -> bool {
        self.float
    }
    /// [`ChangeAxes::Skip`] when tract's layout pass failed on this graph ([`passes`]).
    pub fn change_axes(&self) -> ChangeAxes {
        self.change_axes
    }

    /// Raw model outputs (logits or probabilities, as the model emits them) for a ready tensor.
    pub fn raw_scores(&self, input: Tensor) -> Result<Vec<f32>> {
        let out = self.run(input)?;
        let out = out
            .first()
            .ok_or_else(|| anyhow!("model produced no output"))?
            .cast_to::<f32>()?;
        Ok(out.to_plain_array_view::<f32>()?.iter().copied().collect())
    }

    /// `f` on one of this model's pool threads if it has a pool (tract picks the executor
    /// up from the thread's scope), else on the calling thread. On a pool thread, not
    /// beside the pool: with `threads = n` exactly n threads work. (Run from the calling
    /// thread, the element-wise ops between two parallel convs competed with the pool's
    /// threads, which spin a while for more work: 2 threads were slower than 1 on 2 cores.)
    fn on_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.executor {
            Some(exec @ Executor::MultiThread(pool)) => {
                pool.install(|| multithread::multithread_tract_scope(exec.clone(), f))
            }
            Some(exec) => multithread::multithread_tract_scope(exec.clone(), f),
            None => f(),
        }
    }

    /// One run of the plan.
    fn run(&self, input: Tensor) -> TractResult<TVec<Tensor>> {
        self.on_pool(|| {
            let out = self.plan.run(tvec!(input.into()))?;
            Ok(out.into_iter().map(|v| v.into_tensor()).collect())
        })
    }

    /// Time spent per operator type over `runs` runs of `input`, slowest first, as
    /// (operator, total ms, node evaluations). For the benchmark's profile.
    pub fn profile(&self, input: &Tensor, runs: usize) -> Result<Vec<(String, f64, usize)>> {
        let by_op = self.on_pool(|| -> TractResult<_> {
            let mut by_op: std::collections::HashMap<String, (f64, usize)> = Default::default();
            let mut state = TypedSimpleState::new(&self.plan)?;
            for _ in 0..runs {
                state.run_plan_with_eval(
                    tvec!(input.clone().into()),
                    |ctx, st, node, inputs| {
                        let t0 = Instant::now();
                        let out = tract_core::plan::eval(ctx, st, node, inputs);
                        let e = by_op.entry(node.op.name().to_string()).or_default();
                        e.0 += t0.elapsed().as_secs_f64() * 1e3;
                        e.1 += 1;
                        out
                    },
                )?;
            }
            Ok(by_op)
        })?;
        let mut v: Vec<(String, f64, usize)> =
            by_op.into_iter().map(|(k, (ms, n))| (k, ms, n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v)
    }

    /// Class probabilities for a ready input tensor.
    pub fn probabilities(&self, input: Tensor) -> Result<Vec<f32>> {
        let mut scores = self.raw_scores(input)?;
        if !self.outputs_probabilities {
            softmax(&mut scores);
        }
        Ok(scores)
    }

    /// Preprocess `frame`, run the model and return the top-k predictions above the
    /// threshold, best first, with the time spent in the model alone.
    pub fn classify(&self, frame: &RgbImage) -> Result<(Vec<Prediction>, f64)> {
        self.classify_tensor(self.spec.tensor(frame))
    }

    /// [`Classifier::classify`] for an input already prepared (see `RawFrame::prepare`).
    pub fn classify_tensor(&self, input: Tensor) -> Result<(Vec<Prediction>, f64)> {
        let t0 = Instant::now();
        let probs = self.probabilities(input)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok((self.top(&probs), ms))
    }

    /// The top-k of `probs` at or above the threshold, sorted by score.
    pub fn top(&self, probs: &[f32]) -> Vec<Prediction> {
        let mut idx: Vec<usize> = (0..probs.len()).collect();
        idx.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b)));
        idx.into_iter()
            .take(self.top_k)
            .filter(|i| probs[*i] >= self.threshold)
            .map(|i| Prediction {
                label: self.labels[i].clone(),
                class: i,
                score: probs[i],
            })
            .collect()
    }
}

/// Numerically stable in-place softmax.
pub fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    if sum > 0.0 {
        v.iter_mut().for_each(|x| *x /= sum);
    }
}

/// Largest input height or width accepted: a classifier's input is a few hundred pixels
/// a side; a crafted 2^20 x 2^20 input would ask for terabytes on the first frame (and see
/// `check::check_activations` for what a graph may make of it).
const MAX_INPUT_SIDE: usize = 2048;

/// Input size and layout from the model's declared input: `[N,3,H,W]` or `[N,H,W,3]`.
fn input_spec(model: &InferenceModel, settings: &ModelSettings) -> Result<InputSpec> {
    let fact = model.input_fact(0)?;
    let dims: Vec<Option<usize>> = fact
        .shape
        .dims()
        .map(|d| d.concretize().and_then(|d| d.to_usize().ok()))
        .collect();
    if dims.len() != 4 {
        bail!(
            "input rank {} (shape {:?}); expected a 4-D image tensor",
            dims.len(),
            fact.shape
        );
    }
    if let Some(n) = dims[0]
        && n != 1
    {
        bail!("batch size {n}; edgesight runs batch 1 (export with batch 1 or a dynamic batch)");
    }
    let (layout, h, w) = match (dims[1], dims[3]) {
        (Some(3), _) => (Layout::Nchw, dims[2], dims[3]),
        (_, Some(3)) => (Layout::Nhwc, dims[1], dims[2]),
        _ => bail!(
            "input shape {:?} has no 3-channel axis at position 1 (NCHW) or 3 (NHWC)",
            fact.shape
        ),
    };
    let (Some(height), Some(width)) = (h, w) else {
        bail!(
            "input shape {:?} has a dynamic height or width; export the model with a fixed input size",
            fact.shape
        );
    };
    let side = 1..=MAX_INPUT_SIDE;
    if !side.contains(&height) || !side.contains(&width) {
        bail!(
            "input shape {:?}: height and width must be 1 to {MAX_INPUT_SIDE}",
            fact.shape
        );
    }
    Ok(InputSpec {
        width: width as u32,
        height: height as u32,
        layout,
        normalization: settings.normalization,
        resize: settings.resize,
    })
}

/// One label per line; blank lines at the end are ignored, the count must match the model.
pub fn read_labels(path: &Path, classes: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("labels file {}: cannot read", path.display()))?;
    let labels: Vec<String> = text
        .trim_end()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    if labels.len() != classes {
        bail!(
            "labels file {}: {} labels, but the model outputs {classes} classes",
            path.display(),
            labels.len()
        );
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::int8::qconv::Kernel;

    #[test]
    fn tract_errors_are_told_with_the_node_they_name() {
        let named = [
            (
                r#"Translating node #92 "/fc/Gemm" Gemm ToTypedTranslator"#,
                Some(("/fc/Gemm", "Gemm")),
            ),
            (
                r#"Failed analyse for node #7 "a b" Pad"#,
                Some(("a b", "Pad")),
            ),
            ("running pass ChangeAxes", None),
            (r#"node #3 "unterminated"#, None),
        ];
        for (message, want) in named {
            let got = named_node(message);
            let want = want.map(|(n, o)| (n.to_string(), o.to_string()));
            assert_eq!(got, want, "{message}");
        }
        let e = anyhow!("Output mismatch").context(r#"Translating node #92 "/fc/Gemm" Gemm"#);
        let told = format!("{:#}", cannot_optimise(Path::new("m.onnx"), e));
        assert!(
            told.starts_with(
                r#"model file m.onnx: tract cannot optimise this graph at node "/fc/Gemm" (Gemm). "#
            ),
            "{told}"
        );
        assert!(told.ends_with("Output mismatch"), "{told}");
    }

    /// Which int8 conv path rounds as onnxruntime does: each single-QLinearConv model of
    /// tests/fixtures/qconv (tools/gen_qconv_refs.py; in 4 of them about half the
    /// outputs are exact ties before rounding) through the load's own graph work, with
    /// every kernel of this CPU and with tract's conv, against onnxruntime's integers.
    /// Both equal, every output, ties included (842 of 5 436 outputs here): tract's
    /// per-tensor requantisation, as the load leaves it, rounds ties to even as
    /// onnxruntime's f32 `nearbyint` does. (Shown to fail with our rounding changed to
    /// half away from zero: 154 outputs of one case differ.) Where tract and our op do
    /// differ by a step (`check_against_tract`: i8 in, u8 out) onnxruntime has no
    /// QLinearConv to compare with.
    #[test]
    fn matches_onnxruntimes_integers() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qconv");
        let refs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("refs.json")).unwrap()).unwrap();
        let ints = |v: &serde_json::Value| -> Vec<i32> {
            let v = v.as_array().unwrap();
            v.iter().map(|x| x.as_i64().unwrap() as i32).collect()
        };
        for (name, c) in refs["cases"].as_object().unwrap() {
            let path = dir.join(format!("{name}.onnx"));
            let want = ints(&c["output"]);
            let shape: Vec<usize> = ints(&c["input_shape"])
                .iter()
                .map(|&d| d as usize)
                .collect();
            let values = ints(&c["input"]);
            let signed = name.contains("s8s8") || name.starts_with("fuzz");
            let x = if signed {
                let v: Vec<i8> = values.iter().map(|&b| b as i8).collect();
                Tensor::from_shape(&shape, &v).unwrap()
            } else {
                let v: Vec<u8> = values.iter().map(|&b| b as u8).collect();
                Tensor::from_shape(&shape, &v).unwrap()
            };
            for kernel in Kernel::available().into_iter().map(Some).chain([None]) {
                let model = tract_onnx::onnx().model_for_path(&path).unwrap();
                let kernels = Kernels {
                    int8: kernel,
                    f32: None,
                };
                let (typed, rw, _) = optimize(model, true, kernels, &Default::default()).unwrap();
                // Depthwise convs take the exact float path whatever the kernel.
                let want_paths = match name.contains("depthwise") {
                    true => (0, 1),
                    false => (kernel.is_some() as usize, 0),
                };
                assert_eq!(
                    (rw.int8_convs, rw.depthwise_convs),
                    want_paths,
                    "{name} {kernel:?}"
                );
                let out = typed
                    .into_runnable()
                    .unwrap()
                    .run(tvec!(x.clone().into()))
                    .unwrap();
                let got = out[0].cast_to::<i32>().unwrap();
                let got = got
                    .try_as_plain_ram()
                    .unwrap()
                    .as_slice::<i32>()
                    .unwrap()
                    .to_vec();
                assert_eq!(got.len(), want.len(), "{name}");
                let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
                // Ours and tract's alike: every output, ties included.
                assert_eq!(differ, 0, "{name} {kernel:?}: {differ} outputs differ");
            }
        }
    }
}
