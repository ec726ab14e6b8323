//! edgesight's own f32 convolution, for fp32 models on x86 with AVX-512: one op per conv
//! computing the convolution, the bias, a residual add and a ReLU in one pass, with no
//! im2col.
//!
//! Why our own: tract 0.23 runs an f32 conv as im2col (3x3) or a packed matmul (1x1) on
//! its own kernels; on ResNet-50 that was 1.48x onnxruntime's time on a Zen 4, with
//! its matmul at ~69 % of the core's FMA peak (BENCHMARKS.md). This op lays the input out
//! as the int8 conv does (`conv_geo`: padded phase images, every tap a contiguous run of
//! pixels, one channel a "group" of 4 bytes) and keeps MR x PX accumulators of 16 pixels
//! in registers over every tap and channel.
//!
//! Arithmetic: `acc = sum x * w` by fused multiply-adds, taps outer, channels inner, then
//! `clamp(acc + bias (+ skip), lo, hi)`. Not bit for bit with tract or onnxruntime
//! (their summation orders differ from ours and from each other): within f32 rounding
//! of both (tests here and tests/model.rs).
//!
//! Kernels: AVX-512 F (`vfmadd231ps`), and the portable kernel, the definition, which
//! the vector one matches bit for bit. Elsewhere (ARM, x86 without AVX-512) tract keeps
//! the f32 convs: its ARM kernels are the ones the Pis run fp32 on.
//!
//! Files: `op` (the tract op: packing, dispatch over channel blocks, the residual add),
//! `kernels` (the portable reference beside one file per ISA); this file has the graph
//! rewrites: which tract convs become ours, and which adds and ReLUs go into them.

mod kernels;
mod op;

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_core::ops::nn::DataFormat;

use crate::model::conv_geo::{Conv2d, strides_and_pads};
use crate::model::graph::{konst, rewire, uniform_value};
pub use op::FConv;

/// Output channels per register block.
pub(crate) const MR: usize = 8;

/// Which inner kernel runs; chosen once when the op is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    /// AVX-512 F: `vfmadd231ps` on 16 pixels by a broadcast weight.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// Every kernel this CPU runs, the fastest last (on x86, what `TRACT_CPU_ISA`
    /// leaves: `model::cpu::x86_has`).
    pub fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut k = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if crate::model::cpu::x86_has(tract_linalg::isa::Isa::X86_64Avx512f) {
            k.push(Kernel::Avx512);
        }
        k
    }

    /// The kernel fp32 models use: a vector one, if this CPU has one; else tract keeps
    /// the convs (the portable kernel is the reference, far slower than tract's).
    pub fn best() -> Option<Kernel> {
        Kernel::available().pop().filter(|k| *k != Kernel::Portable)
    }
}

/// Build our op for an f32 tract `Conv` node, if it is one we run: NCHW, OIHW constant
/// weights and bias, one group, no dilation, a known input size, padding narrower than
/// the kernel. `Ok(None)` leaves the node to tract.
fn fconv_for(model: &TypedModel, node: &TypedNode, which: Kernel) -> TractResult<Option<FConv>> {
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let ps = &conv.pool_spec;
    let x = model.outlet_fact(node.inputs[0])?;
    if conv.q_params.is_some()
        || !(2..=3).contains(&node.inputs.len())
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || ps.data_format != DataFormat::NCHW
        || ps.kernel_shape.len() != 2
        || ps.dilations().iter().any(|d| *d != 1)
        || matches!(ps.padding, PaddingSpec::ExplicitOnnxPool(_, _, true))
        || x.datum_type != DatumType::F32
        || x.rank() != 4
    {
        return Ok(None);
    }
    let Some(hw) = x.shape.as_concrete().map(|s| [s[2], s[3]]) else {
        return Ok(None);
    };
    let (cin, cout) = (ps.input_channels, ps.output_channels);
    let kernel = (ps.kernel_shape[0], ps.kernel_shape[1]);
    let taps = kernel.0.saturating_mul(kernel.1);
    let Some(k) = konst::<f32>(model, node, 1) else {
        return Ok(None);
    };
    let bias = match node.inputs.len() {
        3 => konst::<f32>(model, node, 2),
        _ => Some(vec![0.0]),
    };
    let Some(bias) = bias.filter(|b| b.len() == 1 || b.len() == cout) else {
        return Ok(None);
    };
    if Some(k.len()) != cout.checked_mul(cin).and_then(|v| v.checked_mul(taps)) {
        return Ok(None);
    }
    let (stride, pad) = strides_and_pads(ps, &hw);
    // Padding as wide as the kernel means outputs that see only padding; tract keeps it.
    if pad.0 >= kernel.0 || pad.2 >= kernel.0 || pad.1 >= kernel.1 || pad.3 >= kernel.1 {
        return Ok(None);
    }
    let shape = Conv2d {
        cin,
        cout,
        kernel,
        stride,
        pad,
    };
    let (weights, bias) = fold(&shape, &k, &bias);
    let op = FConv {
        shape,
        weights: Arc::new(weights),
        bias: Arc::new(bias),
        residual: false,
        clamp: None,
        which,
    };
    // Every size and read of the kernels, for the input this model has, checked now: a
    // crafted geometry fails the load naming its node, it never reaches `unsafe`.
    op.geo(hw[0], hw[1])
        .with_context(|| format!("node {:?}: f32 convolution", node.name))?;
    Ok(Some(op))
}

/// The weights in the kernel's order, [co block][tap][cin][MR], and the bias per output
/// channel, both padded with zeros to whole blocks.
fn fold(shape: &Conv2d, k: &[f32], bias: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (cin, cout) = (shape.cin, shape.cout);
    let taps = shape.kernel.0 * shape.kernel.1;
    let blocks = cout.div_ceil(MR);
    let wblock = taps * cin * MR;
    let mut weights = vec![0f32; blocks * wblock];
    let mut folded = vec![0f32; blocks * MR];
    for co in 0..cout {
        let (b, m) = (co / MR, co % MR);
        for ci in 0..cin {
            for t in 0..taps {
                weights[b * wblock + (t * cin + ci) * MR + m] = k[(co * cin + ci) * taps + t];
            }
        }
        folded[co] = bias[if bias.len() == 1 { 0 } else { co }];
    }
    (weights, folded)
}

/// Replace every f32 conv edgesight runs itself by an [`FConv`]. Run on the typed model
/// once its constants are folded, before declutter (which would turn 1x1 convs into
/// einsums). Returns how many convs were replaced.
pub fn replace_convs(model: &mut TypedModel, which: Kernel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(op) = fconv_for(model, node, which)? else {
            continue;
        };
        let (name, x) = (format!("{}.f32", node.name), node.inputs[0]);
        rewire(model, OutletId::new(id, 0), name, op, &[x])?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// What follows a conv that can go into it.
enum Follower {
    /// `conv + skip`, the skip the given outlet (a residual add).
    Add(OutletId),
    /// `max(conv, v)`: a ReLU's lower bound.
    Max(f32),
    /// `min(conv, v)`: ReLU6's upper bound.
    Min(f32),
}

/// The [`FConv`] `node` reads as operand `i`, if nothing else reads it, with the other
/// operand's outlet.
fn conv_operand<'m>(
    model: &'m TypedModel,
    node: &TypedNode,
) -> Option<(&'m FConv, usize, OutletId)> {
    if node.inputs.len() != 2 {
        return None;
    }
    (0..2).find_map(|i| {
        let from = model.node(node.inputs[i].node);
        let conv = from.op_as::<FConv>()?;
        let only_here = from.outputs[0].successors.len() == 1
            && !model.outputs.iter().any(|o| o.node == from.id);
        only_here.then_some((conv, from.id, node.inputs[1 - i]))
    })
}

/// What `node` would fuse into the conv it reads, if it is a residual add of a tensor
/// of the conv's own shape, or a max or min with one constant value.
fn follower(
    model: &TypedModel,
    node: &TypedNode,
    conv_out: &TypedFact,
    other: OutletId,
) -> TractResult<Option<Follower>> {
    use crate::model::int8::tract_op::{ADD, MAX, MIN};
    let name = node.op.name();
    let fact = model.outlet_fact(other)?;
    if name == ADD {
        let same = fact.datum_type == DatumType::F32 && fact.shape == conv_out.shape;
        return Ok(same.then_some(Follower::Add(other)));
    }
    let Some(k) = fact.konst.as_ref().filter(|_| name == MAX || name == MIN) else {
        return Ok(None);
    };
    // A constant that does not broadcast into the conv's output would change its shape.
    let out = conv_out.shape.as_concrete();
    let fits = out.is_some_and(|out| {
        k.rank() <= out.len()
            && k.shape()
                .iter()
                .rev()
                .zip(out.iter().rev())
                .all(|(a, b)| *a == 1 || a == b)
    });
    if !fits || k.datum_type() != DatumType::F32 {
        return Ok(None);
    }
    let Some(v) = uniform_value(k)? else {
        return Ok(None);
    };
    let v = *v.try_as_plain_ram()?.to_scalar::<f32>()?;
    Ok(Some(if name == MAX {
        Follower::Max(v)
    } else {
        Follower::Min(v)
    }))
}

/// Fuse into each [`FConv`] what follows it and nothing else reads: a residual add
/// (ResNet's: the block's last conv, or its shortcut), then a ReLU (`max` with a
/// constant) or ReLU6 (`max`, then `min`). Run on the decluttered model, after
/// [`replace_convs`]. Returns how many ops went into convs.
pub fn fuse_epilogues(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some((conv, conv_id, other)) = conv_operand(model, node) else {
            continue;
        };
        let conv_out = model.outlet_fact(OutletId::new(conv_id, 0))?;
        let (lo, hi) = conv.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let (op, inputs) = match follower(model, node, conv_out, other)? {
            Some(Follower::Add(skip)) if !conv.residual && conv.clamp.is_none() => {
                let op = FConv {
                    residual: true,
                    ..conv.clone()
                };
                (op, tvec![model.node(conv_id).inputs[0], skip])
            }
            // The clamp is `min(max(v, lo), hi)`: a max after a min, or bounds that
            // cross, would not be.
            Some(Follower::Max(v)) if hi == f32::INFINITY && v <= hi => {
                let op = FConv {
                    clamp: Some((lo.max(v), hi)),
                    ..conv.clone()
                };
                (op, model.node(conv_id).inputs.iter().copied().collect())
            }
            Some(Follower::Min(v)) if v >= lo => {
                let op = FConv {
                    clamp: Some((lo, hi.min(v))),
                    ..conv.clone()
                };
                (op, model.node(conv_id).inputs.iter().copied().collect())
            }
            _ => continue,
        };
        let name = format!(
            "{}.{}",
            model.node(conv_id).name,
            node.op.name().to_lowercase()
        );
        rewire(model, OutletId::new(id, 0), name, op, &inputs)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::cnn::PoolSpec;
    use tract_core::ops::math::{add, max, min};

    /// A tiny deterministic generator (xorshift), so the test needs no crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// `n` values in [-1, 1).
        fn floats(&mut self, n: usize) -> Vec<f32> {
            (0..n)
                .map(|_| (self.next() % 2000) as f32 / 1000.0 - 1.0)
                .collect()
        }
    }

    #[derive(Clone, Copy)]
    struct Case {
        cin: usize,
        cout: usize,
        hw: (usize, usize),
        k: (usize, usize),
        stride: (usize, usize),
        pad: (usize, usize, usize, usize),
    }

    fn c(
        cin: usize,
        cout: usize,
        hw: (usize, usize),
        k: (usize, usize),
        stride: (usize, usize),
        pad: (usize, usize, usize, usize),
    ) -> Case {
        Case {
            cin,
            cout,
            hw,
            k,
            stride,
            pad,
        }
    }

    /// ResNet's shapes, small (3x3 stride 1 and 2, 1x1 stride 1 and 2, the 7x7 stem),
    /// then odd channel counts and sizes, asymmetric and no padding, non-square kernels
    /// and strides, more pixels than one block, and 1x1 convs that skip the copies.
    fn cases() -> Vec<Case> {
        vec![
            c(16, 16, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1)),
            c(16, 24, (10, 10), (3, 3), (2, 2), (1, 1, 1, 1)),
            c(32, 8, (7, 7), (1, 1), (1, 1), (0, 0, 0, 0)),
            c(32, 16, (8, 8), (1, 1), (2, 2), (0, 0, 0, 0)),
            c(3, 16, (20, 20), (7, 7), (2, 2), (3, 3, 3, 3)),
            c(5, 11, (13, 7), (3, 3), (1, 1), (0, 1, 2, 0)),
            c(6, 9, (11, 12), (3, 2), (2, 1), (1, 0, 0, 1)),
            c(4, 8, (5, 5), (3, 3), (1, 1), (0, 0, 0, 0)),
            c(8, 8, (17, 23), (3, 3), (1, 1), (1, 1, 1, 1)),
            c(7, 3, (9, 11), (5, 5), (3, 3), (2, 2, 2, 2)),
            // 1x1 convs whose pixels are whole vectors: read from the input and written
            // to the output as they are (`FConv::run_image`), stride 1 and 2.
            c(24, 16, (4, 8), (1, 1), (1, 1), (0, 0, 0, 0)),
            c(8, 24, (8, 16), (1, 1), (2, 2), (0, 0, 0, 0)),
        ]
    }

    /// A model holding one f32 conv with a bias as tract builds it from ONNX; its output
    /// is the conv's, then `then` wires what follows (given the model and the conv's
    /// output) and returns the new output.
    fn conv_model(c: &Case, rng: &mut Rng) -> (TypedModel, OutletId) {
        let mut m = TypedModel::default();
        let x = m
            .add_source("x", f32::fact([1, c.cin, c.hw.0, c.hw.1]))
            .unwrap();
        let shape = (c.cout, c.cin, c.k.0, c.k.1);
        let k = tract_ndarray::Array4::from_shape_vec(
            shape,
            rng.floats(c.cout * c.cin * c.k.0 * c.k.1),
        )
        .unwrap()
        .into_tensor();
        let k = m.add_const("k", k).unwrap();
        let bias = m.add_const("bias", tensor1(&rng.floats(c.cout))).unwrap();
        let op = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![c.k.0, c.k.1],
                padding: PaddingSpec::Explicit(tvec![c.pad.0, c.pad.1], tvec![c.pad.2, c.pad.3]),
                dilations: None,
                strides: Some(tvec![c.stride.0, c.stride.1]),
                input_channels: c.cin,
                output_channels: c.cout,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let y = m.wire_node("conv", op, &[x, k, bias]).unwrap()[0];
        (m, y)
    }

    fn input(c: &Case, rng: &mut Rng) -> Tensor {
        Tensor::from_shape(
            &[1, c.cin, c.hw.0, c.hw.1],
            &rng.floats(c.cin * c.hw.0 * c.hw.1),
        )
        .unwrap()
    }

    /// Run `m` on `inputs`, on one thread or on a pool of `threads`.
    fn run(m: TypedModel, inputs: &[Tensor], threads: usize) -> Tensor {
        let plan = m.into_runnable().unwrap();
        let go = || {
            plan.run(inputs.iter().map(|t| t.clone().into_tvalue()).collect())
                .unwrap()
        };
        let out = if threads > 1 {
            use tract_core::internal::tract_linalg::multithread::*;
            multithread_tract_scope(Executor::multithread(threads), go)
        } else {
            go()
        };
        out[0].clone().into_tensor()
    }

    /// Every kernel on one thread, then the fastest on two: (kernel, threads).
    fn runs() -> Vec<(Kernel, usize)> {
        let fastest = *Kernel::available().last().unwrap();
        Kernel::available()
            .into_iter()
            .map(|k| (k, 1))
            .chain([(fastest, 2)])
            .collect()
    }

    /// Our op against tract's own conv, within f32 rounding (the summation orders
    /// differ), and every kernel, on one thread and two, against the portable one bit for
    /// bit (the same fused multiply-adds in the same order).
    #[test]
    fn matches_tracts_conv() {
        let mut rng = Rng(0x5eed_f32c_0000_0001);
        println!("f32 conv kernels on this CPU: {:?}", Kernel::available());
        for (i, c) in cases().iter().enumerate() {
            let (mut m, y) = conv_model(c, &mut rng);
            m.select_output_outlets(&[y]).unwrap();
            let x = input(c, &mut rng);
            let tract = run(
                m.clone().into_optimized().unwrap(),
                std::slice::from_ref(&x),
                1,
            );
            let mut reference = None;
            for (which, threads) in runs() {
                let mut ours = m.clone();
                assert_eq!(replace_convs(&mut ours, which).unwrap(), 1, "case {i}");
                let got = run(ours, std::slice::from_ref(&x), threads);
                assert_eq!(got.shape(), tract.shape(), "case {i}");
                let reference = reference.get_or_insert_with(|| got.clone());
                assert_eq!(got, *reference, "case {i} {which:?} {threads} threads");
            }
            let (a, b) = (reference.unwrap(), tract);
            let (a, b) = (a.try_as_plain_ram().unwrap(), b.try_as_plain_ram().unwrap());
            let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
            // Sums of up to 7*7*32 products of values in [-1, 1): a few ulps of the sum's
            // magnitude apart.
            let worst = a
                .iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "case {i}: {worst} from tract's conv");
        }
    }

    /// The adds and clamps fused into the conv give the bits the conv op and tract's ops
    /// give one after the other: a residual add then a ReLU (the conv either operand), a
    /// ReLU alone, ReLU6 (max then min); and what must not fuse stays: a min before a
    /// max, an add after a ReLU, a conv whose output is also read elsewhere.
    #[test]
    fn fused_adds_and_relus_give_the_same_bits() {
        type Wire = fn(&mut TypedModel, OutletId, OutletId) -> OutletId;
        let add_relu: Wire = |m, y, skip| {
            let s = m.wire_node("add", add(), &[skip, y]).unwrap()[0];
            let zero = m.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
            m.wire_node("relu", max(), &[s, zero]).unwrap()[0]
        };
        let relu6: Wire = |m, y, _| {
            let zero = m.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
            let six = m.add_const("six", tensor4(&[[[[6f32]]]])).unwrap();
            let r = m.wire_node("relu", max(), &[y, zero]).unwrap()[0];
            m.wire_node("relu6", min(), &[r, six]).unwrap()[0]
        };
        let min_then_max: Wire = |m, y, _| {
            let lo = m.add_const("lo", tensor4(&[[[[-0.5f32]]]])).unwrap();
            let hi = m.add_const("hi", tensor4(&[[[[0.5f32]]]])).unwrap();
            let r = m.wire_node("min", min(), &[y, hi]).unwrap()[0];
            m.wire_node("max", max(), &[r, lo]).unwrap()[0]
        };
        let relu_then_add: Wire = |m, y, skip| {
            let zero = m.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
            let r = m.wire_node("relu", max(), &[y, zero]).unwrap()[0];
            m.wire_node("add", add(), &[r, skip]).unwrap()[0]
        };
        let read_twice: Wire = |m, y, skip| {
            let s = m.wire_node("add", add(), &[y, skip]).unwrap()[0];
            m.wire_node("again", add(), &[s, y]).unwrap()[0]
        };
        // (what follows, how many ops fuse, whether the skip input is read)
        let chains: [(Wire, usize, bool); 5] = [
            (add_relu, 2, true),
            (relu6, 2, false),
            (min_then_max, 1, false),
            (relu_then_add, 1, true),
            (read_twice, 0, true),
        ];
        let mut rng = Rng(0x5eed_f32c_add0_0001);
        for (i, (wire, fuses, skip_read)) in chains.into_iter().enumerate() {
            let all = cases();
            for c in [all[0], all[1], all[2], all[3], all[10], all[11]] {
                let (mut m, y) = conv_model(&c, &mut rng);
                let shape = m
                    .outlet_fact(y)
                    .unwrap()
                    .shape
                    .as_concrete()
                    .unwrap()
                    .to_vec();
                let skip = m.add_source("skip", f32::fact(&shape)).unwrap();
                let out = wire(&mut m, y, skip);
                m.select_output_outlets(&[out]).unwrap();
                if !skip_read {
                    m.set_input_outlets(&[m.input_outlets().unwrap()[0]])
                        .unwrap();
                }
                let mut inputs = vec![input(&c, &mut rng)];
                if skip_read {
                    inputs.push(
                        Tensor::from_shape(&shape, &rng.floats(shape.iter().product())).unwrap(),
                    );
                }
                for (which, threads) in runs() {
                    let what = format!("chain {i} {which:?} {threads} threads");
                    let mut apart = m.clone();
                    assert_eq!(replace_convs(&mut apart, which).unwrap(), 1, "{what}");
                    let mut fused = apart.clone();
                    assert_eq!(fuse_epilogues(&mut fused).unwrap(), fuses, "{what}");
                    let (want, got) = (run(apart, &inputs, threads), run(fused, &inputs, threads));
                    assert_eq!(got, want, "{what}");
                }
            }
        }
    }
}
