//! Max pooling of NCHW maps: 8-bit ones (a quantised ResNet's stem, once
//! [`crate::model::int8::pool_quantized`] has moved it onto the integers) and f32 ones
//! (a float ResNet's stem: [`own_float_pools`]).
//!
//! Why our own: tract's MaxPool visits every window of every output pixel through
//! generic index arithmetic, and takes as long on u8 as on f32 (1.4 ms for ResNet's
//! 64 x 112 x 112 stem on one Xeon core) and on one thread. Here each output row is the
//! max of its window's rows (a byte-wise max the compiler vectorises), then of each
//! window's columns in that row; channels are shared out over the model's pool.

use tract_core::internal::*;

use crate::model::cpu::widest;
use crate::model::graph::rewire;
use crate::model::threads::par_chunks;

/// The larger of two values: `Ord::max` for the integers; `f32::max` for floats (a NaN
/// loses to a number).
pub(crate) trait Maximum: Copy {
    fn maximum(self, other: Self) -> Self;
}

impl Maximum for u8 {
    fn maximum(self, other: u8) -> u8 {
        self.max(other)
    }
}

impl Maximum for i8 {
    fn maximum(self, other: i8) -> i8 {
        self.max(other)
    }
}

impl Maximum for f32 {
    fn maximum(self, other: f32) -> f32 {
        self.max(other)
    }
}

/// A 2-D max pool of an NCHW u8, i8 or f32 tensor; padding never wins (windows that reach
/// past the edge take the max of what lies inside, as ONNX's padding with -inf does).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaxPool2d {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    /// (top, left, bottom, right), each below the kernel's side.
    pub pad: (usize, usize, usize, usize),
}

/// One axis: for output `o`, the input range its window covers inside the map.
fn window(o: usize, stride: usize, pad: usize, k: usize, len: usize) -> std::ops::Range<usize> {
    let start = (o * stride).saturating_sub(pad);
    let end = (o * stride + k).saturating_sub(pad).min(len);
    start..end.max(start)
}

impl MaxPool2d {
    /// Ours for tract's `MaxPool` on an input of `fact`, if it is a plain 2-D NCHW pool of
    /// a known size (no dilation, no ceil mode, pads below the kernel side).
    pub(crate) fn of(op: &tract_core::ops::cnn::MaxPool, fact: &TypedFact) -> Option<MaxPool2d> {
        use tract_core::ops::cnn::PaddingSpec;
        use tract_core::ops::nn::DataFormat;
        let ps = &op.pool_spec;
        let hw = fact.shape.as_concrete().filter(|s| s.len() == 4)?;
        let hw = [hw[2], hw[3]];
        if ps.data_format != DataFormat::NCHW
            || ps.kernel_shape.len() != 2
            || ps.dilations().iter().any(|d| *d != 1)
            || matches!(ps.padding, PaddingSpec::ExplicitOnnxPool(_, _, true))
            || op.with_index_outputs.is_some()
        {
            return None;
        }
        let (stride, pad) = crate::model::conv_geo::strides_and_pads(ps, &hw);
        let ours = MaxPool2d {
            kernel: (ps.kernel_shape[0], ps.kernel_shape[1]),
            stride,
            pad,
        };
        ours.out_hw(hw[0], hw[1]).ok().map(|_| ours)
    }

    fn out_len(len: usize, k: usize, stride: usize, before: usize, after: usize) -> usize {
        (len + before + after).saturating_sub(k) / stride + 1
    }

    /// Output height and width for an `h` x `w` map; an error if a window would hold
    /// nothing but padding (the replacement refuses such pads) or a size is zero.
    fn out_hw(&self, h: usize, w: usize) -> TractResult<(usize, usize)> {
        let ((kh, kw), (sh, sw), (pt, pl, pb, pr)) = (self.kernel, self.stride, self.pad);
        ensure!(
            kh > 0 && kw > 0 && sh > 0 && sw > 0 && h > 0 && w > 0,
            "max pool: zero kernel side, stride or input size"
        );
        ensure!(
            pt < kh && pb < kh && pl < kw && pr < kw && h + pt + pb >= kh && w + pl + pr >= kw,
            "max pool: padding as wide as the kernel, or an input smaller than it"
        );
        Ok((
            Self::out_len(h, kh, sh, pt, pb),
            Self::out_len(w, kw, sw, pl, pr),
        ))
    }

    /// One channel: `x` is h x w, `out` hout x wout.
    fn plane<T: Maximum>(&self, x: &[T], (h, w): (usize, usize), out: &mut [T], wout: usize) {
        let ((kh, _), (sh, sw), (pt, _, _, _)) = (self.kernel, self.stride, self.pad);
        let mut rows: Vec<T> = Vec::with_capacity(w);
        for (oy, dst) in out.chunks_exact_mut(wout).enumerate() {
            let ys = window(oy, sh, pt, kh, h);
            rows.clear();
            rows.extend_from_slice(&x[ys.start * w..(ys.start + 1) * w]);
            for y in ys.start + 1..ys.end {
                for (r, v) in rows.iter_mut().zip(&x[y * w..(y + 1) * w]) {
                    *r = r.maximum(*v);
                }
            }
            match sw {
                1 => self.columns::<T, 1>(&rows, dst),
                2 => self.columns::<T, 2>(&rows, dst),
                _ => self.edge_columns(&rows, dst, 0..dst.len()),
            }
        }
    }

    /// One output row from its window rows' max (`rows`, the input's width): each
    /// output the max of its window's columns. The outputs whose window lies inside the
    /// row go a tap at a time over all of them (loops the compiler vectorises: the stem
    /// pool's scalar window per output was 3 % of a quantised ResNet-50 on a Zen 4), the
    /// few at the edges one by one.
    fn columns<T: Maximum, const S: usize>(&self, rows: &[T], dst: &mut [T]) {
        let (kw, pl, w) = (self.kernel.1, self.pad.1, rows.len());
        let lo = pl.div_ceil(S).min(dst.len());
        let hi = if w + pl >= kw {
            ((w + pl - kw) / S + 1).clamp(lo, dst.len())
        } else {
            lo
        };
        self.edge_columns(rows, dst, (0..lo).chain(hi..dst.len()));
        if hi == lo {
            return;
        }
        // Here lo = ceil(pl / S), so lo * S >= pl.
        let inner = &mut dst[lo..hi];
        for j in 0..kw {
            // Output lo + i reads rows[(lo + i) * S - pl + j]: inside, by lo and hi.
            let taps = rows[lo * S + j - pl..].chunks(S).map(|c| c[0]);
            if j == 0 {
                inner.iter_mut().zip(taps).for_each(|(d, v)| *d = v);
            } else {
                inner
                    .iter_mut()
                    .zip(taps)
                    .for_each(|(d, v)| *d = d.maximum(v));
            }
        }
    }

    /// Outputs `which` of one row, each over its own window (clipped to the row).
    fn edge_columns<T: Maximum>(
        &self,
        rows: &[T],
        dst: &mut [T],
        which: impl Iterator<Item = usize>,
    ) {
        let (kw, sw, pl) = (self.kernel.1, self.stride.1, self.pad.1);
        for ox in which {
            let xs = window(ox, sw, pl, kw, rows.len());
            dst[ox] = rows[xs.clone()]
                .iter()
                .copied()
                .fold(rows[xs.start], T::maximum);
        }
    }

    fn run<T: Datum + Maximum + tract_core::internal::tract_num_traits::Zero>(
        &self,
        input: &Tensor,
    ) -> TractResult<Tensor> {
        let shape = input.shape();
        ensure!(
            shape.len() == 4,
            "max pool: input shape {shape:?}, expected NCHW"
        );
        let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
        let (hout, wout) = self.out_hw(h, w)?;
        let mut out = Tensor::zero::<T>(&[n, c, hout, wout])?;
        let x = input.try_as_plain_ram()?;
        let x = x.as_slice::<T>()?;
        {
            let mut o = out.try_as_plain_ram_mut()?;
            par_chunks(o.as_slice_mut::<T>()?, hout * wout, |(i, dst)| {
                let src = &x[i * h * w..(i + 1) * h * w];
                widest(|| self.plane(src, (h, w), dst, wout))
            });
        }
        Ok(out)
    }
}

/// Replace every tract `MaxPool` of an f32 map that ours runs (see [`MaxPool2d::of`]):
/// tract's takes 1.1-1.6 ms for ResNet's stem on one Zen 4 core, on one thread.
/// Returns how many pools became ours.
pub fn own_float_pools(model: &mut TypedModel) -> TractResult<usize> {
    let own = own_pools_of(model, |dt| dt == DatumType::F32, "ours")?;
    if own > 0 {
        model.compact()?;
    }
    Ok(own)
}

/// Replace every tract `MaxPool` ours runs whose input type `pools` accepts, the new
/// node named after the old with `suffix`. Returns how many; the caller compacts.
pub(crate) fn own_pools_of(
    model: &mut TypedModel,
    pools: impl Fn(DatumType) -> bool,
    suffix: &str,
) -> TractResult<usize> {
    use tract_core::ops::cnn::MaxPool;
    let mut own = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(op) = node.op_as::<MaxPool>() else {
            continue;
        };
        let fact = model.outlet_fact(node.inputs[0])?;
        if !pools(fact.datum_type) {
            continue;
        }
        let Some(ours) = MaxPool2d::of(op, fact) else {
            continue;
        };
        let (name, x) = (format!("{}.{suffix}", node.name), node.inputs[0]);
        rewire(model, OutletId::new(id, 0), name, ours, &[x])?;
        own += 1;
    }
    Ok(own)
}

impl Op for MaxPool2d {
    fn name(&self) -> StaticName {
        "EdgesightMaxPool".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}x{} stride {}x{} pad {:?}",
            self.kernel.0, self.kernel.1, self.stride.0, self.stride.1, self.pad
        )])
    }

    tract_core::op_as_typed_op!();
}

impl EvalOp for MaxPool2d {
    tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let mut out = match x.datum_type().unquantized() {
            DatumType::U8 => self.run::<u8>(x)?,
            DatumType::I8 => self.run::<i8>(x)?,
            DatumType::F32 => self.run::<f32>(x)?,
            dt => bail!("max pool of {dt:?} is not supported"),
        };
        if out.datum_type() != x.datum_type() {
            // SAFETY: the same bytes under the input's quantised annotation of the same
            // 8-bit type (QU8 over U8, QI8 over I8), as tract's pool keeps it.
            unsafe { out.set_datum_type(x.datum_type()) };
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for MaxPool2d {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        ensure!(s.rank() == 4, "max pool: input rank {}", s.rank());
        let ((kh, kw), (sh, sw), (pt, pl, pb, pr)) = (self.kernel, self.stride, self.pad);
        let dim = |d: &TDim, k: usize, s: usize, p: usize| -> TDim { (d.clone() + p - k) / s + 1 };
        Ok(tvec!(inputs[0].datum_type.fact(tvec![
            s[0].clone(),
            s[1].clone(),
            dim(&s[2], kh, sh, pt + pb),
            dim(&s[3], kw, sw, pl + pr),
        ])))
    }

    tract_core::as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::cnn::{MaxPool, PaddingSpec, PoolSpec};
    use tract_core::ops::nn::DataFormat;

    /// Our pool against tract's on the same input, bit for bit: ResNet's stem pool, odd
    /// sizes, asymmetric and no padding, non-square windows and strides, u8, i8 and f32.
    #[test]
    fn matches_tracts_max_pool() {
        // (channels, h, w, kernel, stride, pads (t, l, b, r))
        let cases = [
            (4, 112, 112, (3, 3), (2, 2), (1, 1, 1, 1)),
            (3, 9, 7, (3, 3), (2, 2), (1, 1, 1, 1)),
            (2, 10, 13, (2, 3), (1, 2), (0, 2, 1, 0)),
            (5, 8, 8, (2, 2), (2, 2), (0, 0, 0, 0)),
            (1, 5, 6, (5, 1), (3, 1), (4, 0, 2, 0)),
            (2, 1, 1, (3, 3), (1, 1), (1, 1, 1, 1)),
            // Stride 1 with a wide window (the vectorised path's other width), and
            // stride 3 (the window-at-a-time path).
            (3, 7, 11, (3, 3), (1, 1), (1, 1, 1, 1)),
            (2, 9, 10, (3, 3), (3, 3), (1, 2, 1, 0)),
        ];
        let mut seed = 0x9e37_79b9_u32;
        for (i, &(c, h, w, kernel, stride, pad)) in cases.iter().enumerate() {
            let bytes: Vec<u8> = (0..c * h * w)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let u = Tensor::from_shape(&[1, c, h, w], &bytes).unwrap();
            let s: Vec<i8> = bytes.iter().map(|b| *b as i8).collect();
            // Floats with repeats (ties) and negatives.
            let f: Vec<f32> = s.iter().map(|v| *v as f32 * 0.37).collect();
            let s = Tensor::from_shape(&[1, c, h, w], &s).unwrap();
            let f = Tensor::from_shape(&[1, c, h, w], &f).unwrap();
            for x in [u, s, f] {
                let (ours, theirs) = run_both(&x, kernel, stride, pad);
                assert_eq!(ours, theirs, "case {i}, {:?}", x.datum_type());
            }
        }
    }

    fn run_both(
        x: &Tensor,
        kernel: (usize, usize),
        stride: (usize, usize),
        pad: (usize, usize, usize, usize),
    ) -> (Tensor, Tensor) {
        let op = MaxPool {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![kernel.0, kernel.1],
                padding: PaddingSpec::Explicit(tvec![pad.0, pad.1], tvec![pad.2, pad.3]),
                dilations: None,
                strides: Some(tvec![stride.0, stride.1]),
                input_channels: x.shape()[1],
                output_channels: x.shape()[1],
            },
            with_index_outputs: None,
        };
        let fact = x.datum_type().fact(x.shape());
        let run = |op: Box<dyn TypedOp>| {
            let mut m = TypedModel::default();
            let src = m.add_source("x", fact.clone()).unwrap();
            let y = m.wire_node("pool", op, &[src]).unwrap();
            m.select_output_outlets(&y).unwrap();
            let plan = m.into_optimized().unwrap().into_runnable().unwrap();
            let out = plan.run(tvec!(x.clone().into_tvalue())).unwrap();
            out[0].clone().into_tensor()
        };
        let ours = MaxPool2d::of(&op, &fact).expect("a pool ours runs");
        (run(Box::new(ours)), run(Box::new(op)))
    }
}
