//! The ONNX graph checked before anything reads it: what our protobuf rewrites and
//! tract's parser assume but do not check (a crafted file must get an error naming the
//! node, not a panic or a wrapped size).
//!
//! tract-onnx checks that pads and strides are not negative, but not that strides and
//! dilations are at least 1 (its padding code divides by them), that a scale tensor is
//! not empty (its quantisers index `[0]`), that a graph output is produced by something
//! (it indexes a map), or that sizes derived from attributes fit (release builds wrap).
//! Limits here are far above any image classifier's (ResNet's largest kernel is 7).

use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};
use tract_onnx::prelude::TypedModel;

/// Largest kernel side, stride, dilation or pad accepted.
pub const MAX_SPATIAL: i64 = 4096;
/// Most elements one initializer may declare.
const MAX_ELEMENTS: i64 = 1 << 32;
/// Most elements one intermediate tensor may hold: 512 MB of f32. ResNet-50's largest at
/// 224x224 is 0.8 M; a 2048x2048 input's stem output 67 M. Pads or an upsampling that
/// blow an activation up past this would exhaust a Pi's memory on the first frame (or
/// take minutes to constant-fold at load).
const MAX_ACTIVATION: usize = 1 << 27;

/// What is wrong with a model file, naming the part.
#[derive(Debug, thiserror::Error)]
pub enum BadModel {
    #[error("the graph has no output")]
    NoOutput,
    #[error("graph output {0:?} is produced by no node, input or initializer")]
    DanglingOutput(String),
    #[error("initializer {name:?}: dimensions {dims:?} {why}")]
    Initializer {
        name: String,
        dims: Vec<i64>,
        why: &'static str,
    },
    #[error(
        "node {node:?}: output of {elements} values (shape {shape}) is larger than {MAX_ACTIVATION}"
    )]
    Activation {
        node: String,
        shape: String,
        elements: String,
    },
    #[error("node {node:?} ({op}): {why}")]
    Node {
        node: String,
        op: String,
        why: String,
    },
}

fn node_error(n: &NodeProto, why: String) -> BadModel {
    BadModel::Node {
        node: n.name.clone(),
        op: n.op_type.clone(),
        why,
    }
}

/// Every check below, in graph order; the first failure is returned.
pub fn check_graph(g: &GraphProto) -> Result<(), BadModel> {
    for t in &g.initializer {
        check_initializer(t)?;
    }
    let empty: std::collections::HashSet<&str> = g
        .initializer
        .iter()
        .filter(|t| elements(&t.dims) == Some(0))
        .map(|t| t.name.as_str())
        .collect();
    for n in &g.node {
        if n.output.iter().all(String::is_empty) {
            return Err(node_error(n, "has no outputs".into()));
        }
        check_spatial(n)?;
        if is_quantised(n) {
            let e = n.input.iter().find(|i| empty.contains(i.as_str()));
            if let Some(e) = e {
                return Err(node_error(n, format!("its input {e:?} is an empty tensor")));
            }
        }
    }
    if g.output.is_empty() {
        return Err(BadModel::NoOutput);
    }
    let produced = |name: &str| {
        g.node.iter().any(|n| n.output.iter().any(|o| o == name))
            || g.input.iter().any(|i| i.name == name)
            || g.initializer.iter().any(|t| t.name == name)
    };
    match g.output.iter().find(|o| !produced(&o.name)) {
        Some(o) => Err(BadModel::DanglingOutput(o.name.clone())),
        None => Ok(()),
    }
}

/// The element count of `dims`, if none is negative and the product does not overflow.
pub fn elements(dims: &[i64]) -> Option<i64> {
    dims.iter()
        .try_fold(1i64, |n, d| if *d < 0 { None } else { n.checked_mul(*d) })
}

fn check_initializer(t: &TensorProto) -> Result<(), BadModel> {
    let why = match elements(&t.dims) {
        None if t.dims.iter().any(|d| *d < 0) => "include a negative one",
        None => "overflow",
        Some(n) if n > MAX_ELEMENTS => "are too large",
        Some(_) => return Ok(()),
    };
    Err(BadModel::Initializer {
        name: t.name.clone(),
        dims: t.dims.clone(),
        why,
    })
}

/// The ops with scale and zero-point inputs, each of which must hold a value.
fn is_quantised(n: &NodeProto) -> bool {
    let op = n.op_type.as_str();
    op.starts_with("QLinear")
        || op.ends_with("Integer")
        || matches!(
            op,
            "QuantizeLinear" | "DequantizeLinear" | "DynamicQuantizeLinear" | "QGemm"
        )
}

/// Convolution and pooling attributes: sides, strides and dilations in 1..=MAX_SPATIAL,
/// pads in 0..=MAX_SPATIAL, a group of at least 1, and lists of lengths that agree (one
/// value per spatial axis, two pads per axis: tract indexes one by the other's length).
fn check_spatial(n: &NodeProto) -> Result<(), BadModel> {
    let spatial = n.op_type.contains("Conv") || n.op_type.ends_with("Pool");
    if !spatial {
        return Ok(());
    }
    check_ranks(n)?;
    for a in &n.attribute {
        let min = match a.name.as_str() {
            "kernel_shape" | "strides" | "dilations" => 1,
            "pads" | "output_padding" => 0,
            "group" => {
                if a.i < 1 {
                    return Err(node_error(n, format!("group {} (must be at least 1)", a.i)));
                }
                continue;
            }
            _ => continue,
        };
        if let Some(v) = a.ints.iter().find(|v| !(min..=MAX_SPATIAL).contains(*v)) {
            return Err(node_error(
                n,
                format!(
                    "{} {:?}: {v} is outside {min}..={MAX_SPATIAL}",
                    a.name, a.ints
                ),
            ));
        }
    }
    Ok(())
}

/// The spatial rank each list attribute implies (pads: half its length) must be one.
fn check_ranks(n: &NodeProto) -> Result<(), BadModel> {
    let mut rank: Option<(&str, usize)> = None;
    for a in &n.attribute {
        let r = match a.name.as_str() {
            "kernel_shape" | "strides" | "dilations" | "output_padding" => a.ints.len(),
            "pads" if a.ints.len() % 2 == 0 => a.ints.len() / 2,
            "pads" => {
                let why = format!("pads {:?}: an odd count (two per axis)", a.ints);
                return Err(node_error(n, why));
            }
            _ => continue,
        };
        match rank {
            Some((other, r0)) if r0 != r => {
                let why = format!("{} {:?} is for {r} axes, {other} for {r0}", a.name, a.ints);
                return Err(node_error(n, why));
            }
            _ => rank = Some((a.name.as_str(), r)),
        }
    }
    Ok(())
}

/// Every intermediate tensor of the typed graph (shapes are known by now) within
/// [`MAX_ACTIVATION`], checked before tract optimises (constant folding would compute an
/// oversized one at load).
pub fn check_activations(model: &TypedModel) -> Result<(), BadModel> {
    for node in model.nodes() {
        for out in &node.outputs {
            let Some(dims) = out.fact.shape.as_concrete() else {
                continue;
            };
            let n = dims.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
            if n.is_none_or(|n| n > MAX_ACTIVATION) {
                return Err(BadModel::Activation {
                    node: node.name.clone(),
                    shape: format!("{dims:?}"),
                    elements: n.map_or("too many".into(), |n| n.to_string()),
                });
            }
        }
    }
    Ok(())
}
