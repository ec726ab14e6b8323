//! int8 depthwise convolutions (MobileNet, EfficientNet) on tract's float depthwise
//! kernel, exactly.
//!
//! tract runs a quantised depthwise conv as one im2col and one matrix product per
//! channel: 96 of MobileNetV2's 110 ms in int8 here, five times its float time. Our int8
//! kernel is a dense one (four input channels per step) and a depthwise conv has one.
//! But every product of a depthwise conv's integers is below 2^16 and its sums stay
//! below 2^24, where every f32 is an integer: the float conv of `x - x0` and `w - w0`
//! computes the integer accumulator exactly, in any order. So the conv becomes
//! `Cast(x) - x0 -> float depthwise Conv (+ bias) -> Requant`, tract's fast float path
//! and the per-channel requantisation our other convs use, and the integers that come
//! out are the ones an integer conv would give (onnxruntime's, bit for bit).

use tract_core::internal::*;
use tract_core::ops::cast::cast;
use tract_core::ops::cnn::{Conv, KernelFormat};

use crate::model::graph::konst;
use crate::model::int8::Requant;

/// 2^24: below it every integer is an f32, so integer sums in f32 are exact.
const EXACT: i64 = 1 << 24;

/// Replace every quantised depthwise conv whose parameters are constants and whose
/// accumulator stays exact in f32 (see the module doc). Run before declutter, on the
/// convs as parsed. Returns how many.
pub fn replace_depthwise(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        let Some(plan) = Depthwise::of(model, node, conv)? else {
            continue;
        };
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, node.inputs[0])?;
        let out = plan.wire(&mut patch, &node.name, conv, x)?;
        patch.shunt_outside(model, OutletId::new(id, 0), out)?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// A depthwise conv's constants, ready for the float path.
struct Depthwise {
    /// `w - w0`, in the conv's kernel shape and format.
    kernel: Tensor,
    /// One per output channel.
    bias: Tensor,
    x0: f32,
    /// `x_scale * w_scale[c] / y_scale`, as our int8 kernels compute it.
    scales: Vec<f32>,
    y0: i32,
    dt: DatumType,
}

impl Depthwise {
    fn of(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<Depthwise>> {
        let ps = &conv.pool_spec;
        let channels = ps.output_channels;
        let depthwise = conv.group > 1 && conv.group == ps.input_channels && conv.group == channels;
        let Some(dt) = conv.q_params.map(|d| d.unquantized()) else {
            return Ok(None);
        };
        let x_dt = model.outlet_fact(node.inputs[0])?.datum_type;
        // OIHW: the output channel is the weights' outer axis, which `centred` relies on.
        if !depthwise
            || conv.kernel_fmt != KernelFormat::OIHW
            || node.inputs.len() != 9
            || !matches!(dt, DatumType::U8 | DatumType::I8)
            || !matches!(x_dt, DatumType::U8 | DatumType::I8)
        {
            return Ok(None);
        }
        let k = |ix| konst::<i32>(model, node, ix);
        let s = |ix| konst::<f32>(model, node, ix);
        let (Some(w), Some(bias), Some(x0), Some(xs), Some(w0), Some(ws), Some(y0), Some(ys)) =
            (k(1), k(2), k(3), s(4), k(5), s(6), k(7), s(8))
        else {
            return Ok(None);
        };
        let per_channel = |n: usize| n == 1 || n == channels;
        if x0.len() != 1 || xs.len() != 1 || y0.len() != 1 || ys.len() != 1 {
            return Ok(None);
        }
        if !per_channel(bias.len()) || !per_channel(w0.len()) || !per_channel(ws.len()) {
            return Ok(None);
        }
        let taps = w.len() / channels;
        if taps * channels != w.len() {
            return Ok(None);
        }
        // A per-tensor (one value) or per-channel parameter's value for channel `c`.
        fn at<T: Copy>(v: &[T], c: usize) -> T {
            v[if v.len() == 1 { 0 } else { c }]
        }
        let centred: Vec<i32> = w
            .iter()
            .enumerate()
            .map(|(i, v)| v - at(&w0, i / taps))
            .collect();
        // The largest |accumulator| any input can give, bias included.
        let max_x = [
            x0[0].abs(),
            (255 - x0[0]).abs(),
            (x0[0] + 128).abs(),
            (127 - x0[0]).abs(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0) as i64;
        let exact = (0..channels).all(|c| {
            let row = &centred[c * taps..(c + 1) * taps];
            let sum: i64 = row.iter().map(|v| v.unsigned_abs() as i64).sum();
            sum * max_x + (at(&bias, c) as i64).abs() < EXACT
        });
        if !exact {
            return Ok(None);
        }
        let kernel_shape = model
            .outlet_fact(node.inputs[1])?
            .shape
            .as_concrete()
            .map(|s| s.to_vec());
        let Some(kernel_shape) = kernel_shape else {
            return Ok(None);
        };
        let kernel: Vec<f32> = centred.iter().map(|v| *v as f32).collect();
        let bias: Vec<f32> = (0..channels).map(|c| at(&bias, c) as f32).collect();
        let scales = (0..channels)
            .map(|c| (at(&ws, c) * xs[0]) / ys[0])
            .collect();
        Ok(Some(Depthwise {
            kernel: tensor1(&kernel).into_shape(&kernel_shape)?,
            bias: tensor1(&bias),
            x0: x0[0] as f32,
            scales,
            y0: y0[0],
            dt,
        }))
    }

    /// `Cast(x) - x0 -> float Conv -> Requant` into `patch`; returns the output.
    fn wire(
        self,
        patch: &mut TypedModelPatch,
        name: &str,
        conv: &Conv,
        x: OutletId,
    ) -> TractResult<OutletId> {
        let rank = patch.outlet_fact(x)?.rank();
        let xf = patch.wire_node(format!("{name}.f32"), cast(DatumType::F32), &[x])?[0];
        let x0 = tensor0(self.x0).broadcast_into_rank(rank)?;
        let x0 = patch.add_const(format!("{name}.x0"), x0)?;
        let centred = patch.wire_node(
            format!("{name}.centred"),
            tract_core::ops::math::sub(),
            &[xf, x0],
        )?[0];
        let kernel = patch.add_const(format!("{name}.kernel_f32"), self.kernel)?;
        let bias = patch.add_const(format!("{name}.bias_f32"), self.bias)?;
        let float = Conv {
            q_params: None,
            ..conv.clone()
        };
        let acc = patch.wire_node(format!("{name}.acc"), float, &[centred, kernel, bias])?[0];
        let axis = conv
            .pool_spec
            .data_format
            .shape(patch.outlet_fact(acc)?.shape.to_tvec())?
            .c_axis();
        let (lo, hi) = if self.dt == DatumType::U8 {
            (0, 255)
        } else {
            (-128, 127)
        };
        let requant = Requant {
            scales: self.scales,
            axis,
            zero_point: self.y0,
            lo,
            hi,
            dt: self.dt,
        };
        Ok(patch.wire_node(format!("{name}.requant"), requant, &[acc])?[0])
    }
}
