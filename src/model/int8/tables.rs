//! Per-channel tables: a chain of element-wise ops from one 8-bit tensor to another,
//! replaced by one lookup per element.
//!
//! The Keras exporter writes BatchNorm as `Sub`, `Mul` and `Add` by per-channel
//! constants after each conv, and onnxruntime's quantisers quantise each of them: on
//! Keras's ResNet50 every conv's output then goes through dequantise, Sub, quantise,
//! dequantise, Mul, quantise, dequantise, Add, quantise, nine passes over the map (in the
//! QOperator forms the BatchNorm stays in floats between a dequantise and a quantise).
//! Whatever the chain, each output element depends only on its input element and its
//! channel, and the input is one of 256 values: so the chain is a table of 256 bytes per
//! channel.
//!
//! Exact by construction: a channel's table is the chain itself, evaluated by the same
//! ops on the 256 values (the quantisers as [`super::fast_quantize`] will run them), so
//! every output is the byte the chain gives. `tests::tables_give_the_chains_bits` checks
//! it on random inputs.

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::element_wise::ElementWiseOp;
use tract_core::ops::quant::DequantizeLinearF32;

use crate::model::graph::rewire;
use crate::model::int8::Quantize;
use crate::model::int8::onnx_quant::QuantizeScales;
use crate::model::threads::{PAR_CHUNK, par_chunks};

/// `y = table[channel][x]` on an 8-bit tensor: one 256-byte table per channel of `axis`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelTable {
    /// The channel axis; with one channel, any.
    pub axis: usize,
    /// `channels x 256` bytes of the output type, indexed by the input's byte.
    pub tables: Arc<Vec<u8>>,
    /// The output's type (u8 or i8, as the chain's last op makes it).
    pub dt: DatumType,
}

impl ChannelTable {
    fn channels(&self) -> usize {
        self.tables.len() / 256
    }

    /// `x` (whose `axis` has [`Self::channels`] or one channel) through the tables.
    fn run(&self, x: &Tensor) -> TractResult<Tensor> {
        let shape = x.shape();
        let channels = self.channels();
        let c = shape.get(self.axis).copied().unwrap_or(1);
        ensure!(
            c == channels || channels == 1,
            "channel table of {channels} channels on shape {shape:?} (axis {})",
            self.axis
        );
        // Elements from one channel to the next (a plane in NCHW); at least 1, so that an
        // empty tensor still cuts into (empty) pieces.
        let inner = shape.iter().skip(self.axis + 1).product::<usize>().max(1);
        let x = x.try_as_plain_ram()?;
        let x = x.as_bytes();
        // SAFETY: a plain 8-bit tensor; every byte is written below before it is read.
        let mut out = unsafe { Tensor::uninitialized_dt(self.dt, shape)? };
        {
            let mut o = out.try_as_plain_ram_mut()?;
            // Whole planes per piece, so that each piece walks whole channels.
            let planes = (PAR_CHUNK / inner).max(1);
            par_chunks(o.as_bytes_mut(), planes * inner, |(i, o)| {
                let first = i * planes;
                let src = &x[first * inner..];
                for (j, (o, x)) in o.chunks_mut(inner).zip(src.chunks(inner)).enumerate() {
                    let ch = if channels == 1 { 0 } else { (first + j) % c };
                    let t: &[u8; 256] = self.tables[ch * 256..][..256]
                        .try_into()
                        .expect("256 bytes");
                    for (y, x) in o.iter_mut().zip(x) {
                        *y = t[*x as usize];
                    }
                }
            });
        }
        Ok(out)
    }
}

impl Op for ChannelTable {
    fn name(&self) -> StaticName {
        "EdgesightChannelTable".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} channel(s) on axis {} -> {:?}",
            self.channels(),
            self.axis,
            self.dt
        )])
    }

    tract_core::op_as_typed_op!();
}

impl EvalOp for ChannelTable {
    tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(self.run(&inputs[0])?.into_tvalue()))
    }
}

impl TypedOp for ChannelTable {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.dt.fact(inputs[0].shape.clone())))
    }

    tract_core::as_op!();
}

/// Replace every chain of element-wise ops from an 8-bit tensor to an 8-bit tensor (two
/// ops or more, each with per-channel constants at most) by a [`ChannelTable`]. Run on
/// the decluttered model, after the int8 fusions that read such chains' ops
/// (quantised adds, pools). Returns how many chains were replaced.
pub fn fold_channel_tables(model: &mut TypedModel, scales: &QuantizeScales) -> TractResult<usize> {
    let mut folded = 0;
    // A chain can start at a table a fold just made (one read twice): again until none.
    loop {
        let more = fold_once(model, scales)?;
        if more == 0 {
            return Ok(folded);
        }
        folded += more;
        model.compact()?;
    }
}

/// One pass of [`fold_channel_tables`] in evaluation order: the chains from each value,
/// one from each of its readers.
fn fold_once(model: &mut TypedModel, scales: &QuantizeScales) -> TractResult<usize> {
    let mut folded = 0;
    for id in model.eval_order()? {
        // A node an earlier fold left dead has no outputs.
        if model.node(id).outputs.len() != 1 {
            continue;
        }
        let start = OutletId::new(id, 0);
        let heads: Vec<InletId> = model.outlet_successors(start).to_vec();
        for head in heads {
            let Some(chain) = Chain::from(model, start, head)? else {
                continue;
            };
            // An error evaluating the chain (an op that needs a plan, a type it refuses)
            // only means it stays as it is.
            let Ok(op) = chain.table(model, scales) else {
                continue;
            };
            let last = *chain.nodes.last().expect("a chain has nodes");
            let name = format!("{}.table", model.node(last).name);
            rewire(model, OutletId::new(last, 0), name, op, &[start])?;
            folded += 1;
        }
    }
    Ok(folded)
}

/// Whether `dt` is a plain 8-bit integer (the tables' input and output).
fn is_8bit(dt: DatumType) -> bool {
    matches!(dt, DatumType::U8 | DatumType::I8)
}

/// A foldable chain: its nodes from first to last, and the channel axis and count its
/// constants have (one channel if none is per channel).
struct Chain {
    nodes: Vec<usize>,
    axis: usize,
    channels: usize,
}

impl Chain {
    /// The longest chain of element-wise nodes from `start` (an 8-bit value) through its
    /// reader `head` that ends on an 8-bit value, each later node the only reader of the
    /// one before; None if it is shorter than two nodes.
    fn from(model: &TypedModel, start: OutletId, head: InletId) -> TractResult<Option<Chain>> {
        let fact = model.outlet_fact(start)?;
        let Some(shape) = fact.shape.as_concrete().map(|s| s.to_vec()) else {
            return Ok(None);
        };
        if !is_8bit(fact.datum_type) || head.slot != 0 {
            return Ok(None);
        }
        let outputs = model.output_outlets()?;
        let (mut node, mut nodes, mut ends) = (model.node(head.node), vec![], 0);
        let mut channel: Option<(usize, usize)> = None;
        while element_wise(model, node, &shape, &mut channel)? {
            nodes.push(node.id);
            let at = OutletId::new(node.id, 0);
            if is_8bit(model.outlet_fact(at)?.datum_type) {
                ends = nodes.len();
            }
            // A value the model outputs, or that another node reads, must stay.
            let succ = model.outlet_successors(at);
            if outputs.contains(&at) || succ.len() != 1 || succ[0].slot != 0 {
                break;
            }
            node = model.node(succ[0].node);
        }
        nodes.truncate(ends);
        let (axis, channels) = channel.unwrap_or((0, 1));
        Ok((nodes.len() >= 2).then_some(Chain {
            nodes,
            axis,
            channels,
        }))
    }

    /// The chain as one [`ChannelTable`]: its ops run on every byte of every channel.
    fn table(&self, model: &TypedModel, scales: &QuantizeScales) -> TractResult<ChannelTable> {
        let first = model.node(self.nodes[0]);
        let input = model.outlet_fact(first.inputs[0])?;
        let rank = input.rank();
        ensure!(rank > 0, "a scalar");
        // The probe: the 256 bytes along one axis that is not the channel axis, every
        // channel, 1 on the other axes (which the constants broadcast over).
        let values_axis = if self.axis + 1 == rank { 0 } else { rank - 1 };
        ensure!(values_axis != self.axis || self.channels == 1);
        let mut shape = vec![1; rank];
        shape[self.axis] = self.channels;
        shape[values_axis] *= 256;
        let c = self.channels;
        // Where byte `v` of channel `ch` sits in the probe (and its image in the output).
        let at = |ch: usize, v: usize| match values_axis > self.axis {
            true => ch * 256 + v,
            false => v * c + ch,
        };
        let mut bytes = vec![0u8; c * 256];
        for ch in 0..c {
            for v in 0..256 {
                bytes[at(ch, v)] = v as u8;
            }
        }
        let mut probe = Tensor::from_shape(&shape, &bytes)?;
        // SAFETY: the same bytes, under the input's 8-bit type (u8 or i8).
        unsafe { probe.set_datum_type(input.datum_type) };
        let mut value = probe.into_tvalue();
        for &id in &self.nodes {
            value = eval(model, model.node(id), value, scales)?;
        }
        let out = value.into_tensor();
        let dt = out.datum_type();
        ensure!(is_8bit(dt) && out.len() == c * 256);
        let out = out.try_as_plain_ram()?;
        let out = out.as_bytes();
        let tables = (0..c)
            .flat_map(|ch| (0..256).map(move |v| out[at(ch, v)]))
            .collect();
        Ok(ChannelTable {
            axis: self.axis,
            tables: Arc::new(tables),
            dt,
        })
    }
}

/// Whether `node` computes each output element from the input element at the same place
/// (input 0, of `shape`) and constants that vary along one axis at most, the same axis
/// and length for the whole chain (`channel`, set by the first that varies).
fn element_wise(
    model: &TypedModel,
    node: &TypedNode,
    shape: &[usize],
    channel: &mut Option<(usize, usize)>,
) -> TractResult<bool> {
    if node.outputs.len() != 1
        || node.outputs[0].fact.shape.as_concrete() != Some(shape)
        || node.outputs[0].fact.datum_type.is_quantized()
    {
        return Ok(false);
    }
    let pure = node.op_is::<DequantizeLinearF32>()
        || node.op_is::<ElementWiseOp>()
        || node.op_is::<TypedBinOp>() && node.inputs.len() == 2;
    if !pure {
        return Ok(false);
    }
    for &input in &node.inputs[1..] {
        let Some(k) = model.outlet_fact(input)?.konst.clone() else {
            return Ok(false);
        };
        if !per_channel(k.shape(), shape, channel) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a constant of shape `k` broadcast over `shape` (of the same rank, as tract's
/// typed binary ops require) varies along one axis at most, the chain's channel axis
/// (recorded in `channel` by the first constant that varies).
fn per_channel(k: &[usize], shape: &[usize], channel: &mut Option<(usize, usize)>) -> bool {
    if k.len() != shape.len() {
        return false;
    }
    let long: Vec<(usize, usize)> = k
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, d)| *d > 1)
        .collect();
    match long[..] {
        [] => true,
        [(axis, len)] => *channel.get_or_insert((axis, len)) == (axis, len),
        _ => false,
    }
}

/// `node`'s op on `x` and its constants, out of any plan; a quantiser as
/// [`super::fast_quantize`] will run it.
fn eval(
    model: &TypedModel,
    node: &TypedNode,
    x: TValue,
    scales: &QuantizeScales,
) -> TractResult<TValue> {
    let mut inputs = tvec![x];
    for &i in &node.inputs[1..] {
        let k = model.outlet_fact(i)?.konst.clone().context("a constant")?;
        inputs.push(k.into_tvalue());
    }
    let fast = Quantize::replacing(model, node, scales)?;
    let out = match fast {
        Some(q) => q.eval_out_of_plan(inputs)?,
        None => node.op.eval_out_of_plan(inputs)?,
    };
    let mut out = out.with_context(|| format!("{} needs a plan", node.name))?;
    Ok(out.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::math::{add, max, mul, sub};
    use tract_core::ops::quant::{offset_u8_as_i8, quantize_linear_i8, quantize_linear_u8};

    /// A Keras BatchNorm quantised op by op, then a ReLU: from `x` (8-bit), dequantise,
    /// Sub, quantise, dequantise, Mul, quantise, dequantise, Add, Max 0, quantise to
    /// `out`. The constants vary along `axis` (`c` channels) and have `rank` axes.
    fn batchnorm(
        m: &mut TypedModel,
        x: OutletId,
        axis: usize,
        c: usize,
        out: DatumType,
    ) -> OutletId {
        let rank = m.outlet_fact(x).unwrap().rank();
        let mut shape = vec![1; rank];
        shape[axis] = c;
        let per_channel = |m: &mut TypedModel, name: &str, f: &dyn Fn(usize) -> f32| {
            let v: Vec<f32> = (0..c).map(f).collect();
            let t = tensor1(&v).into_shape(&shape).unwrap();
            m.add_const(format!("{name}.k"), t).unwrap()
        };
        let wire = |m: &mut TypedModel, name: &str, op: Box<dyn TypedOp>, inputs: &[OutletId]| {
            m.wire_node(name, op, inputs).unwrap()[0]
        };
        let in_zp = if m.outlet_fact(x).unwrap().datum_type == DatumType::I8 {
            -3
        } else {
            131
        };
        let dq = |s: f32, z: i32| {
            Box::new(DequantizeLinearF32 {
                scale: s,
                zero_point: z,
            })
        };
        let w = wire(m, "dq0", dq(0.047, in_zp), &[x]);
        let mean = per_channel(m, "mean", &|i| (i as f32 * 0.7).sin() * 0.3);
        let w = wire(m, "sub", Box::new(sub()), &[w, mean]);
        let w = wire(
            m,
            "q1",
            Box::new(quantize_linear_u8(1.0 / 0.051, 127)),
            &[w],
        );
        let w = wire(m, "dq1", dq(0.051, 127), &[w]);
        let scale = per_channel(m, "scale", &|i| 0.8 + (i as f32 * 1.3).cos().abs() * 0.5);
        let w = wire(m, "mul", Box::new(mul()), &[w, scale]);
        // A scale the model's quantiser list does not know: tract's `x * (1/s)`.
        let w = wire(
            m,
            "q2",
            Box::new(quantize_linear_u8(1.0 / 0.063, 120)),
            &[w],
        );
        let w = wire(m, "dq2", dq(0.063, 120), &[w]);
        let beta = per_channel(m, "beta", &|i| (i as f32 * 2.1).sin() * 0.2);
        let w = wire(m, "add", Box::new(add()), &[w, beta]);
        let zero = Tensor::from_shape(&vec![1; rank], &[0f32]).unwrap();
        let zero = m.add_const("zero", zero).unwrap();
        let w = wire(m, "relu", Box::new(max()), &[w, zero]);
        let q: Box<dyn TypedOp> = match out {
            DatumType::I8 => Box::new(quantize_linear_i8(1.0 / 0.029, -100)),
            _ => Box::new(quantize_linear_u8(1.0 / 0.029, 5)),
        };
        wire(m, "q3", q, &[w])
    }

    /// The quantisers' scales as a model's QuantizeLinear nodes give them (all but q2's).
    fn scales() -> QuantizeScales {
        [0.051f32, 0.029]
            .iter()
            .map(|s| (s.recip().to_bits(), Some(*s)))
            .collect()
    }

    /// Each chain folded into one table gives the chain's bytes, element for element:
    /// NCHW and NHWC, u8 and i8 in and out, every byte in every channel, a tensor cut
    /// into pieces. The reference is
    /// the chain with its quantisers as `fast_quantize` makes them.
    #[test]
    fn tables_give_the_chains_bits() {
        for (shape, axis, dt_in, dt_out) in [
            ([1, 5, 16, 18], 1, DatumType::U8, DatumType::U8),
            ([1, 16, 18, 5], 3, DatumType::U8, DatumType::I8),
            ([1, 7, 9, 64], 1, DatumType::I8, DatumType::U8),
            ([2, 3, 4, 128], 3, DatumType::I8, DatumType::I8),
            // Larger than one piece of parallel work: pieces start mid-tensor.
            ([1, 64, 32, 32], 1, DatumType::U8, DatumType::U8),
        ] {
            let c = shape[axis];
            let mut m = TypedModel::default();
            let x = m.add_source("x", dt_in.fact(shape)).unwrap();
            let y = batchnorm(&mut m, x, axis, c, dt_out);
            m.select_output_outlets(&[y]).unwrap();
            let n: usize = shape.iter().product();
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + i / 256) as u8).collect();
            let mut input = Tensor::from_shape(&shape, &bytes).unwrap();
            // SAFETY: the same bytes as i8 where the source is i8.
            unsafe { input.set_datum_type(dt_in) };
            let run = |m: &TypedModel| {
                let plan = m.clone().into_runnable().unwrap();
                plan.run(tvec![input.clone().into_tvalue()])
                    .unwrap()
                    .remove(0)
            };
            let mut want = m.clone();
            assert_eq!(
                crate::model::int8::fast_quantize(&mut want, &scales()).unwrap(),
                3
            );
            let want = run(&want);
            let mut folded = m.clone();
            assert_eq!(fold_channel_tables(&mut folded, &scales()).unwrap(), 1);
            assert_eq!(
                folded.nodes().len(),
                2,
                "{shape:?}: the source and the table"
            );
            let got = run(&folded);
            assert_eq!(got.datum_type(), dt_out);
            assert_eq!(
                got.try_as_plain_ram().unwrap().as_bytes(),
                want.try_as_plain_ram().unwrap().as_bytes(),
                "{shape:?} axis {axis}, {dt_in:?} -> {dt_out:?}"
            );
        }
    }

    /// What is not one value's function stays: a chain stops at a value read twice or
    /// output (the tail after it is a chain of its own), at a constant that varies along two axes, and at an
    /// add of two computed values; one op alone is not worth a table.
    #[test]
    fn only_pure_chains_fold() {
        let shape = [1, 4, 6, 6];
        let dq = |s: f32| DequantizeLinearF32 {
            scale: s,
            zero_point: 0,
        };
        let mut m = TypedModel::default();
        let x = m.add_source("x", u8::fact(shape)).unwrap();
        let w = m.wire_node("dq", dq(0.1), &[x]).unwrap()[0];
        let k = Tensor::from_shape(&[1, 4, 1, 1], &[0.5f32, 0.25, 0.125, 1.0]).unwrap();
        let k = m.add_const("k", k).unwrap();
        let w = m.wire_node("sub", sub(), &[w, k]).unwrap()[0];
        let q = m.wire_node("q", quantize_linear_u8(10.0, 0), &[w]).unwrap()[0];
        // q read by two nodes, each beginning a chain; q2 output, and read by one op.
        let w = m.wire_node("dq2", dq(0.1), &[q]).unwrap()[0];
        let w = m.wire_node("mul", mul(), &[w, k]).unwrap()[0];
        let q2 = m
            .wire_node("q2", quantize_linear_u8(10.0, 0), &[w])
            .unwrap()[0];
        let c = m.wire_node("dqc", dq(0.3), &[q]).unwrap()[0];
        let c = m.wire_node("qc", quantize_linear_u8(5.0, 0), &[c]).unwrap()[0];
        let b = m.wire_node("dqb", dq(0.2), &[c]).unwrap()[0];
        let b = m.wire_node("qb", quantize_linear_u8(5.0, 0), &[b]).unwrap()[0];
        // A constant that varies over the map, not only over the channels.
        let w = m.wire_node("dq3", dq(0.1), &[b]).unwrap()[0];
        let plane = Tensor::from_shape(&[1, 1, 6, 6], &[0.5f32; 36]).unwrap();
        let plane = m.add_const("plane", plane).unwrap();
        let w = m.wire_node("addmap", add(), &[w, plane]).unwrap()[0];
        let q3 = m
            .wire_node("q3", quantize_linear_u8(10.0, 0), &[w])
            .unwrap()[0];
        // An add of two computed values.
        let a = m.wire_node("dqa", dq(0.1), &[q3]).unwrap()[0];
        let s = m.wire_node("sum", add(), &[a, w]).unwrap()[0];
        let y = m
            .wire_node("qy", quantize_linear_u8(10.0, 0), &[s])
            .unwrap()[0];
        // One op alone, after a value the model outputs.
        let o = m.wire_node("offset", offset_u8_as_i8(), &[q2]).unwrap()[0];
        m.select_output_outlets(&[q2, y, b, c, o]).unwrap();
        assert_eq!(fold_channel_tables(&mut m, &Default::default()).unwrap(), 4);
        let names: Vec<&str> = m.nodes().iter().map(|n| &*n.name).collect();
        for table in ["q.table", "q2.table", "qb.table", "qc.table"] {
            assert!(names.contains(&table), "{table} missing: {names:?}");
        }
        for kept in ["dq3", "addmap", "q3", "dqa", "sum", "qy", "offset"] {
            assert!(names.contains(&kept), "{kept} folded: {names:?}");
        }
        // Each table reads the one before it: none runs a chain through a shared value.
        let reads = |name: &str| {
            let node = m.nodes().iter().find(|n| n.name == name).unwrap();
            &*m.node(node.inputs[0].node).name
        };
        for (table, input) in [
            ("q.table", "x"),
            ("q2.table", "q.table"),
            ("qc.table", "q.table"),
            ("qb.table", "qc.table"),
            ("offset", "q2.table"),
        ] {
            assert_eq!(reads(table), input, "{table}");
        }
    }

    /// The quantisers in a table divide by the model's scale as [`super::fast_quantize`]
    /// makes them, not multiply by its reciprocal as tract's do: on a scale where the two
    /// round apart, the table follows the division.
    #[test]
    fn tables_quantise_as_fast_quantize_does() {
        let a = 0.001f32;
        // A scale on which x / s and x * (1 / s) round apart for some byte x.
        let apart = |s: f32| {
            (0..=255u8).any(|q| {
                let x = q as f32 * a;
                (x / s).round_ties_even() != (x * s.recip()).round_ties_even()
            })
        };
        let s = (1..100_000)
            .map(|i| 0.003 + i as f32 * 1e-6)
            .find(|s| apart(*s))
            .expect("a scale that rounds apart");
        let mut m = TypedModel::default();
        let x = m.add_source("x", u8::fact([1, 1, 1, 256])).unwrap();
        let w = m
            .wire_node(
                "dq",
                DequantizeLinearF32 {
                    scale: a,
                    zero_point: 0,
                },
                &[x],
            )
            .unwrap()[0];
        let one = Tensor::from_shape(&[1, 1, 1, 1], &[1f32]).unwrap();
        let one = m.add_const("one", one).unwrap();
        let w = m.wire_node("mul", mul(), &[w, one]).unwrap()[0];
        let y = m
            .wire_node("q", quantize_linear_i8(s.recip(), 0), &[w])
            .unwrap()[0];
        m.select_output_outlets(&[y]).unwrap();
        let input = tensor1(&(0..=255u8).collect::<Vec<_>>())
            .into_shape(&[1, 1, 1, 256])
            .unwrap();
        let run = |m: &TypedModel| {
            let plan = m.clone().into_runnable().unwrap();
            plan.run(tvec![input.clone().into_tvalue()])
                .unwrap()
                .remove(0)
        };
        let scales: QuantizeScales = [(s.recip().to_bits(), Some(s))].into();
        let tracts = run(&m);
        let mut want = m.clone();
        crate::model::int8::fast_quantize(&mut want, &scales).unwrap();
        let want = run(&want);
        assert_ne!(tracts, want, "the test's scale must round apart");
        let mut folded = m.clone();
        assert_eq!(fold_channel_tables(&mut folded, &scales).unwrap(), 1);
        assert_eq!(run(&folded), want);
    }
}
