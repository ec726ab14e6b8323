//! Which of tract's convs become ours: the preconditions (NCHW, OIHW i8 weights with
//! zero point 0, one group, no dilation, u8/i8 in and out, constant parameters, a known
//! input size), the folding of zero points and scales, and the graph patch.

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_core::ops::nn::DataFormat;

use crate::model::graph::{konst, rewire};
use crate::model::int8::QuantizedAdd;
#[cfg(target_arch = "x86_64")]
use crate::model::int8::qconv::kernels::avx2;
use crate::model::int8::qconv::kernels::{Excess, Excesses, split_for_pairs};
use crate::model::int8::qconv::op::{Packing, QConv};
use crate::model::int8::qconv::{Kernel, MR};

/// What the node's facts say about the conv: its element types and sizes.
struct Shape {
    out_dt: DatumType,
    signed_x: bool,
    hw: [usize; 2],
    cin: usize,
    cout: usize,
    kernel: (usize, usize),
}

impl Shape {
    /// `None` unless the layout is one our kernels run: NCHW, OIHW i8 weights, one
    /// group, no dilation, u8/i8 in and out, a known input height and width.
    fn of(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<Shape>> {
        let ps = &conv.pool_spec;
        let Some(out_dt) = conv.q_params.map(|d| d.unquantized()) else {
            return Ok(None);
        };
        if node.inputs.len() != 9
            || conv.group != 1
            || conv.kernel_fmt != KernelFormat::OIHW
            || ps.data_format != DataFormat::NCHW
            || ps.kernel_shape.len() != 2
            || ps.dilations().iter().any(|d| *d != 1)
            || !matches!(out_dt, DatumType::U8 | DatumType::I8)
        {
            return Ok(None);
        }
        let x = model.outlet_fact(node.inputs[0])?;
        let k = model.outlet_fact(node.inputs[1])?;
        let signed_x = match x.datum_type.unquantized() {
            DatumType::U8 => false,
            DatumType::I8 => true,
            _ => return Ok(None),
        };
        if k.datum_type.unquantized() != DatumType::I8 || x.rank() != 4 {
            return Ok(None);
        }
        let Some(hw) = x.shape.as_concrete().map(|s| [s[2], s[3]]) else {
            return Ok(None);
        };
        Ok(Some(Shape {
            out_dt,
            signed_x,
            hw,
            cin: ps.input_channels,
            cout: ps.output_channels,
            kernel: (ps.kernel_shape[0], ps.kernel_shape[1]),
        }))
    }

    fn taps(&self) -> usize {
        self.kernel.0.saturating_mul(self.kernel.1)
    }
}

/// The constant weights and quantisation parameters (inputs 1 to 8 of tract's conv).
struct Quant {
    kernel: Vec<i8>,
    bias: Vec<i32>,
    x0: i32,
    xs: f32,
    ks: Vec<f32>,
    y0: i32,
    ys: f32,
}

impl Quant {
    /// `None` unless every parameter is a constant of the size our op folds: per-tensor
    /// input and output, per-tensor or per-channel bias and weight scale, weight zero
    /// point 0.
    fn of(model: &TypedModel, node: &TypedNode, shape: &Shape) -> Option<Quant> {
        let kernel = konst::<i8>(model, node, 1)?;
        let (bias, x0, xs) = (
            konst(model, node, 2)?,
            konst(model, node, 3)?,
            konst(model, node, 4)?,
        );
        let (k0, ks) = (konst::<i32>(model, node, 5)?, konst(model, node, 6)?);
        let (y0, ys) = (konst(model, node, 7)?, konst(model, node, 8)?);
        let per_channel = |v: usize| v == 1 || v == shape.cout;
        let one = |v: &[i32], s: &[f32]| (v.len() == 1 && s.len() == 1).then(|| (v[0], s[0]));
        let ((x0, xs), (y0, ys)) = (one(&x0, &xs)?, one(&y0, &ys)?);
        let want = shape
            .cout
            .checked_mul(shape.cin)?
            .checked_mul(shape.taps())?;
        let ok = kernel.len() == want
            && k0.iter().all(|z| *z == 0)
            && per_channel(bias.len())
            && per_channel(ks.len());
        ok.then_some(Quant {
            kernel,
            bias,
            x0,
            xs,
            ks,
            y0,
            ys,
        })
    }
}

/// The XOR that brings input bytes into the kernel's domain, and the input zero point in
/// that domain; `None` if the zero point does not fit it.
fn input_domain(which: Kernel, signed_x: bool, x0: i32) -> Option<(u8, i32)> {
    let (flip, x0) = match (which.signed(), signed_x) {
        (false, false) => (0, x0),
        (false, true) => (0x80, x0 + 128),
        (true, false) => (0x80, x0 - 128),
        (true, true) => (0, x0),
    };
    let domain = if which.signed() { -128..=127 } else { 0..=255 };
    domain.contains(&x0).then_some((flip, x0))
}

/// Where weight (block row `m`, tap `t`, C4 group `g`, byte `j`) goes in one block of
/// the kernel's weights, in weights of `Kernel::weight_bytes`: [tap][c4 group][MR][4]
/// for the vector kernels, AMX's tiles for AMX.
fn weight_index(which: Kernel, t: usize, g: usize, m: usize, j: usize, groups: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if which == Kernel::Amx {
        return crate::model::int8::qconv::kernels::amx::weight_index(t, g, m, j, groups);
    }
    let _ = which;
    ((t * groups + g) * MR + m) * 4 + j
}

/// A conv's constants in its kernel's terms.
struct Folded {
    weights: Vec<i8>,
    bias: Vec<i32>,
    scales: Vec<f32>,
    excess: Excesses,
}

/// The weights in the kernel's order (per block of `which.rows()` output channels: see
/// [`weight_index`]) and, for AVX2, split where a pair would saturate ([`Excess`]); the
/// bias with the input zero point folded in (`bias - x0 * sum(w)`), and the
/// requantisation scales, each padded to whole blocks.
fn fold(shape: &Shape, q: &Quant, x0: i32, which: Kernel) -> Folded {
    let (cin, cout, taps) = (shape.cin, shape.cout, shape.taps());
    let groups = cin.div_ceil(4);
    let rows = which.rows();
    let blocks = cout.div_ceil(rows);
    let width = which.weight_bytes();
    let wblock = taps * groups * rows * 4 * width;
    let pairs = which.splits_pairs();
    let mut f = Folded {
        weights: vec![0i8; blocks * wblock],
        bias: vec![0i32; blocks * rows],
        scales: vec![0f32; blocks * rows],
        excess: Excesses::default(),
    };
    let mut excess = vec![vec![]; if pairs { blocks } else { 0 }];
    for co in 0..cout {
        let (b, m) = (co / rows, co % rows);
        let mut sum = 0i32;
        for t in 0..taps {
            for g in 0..groups {
                let mut w = [0i8; 4];
                for (j, w) in w.iter_mut().enumerate().take(cin - 4 * g) {
                    *w = q.kernel[(co * cin + 4 * g + j) * taps + t];
                    sum += *w as i32;
                }
                let (w, rest) = if pairs {
                    split_for_pairs(w)
                } else {
                    (w, [0; 4])
                };
                if rest != [0; 4] {
                    let (tap, group) = (t as u32, g as u32);
                    excess[b].push(Excess {
                        tap,
                        group,
                        m: m as u8,
                        w: rest,
                    });
                }
                for (j, w) in w.into_iter().enumerate() {
                    let at = b * wblock + weight_index(which, t, g, m, j, groups) * width;
                    // Widened weights are little-endian i16s: the byte, then its sign.
                    f.weights[at..at + width].copy_from_slice(&[w, w >> 7][..width]);
                }
            }
        }
        let bias = q.bias[if q.bias.len() == 1 { 0 } else { co }];
        f.bias[co] = bias.wrapping_sub(x0 * sum);
        // tract's combine_scales: (k_scale * x_scale) / y_scale.
        f.scales[co] = (q.ks[if q.ks.len() == 1 { 0 } else { co }] * q.xs) / q.ys;
    }
    f.excess = Excesses::new(excess);
    f
}

/// [`fold`] for `which`, or for the widened AVX2 kernel where `which` is AVX2 and its
/// `vpmaddubsw` would have to split too many of the weights' fours
/// ([`avx2::WIDE_SHARE`]).
fn fold_for(shape: &Shape, q: &Quant, x0: i32, which: Kernel) -> (Kernel, Folded) {
    let folded = fold(shape, q, x0, which);
    #[cfg(target_arch = "x86_64")]
    {
        let fours = shape.cout * shape.taps() * shape.cin.div_ceil(4);
        if which == Kernel::Avx2 && folded.excess.len() as f64 > avx2::WIDE_SHARE * fours as f64 {
            return (Kernel::Avx2Wide, fold(shape, q, x0, Kernel::Avx2Wide));
        }
    }
    (which, folded)
}

/// Build our op for a quantised tract `Conv` node, if it is one we run (see [`Shape::of`]
/// and [`Quant::of`]); `Ok(None)` leaves the node to tract.
pub(crate) fn qconv_for(
    model: &TypedModel,
    node: &TypedNode,
    which: Kernel,
) -> TractResult<Option<QConv>> {
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let ps = &conv.pool_spec;
    let Some(shape) = Shape::of(model, node, conv)? else {
        return Ok(None);
    };
    let Some(q) = Quant::of(model, node, &shape) else {
        return Ok(None);
    };
    let Some((flip, x0)) = input_domain(which, shape.signed_x, q.x0) else {
        return Ok(None);
    };
    if matches!(ps.padding, PaddingSpec::ExplicitOnnxPool(_, _, true)) {
        return Ok(None);
    }
    let (stride, pad) = crate::model::conv_geo::strides_and_pads(ps, &shape.hw);
    // Padding as wide as the kernel means output pixels that see nothing but padding:
    // legal, but no exported classifier has it; tract keeps such a conv.
    let (kh, kw) = shape.kernel;
    if pad.0 >= kh || pad.2 >= kh {
        return Ok(None);
    }
    if pad.1 >= kw || pad.3 >= kw {
        return Ok(None);
    }
    let (lo, hi) = if shape.out_dt == DatumType::U8 {
        (0, 255)
    } else {
        (-128, 127)
    };
    // An output zero point the output type cannot hold is no 8-bit quantisation; the
    // kernels' requantisers count on it being one (kernels::neon's `Requant`).
    if !(lo..=hi).contains(&q.y0) {
        return Ok(None);
    }
    // AMX reduces 64 input channels a step: other convs (a 3-channel stem) run on VNNI.
    #[cfg(target_arch = "x86_64")]
    let which = if which == Kernel::Amx && shape.cin % 64 != 0 {
        Kernel::Avx512Vnni
    } else {
        which
    };
    let (which, folded) = fold_for(&shape, &q, x0, which);
    let Folded {
        weights,
        bias,
        scales,
        excess,
    } = folded;
    let mut op = QConv {
        packing: Packing {
            cin: shape.cin,
            kernel: shape.kernel,
            stride,
            pad,
            flip,
            x0: x0 as u8, // the byte: i8's two's complement in the signed domain
        },
        cout: shape.cout,
        weights: Arc::new(weights),
        excess: Arc::new(excess),
        bias: Arc::new(bias),
        scales: Arc::new(scales),
        y0: q.y0,
        lo,
        hi,
        out_dt: shape.out_dt,
        which,
        residual: None,
        handoff: None,
        prepacked: None,
        gather: false,
    };
    // Every size and read of the kernels, for the input this model has, checked now: a
    // crafted geometry fails the load naming its node, it never reaches `unsafe`.
    let g = op
        .geo(shape.hw[0], shape.hw[1])
        .with_context(|| format!("node {:?}: int8 convolution", node.name))?;
    op.gather = op.gather_pays(&g);
    if op.gather {
        g.gathered(op.packing.groups())
            .with_context(|| format!("node {:?}: int8 convolution, gathered", node.name))?;
    }
    Ok(Some(op))
}

/// Replace every quantised conv edgesight runs itself by a [`QConv`]. Run on the typed
/// model once its constants are folded, before declutter (which would turn 1x1 convs
/// into einsums). Returns how many convs were replaced.
pub fn replace_convs(model: &mut TypedModel, which: Kernel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(op) = qconv_for(model, node, which)? else {
            continue;
        };
        let (name, x) = (format!("{}.int8", node.name), node.inputs[0]);
        rewire(model, OutletId::new(id, 0), name, op, &[x])?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// Fuse each [`QuantizedAdd`] one of whose inputs is a [`QConv`]'s output, used by
/// nothing else, into that conv: the conv's pass that moves its result out of the
/// kernel's rows does the add on the way (ResNet's residual adds: the third conv of a
/// block, or its shortcut's conv). The add's pass over memory goes: a read and a write of
/// the conv's output, and the op. The same arithmetic per element as the add op
/// (`QuantizedAdd`), so the same bits. Run after [`crate::model::int8::fuse_quantized_adds`].
/// Returns how many adds went into convs.
pub fn fuse_conv_adds(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(add) = node.op_as::<QuantizedAdd>() else {
            continue;
        };
        let conv_of = |i: usize| -> Option<(&QConv, usize)> {
            let from = node.inputs[i];
            let n = model.node(from.node);
            let conv = n.op_as::<QConv>()?;
            let only_here =
                n.outputs[0].successors.len() == 1 && !model.outputs.iter().any(|o| o.node == n.id);
            (conv.residual.is_none() && only_here).then_some((conv, n.id))
        };
        let (conv, conv_id, skip, add) = match (conv_of(0), conv_of(1)) {
            (Some((c, n)), _) => (c, n, node.inputs[1], add.clone()),
            (None, Some((c, n))) => (c, n, node.inputs[0], add.swapped()),
            _ => continue,
        };
        let op = QConv {
            residual: Some(Box::new(add)),
            ..conv.clone()
        };
        let x = model.node(conv_id).inputs[0];
        let name = format!("{}.add", model.node(conv_id).name);
        rewire(model, OutletId::new(id, 0), name, op, &[x, skip])?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// Hand each [`QConv`]'s output straight to the next conv's packing where that conv is
/// its only reader (ResNet's first and second conv of every block): the conv packs its
/// kernel's rows into the next conv's layout (`QConv::handoff`), and the next conv packs
/// nothing (`QConv::prepacked`). The NCHW tensor between them, the copy into it and the
/// next conv's pass over it go; the bytes the next conv's kernel reads are the same.
/// Only where the sizes are known (a model's fixed input); the conv must not carry a
/// fused add (its output then is the block's, read by more than one op). Run last:
/// the tensor between the two convs is no longer an image any other op could read.
/// Returns how many handoffs were made.
pub fn fuse_handoffs(model: &mut TypedModel) -> TractResult<usize> {
    let mut made = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(conv) = node.op_as::<QConv>() else {
            continue;
        };
        let succ = &node.outputs[0].successors;
        let is_output = model.outputs.iter().any(|o| o.node == id);
        if conv.residual.is_some() || conv.handoff.is_some() || is_output || succ.len() != 1 {
            continue;
        }
        let (next_id, slot) = (succ[0].node, succ[0].slot);
        let Some(next) = model.node(next_id).op_as::<QConv>() else {
            continue;
        };
        let fact = model.outlet_fact(OutletId::new(id, 0))?;
        let (Some(shape), 0, None) = (fact.shape.as_concrete(), slot, next.prepacked) else {
            continue;
        };
        let (h, w) = (shape[2], shape[3]);
        let packing = next.packing.clone();
        let packed_len = packing
            .geo(h, w)
            .with_context(|| format!("node {:?}: packing for the next conv", node.name))?
            .packed_len;
        let fact = DatumType::U8.fact([shape[0], packed_len]);
        let conv = QConv {
            handoff: Some(packing),
            ..conv.clone()
        };
        let next = QConv {
            prepacked: Some((h, w)),
            ..next.clone()
        };
        model.node_mut(id).op = Box::new(conv);
        model.set_outlet_fact(OutletId::new(id, 0), fact)?;
        model.node_mut(next_id).op = Box::new(next);
        made += 1;
    }
    Ok(made)
}
