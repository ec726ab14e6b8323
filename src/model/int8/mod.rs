//! Load-time graph work that keeps quantised models on tract's integer kernels and takes
//! the slow element-wise passes out of the way.
//!
//! tract 0.23 runs a per-tensor QLinearConv fused (int8 matmul, requantisation inside the
//! kernel), but leaves common forms on slow paths (measured on ResNet-50, BENCHMARKS.md):
//! - per-channel weights: the weight zero point arrives as a `[1,1,C,1]` tensor of zeros,
//!   which tract does not recognise as uniform, so every conv also sums its activations and
//!   subtracts `k0 * sum_x` over the whole output ([`scalar_zero_points`] fixes that,
//!   exactly); and the per-channel requantisation (`Scale -> Add -> Min -> Max -> Cast`)
//!   has no fused form, so it runs as five passes over an i32 tensor ([`fuse_requant`]
//!   replaces the chain with one op of ours, [`Requant`]);
//! - residual adds between quantised tensors run as dequantise, dequantise, add, ReLU and
//!   quantise ([`fuse_quantized_adds`]: one pass, [`QuantizedAdd`]), and tract's f32 ->
//!   int8 quantiser rounds through a function call per element ([`fast_quantize`]:
//!   [`Quantize`], vectorised).
//!
//! Every op here computes the same f32 operations in the same order as the tract ops it
//! replaces, so outputs are bit-identical (tests/model.rs checks whole models; the unit
//! tests check ties and saturation). The protobuf-level rewrites for QDQ and com.microsoft
//! forms are in [`crate::model::int8::onnx_quant`]. Everything goes through tract's public
//! model-patching API; tract itself is not modified.

/// `$go!(A, B, T)` for the (a, b, output) type combination `$dts` of a quantised add
/// (u8 or i8 each), or the error naming `$what`. One table for the add op and for the
/// conv with an add fused in (`qconv`).
macro_rules! for_add_types {
    ($dts:expr, $go:ident, $what:expr) => {{
        use DatumType::{I8, U8};
        match $dts {
            (U8, U8, U8) => $go!(u8, u8, u8),
            (U8, U8, I8) => $go!(u8, u8, i8),
            (I8, I8, I8) => $go!(i8, i8, i8),
            (I8, I8, U8) => $go!(i8, i8, u8),
            (U8, I8, U8) => $go!(u8, i8, u8),
            (U8, I8, I8) => $go!(u8, i8, i8),
            (I8, U8, U8) => $go!(i8, u8, u8),
            (I8, U8, I8) => $go!(i8, u8, i8),
            (x, y, z) => bail!("{} of {x:?} and {y:?} to {z:?} is not supported", $what),
        }
    }};
}

pub mod depthwise;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
pub mod onnx_quant;
pub mod qconv;
pub mod tables;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use tract_core::internal::*;
use tract_core::ops::einsum::EinSum;

use crate::model::cpu::widest;
use crate::model::graph::uniform_value;
use crate::model::int8::onnx_quant::QuantizeScales;
use crate::model::threads::{PAR_CHUNK, par_chunks, par_chunks2};

/// The names of tract's ops the rewrites look for. tract's typed ops are matched by name
/// where their types are private or generic (binary ops are one `TypedBinOp` type); a
/// tract upgrade that renames one would silently lose an int8 path, so
/// `tests::tract_still_calls_its_ops_by_these_names` builds each op and checks its name.
pub mod tract_op {
    pub const ADD: &str = "Add";
    pub const MAX: &str = "Max";
    pub const MIN: &str = "Min";
    pub const SCALE: &str = "Scale";
    pub const CAST: &str = "Cast";
    pub const CONV: &str = "Conv";
    pub const EINSUM: &str = "EinSum";
}

/// Where a zero point sits among a quantised `Conv`'s or `EinSum`'s nine inputs
/// (`[x, k, bias, x0, x_scale, k0, k_scale, y0, y_scale]` and the einsum equivalent).
const ZERO_POINT_INPUTS: [usize; 3] = [3, 5, 7];

/// Replace every zero point of a quantised conv/einsum that holds one value repeated (a
/// per-channel quantiser's all-zero weight zero point) by a scalar constant. Exact: the
/// same value, in a shape tract's optimiser recognises as uniform, so it drops the
/// `k0 * sum_x` compensation instead of computing it for every output. Run on the
/// decluttered model, before codegen. Returns how many inputs were replaced.
pub fn scalar_zero_points(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let name = node.op.name();
        if node.inputs.len() != 9 || !(name == tract_op::CONV || name == tract_op::EINSUM) {
            continue;
        }
        let mut patch = TypedModelPatch::default();
        let mut inputs = tvec![];
        let mut op = node.op.clone();
        let mut changed = false;
        for (ix, outlet) in node.inputs.iter().enumerate() {
            let fact = model.outlet_fact(*outlet)?;
            let scalar = match &fact.konst {
                Some(k) if ZERO_POINT_INPUTS.contains(&ix) && k.len() > 1 => uniform_value(k)?,
                _ => None,
            };
            match scalar {
                Some(s) => {
                    changed = true;
                    inputs.push(patch.add_const(format!("{}.scalar_zp{ix}", node.name), s)?);
                    // An einsum names every axis of every input: the scalar has none.
                    if let Some(einsum) = op.downcast_ref::<EinSum>() {
                        let mut einsum = einsum.clone();
                        for _ in 0..fact.rank() {
                            einsum.axes = einsum.axes.remove_axis_occurency(InOut::In(ix), 0)?;
                        }
                        op = Box::new(einsum);
                    }
                }
                None => inputs.push(patch.tap_model(model, *outlet)?),
            }
        }
        if !changed {
            continue;
        }
        let out = patch.wire_node(&*node.name, op, &inputs)?;
        for (slot, o) in out.iter().enumerate() {
            patch.shunt_outside(model, OutletId::new(id, slot), *o)?;
        }
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// Per-channel requantisation of an i32 (or integer-valued f32) accumulator in one pass:
/// `clamp(round_half_even(acc * scale[c]) + zero_point, lo, hi)` cast to u8 or i8.
/// The same arithmetic, in the same order and precision, as the chain tract builds
/// (`Scale` -> `Add` -> `Min` -> `Max` -> `Cast`), so outputs are bit-identical.
#[derive(Debug, Clone, PartialEq)]
pub struct Requant {
    /// One scale per channel along `axis`.
    pub scales: Vec<f32>,
    pub axis: usize,
    pub zero_point: i32,
    pub lo: i32,
    pub hi: i32,
    pub dt: DatumType,
}

impl Eq for Requant {}

impl Requant {
    fn run<A, T: Datum + Copy>(&self, acc: &[A], inner: usize, out: &mut [T])
    where
        A: Copy + tract_core::internal::tract_num_traits::AsPrimitive<f32>,
        i32: tract_core::internal::tract_num_traits::AsPrimitive<T>,
    {
        use tract_core::internal::tract_num_traits::AsPrimitive;
        let channels = self.scales.len();
        let (zp, lo, hi) = (self.zero_point as f32, self.lo as f32, self.hi as f32);
        for (row, (a, o)) in acc.chunks(inner).zip(out.chunks_mut(inner)).enumerate() {
            let s = self.scales[row % channels];
            for (x, y) in a.iter().zip(o.iter_mut()) {
                // tract's `scale_by` (magnitude scaled and rounded, then the sign) and
                // requant chain (+ zero point, clamp, cast) in one step.
                *y = quantize(x.as_() * s, zp, lo, hi).as_();
            }
        }
    }
}

impl Op for Requant {
    fn name(&self) -> StaticName {
        "EdgesightRequant".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} channels on axis {}, zero point {}, clamp [{}, {}] -> {:?}",
            self.scales.len(),
            self.axis,
            self.zero_point,
            self.lo,
            self.hi,
            self.dt
        )])
    }

    tract_core::op_as_typed_op!();
}

impl EvalOp for Requant {
    tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let shape = input.shape();
        ensure!(
            shape.get(self.axis) == Some(&self.scales.len()),
            "requantisation: {} scales for shape {shape:?} on axis {}",
            self.scales.len(),
            self.axis
        );
        let inner: usize = shape[self.axis + 1..].iter().product();
        let acc = input.try_as_plain_ram()?;
        // SAFETY: a plain-data tensor (u8/i8/i32/f32); every element is written below
        // before the tensor is read or returned.
        let mut out = unsafe { Tensor::uninitialized_dt(self.dt, shape)? };
        if inner > 0 {
            let mut plain = out.try_as_plain_ram_mut()?;
            // i32 from tract's integer convs; f32 (integer-valued) from the depthwise path.
            match (input.datum_type(), self.dt) {
                (DatumType::I32, DatumType::U8) => {
                    self.run(acc.as_slice::<i32>()?, inner, plain.as_slice_mut::<u8>()?)
                }
                (DatumType::I32, DatumType::I8) => {
                    self.run(acc.as_slice::<i32>()?, inner, plain.as_slice_mut::<i8>()?)
                }
                (DatumType::F32, DatumType::U8) => {
                    self.run(acc.as_slice::<f32>()?, inner, plain.as_slice_mut::<u8>()?)
                }
                (DatumType::F32, DatumType::I8) => {
                    self.run(acc.as_slice::<f32>()?, inner, plain.as_slice_mut::<i8>()?)
                }
                (a, dt) => bail!("requantisation of {a:?} to {dt:?} is not supported"),
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Requant {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.dt.fact(inputs[0].shape.clone())))
    }

    tract_core::as_op!();
}

/// 2^23: adding and removing it rounds a non-negative f32 below it to the nearest integer,
/// ties to even (the default rounding mode); at or above it every f32 is an integer.
#[cfg(not(target_arch = "aarch64"))]
const TOINT: f32 = 8_388_608.0;

/// `clamp(round_half_even(x) + zero_point, lo, hi)`, exactly as tract computes it
/// (`round_ties_to_even`, a cast to i32, an i32 add, an i32 clamp), but in f32 only so
/// loops over it vectorise: the magnitude is capped at 2^23 before rounding (anything
/// larger saturates the clamp either way), and every intermediate is an integer below
/// 2^24, exact in f32. (`f32::round_ties_even` would be a libm call per element on
/// baseline x86-64; tract's own rounding is a function call per element too.)
///
/// On aarch64 the rounding is one instruction (`frintn`, which `round_ties_even` is there):
/// the same integers for every finite `x` (at or above 2^23 both saturate the clamp), 4
/// vector operations fewer per 4 values. It was ~10 % of a Pi 5's quantised ResNet-50 in
/// the conv's requantisation alone (tools/arm_model.py). A NaN `x` (only from a NaN scale)
/// lands on `lo` there, on `lo` or `hi` by its sign bit here.
#[inline(always)]
pub(crate) fn quantize(x: f32, zero_point: f32, lo: f32, hi: f32) -> i32 {
    #[cfg(target_arch = "aarch64")]
    let r = x.round_ties_even();
    #[cfg(not(target_arch = "aarch64"))]
    let r = ((x.abs().min(TOINT) + TOINT) - TOINT).copysign(x);
    // `max` then `min` return the non-NaN operand, so even a NaN `x` lands in [lo, hi].
    let q = (r + zero_point).max(lo).min(hi);
    // SAFETY: `q` is finite and within [lo, hi], a sub-range of i8/u8, so it fits an i32.
    // (`as i32` would be the saturating cast, which compiles to a branchy scalar sequence
    // per lane; this is one vector conversion.)
    unsafe { q.to_int_unchecked::<i32>() }
}

/// A residual add of two quantised tensors, optionally followed by ReLU, requantised:
/// `Q(max(DQ(a) + DQ(b), floor))` in one pass over the integers, instead of tract's four
/// passes (two dequantisations, the add, and a quantisation that calls a rounding function
/// per element). The same f32 operations in the same order as tract's ops, so the same
/// bits come out, except that the sum is divided by the output scale, as ONNX and
/// onnxruntime do, where the model's scale is known.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedAdd {
    pub a_scale: f32,
    pub a_zero_point: i32,
    pub b_scale: f32,
    pub b_zero_point: i32,
    /// The constant of a following `Max` (ReLU: 0.0).
    pub floor: Option<f32>,
    /// The quantiser it replaces: its output scale, zero point and type.
    pub quantize: Quantize,
    /// Multiplying by `1 / scale` gives the division's integers for every input pair
    /// ([`QuantizedAdd::reciprocal_is_exact`], checked when the op is built).
    pub exact_reciprocal: bool,
}

impl Eq for QuantizedAdd {}

/// What one element of a [`QuantizedAdd`] needs, in the order its arithmetic uses it.
#[derive(Clone, Copy)]
pub(crate) struct AddConsts {
    a_zero_point: i32,
    a_scale: f32,
    b_zero_point: i32,
    b_scale: f32,
    floor: f32,
    inv: f32,
    s: f32,
    zp: f32,
    lo: f32,
    hi: f32,
}

impl AddConsts {
    /// Whether the add divides by its scale: dividing by 1.0 changes no bit, so the loops
    /// for a reciprocal (`s` = 1) have no division (`add_loop`'s `DIV`).
    pub(crate) fn divides(&self) -> bool {
        self.s != 1.0
    }
}

impl QuantizedAdd {
    fn run<A, B, T>(&self, a: &[A], b: &[B], out: &mut [T]) -> TractResult<()>
    where
        A: Datum + Byte + tract_core::internal::tract_num_traits::AsPrimitive<i32>,
        B: Datum + Byte + tract_core::internal::tract_num_traits::AsPrimitive<i32>,
        T: Datum + Byte + Send + tract_core::internal::tract_num_traits::Bounded,
        i32: tract_core::internal::tract_num_traits::AsPrimitive<T>,
        T: tract_core::internal::tract_num_traits::AsPrimitive<f32>,
    {
        let c = self.consts_for::<T>();
        par_chunks(out, PAR_CHUNK, |(i, o)| {
            let (a, b) = (&a[i * PAR_CHUNK..], &b[i * PAR_CHUNK..]);
            add_chunk(a, b, o, &c);
        });
        Ok(())
    }

    /// The constants of an add into `T`.
    pub(crate) fn consts_for<T>(&self) -> AddConsts
    where
        T: tract_core::internal::tract_num_traits::Bounded
            + tract_core::internal::tract_num_traits::AsPrimitive<f32>,
    {
        // ONNX's QuantizeLinear divides by the scale; tract's reciprocal rounds
        // differently on about one value in 10^5 ([`QuantizeScales`]), and each such step
        // can grow through the layers after it. (One of the two factors is 1.)
        // A division costs a Pi 5 a tenth of a quantised ResNet-50 (tools/arm_model.py):
        // where the reciprocal is exact for every input, multiply.
        let (inv, s) = match self.quantize.scale {
            Some(s) if self.exact_reciprocal => (1.0 / s, 1.0),
            Some(s) => (1.0, s),
            None => (self.quantize.inv_scale, 1.0),
        };
        self.consts(inv, s, T::min_value().as_(), T::max_value().as_())
    }

    /// The same add with its operands' roles swapped: `b + a` is `a + b` to the bit (IEEE
    /// addition commutes), so either input can be the one a conv produces.
    pub fn swapped(&self) -> QuantizedAdd {
        QuantizedAdd {
            a_scale: self.b_scale,
            a_zero_point: self.b_zero_point,
            b_scale: self.a_scale,
            b_zero_point: self.a_zero_point,
            ..self.clone()
        }
    }

    fn consts(&self, inv: f32, s: f32, lo: f32, hi: f32) -> AddConsts {
        AddConsts {
            a_zero_point: self.a_zero_point,
            a_scale: self.a_scale,
            b_zero_point: self.b_zero_point,
            b_scale: self.b_scale,
            floor: self.floor.unwrap_or(f32::NEG_INFINITY),
            inv,
            s,
            zp: self.quantize.zero_point as f32,
            lo,
            hi,
        }
    }

    /// Whether `v * (1 / scale)` rounds to the integer `v / scale` does, for the sum of
    /// every pair of 8-bit inputs (u8 and i8 alike: -128..=255 each), before the
    /// output's clamp (so for either output type). 147 456 pairs, once at load.
    pub fn reciprocal_is_exact(&self) -> bool {
        let Some(s) = self.quantize.scale else {
            return false;
        };
        let (div, mul) = (
            self.consts(1.0, s, -1024.0, 1024.0),
            self.consts(1.0 / s, 1.0, -1024.0, 1024.0),
        );
        let a: Vec<i32> = (-128..=255).flat_map(|x| [x; 384]).collect();
        let b: Vec<i32> = (-128..=255).cycle().take(a.len()).collect();
        let (mut q, mut r) = (vec![0i32; a.len()], vec![0i32; a.len()]);
        add_elements::<_, _, _, false>(&a, &b, &mut q, &div);
        add_elements::<_, _, _, false>(&a, &b, &mut r, &mul);
        q == r
    }
}

/// One piece of a [`QuantizedAdd`]: DequantizeLinear twice, Add, Max, QuantizeLinear per
/// element. On x86 the same code is compiled for AVX-512 and for AVX2 too and chosen at
/// run time ([`widest`]): the baseline x86-64 build has SSE2 only. ResNet-50's sixteen
/// adds on a Xeon: 5.2 ms with SSE2, 3.7 with AVX2, 2.6 with AVX-512 (measured with
/// `--profile`). The same IEEE operations in the same order (no FMA), so the same bits
/// on either path.
///
/// On aarch64 the whole sixteens go to the NEON loop ([`neon::add`]), the same IEEE
/// operations written out (the compiler's loop took 13-19 cycles per 4 on a Pi 5).
pub(crate) fn add_chunk<A, B, T>(a: &[A], b: &[B], o: &mut [T], c: &AddConsts)
where
    A: Byte + tract_core::internal::tract_num_traits::AsPrimitive<i32>,
    B: Byte + tract_core::internal::tract_num_traits::AsPrimitive<i32>,
    T: Byte,
    i32: tract_core::internal::tract_num_traits::AsPrimitive<T>,
{
    #[cfg(target_arch = "aarch64")]
    let done = if c.divides() {
        neon::add::<A, B, T, true>(a, b, o, c)
    } else {
        neon::add::<A, B, T, false>(a, b, o, c)
    };
    #[cfg(target_arch = "x86_64")]
    let done = if crate::model::cpu::x86_avx512bw() {
        // SAFETY: the CPU has AVX-512 F and BW, checked above.
        unsafe {
            if c.divides() {
                x86::add::<A, B, T, true>(a, b, o, c)
            } else {
                x86::add::<A, B, T, false>(a, b, o, c)
            }
        }
    } else if crate::model::cpu::x86_has(tract_linalg::isa::Isa::X86_64Avx2) {
        // SAFETY: the CPU has AVX2, checked above.
        unsafe {
            if c.divides() {
                x86::add_avx2::<A, B, T, true>(a, b, o, c)
            } else {
                x86::add_avx2::<A, B, T, false>(a, b, o, c)
            }
        }
    } else {
        0
    };
    #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
    let done = 0;
    // `done` is at most the shortest slice's length (neon::add, x86::add).
    add_elements::<A, B, T, true>(&a[done..], &b[done..], &mut o[done..], c)
}

/// The 8-bit element types: u8, and i8 as its two's complement byte.
pub(crate) trait Byte: Copy + 'static {
    /// Read by the NEON code only (how to widen).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    const SIGNED: bool;
}
impl Byte for u8 {
    const SIGNED: bool = false;
}
impl Byte for i8 {
    const SIGNED: bool = true;
}

/// The adds, through [`widest`] if `WIDE`; without it they are the reference the vector
/// path is tested against, and the loop `reciprocal_is_exact` runs once per op at load.
/// One `widest` call per loop: with the choice of division inside its closure neither
/// loop was vectorised (ResNet-50's adds took 7.8 ms instead of 2.0, Zen 4).
#[inline(always)]
fn add_elements<A, B, T, const WIDE: bool>(a: &[A], b: &[B], o: &mut [T], c: &AddConsts)
where
    A: Copy + tract_core::internal::tract_num_traits::AsPrimitive<i32>,
    B: Copy + tract_core::internal::tract_num_traits::AsPrimitive<i32>,
    T: Copy + 'static,
    i32: tract_core::internal::tract_num_traits::AsPrimitive<T>,
{
    #[inline(always)]
    fn wide<const WIDE: bool>(f: impl FnOnce()) {
        if WIDE { widest(f) } else { f() }
    }
    // Dividing by 1.0 changes no bit: that loop has no division (`AddConsts::divides`).
    if c.divides() {
        wide::<WIDE>(|| add_loop::<A, B, T, true>(a, b, o, c))
    } else {
        wide::<WIDE>(|| add_loop::<A, B, T, false>(a, b, o, c))
    }
}

/// The loop itself, one per choice of division, so that each is a plain loop the
/// compiler vectorises.
#[inline(always)]
fn add_loop<A, B, T, const DIV: bool>(a: &[A], b: &[B], o: &mut [T], c: &AddConsts)
where
    A: Copy + tract_core::internal::tract_num_traits::AsPrimitive<i32>,
    B: Copy + tract_core::internal::tract_num_traits::AsPrimitive<i32>,
    T: Copy + 'static,
    i32: tract_core::internal::tract_num_traits::AsPrimitive<T>,
{
    use tract_core::internal::tract_num_traits::AsPrimitive;
    for ((x, y), o) in a.iter().zip(b).zip(o) {
        let fa = (x.as_() - c.a_zero_point) as f32 * c.a_scale;
        let fb = (y.as_() - c.b_zero_point) as f32 * c.b_scale;
        let v = (fa + fb).max(c.floor) * c.inv;
        let v = if DIV { v / c.s } else { v };
        *o = quantize(v, c.zp, c.lo, c.hi).as_();
    }
}

impl Op for QuantizedAdd {
    fn name(&self) -> StaticName {
        "EdgesightQuantizedAdd".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "a {}/{} + b {}/{}{} -> {}",
            self.a_scale,
            self.a_zero_point,
            self.b_scale,
            self.b_zero_point,
            self.floor.map(|f| format!(", max {f}")).unwrap_or_default(),
            self.quantize.describe()
        )])
    }

    tract_core::op_as_typed_op!();
}

impl EvalOp for QuantizedAdd {
    tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        ensure!(
            a.shape() == b.shape(),
            "quantised add: shapes {:?} and {:?}",
            a.shape(),
            b.shape()
        );
        // SAFETY: a plain-data tensor (u8/i8/i32/f32); every element is written below
        // before the tensor is read or returned.
        let mut out = unsafe { Tensor::uninitialized_dt(self.quantize.dt, a.shape())? };
        {
            let (a, b) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
            let mut o = out.try_as_plain_ram_mut()?;
            macro_rules! go {
                ($A:ty, $B:ty, $T:ty) => {
                    self.run::<$A, $B, $T>(a.as_slice()?, b.as_slice()?, o.as_slice_mut()?)?
                };
            }
            let dts = (
                inputs[0].datum_type(),
                inputs[1].datum_type(),
                self.quantize.dt,
            );
            for_add_types!(dts, go, "quantised add")
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QuantizedAdd {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.quantize.dt.fact(inputs[0].shape.clone())))
    }

    tract_core::as_op!();
}

/// tract's f32 -> int8 QuantizeLinear, if `node` is one: (1/scale, zero point, output type).
fn quantizer(node: &TypedNode) -> Option<(f32, i32, DatumType)> {
    use tract_core::ops::element_wise::ElementWiseOp;
    use tract_core::ops::quant::{QuantizeLinearI8, QuantizeLinearU8};
    let ew = node.op_as::<ElementWiseOp>()?;
    if let Some(q) = ew.0.downcast_ref::<QuantizeLinearU8>() {
        Some((q.scale, q.zero_point as i32, DatumType::U8))
    } else {
        let q = ew.0.downcast_ref::<QuantizeLinearI8>()?;
        Some((q.scale, q.zero_point as i32, DatumType::I8))
    }
}

/// An `Add`, optionally followed by a ReLU (`Max` with one repeated constant).
struct AddMax<'a> {
    add: &'a TypedNode,
    /// The Max's constant.
    floor: Option<f32>,
    /// The Max node.
    max: Option<usize>,
}

/// The `Add` whose sum reaches `sum`, looking through an optional ReLU. None if there is
/// no such Add.
fn add_under_max(model: &TypedModel, sum: OutletId) -> TractResult<Option<AddMax<'_>>> {
    let mut add = model.node(sum.node);
    let (mut floor, mut max) = (None, None);
    if add.op.name() == tract_op::MAX && add.inputs.len() == 2 {
        let k = model.outlet_fact(add.inputs[1])?.konst.clone();
        let Some(v) = k.map(|k| uniform_value(&k)).transpose()?.flatten() else {
            return Ok(None);
        };
        floor = Some(v.cast_to_scalar::<f32>()?);
        max = Some(add.id);
        add = model.node(add.inputs[0].node);
    }
    if add.op.name() != tract_op::ADD || add.inputs.len() != 2 {
        return Ok(None);
    }
    Ok(Some(AddMax { add, floor, max }))
}

/// Replace every `Q(max?(DQ(a) + DQ(b)))` of the decluttered model (the residual adds of a
/// quantised ResNet, in every int8 form once it is parsed) by one [`QuantizedAdd`]. Run
/// before codegen. Returns how many were fused.
pub fn fuse_quantized_adds(model: &mut TypedModel, scales: &QuantizeScales) -> TractResult<usize> {
    use tract_core::ops::quant::DequantizeLinearF32;
    let mut fused = 0;
    for id in 0..model.nodes().len() {
        let q = model.node(id);
        let Some(quantize) = Quantize::of(q, scales) else {
            continue;
        };
        let single = |n: usize| -> bool {
            model.node(n).outputs[0].successors.len() == 1
                && !model.outputs.iter().any(|o| o.node == n)
        };
        // The sum and its ReLU feed only the quantiser.
        let Some(AddMax { add, floor, max }) = add_under_max(model, q.inputs[0])? else {
            continue;
        };
        if !single(add.id) || max.is_some_and(|m| !single(m)) {
            continue;
        }
        let dq = |outlet: OutletId| -> Option<(&DequantizeLinearF32, OutletId)> {
            let n = model.node(outlet.node);
            let op = n.op_as::<DequantizeLinearF32>()?;
            single(n.id).then_some((op, n.inputs[0]))
        };
        let (Some((da, a)), Some((db, b))) = (dq(add.inputs[0]), dq(add.inputs[1])) else {
            continue;
        };
        let (fa, fb) = (model.outlet_fact(a)?, model.outlet_fact(b)?);
        if fa.shape != fb.shape || fa.shape != q.outputs[0].fact.shape {
            continue;
        }
        let mut op = QuantizedAdd {
            a_scale: da.scale,
            a_zero_point: da.zero_point,
            b_scale: db.scale,
            b_zero_point: db.zero_point,
            floor,
            quantize,
            exact_reciprocal: false,
        };
        op.exact_reciprocal = op.reciprocal_is_exact();
        let mut patch = TypedModelPatch::default();
        let inputs = [patch.tap_model(model, a)?, patch.tap_model(model, b)?];
        let out = patch.wire_node(format!("{}.qadd", q.name), op, &inputs)?;
        patch.shunt_outside(model, OutletId::new(id, 0), out[0])?;
        patch.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// Pool the integers instead of their dequantised floats: `Q(MaxPool(DQ(x)))`, where the
/// quantiser has the dequantiser's scale and zero point (a quantised ResNet's stem: the
/// quantiser treats MaxPool as data movement), becomes a pool of `x`: ours
/// ([`crate::model::pool::MaxPool2d`]), or tract's where ours does not apply. Exact: DQ is
/// non-decreasing (scale > 0), so the max of the floats is the float of the max, and
/// `Q(DQ(k)) == k` is checked for every value `k` of the type, with the division and
/// with tract's reciprocal both. The pool then moves a quarter of the bytes, and the DQ
/// and Q passes (a 64 x 112 x 112 map each) go. Pools already on 8-bit maps become ours
/// too. Run on the decluttered model, before codegen. Returns how many pools moved or
/// became ours.
pub fn pool_quantized(model: &mut TypedModel, scales: &QuantizeScales) -> TractResult<usize> {
    let moved = move_pools(model, scales)?;
    let own = own_pools(model)?;
    if moved + own > 0 {
        model.compact()?;
    }
    Ok(moved + own)
}

/// The first half of [`pool_quantized`]: pools between a DQ and a Q of one scale.
fn move_pools(model: &mut TypedModel, scales: &QuantizeScales) -> TractResult<usize> {
    use tract_core::ops::cnn::MaxPool;
    use tract_core::ops::quant::DequantizeLinearF32;
    let mut moved = 0;
    for id in 0..model.nodes().len() {
        let q = model.node(id);
        let Some(quantize) = Quantize::of(q, scales) else {
            continue;
        };
        let single = |n: usize| -> bool {
            model.node(n).outputs[0].successors.len() == 1
                && !model.outputs.iter().any(|o| o.node == n)
        };
        let pool = model.node(q.inputs[0].node);
        let Some(op) = pool.op_as::<MaxPool>() else {
            continue;
        };
        let dq = model.node(pool.inputs[0].node);
        let Some(d) = dq.op_as::<DequantizeLinearF32>() else {
            continue;
        };
        let x = dq.inputs[0];
        let dt = model.outlet_fact(x)?.datum_type.unquantized();
        if op.with_index_outputs.is_some()
            || !single(pool.id)
            || !single(dq.id)
            || dt != quantize.dt
            || !round_trips(d, &quantize)
        {
            continue;
        }
        let mut patch = TypedModelPatch::default();
        let tap = patch.tap_model(model, x)?;
        let name = format!("{}.int", pool.name);
        let out = match crate::model::pool::MaxPool2d::of(op, model.outlet_fact(x)?) {
            Some(ours) => patch.wire_node(name, ours, &[tap])?,
            None => patch.wire_node(name, op.clone(), &[tap])?,
        };
        patch.shunt_outside(model, OutletId::new(id, 0), out[0])?;
        patch.apply(model)?;
        moved += 1;
    }
    Ok(moved)
}

/// The second half of [`pool_quantized`]: pools already on 8-bit maps (the QLinearConv
/// and QOperator forms' stem, and those just moved where ours did not apply) take ours
/// where it applies.
fn own_pools(model: &mut TypedModel) -> TractResult<usize> {
    let bytes = |dt: DatumType| matches!(dt.unquantized(), DatumType::U8 | DatumType::I8);
    crate::model::pool::own_pools_of(model, bytes, "int")
}

/// Whether quantising the dequantised `k` gives `k` back for every value of the type,
/// dividing by the scale (ONNX) and multiplying by tract's reciprocal alike.
fn round_trips(d: &tract_core::ops::quant::DequantizeLinearF32, q: &Quantize) -> bool {
    let (lo, hi) = if q.dt == DatumType::I8 {
        (-128, 127)
    } else {
        (0, 255)
    };
    let zp = q.zero_point as f32;
    d.scale > 0.0
        && d.zero_point == q.zero_point
        && (lo..=hi).all(|k| {
            let f = (k - d.zero_point) as f32 * d.scale;
            let by_inv = quantize(f * q.inv_scale, zp, lo as f32, hi as f32);
            let by_div = q
                .scale
                .map_or(k, |s| quantize(f / s, zp, lo as f32, hi as f32));
            by_inv == k && by_div == k
        })
}

/// The float residual add of a QLinearConv-form ResNet, where the skip connection stays in
/// f32 between blocks: `y = max?(DQ(a) + b)`, and `Q(y)` for the next block's convs, in
/// one pass with two outputs (f32 `y`, quantised `y`). tract runs it as three passes
/// (dequantise, add + ReLU, quantise) over f32 tensors. The same f32 operations in the
/// same order, so the same bits.
#[derive(Debug, Clone, PartialEq)]
pub struct ResidualAdd {
    pub a_scale: f32,
    pub a_zero_point: i32,
    pub floor: Option<f32>,
    pub quantize: Quantize,
}

impl Eq for ResidualAdd {}

impl ResidualAdd {
    fn run<A>(&self, a: &[A], b: &[f32], y: &mut [f32], q: &mut [u8])
    where
        A: Datum + Copy + tract_core::internal::tract_num_traits::AsPrimitive<i32>,
    {
        let floor = self.floor.unwrap_or(f32::NEG_INFINITY);
        // Shared out over the model's pool, each piece in one pass (add, then quantise
        // while it is in cache), vectorised for the widest vectors the CPU has.
        par_chunks2(y, q, PAR_CHUNK, |(i, y, q)| {
            let (a, b) = (&a[i * PAR_CHUNK..], &b[i * PAR_CHUNK..]);
            widest(|| {
                for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                    // tract's DequantizeLinearF32, Add, Max.
                    *y = ((a.as_() - self.a_zero_point) as f32 * self.a_scale + b).max(floor);
                }
                self.quantize.run(y, q);
            })
        });
    }
}

impl Op for ResidualAdd {
    fn name(&self) -> StaticName {
        "EdgesightResidualAdd".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = vec![format!(
            "DQ(a) {}/{} + b{}",
            self.a_scale,
            self.a_zero_point,
            self.floor.map(|f| format!(", max {f}")).unwrap_or_default(),
        )];
        info.extend(self.quantize.info()?);
        Ok(info)
    }

    tract_core::op_as_typed_op!();
}

impl EvalOp for ResidualAdd {
    tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        ensure!(
            a.shape() == b.shape(),
            "residual add: shapes {:?} and {:?}",
            a.shape(),
            b.shape()
        );
        // SAFETY: a plain-data tensor (u8/i8/i32/f32); every element is written below
        // before the tensor is read or returned.
        let mut y = unsafe { Tensor::uninitialized::<f32>(a.shape())? };
        // SAFETY: a plain-data tensor (u8/i8/i32/f32); every element is written below
        // before the tensor is read or returned.
        let mut q = unsafe { Tensor::uninitialized_dt(self.quantize.dt, a.shape())? };
        {
            let (av, bv) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
            let b = bv.as_slice::<f32>()?;
            let mut yv = y.try_as_plain_ram_mut()?;
            let mut qv = q.try_as_plain_ram_mut()?;
            let (yv, qv) = (yv.as_slice_mut::<f32>()?, qv.as_bytes_mut());
            match a.datum_type() {
                DatumType::U8 => self.run(av.as_slice::<u8>()?, b, yv, qv),
                DatumType::I8 => self.run(av.as_slice::<i8>()?, b, yv, qv),
                dt => bail!("residual add of {dt:?} is not supported"),
            }
        }
        Ok(tvec!(y.into_tvalue(), q.into_tvalue()))
    }
}

impl TypedOp for ResidualAdd {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = inputs[0].shape.clone();
        Ok(tvec!(
            f32::fact(shape.clone()),
            self.quantize.dt.fact(shape)
        ))
    }

    tract_core::as_op!();
}

/// Replace every `Q(max?(DQ(a) + b))` whose sum is also used in f32 (the residual adds of
/// the QLinearConv forms) by one [`ResidualAdd`]. Run on the decluttered model, after
/// [`fuse_quantized_adds`]. Returns how many.
pub fn fuse_residual_adds(model: &mut TypedModel, scales: &QuantizeScales) -> TractResult<usize> {
    use tract_core::ops::quant::DequantizeLinearF32;
    let mut fused = 0;
    for id in 0..model.nodes().len() {
        let q = model.node(id);
        let Some(quantize) = Quantize::of(q, scales) else {
            continue;
        };
        let sum = q.inputs[0];
        // The sum (or its ReLU) may have other consumers: it is an output of the op.
        let Some(AddMax { add, floor, .. }) = add_under_max(model, sum)? else {
            continue;
        };
        // One operand a dequantised tensor used only here, the other any f32 tensor of the
        // same shape (the skip connection).
        let dq = |o: OutletId| {
            let n = model.node(o.node);
            let op = n.op_as::<DequantizeLinearF32>()?;
            (n.outputs[0].successors.len() == 1).then_some((op.clone(), n.inputs[0]))
        };
        let (dq_op, a, b) = match (dq(add.inputs[0]), dq(add.inputs[1])) {
            (Some((op, a)), _) => (op, a, add.inputs[1]),
            (None, Some((op, a))) => (op, a, add.inputs[0]),
            _ => continue,
        };
        let (fa, fb) = (model.outlet_fact(a)?, model.outlet_fact(b)?);
        if fa.shape != fb.shape || fb.datum_type != DatumType::F32 {
            continue;
        }
        let op = ResidualAdd {
            a_scale: dq_op.scale,
            a_zero_point: dq_op.zero_point,
            floor,
            quantize,
        };
        let mut patch = TypedModelPatch::default();
        let inputs = [patch.tap_model(model, a)?, patch.tap_model(model, b)?];
        let out = patch.wire_node(format!("{}.residual", q.name), op, &inputs)?;
        patch.shunt_outside(model, sum, out[0])?;
        patch.shunt_outside(model, OutletId::new(id, 0), out[1])?;
        patch.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// An f32 -> u8/i8 quantiser, vectorised (see [`quantize`]): `x / scale` as ONNX and
/// onnxruntime define it where the model's scale is known, else tract's `x * (1/scale)`,
/// bit for bit.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantize {
    pub inv_scale: f32,
    /// The model's own scale, divided by.
    pub scale: Option<f32>,
    pub zero_point: i32,
    pub dt: DatumType,
}

impl Eq for Quantize {}

impl Quantize {
    /// tract's QuantizeLinear `node` as ours, dividing by the model's scale where `scales`
    /// knows it.
    fn of(node: &TypedNode, scales: &QuantizeScales) -> Option<Quantize> {
        let (inv_scale, zero_point, dt) = quantizer(node)?;
        Some(Quantize {
            inv_scale,
            scale: scales.get(&inv_scale.to_bits()).copied().flatten(),
            zero_point,
            dt,
        })
    }

    /// The op [`fast_quantize`] puts in place of `node`, if it replaces it: a tract
    /// quantiser of one f32 input to its own type.
    fn replacing(
        model: &TypedModel,
        node: &TypedNode,
        scales: &QuantizeScales,
    ) -> TractResult<Option<Quantize>> {
        let Some(op) = Quantize::of(node, scales) else {
            return Ok(None);
        };
        let replaces = node.inputs.len() == 1
            && model.outlet_fact(node.inputs[0])?.datum_type == DatumType::F32
            && node.outputs[0].fact.datum_type == op.dt;
        Ok(replaces.then_some(op))
    }

    /// "x / s, zero point z -> U8": the op's `info`, and a part of the ops that embed it.
    fn describe(&self) -> String {
        let scale = match self.scale {
            Some(s) => format!("/ {s}"),
            None => format!("* {}", self.inv_scale),
        };
        format!("x {scale}, zero point {} -> {:?}", self.zero_point, self.dt)
    }

    /// `x` quantised into `o`, as bytes of the output type (i8: two's complement).
    /// Inlined into its callers, which compile it for their vector width ([`widest`]).
    #[inline(always)]
    fn run(&self, x: &[f32], o: &mut [u8]) {
        let zp = self.zero_point as f32;
        let (lo, hi) = if self.dt == DatumType::I8 {
            (-128.0, 127.0)
        } else {
            (0.0, 255.0)
        };
        // On AVX-512 the whole sixteens written out (`x86::quantize`), the rest below.
        #[cfg(target_arch = "x86_64")]
        let (x, o) = {
            let done = match (crate::model::cpu::x86_avx512bw(), self.scale) {
                // SAFETY: the CPU has AVX-512 F and BW, checked here.
                (true, Some(s)) => unsafe { x86::quantize::<true>(x, o, s, (zp, lo, hi)) },
                (true, None) => unsafe {
                    x86::quantize::<false>(x, o, self.inv_scale, (zp, lo, hi))
                },
                (false, _) => 0,
            };
            (&x[done..], &mut o[done..])
        };
        match self.scale {
            Some(s) => quantize_all(x, o, zp, lo, hi, |x| x / s),
            None => quantize_all(x, o, zp, lo, hi, |x| x * self.inv_scale),
        }
    }
}

impl Op for Quantize {
    fn name(&self) -> StaticName {
        "EdgesightQuantize".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.describe()])
    }

    tract_core::op_as_typed_op!();
}

impl EvalOp for Quantize {
    tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        // SAFETY: a plain-data tensor (u8/i8/i32/f32); every element is written below
        // before the tensor is read or returned.
        let mut out = unsafe { Tensor::uninitialized_dt(self.dt, inputs[0].shape())? };
        {
            let mut o = out.try_as_plain_ram_mut()?;
            par_chunks(o.as_bytes_mut(), PAR_CHUNK, |(i, o)| {
                widest(|| self.run(&x[i * PAR_CHUNK..], o))
            });
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// `o[i] = quantize(f(x[i]))`, stored as the output type's byte (i8: two's complement).
/// Generic over `f` so that each caller's loop is compiled, and vectorised, on its own.
/// Works in blocks of 16 so the compiler vectorises even the division (as a plain loop it
/// kept `x / s` scalar: 2.2 ms more on ResNet-50).
#[inline(always)]
fn quantize_all(x: &[f32], o: &mut [u8], zp: f32, lo: f32, hi: f32, f: impl Fn(f32) -> f32) {
    const B: usize = 16;
    let mut xs = x.chunks_exact(B);
    let mut os = o.chunks_exact_mut(B);
    for (x, o) in (&mut xs).zip(&mut os) {
        let v: [f32; B] = std::array::from_fn(|i| f(x[i]));
        for (y, v) in o.iter_mut().zip(v) {
            *y = quantize(v, zp, lo, hi) as u8;
        }
    }
    for (x, y) in xs.remainder().iter().zip(os.into_remainder()) {
        *y = quantize(f(*x), zp, lo, hi) as u8;
    }
}

impl TypedOp for Quantize {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.dt.fact(inputs[0].shape.clone())))
    }

    tract_core::as_op!();
}

/// Replace tract's f32 QuantizeLinear nodes of the optimised model by [`Quantize`],
/// dividing by the model's scale where `scales` (from
/// [`crate::model::int8::onnx_quant::quantize_scales`]) knows it. Returns how many.
pub fn fast_quantize(model: &mut TypedModel, scales: &QuantizeScales) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(op) = Quantize::replacing(model, node, scales)? else {
            continue;
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// The constant operand of a binary node `node` whose other operand is `from`, if it is
/// one repeated i32 value.
fn uniform_i32_operand(model: &TypedModel, node: &TypedNode, from: OutletId) -> Option<i32> {
    if node.inputs.len() != 2 {
        return None;
    }
    let other = if node.inputs[0] == from {
        node.inputs[1]
    } else if node.inputs[1] == from {
        node.inputs[0]
    } else {
        return None;
    };
    let k = model.outlet_fact(other).ok()?.konst.clone()?;
    let v = uniform_value(&k).ok()??;
    v.cast_to_scalar::<i32>().ok()
}

/// The requantisation chain that starts at the `Scale` node `id`, as the op that replaces
/// it and the id of the chain's last node (the cast).
/// The f32 scales of an i32 `Scale` node, if they are per channel: exactly one axis of
/// the scale tensor longer than 1, aligned with the output's axes (the scale was
/// broadcast to the output's rank). Returns the scales and that axis.
fn per_channel_scales(
    model: &TypedModel,
    scale_node: &TypedNode,
) -> TractResult<Option<(Vec<f32>, usize)>> {
    if scale_node.op.name() != tract_op::SCALE || scale_node.inputs.len() != 2 {
        return Ok(None);
    }
    let out_fact = &scale_node.outputs[0].fact;
    let Some(scales) = model.outlet_fact(scale_node.inputs[0])?.konst.clone() else {
        return Ok(None);
    };
    if out_fact.datum_type != DatumType::I32 || scales.datum_type() != DatumType::F32 {
        return Ok(None);
    }
    let long: Vec<usize> = (0..scales.rank())
        .filter(|a| scales.shape()[*a] > 1)
        .collect();
    let Some(out_shape) = out_fact.shape.as_concrete() else {
        return Ok(None);
    };
    let [axis] = long[..] else {
        return Ok(None);
    };
    if scales.rank() != out_shape.len() || out_shape[axis] != scales.shape()[axis] {
        return Ok(None);
    }
    let scales: Vec<f32> = scales.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    Ok(Some((scales, axis)))
}

fn requant_chain(model: &TypedModel, id: usize) -> TractResult<Option<(Requant, usize)>> {
    let Some((scales, axis)) = per_channel_scales(model, model.node(id))? else {
        return Ok(None);
    };
    let is_output = |n: usize| model.outputs.iter().any(|o| o.node == n);
    let mut current = id;
    let (mut zero_point, mut lo, mut hi) = (0i32, None, None);
    loop {
        if is_output(current) {
            return Ok(None);
        }
        let Some(next) = model.single_succ(current)? else {
            return Ok(None);
        };
        let from = OutletId::new(current, 0);
        match &*next.op.name() {
            tract_op::ADD if lo.is_none() && hi.is_none() => {
                let Some(z) = uniform_i32_operand(model, next, from) else {
                    return Ok(None);
                };
                zero_point = zero_point.wrapping_add(z);
            }
            tract_op::MIN if hi.is_none() => {
                let Some(h) = uniform_i32_operand(model, next, from) else {
                    return Ok(None);
                };
                hi = Some(h);
            }
            tract_op::MAX if lo.is_none() => {
                let Some(l) = uniform_i32_operand(model, next, from) else {
                    return Ok(None);
                };
                lo = Some(l);
            }
            tract_op::CAST => {
                let dt = next.outputs[0].fact.datum_type;
                let (lo, hi) = match (dt, lo, hi) {
                    (DatumType::U8 | DatumType::I8, Some(lo), Some(hi)) => (lo, hi),
                    _ => return Ok(None),
                };
                // The cast must not wrap: the clamp has to lie within the target type.
                let (tmin, tmax) = if dt == DatumType::U8 {
                    (0, 255)
                } else {
                    (-128, 127)
                };
                if lo < tmin || hi > tmax {
                    return Ok(None);
                }
                let op = Requant {
                    scales,
                    axis,
                    zero_point,
                    lo,
                    hi,
                    dt,
                };
                return Ok(Some((op, next.id)));
            }
            _ => return Ok(None),
        }
        current = next.id;
    }
}

/// Replace every per-channel requantisation chain of the optimised model by one
/// [`Requant`]. Run after codegen (the chains appear when tract lowers quantised convs).
/// Returns how many chains were fused.
pub fn fuse_requant(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in 0..model.nodes().len() {
        let Some((op, last)) = requant_chain(model, id)? else {
            continue;
        };
        let mut patch = TypedModelPatch::default();
        let acc = patch.tap_model(model, model.node(id).inputs[1])?;
        let name = model.node(last).name.clone();
        let out = patch.wire_node(format!("{name}.requant"), op, &[acc])?;
        patch.shunt_outside(model, OutletId::new(last, 0), out[0])?;
        patch.apply(model)?;
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

    /// The names the rewrites match (`tract_op`) are the names tract's ops still report:
    /// a rename in a tract upgrade fails here instead of silently losing an int8 path.
    #[test]
    fn tract_still_calls_its_ops_by_these_names() {
        use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
        use tract_core::ops::einsum::EinSum;
        use tract_core::ops::nn::DataFormat;
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![1, 1],
                padding: PaddingSpec::Valid,
                dilations: None,
                strides: None,
                input_channels: 1,
                output_channels: 1,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let einsum = EinSum::new("ij,jk->ik".parse().unwrap(), DatumType::F32);
        let ops: [(Box<dyn TypedOp>, &str); 7] = [
            (Box::new(tract_core::ops::math::add()), tract_op::ADD),
            (Box::new(tract_core::ops::math::max()), tract_op::MAX),
            (Box::new(tract_core::ops::math::min()), tract_op::MIN),
            (Box::new(tract_core::ops::quant::scale()), tract_op::SCALE),
            (
                Box::new(tract_core::ops::cast::cast(DatumType::U8)),
                tract_op::CAST,
            ),
            (Box::new(conv), tract_op::CONV),
            (Box::new(einsum), tract_op::EINSUM),
        ];
        for (op, want) in ops {
            assert_eq!(op.name(), want, "{op:?}");
        }
    }

    /// The fused op against tract's own chain on the values where rounding and clamping
    /// decide: ties, negatives, saturation at both ends, i8 and u8.
    #[test]
    fn requant_matches_tracts_chain() {
        let acc: Vec<i32> = vec![0, 1, -1, 3, -3, 5, -5, 7, 1000, -1000, 123456, -123456];
        let scales = [0.5f32, 0.25, 0.0123];
        for (dt, zp, lo, hi) in [
            (DatumType::U8, 120, 0, 255),
            (DatumType::U8, 0, 0, 255),
            (DatumType::I8, -3, -128, 127),
        ] {
            let op = Requant {
                scales: scales.to_vec(),
                axis: 1,
                zero_point: zp,
                lo,
                hi,
                dt,
            };
            let input = tensor1(&acc).into_shape(&[1, 3, 4]).unwrap();
            let got = op
                .eval_out_of_plan(tvec!(input.clone().into_tvalue()))
                .unwrap()
                .unwrap();

            // tract's chain, built the way tract builds it for a quantised conv.
            let mut m = TypedModel::default();
            let x = m.add_source("x", i32::fact([1, 3, 4])).unwrap();
            let s = m
                .add_const("s", tensor1(&scales).into_shape(&[1, 3, 1]).unwrap())
                .unwrap();
            let w = m
                .wire_node("scale", tract_core::ops::quant::scale(), &[s, x])
                .unwrap();
            let z = m.add_const("z", tensor3(&[[[zp]]])).unwrap();
            let w = m
                .wire_node("zp", tract_core::ops::math::add(), &[w[0], z])
                .unwrap();
            let h = m.add_const("h", tensor3(&[[[hi]]])).unwrap();
            let w = m
                .wire_node("min", tract_core::ops::math::min(), &[w[0], h])
                .unwrap();
            let l = m.add_const("l", tensor3(&[[[lo]]])).unwrap();
            let w = m
                .wire_node("max", tract_core::ops::math::max(), &[w[0], l])
                .unwrap();
            let w = m
                .wire_node("cast", tract_core::ops::cast::cast(dt), &w)
                .unwrap();
            m.select_output_outlets(&w).unwrap();
            let want = m
                .into_runnable()
                .unwrap()
                .run(tvec!(input.into_tvalue()))
                .unwrap();
            assert_eq!(*got[0], *want[0], "{dt:?} zp {zp}");
        }
    }

    /// Ties, negatives, saturation and values past 2^23 against tract's own quantiser.
    /// (Not past 2^31: tract's i32 add of the zero point overflows there, wrapping in
    /// release; ours saturates. Activations never come near.)
    #[test]
    fn quantize_matches_tracts() {
        use tract_core::ops::quant::{quantize_linear_f32_i8, quantize_linear_f32_u8};
        let xs = [
            0.0f32, -0.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.5, 128.5, -128.5, 300.0, -300.0,
            2e9, -2e9, 8388609.0, -8388609.0, 0.49999997,
        ];
        for zp in [0, 3, 128, 255] {
            let op = Quantize {
                inv_scale: 1.0,
                scale: None,
                zero_point: zp,
                dt: DatumType::U8,
            };
            let out = op
                .eval_out_of_plan(tvec!(tensor1(&xs).into_tvalue()))
                .unwrap()
                .unwrap();
            let want: Vec<u8> = xs
                .iter()
                .map(|x| quantize_linear_f32_u8(*x, 1.0, zp))
                .collect();
            assert_eq!(
                out[0].try_as_plain_ram().unwrap().as_slice::<u8>().unwrap(),
                &want[..]
            );
        }
        for zp in [-128, -3, 0, 127] {
            let op = Quantize {
                inv_scale: 1.0,
                scale: None,
                zero_point: zp,
                dt: DatumType::I8,
            };
            let out = op
                .eval_out_of_plan(tvec!(tensor1(&xs).into_tvalue()))
                .unwrap()
                .unwrap();
            let want: Vec<i8> = xs
                .iter()
                .map(|x| quantize_linear_f32_i8(*x, 1.0, zp))
                .collect();
            assert_eq!(
                out[0].try_as_plain_ram().unwrap().as_slice::<i8>().unwrap(),
                &want[..]
            );
        }
    }

    /// The float residual add of a QLinearConv-form ResNet (DQ, add the f32 skip, ReLU,
    /// quantise; the f32 sum used again) against tract's own ops: bit for bit when the
    /// scale is unknown (tract's `x * (1/s)`), and `round(x / s)` when it is known.
    #[test]
    fn residual_add_matches_tracts_ops() {
        use tract_core::ops::quant::{DequantizeLinearF32, quantize_linear_u8};
        let shape = [1, 3, 7, 5];
        let n: usize = shape.iter().product();
        let a: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
        // Includes sums that land on .5 ties after division (b = -DQ(a) + k/2 steps).
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.731).sin() * 3.0).collect();
        let (a_scale, a_zp, y_scale, y_zp) = (0.05f32, 128, 0.03f32, 3);
        let mut m = TypedModel::default();
        let xa = m.add_source("a", u8::fact(shape)).unwrap();
        let xb = m.add_source("b", f32::fact(shape)).unwrap();
        let dq = DequantizeLinearF32 {
            scale: a_scale,
            zero_point: a_zp,
        };
        let w = m.wire_node("dq", dq, &[xa]).unwrap();
        let w = m
            .wire_node("add", tract_core::ops::math::add(), &[w[0], xb])
            .unwrap();
        let zero = m.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
        let relu = m
            .wire_node("relu", tract_core::ops::math::max(), &[w[0], zero])
            .unwrap();
        let q = m
            .wire_node("q", quantize_linear_u8(y_scale.recip(), y_zp as u8), &relu)
            .unwrap();
        m.select_output_outlets(&[q[0], relu[0]]).unwrap();
        let inputs = || {
            tvec!(
                tensor1(&a).into_shape(&shape).unwrap().into_tvalue(),
                tensor1(&b).into_shape(&shape).unwrap().into_tvalue()
            )
        };
        let run = |m: &TypedModel| m.clone().into_runnable().unwrap().run(inputs()).unwrap();
        let want = run(&m);

        let mut fused = m.clone();
        assert_eq!(
            fuse_residual_adds(&mut fused, &Default::default()).unwrap(),
            1
        );
        assert_eq!(fused.nodes().len(), 3, "two sources and the fused op");
        let got = run(&fused);
        assert_eq!(*got[0], *want[0]);
        assert_eq!(*got[1], *want[1]);

        let scales = [(y_scale.recip().to_bits(), Some(y_scale))].into();
        let mut divided = m.clone();
        assert_eq!(fuse_residual_adds(&mut divided, &scales).unwrap(), 1);
        let got = run(&divided);
        assert_eq!(*got[1], *want[1], "the f32 sum is the same");
        let sums = want[1].try_as_plain_ram().unwrap();
        let onnx: Vec<u8> = sums
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|x| ((x / y_scale).round_ties_even() + y_zp as f32).clamp(0.0, 255.0) as u8)
            .collect();
        assert_eq!(
            got[0].try_as_plain_ram().unwrap().as_slice::<u8>().unwrap(),
            &onnx[..]
        );
    }

    /// The reciprocal is taken only where it changes no output: for scales where it is
    /// judged exact, the op's bytes equal the division's on every input pair; and the
    /// check is not vacuous: some scales fail it.
    #[test]
    fn the_adds_reciprocal_is_taken_only_where_exact() {
        let a: Vec<u8> = (0..=255u8).flat_map(|x| [x; 256]).collect();
        let b: Vec<u8> = (0..=255u8).cycle().take(65_536).collect();
        let (mut exact, mut inexact) = (0, 0);
        for i in 0..40 {
            let scale = 0.0123 + i as f32 * 0.00731;
            let mut op = QuantizedAdd {
                a_scale: 0.0213,
                a_zero_point: 131,
                b_scale: 0.0477,
                b_zero_point: 7,
                floor: Some(0.0),
                quantize: Quantize {
                    inv_scale: 1.0 / scale,
                    scale: Some(scale),
                    zero_point: 3,
                    dt: u8::datum_type(),
                },
                exact_reciprocal: false,
            };
            let mut divided = vec![0u8; a.len()];
            op.run(&a, &b, &mut divided).unwrap();
            op.exact_reciprocal = true;
            let mut multiplied = vec![0u8; a.len()];
            op.run(&a, &b, &mut multiplied).unwrap();
            if op.reciprocal_is_exact() {
                exact += 1;
                assert!(
                    multiplied == divided,
                    "scale {scale}: judged exact, bytes differ"
                );
            } else {
                inexact += 1;
            }
        }
        assert!(exact > 0 && inexact > 0, "{exact} exact, {inexact} not");
    }

    /// The add's vector paths (AVX2 or AVX-512 where the CPU has them, chosen at run time;
    /// NEON on aarch64) give the bits of the plain loop on every pair of bytes, u8 and i8
    /// in and out, with a ReLU floor and without, dividing by the scale and multiplying by
    /// a reciprocal. Five more elements than whole sixteens, for the scalar tail.
    #[test]
    fn the_adds_vector_path_equals_its_plain_loop() {
        let a: Vec<u8> = (0..=255u8).flat_map(|x| [x; 256]).chain(0..5).collect();
        let b: Vec<u8> = (0..=255u8).cycle().take(a.len()).collect();
        let signed: Vec<i8> = a.iter().map(|&x| x as i8).collect();
        for (floor, inv, s) in [(0.0, 1.0, 0.0731), (f32::NEG_INFINITY, 13.68, 1.0)] {
            let c = AddConsts {
                a_zero_point: 131,
                a_scale: 0.0213,
                b_zero_point: 7,
                b_scale: 0.0477,
                floor,
                inv,
                s,
                zp: 3.0,
                lo: 0.0,
                hi: 255.0,
            };
            let i8_out = AddConsts {
                lo: -128.0,
                hi: 127.0,
                ..c
            };
            let what = format!("floor {floor}, divide by {s}");
            check_add_paths::<_, u8>(&a, &b, &c, &format!("u8 + u8 -> u8, {what}"));
            check_add_paths::<_, i8>(&a, &b, &i8_out, &format!("u8 + u8 -> i8, {what}"));
            let c = AddConsts {
                a_zero_point: -5,
                ..c
            };
            check_add_paths::<_, u8>(&signed, &b, &c, &format!("i8 + u8 -> u8, {what}"));
        }
    }

    /// Every vector path of the add against its plain loop.
    fn check_add_paths<A, T>(a: &[A], b: &[u8], c: &AddConsts, what: &str)
    where
        A: Byte + tract_core::internal::tract_num_traits::AsPrimitive<i32>,
        T: Byte + Default + PartialEq + std::fmt::Debug,
        i32: tract_core::internal::tract_num_traits::AsPrimitive<T>,
    {
        let mut plain = vec![T::default(); a.len()];
        add_elements::<_, _, _, false>(a, b, &mut plain, c);
        for (path, fast) in add_paths::<A, T>(a, b, c) {
            let diff = fast.iter().zip(&plain).position(|(f, p)| f != p);
            assert!(
                diff.is_none(),
                "{what}, {path}: first difference at {diff:?}"
            );
        }
    }

    /// A max pool moves onto the integers only where quantising the dequantised value
    /// gives it back for every value of the type: same zero point, a positive scale.
    #[test]
    fn pools_move_only_where_the_round_trip_is_exact() {
        use tract_core::ops::quant::DequantizeLinearF32;
        let q = |scale: f32, zero_point| Quantize {
            inv_scale: scale.recip(),
            scale: Some(scale),
            zero_point,
            dt: DatumType::U8,
        };
        let d = |scale, zero_point| DequantizeLinearF32 { scale, zero_point };
        assert!(round_trips(&d(0.0213, 7), &q(0.0213, 7)));
        assert!(round_trips(&d(3.7, 250), &q(3.7, 250)));
        assert!(
            !round_trips(&d(0.0213, 7), &q(0.0213, 8)),
            "zero points differ"
        );
        assert!(!round_trips(&d(0.0213, 7), &q(0.0426, 7)), "scales differ");
        assert!(
            !round_trips(&d(-0.0213, 7), &q(-0.0213, 7)),
            "a negative scale"
        );
    }

    /// The add through every vector path this CPU runs, named.
    fn add_paths<A, T>(a: &[A], b: &[u8], c: &AddConsts) -> Vec<(&'static str, Vec<T>)>
    where
        A: Byte + tract_core::internal::tract_num_traits::AsPrimitive<i32>,
        T: Byte + Default,
        i32: tract_core::internal::tract_num_traits::AsPrimitive<T>,
    {
        let run = |f: &dyn Fn(&mut [T])| {
            let mut o = vec![T::default(); a.len()];
            f(&mut o);
            o
        };
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut out = vec![("dispatch", run(&|o| add_chunk(a, b, o, c)))];
        #[cfg(target_arch = "x86_64")]
        {
            use crate::model::cpu::{with_avx2, with_avx512};
            if is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked above.
                out.push((
                    "avx2",
                    run(&|o| unsafe { with_avx2(|| add_elements::<_, _, _, false>(a, b, o, c)) }),
                ));
                // The written-out AVX2 loop, which `add_chunk` passes over where AVX-512
                // is present; the plain loop finishes what it leaves.
                out.push((
                    "x86::add_avx2",
                    run(&|o| {
                        // SAFETY: the CPU has AVX2, checked above.
                        let done = unsafe {
                            match c.s == 1.0 {
                                true => x86::add_avx2::<_, _, _, false>(a, b, o, c),
                                false => x86::add_avx2::<_, _, _, true>(a, b, o, c),
                            }
                        };
                        add_elements::<_, _, _, false>(&a[done..], &b[done..], &mut o[done..], c)
                    }),
                ));
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                // SAFETY: the CPU has AVX-512 F and BW, checked above.
                out.push((
                    "avx512",
                    run(&|o| unsafe { with_avx512(|| add_elements::<_, _, _, false>(a, b, o, c)) }),
                ));
            }
        }
        out
    }

    /// The integer residual add (DQ both, add, ReLU, quantise) against tract's own ops on
    /// every pair of u8 inputs: bit for bit when the output scale is unknown (tract's
    /// `x * (1/s)`), and `round(x / s)` when it is known. With these scales the two
    /// differ on 210 of the 65 536 sums, so the second half sees the division.
    #[test]
    fn quantized_add_matches_tracts_ops_or_divides() {
        use tract_core::ops::quant::{DequantizeLinearF32, quantize_linear_u8};
        let shape = [1, 256, 16, 16];
        let a: Vec<u8> = (0..65536).map(|i| (i / 256) as u8).collect();
        let b: Vec<u8> = (0..65536).map(|i| (i % 256) as u8).collect();
        let (y_scale, y_zp) = (0.1f32, 3);
        let mut m = TypedModel::default();
        let mut dq = |name: &str, scale, zero_point| {
            let x = m.add_source(name, u8::fact(shape)).unwrap();
            let op = DequantizeLinearF32 { scale, zero_point };
            m.wire_node(format!("{name}.dq"), op, &[x]).unwrap()[0]
        };
        let (fa, fb) = (dq("a", 0.05, 128), dq("b", 0.03, 100));
        let sum = m
            .wire_node("add", tract_core::ops::math::add(), &[fa, fb])
            .unwrap();
        let zero = m.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
        let relu = m
            .wire_node("relu", tract_core::ops::math::max(), &[sum[0], zero])
            .unwrap();
        let q = m
            .wire_node("q", quantize_linear_u8(y_scale.recip(), y_zp as u8), &relu)
            .unwrap();
        m.select_output_outlets(&[q[0]]).unwrap();
        let run = |m: &TypedModel| {
            let inputs = [&a, &b].map(|v| tensor1(v).into_shape(&shape).unwrap().into_tvalue());
            let out = m
                .clone()
                .into_runnable()
                .unwrap()
                .run(inputs.into_iter().collect())
                .unwrap();
            out[0]
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<u8>()
                .unwrap()
                .to_vec()
        };
        let tract = run(&m);
        let mut fused = m.clone();
        assert_eq!(
            fuse_quantized_adds(&mut fused, &Default::default()).unwrap(),
            1
        );
        assert_eq!(run(&fused), tract);
        // Shared out over a pool in 16 K pieces, the same bytes.
        use tract_core::internal::tract_linalg::multithread::{Executor, multithread_tract_scope};
        let pooled = multithread_tract_scope(Executor::multithread(2), || run(&fused));
        assert_eq!(pooled, tract);

        let scales = [(y_scale.recip().to_bits(), Some(y_scale))].into();
        let mut divided = m.clone();
        assert_eq!(fuse_quantized_adds(&mut divided, &scales).unwrap(), 1);
        let onnx: Vec<u8> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| {
                let sum = (*x as i32 - 128) as f32 * 0.05 + (*y as i32 - 100) as f32 * 0.03;
                ((sum.max(0.0) / y_scale).round_ties_even() + y_zp as f32).clamp(0.0, 255.0) as u8
            })
            .collect();
        let got = run(&divided);
        assert_eq!(got, onnx);
        let changed = got.iter().zip(&tract).filter(|(g, t)| g != t).count();
        assert_eq!(changed, 210, "sums the division rounds otherwise");
    }

    #[test]
    fn only_repeated_values_are_uniform() {
        let zeros = tensor1(&[0i8, 0, 0, 0]);
        assert_eq!(uniform_value(&zeros).unwrap(), Some(tensor0(0i8)));
        assert_eq!(uniform_value(&tensor1(&[3u8, 3, 4])).unwrap(), None);
    }
}
