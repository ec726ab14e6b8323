//! Rewrites of quantised ONNX graphs at the protobuf level, before tract parses them, so
//! that every int8 form users bring lands on tract's integer convolution:
//! - QDQ (onnxruntime's default format): `DequantizeLinear(x) -> Conv(DQ(w), DQ(b)) ->
//!   QuantizeLinear` becomes one `QLinearConv` (tract would otherwise run the conv in f32
//!   between the Q/DQ pairs);
//! - onnxruntime's QOperator default (also the ONNX Model Zoo int8 ResNets) uses
//!   com.microsoft contrib ops tract has no translation for: `QLinearAdd`,
//!   `QLinearMul`, `QLinearGlobalAveragePool`, `QGemm`, `QLinearSigmoid`, `QLinearLeakyRelu`
//!   and `QLinearConcat` become their standard-op definitions
//!   (DequantizeLinear -> Add / GlobalAveragePool / Gemm -> QuantizeLinear), which tract's
//!   own translations then fuse.
//!
//! Rewriting the protobuf keeps both on tract's standard ONNX translations (and their
//! optimisations) instead of re-implementing type and shape inference for new operators.
//! Every rewrite checks its preconditions and leaves a node alone when they do not hold.

use std::collections::HashMap;

use anyhow::{Result, bail};
use serde::Serialize;
use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, TensorProto};

use crate::model::onnx_graph::{attr_float, attr_int, fresh, get_float, get_int, input, node};

/// What [`rewrite`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProtoRewrites {
    /// DQ -> Conv -> Q groups turned into QLinearConv.
    pub qdq_convs: usize,
    /// com.microsoft QLinearAdd / QLinearMul / QLinearGlobalAveragePool / QGemm expanded.
    pub contrib_ops: usize,
}

pub fn rewrite(graph: &mut GraphProto) -> Result<ProtoRewrites> {
    let contrib_ops = expand_contrib_ops(graph)?;
    let qdq_convs = qdq_to_qlinear_conv(graph);
    remove_dead_nodes(graph);
    Ok(ProtoRewrites {
        qdq_convs,
        contrib_ops,
    })
}

// ---------------------------------------------------------------- helpers

const FLOAT: i32 = 1;

/// The values of a float initializer.
fn floats(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != FLOAT {
        return None;
    }
    if !t.float_data.is_empty() {
        return Some(t.float_data.clone());
    }
    if !t.raw_data.len().is_multiple_of(4) {
        return None;
    }
    Some(
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

fn float_initializer(name: String, dims: Vec<i64>, values: Vec<f32>) -> TensorProto {
    TensorProto {
        name,
        dims,
        data_type: FLOAT,
        float_data: values,
        ..Default::default()
    }
}

/// Whether an integer initializer holds only zeros.
fn all_zero(t: &TensorProto) -> bool {
    t.raw_data.iter().all(|b| *b == 0)
        && t.int32_data.iter().all(|v| *v == 0)
        && t.int64_data.iter().all(|v| *v == 0)
}

/// QuantizeLinear scales by the bits of their f32 reciprocal; see [`quantize_scales`].
pub type QuantizeScales = HashMap<u32, Option<f32>>;

/// The scale of every QuantizeLinear whose scale is a one-value initializer, keyed by the
/// bits of its f32 reciprocal, which is all tract's quantiser keeps (it multiplies by
/// `1/scale`; ONNX and onnxruntime divide by `scale`, and the two round differently on
/// about one value in 10^5, enough to flip the top-1 of a ResNet whose two best classes
/// are close). `None` marks a reciprocal that two different scales share.
pub fn quantize_scales(graph: &GraphProto) -> QuantizeScales {
    let mut scales = QuantizeScales::new();
    for n in graph.node.iter().filter(|n| n.op_type == "QuantizeLinear") {
        let Some(name) = input(n, 1) else { continue };
        let Some(t) = graph.initializer.iter().find(|t| t.name == name) else {
            continue;
        };
        let Some(&[s]) = floats(t).as_deref() else {
            continue;
        };
        let entry = scales.entry(s.recip().to_bits()).or_insert(Some(s));
        if *entry != Some(s) {
            *entry = None;
        }
    }
    scales
}

// ---------------------------------------------------------------- com.microsoft ops

fn expand_contrib_ops(graph: &mut GraphProto) -> Result<usize> {
    let mut expanded = 0;
    let mut out: Vec<NodeProto> = Vec::with_capacity(graph.node.len());
    let nodes = std::mem::take(&mut graph.node);
    for mut n in nodes {
        // Unnamed nodes (onnxruntime's quantiser leaves some) would give every expansion
        // the same node names ("".op): name them after their output, unique in a graph.
        if n.name.is_empty()
            && let Some(out) = n.output.first()
        {
            n.name = format!("{out}.{}", n.op_type);
        }
        let replacement = match n.op_type.as_str() {
            "QLinearAdd" => Some(qlinear_binary(graph, &n, "Add")?),
            // Keras exports BatchNorm as Sub/Mul/Add; quantised, the Mul becomes QLinearMul.
            "QLinearMul" => Some(qlinear_binary(graph, &n, "Mul")?),
            "QLinearGlobalAveragePool" => Some(qlinear_global_average_pool(graph, &n)?),
            "QGemm" => Some(qgemm(graph, &n)?),
            // EfficientNet's SiLU and squeeze-excitation gates, quantised (QOperator).
            "QLinearSigmoid" => Some(qlinear_unary(graph, &n, "Sigmoid", None)?),
            "QLinearLeakyRelu" => {
                let alpha = attr_float("alpha", get_float(&n, "alpha").unwrap_or(0.01));
                Some(qlinear_unary(graph, &n, "LeakyRelu", Some(alpha))?)
            }
            // SqueezeNet's and Inception's channel concatenations, quantised.
            "QLinearConcat" => Some(qlinear_concat(graph, &n)?),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.extend(r);
                expanded += 1;
            }
            None => out.push(n),
        }
    }
    graph.node = out;
    Ok(expanded)
}

fn need<'a>(n: &'a NodeProto, ix: usize, what: &str) -> Result<&'a str> {
    match input(n, ix) {
        Some(s) => Ok(s),
        None => bail!("{} node {:?}: no {what} (input {ix})", n.op_type, n.name),
    }
}

/// The DequantizeLinear of the quantised tensor whose (value, scale, zero point) are
/// inputs `ix..ix + 3` of `n` (`what`, `what`_scale, `what`_zero_point in the op's
/// words): the node, and the name of the float it makes.
fn dequantize(
    graph: &GraphProto,
    n: &NodeProto,
    ix: usize,
    what: &str,
) -> Result<(NodeProto, String)> {
    let x = need(n, ix, what)?;
    let s = need(n, ix + 1, &format!("{what}_scale"))?;
    let z = need(n, ix + 2, &format!("{what}_zero_point"))?;
    let out = n.output.first().map(String::as_str).unwrap_or_default();
    let f = fresh(graph, &format!("{out}.{what}{ix}_f32"));
    let dq = node(
        "DequantizeLinear",
        format!("{}.dq{ix}", n.name),
        &[x, s, z],
        &[&f],
    );
    Ok((dq, f))
}

/// The QuantizeLinear of float `f` into the node's output, with the scale and zero point
/// at inputs `ix` and `ix + 1`; it takes the node's name.
fn quantize_into_output(n: &NodeProto, f: &str, ix: usize, what: &str) -> Result<NodeProto> {
    let s = need(n, ix, &format!("{what}_scale"))?;
    let z = need(n, ix + 1, &format!("{what}_zero_point"))?;
    let out = n.output.first().map(String::as_str).unwrap_or_default();
    Ok(node("QuantizeLinear", n.name.clone(), &[f, s, z], &[out]))
}

/// A float value named after the node's output.
fn float_output(graph: &GraphProto, n: &NodeProto) -> String {
    let out = n.output.first().map(String::as_str).unwrap_or_default();
    fresh(graph, &format!("{out}.f32"))
}

/// `C = Q(DQ(A) op DQ(B))`, the definition of the contrib ops QLinearAdd and QLinearMul.
fn qlinear_binary(graph: &GraphProto, n: &NodeProto, op: &str) -> Result<Vec<NodeProto>> {
    let (dq_a, af) = dequantize(graph, n, 0, "A")?;
    let (dq_b, bf) = dequantize(graph, n, 3, "B")?;
    let cf = float_output(graph, n);
    let f = node(op, format!("{}.op", n.name), &[&af, &bf], &[&cf]);
    Ok(vec![dq_a, dq_b, f, quantize_into_output(n, &cf, 6, "C")?])
}

/// `Y = Q(op(DQ(X)))`: QLinearSigmoid, QLinearLeakyRelu (inputs X, X_scale,
/// X_zero_point, Y_scale, Y_zero_point).
fn qlinear_unary(
    graph: &GraphProto,
    n: &NodeProto,
    op: &str,
    attr: Option<AttributeProto>,
) -> Result<Vec<NodeProto>> {
    let (dq, xf) = dequantize(graph, n, 0, "X")?;
    let yf = float_output(graph, n);
    let mut f = node(op, format!("{}.op", n.name), &[&xf], &[&yf]);
    f.attribute.extend(attr);
    Ok(vec![dq, f, quantize_into_output(n, &yf, 3, "Y")?])
}

/// `Y = Q(Concat(DQ(X1), DQ(X2), ...))`: inputs Y_scale, Y_zero_point, then (X, X_scale,
/// X_zero_point) per input; attribute `axis`.
fn qlinear_concat(graph: &GraphProto, n: &NodeProto) -> Result<Vec<NodeProto>> {
    let rest = n.input.len().saturating_sub(2);
    if rest == 0 || !rest.is_multiple_of(3) {
        bail!(
            "QLinearConcat node {:?}: {} inputs after Y_scale and Y_zero_point, not (X, X_scale, X_zero_point) triples",
            n.name,
            rest
        );
    }
    let Some(axis) = get_int(n, "axis") else {
        bail!("QLinearConcat node {:?}: no axis attribute", n.name);
    };
    let mut nodes = Vec::new();
    let mut parts = Vec::new();
    for k in 0..rest / 3 {
        let (dq, f) = dequantize(graph, n, 2 + 3 * k, "X")?;
        nodes.push(dq);
        parts.push(f);
    }
    let yf = float_output(graph, n);
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let mut concat = node("Concat", format!("{}.concat", n.name), &refs, &[&yf]);
    concat.attribute.push(attr_int("axis", axis));
    nodes.push(concat);
    nodes.push(quantize_into_output(n, &yf, 0, "Y")?);
    Ok(nodes)
}

/// `Y = Q(GlobalAveragePool(DQ(X)))` (NCHW only: channels_last = 0).
fn qlinear_global_average_pool(graph: &GraphProto, n: &NodeProto) -> Result<Vec<NodeProto>> {
    if get_int(n, "channels_last").unwrap_or(0) != 0 {
        bail!(
            "QLinearGlobalAveragePool node {:?}: channels_last = 1 is not supported",
            n.name
        );
    }
    let (dq, xf) = dequantize(graph, n, 0, "X")?;
    let yf = float_output(graph, n);
    let pool = node(
        "GlobalAveragePool",
        format!("{}.pool", n.name),
        &[&xf],
        &[&yf],
    );
    Ok(vec![dq, pool, quantize_into_output(n, &yf, 3, "Y")?])
}

/// `Y = Q(alpha * DQ(A) x DQ(B) + DQ(C))`; C is int32 with scale alpha * a_scale * b_scale
/// and zero point 0; without y_scale the output stays float.
fn qgemm(graph: &mut GraphProto, n: &NodeProto) -> Result<Vec<NodeProto>> {
    let y = n.output.first().cloned().unwrap_or_default();
    let alpha = get_float(n, "alpha").unwrap_or(1.0);
    let trans_a = get_int(n, "transA").unwrap_or(0);
    let trans_b = get_int(n, "transB").unwrap_or(0);
    let (dq_a, af) = dequantize(graph, n, 0, "a")?;
    let (mut dq_b, bf) = dequantize(graph, n, 3, "b")?;
    // Per-channel weight scales run along N: axis 0 of B transposed ([N, K]), else 1.
    dq_b.attribute
        .push(attr_int("axis", if trans_b == 1 { 0 } else { 1 }));
    let mut nodes = vec![dq_a, dq_b];
    let mut gemm_inputs = vec![af.clone(), bf.clone()];
    if let Some(c) = input(n, 6) {
        let (dq_c, cf) = qgemm_bias(graph, n, c, alpha)?;
        nodes.push(dq_c);
        gemm_inputs.push(cf);
    }
    let quantized_out = input(n, 7).is_some();
    let yf = if quantized_out {
        fresh(graph, &format!("{y}.y_f32"))
    } else {
        y.clone()
    };
    let gi: Vec<&str> = gemm_inputs.iter().map(String::as_str).collect();
    let mut gemm = node("Gemm", format!("{}.gemm", n.name), &gi, &[&yf]);
    gemm.attribute.extend([
        attr_float("alpha", alpha),
        attr_float("beta", 1.0),
        attr_int("transA", trans_a),
        attr_int("transB", trans_b),
    ]);
    nodes.push(gemm);
    if quantized_out {
        let y_s = need(n, 7, "y_scale")?;
        let mut q = vec![yf.as_str(), y_s];
        if let Some(z) = input(n, 8) {
            q.push(z);
        }
        nodes.push(node("QuantizeLinear", n.name.clone(), &q, &[&y]));
    }
    Ok(nodes)
}

/// The DequantizeLinear of QGemm's int32 C (scale `alpha * a_scale * b_scale`, zero
/// point 0), and the name of its float output.
fn qgemm_bias(
    graph: &mut GraphProto,
    n: &NodeProto,
    c: &str,
    alpha: f32,
) -> Result<(NodeProto, String)> {
    let (a_s, b_s) = (need(n, 1, "a_scale")?, need(n, 4, "b_scale")?);
    let y = n.output.first().cloned().unwrap_or_default();
    let scale_of = |name: &str| {
        graph
            .initializer
            .iter()
            .find(|t| t.name == name)
            .and_then(floats)
    };
    let (Some(sa), Some(sb)) = (scale_of(a_s), scale_of(b_s)) else {
        bail!(
            "QGemm node {:?}: a_scale and b_scale must be initializers",
            n.name
        );
    };
    let [sa] = sa.as_slice() else {
        bail!("QGemm node {:?}: a_scale must be one value", n.name);
    };
    let sc: Vec<f32> = sb.iter().map(|s| alpha * sa * s).collect();
    let dims = if sc.len() == 1 {
        vec![]
    } else {
        vec![sc.len() as i64]
    };
    let sc_name = fresh(graph, &format!("{y}.c_scale"));
    graph
        .initializer
        .push(float_initializer(sc_name.clone(), dims, sc));
    let cf = fresh(graph, &format!("{y}.c_f32"));
    let mut dq_c = node(
        "DequantizeLinear",
        format!("{}.dq_c", n.name),
        &[c, &sc_name],
        &[&cf],
    );
    dq_c.attribute.push(attr_int("axis", -1));
    Ok((dq_c, cf))
}

// ---------------------------------------------------------------- QDQ -> QLinearConv

/// Who produces and who consumes each tensor, and the initializers: what the QDQ pattern
/// match looks up.
struct QdqIndex<'g> {
    graph: &'g GraphProto,
    producer: HashMap<&'g str, usize>,
    consumers: HashMap<&'g str, Vec<usize>>,
    init: HashMap<&'g str, &'g TensorProto>,
}

impl<'g> QdqIndex<'g> {
    fn new(graph: &'g GraphProto) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
            for x in n.input.iter().filter(|x| !x.is_empty()) {
                consumers.entry(x.as_str()).or_default().push(i);
            }
        }
        let init = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        QdqIndex {
            graph,
            producer,
            consumers,
            init,
        }
    }

    fn scalar(&self, name: &str) -> bool {
        self.init
            .get(name)
            .is_some_and(|t| crate::model::check::elements(&t.dims) == Some(1))
    }

    /// The standard DequantizeLinear that produces `tensor`.
    fn dq(&self, tensor: &str) -> Option<&'g NodeProto> {
        let n = &self.graph.node[*self.producer.get(tensor)?];
        (n.op_type == "DequantizeLinear" && n.domain.is_empty()).then_some(n)
    }

    /// The conv's bias, if it is an int32 initializer quantised with scale
    /// x_scale * w_scale and zero point 0: `Some(None)` for no bias, `None` for a bias
    /// QLinearConv cannot take.
    fn bias(&self, conv: &NodeProto, xs: &str, w_scales: &[f32]) -> Option<Option<&'g str>> {
        let Some(b) = input(conv, 2) else {
            return Some(None);
        };
        let bd = self.dq(b)?;
        let (bq, bs) = (input(bd, 0)?, input(bd, 1)?);
        if let Some(z) = input(bd, 2)
            && !self.init.get(z).is_some_and(|t| all_zero(t))
        {
            return None;
        }
        if self.init.get(bq)?.data_type != 6 {
            return None;
        }
        let sx = *floats(self.init.get(xs)?)?.first()?;
        let sb = floats(self.init.get(bs)?)?;
        let ok = sb.len() == w_scales.len()
            && sb.iter().zip(w_scales).all(|(b, w)| {
                let want = sx * w;
                (b - want).abs() <= 1e-6 * want.abs().max(f32::MIN_POSITIVE)
            });
        ok.then_some(Some(bq))
    }

    /// `DQ(x), DQ(w) -> Conv -> Q` as one QLinearConv: (conv index, quantize index, the
    /// QLinearConv that replaces both), if the pattern and its scales allow it.
    fn plan(&self, ci: usize, conv: &NodeProto) -> Option<(usize, usize, NodeProto)> {
        let x = self.dq(input(conv, 0)?)?;
        let w = self.dq(input(conv, 1)?)?;
        let (xq, xs, xz) = (input(x, 0)?, input(x, 1)?, input(x, 2)?);
        let (wq, ws, wz) = (input(w, 0)?, input(w, 1)?, input(w, 2)?);
        // QLinearConv: per-tensor activations, weights per tensor or per output channel.
        if !self.scalar(xs) || !self.scalar(xz) || !self.init.contains_key(wq) {
            return None;
        }
        let w_scales = floats(self.init.get(ws)?)?;
        if w_scales.len() > 1 && get_int(w, "axis").unwrap_or(1) != 0 {
            return None;
        }
        let bias = self.bias(conv, xs, &w_scales)?;
        let y = conv.output.first()?;
        if self.graph.output.iter().any(|o| &o.name == y) {
            return None;
        }
        let [qi] = self.consumers.get(y.as_str())?.as_slice() else {
            return None;
        };
        let q = &self.graph.node[*qi];
        if q.op_type != "QuantizeLinear" || !q.domain.is_empty() || input(q, 0)? != y {
            return None;
        }
        let (ys, yz) = (input(q, 1)?, input(q, 2)?);
        if !self.scalar(ys) || !self.scalar(yz) {
            return None;
        }
        let mut inputs = vec![xq, xs, xz, wq, ws, wz, ys, yz];
        inputs.extend(bias);
        let mut qconv = node(
            "QLinearConv",
            conv.name.clone(),
            &inputs,
            &[q.output.first()?],
        );
        qconv.attribute = conv.attribute.clone();
        Some((ci, *qi, qconv))
    }
}

fn qdq_to_qlinear_conv(graph: &mut GraphProto) -> usize {
    let index = QdqIndex::new(graph);
    let plans: Vec<(usize, usize, NodeProto)> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "Conv" && n.domain.is_empty())
        .filter_map(|(ci, conv)| index.plan(ci, conv))
        .collect();
    let count = plans.len();
    let mut replace: HashMap<usize, NodeProto> = HashMap::new();
    let mut drop = std::collections::HashSet::new();
    for (ci, qi, qconv) in plans {
        replace.insert(ci, qconv);
        drop.insert(qi);
    }
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !drop.contains(i))
        .map(|(i, n)| replace.remove(&i).unwrap_or(n))
        .collect();
    count
}

/// Drop nodes none of whose outputs is used (the DequantizeLinear of a weight whose conv
/// became a QLinearConv), repeatedly.
fn remove_dead_nodes(graph: &mut GraphProto) {
    loop {
        let mut used: std::collections::HashSet<&str> =
            graph.output.iter().map(|o| o.name.as_str()).collect();
        for n in &graph.node {
            used.extend(n.input.iter().map(String::as_str));
        }
        let dead: Vec<usize> = graph
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.output.iter().any(|o| used.contains(o.as_str())))
            .map(|(i, _)| i)
            .collect();
        if dead.is_empty() {
            return;
        }
        let mut i = 0;
        graph.node.retain(|_| {
            i += 1;
            !dead.contains(&(i - 1))
        });
    }
}
