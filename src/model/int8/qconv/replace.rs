//! Which of tract's convs become ours: the preconditions (NCHW, OIHW i8 weights with
//! zero point 0, one group, no dilation, u8/i8 in and out, constant parameters, a known
//! input size), the folding of zero points and scales, and the graph patch.

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_core::ops::nn::DataFormat;

use crate::model::int8::qconv::op::QConv;
use crate::model::int8::qconv::{Kernel, MR};

/// The constant input `ix` of `node` as a flat vector of `T`.
fn konst<T: Datum + Copy>(model: &TypedModel, node: &TypedNode, ix: usize) -> Option<Vec<T>> {
    let k = model.outlet_fact(node.inputs[ix]).ok()?.konst.clone()?;
    let k = k.cast_to::<T>().ok()?;
    Some(k.try_as_plain_ram().ok()?.as_slice::<T>().ok()?.to_vec())
}

/// Build our op for a quantised tract `Conv` node, if it is one we run: NCHW, OIHW i8
/// weights with zero point 0, one group, no dilation, u8/i8 in and out, constant
/// parameters, a known input height and width.
pub(crate) fn qconv_for(
    model: &TypedModel,
    node: &TypedNode,
    which: Kernel,
) -> TractResult<Option<QConv>> {
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
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
    let (cin, cout) = (ps.input_channels, ps.output_channels);
    let (kh, kw) = (ps.kernel_shape[0], ps.kernel_shape[1]);
    let Some(kernel) = model
        .outlet_fact(node.inputs[1])?
        .konst
        .clone()
        .and_then(|k| {
            let k = k.cast_to::<i8>().ok()?.into_owned();
            Some(k.try_as_plain_ram().ok()?.as_slice::<i8>().ok()?.to_vec())
        })
    else {
        return Ok(None);
    };
    let (Some(bias), Some(x0), Some(xs), Some(k0), Some(ks), Some(y0), Some(ys)) = (
        konst::<i32>(model, node, 2),
        konst::<i32>(model, node, 3),
        konst::<f32>(model, node, 4),
        konst::<i32>(model, node, 5),
        konst::<f32>(model, node, 6),
        konst::<i32>(model, node, 7),
        konst::<f32>(model, node, 8),
    ) else {
        return Ok(None);
    };
    let per_channel = |v: usize| v == 1 || v == cout;
    if kernel.len() != cout * cin * kh * kw
        || k0.iter().any(|z| *z != 0)
        || x0.len() != 1
        || xs.len() != 1
        || y0.len() != 1
        || ys.len() != 1
        || !per_channel(bias.len())
        || !per_channel(ks.len())
    {
        return Ok(None);
    }
    // The zero point in the kernel's domain (see `flip`), and the flip that gets there.
    let (flip, x0) = match (which.signed(), signed_x) {
        (false, false) => (0, x0[0]),
        (false, true) => (0x80, x0[0] + 128),
        (true, false) => (0x80, x0[0] - 128),
        (true, true) => (0, x0[0]),
    };
    let domain = if which.signed() { -128..=127 } else { 0..=255 };
    if !domain.contains(&x0) {
        return Ok(None);
    }
    let pads = ps.computed_padding(&hw);
    let pad = (
        pads[0].pad_before,
        pads[1].pad_before,
        pads[0].pad_after,
        pads[1].pad_after,
    );
    if matches!(ps.padding, PaddingSpec::ExplicitOnnxPool(_, _, true)) {
        return Ok(None);
    }
    let strides = ps.strides();
    let (lo, hi) = if out_dt == DatumType::U8 {
        (0, 255)
    } else {
        (-128, 127)
    };
    let taps = kh * kw;
    let groups = cin.div_ceil(4);
    let blocks = cout.div_ceil(MR);
    let mut weights = vec![0i8; blocks * taps * groups * MR * 4];
    let mut folded = vec![0i32; blocks * MR];
    let mut scales = vec![0f32; blocks * MR];
    for co in 0..cout {
        let (b, m) = (co / MR, co % MR);
        let mut sum = 0i32;
        for ci in 0..cin {
            for t in 0..taps {
                let v = kernel[(co * cin + ci) * taps + t];
                sum += v as i32;
                let (g, j) = (ci / 4, ci % 4);
                weights[(((b * taps + t) * groups + g) * MR + m) * 4 + j] = v;
            }
        }
        let bias = bias[if bias.len() == 1 { 0 } else { co }];
        folded[co] = bias.wrapping_sub(x0 * sum);
        // tract's combine_scales: (k_scale * x_scale) / y_scale.
        scales[co] = (ks[if ks.len() == 1 { 0 } else { co }] * xs[0]) / ys[0];
    }
    Ok(Some(QConv {
        cin,
        cout,
        kernel: (kh, kw),
        stride: (strides[0], strides[1]),
        pad,
        flip,
        x0: x0 as u8, // the byte: i8's two's complement in the signed domain
        weights: Arc::new(weights),
        bias: Arc::new(folded),
        scales: Arc::new(scales),
        y0: y0[0],
        lo,
        hi,
        out_dt,
        which,
    }))
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
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, node.inputs[0])?;
        let out = patch.wire_node(format!("{}.int8", node.name), op, &[x])?;
        patch.shunt_outside(model, OutletId::new(id, 0), out[0])?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}
