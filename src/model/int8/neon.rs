//! Quantisation on aarch64's NEON, written out: the conv kernels' requantisation straight
//! from their accumulators, and the residual adds 16 elements a step.
//!
//! Why by hand: the compiler vectorises `quantize`'s loops four values a step with a
//! round, an add and a clamp each, and the conv's goes through a buffer of sums first.
//! On a Pi 5 (tools/arm_model.py) the requantisation took 16 cycles per 8 outputs and
//! the adds 13-19 cycles per 4: together a fifth of a quantised ResNet-50. Here the
//! rounding is one add ([`Requant::round`]), the narrowing packs two vectors in one
//! instruction, and the zero point is one byte add per 16 values.
//!
//! Exactness: [`Requant::round`] is `quantize` for every f32, NaN included (see there).
//! The adds do `add_loop`'s IEEE operations in its order, so the bytes are the same; the
//! tests in `int8` and `qconv` hold both to the portable code.

use std::arch::aarch64::*;

use crate::model::int8::{AddConsts, Byte};

/// 1.5 x 2^23: floats from 2^23 to 2^24 step by 1, so adding it rounds to an integer
/// and puts that integer (within 2^22 of zero) in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

/// `quantize(x, zp, lo, hi)` on NEON vectors, with the bounds in registers.
#[derive(Clone, Copy)]
pub(crate) struct Requant {
    /// `lo - zp` and `hi - zp`: the clamp moved before the rounding.
    lo: float32x4_t,
    hi: float32x4_t,
    /// The zero point's byte: added last, to the bytes (see `bytes16`).
    zp: uint8x16_t,
}

impl Requant {
    /// For a zero point and bounds that are integers below 2^22 in magnitude, where
    /// `lo - zp` and `hi - zp` are exact in f32 and within [`Requant::round`]'s range,
    /// and bounds inside -128..=255 (the bytes of u8 or i8): every 8-bit type's; `None`
    /// otherwise.
    pub(crate) fn new(zp: f32, lo: f32, hi: f32) -> Option<Requant> {
        let exact = |v: f32| v.fract() == 0.0 && v.abs() < 4_194_304.0;
        let bytes = (-128.0..=255.0).contains(&lo) && (-128.0..=255.0).contains(&hi);
        if !(exact(zp) && exact(lo) && exact(hi) && exact(lo - zp) && exact(hi - zp) && bytes) {
            return None;
        }
        // SAFETY: NEON is part of aarch64.
        unsafe {
            Some(Requant {
                lo: vdupq_n_f32(lo - zp),
                hi: vdupq_n_f32(hi - zp),
                zp: vdupq_n_u8(zp as i32 as u8),
            })
        }
    }

    /// Per lane, an i32 whose low 16 bits are `quantize(x, zp, lo, hi) - zp`. `quantize`
    /// rounds, adds the zero point and clamps; this clamps to `[lo - zp, hi - zp]` and
    /// rounds. The same integers: the bounds are integers, so clamping commutes with
    /// rounding, and `fmaxnm` takes a NaN to `lo - zp` as `quantize`'s `max` takes it to
    /// `lo`. The rounding adds [`MAGIC`]: the clamped value is within 2^22 of zero, so
    /// the sum rounds to the integer (ties to even, as MAGIC is even), which sits in the
    /// sum's low mantissa bits. One add on either vector pipe instead of `fcvtns`, which
    /// takes the Cortex-A76's one convert pipe for two cycles.
    #[inline(always)]
    fn round(&self, x: float32x4_t) -> int32x4_t {
        // SAFETY: NEON is part of aarch64.
        unsafe {
            let x = vminnmq_f32(vmaxnmq_f32(x, self.lo), self.hi);
            vreinterpretq_s32_f32(vaddq_f32(x, vdupq_n_f32(MAGIC)))
        }
    }

    /// Eight values quantised, as bytes (u8, or i8's two's complement).
    #[inline(always)]
    pub(crate) fn bytes8(&self, a: float32x4_t, b: float32x4_t) -> uint8x8_t {
        // SAFETY: NEON is part of aarch64.
        unsafe { vadd_u8(vmovn_u16(self.halves(a, b)), vget_low_u8(self.zp)) }
    }

    /// Sixteen values quantised, as bytes. The low byte of each lane of `round` plus the
    /// zero point's, modulo 256, is the byte of `quantize` (which lies in `[lo, hi]`,
    /// inside -128..=255): the narrowing keeps low halves, and the zero point is one byte
    /// add per 16 values.
    #[inline(always)]
    pub(crate) fn bytes16(&self, v: [float32x4_t; 4]) -> uint8x16_t {
        let (lo, hi) = (self.halves(v[0], v[1]), self.halves(v[2], v[3]));
        // SAFETY: NEON is part of aarch64.
        unsafe {
            let b = vuzp1q_u8(vreinterpretq_u8_u16(lo), vreinterpretq_u8_u16(hi));
            vaddq_u8(b, self.zp)
        }
    }

    #[inline(always)]
    fn halves(&self, a: float32x4_t, b: float32x4_t) -> uint16x8_t {
        let (a, b) = (self.round(a), self.round(b));
        // SAFETY: NEON is part of aarch64.
        unsafe { vuzp1q_u16(vreinterpretq_u16_s32(a), vreinterpretq_u16_s32(b)) }
    }
}

/// `(x - z) as f32` for sixteen elements at `p`, without `scvtf` (two cycles of the
/// Cortex-A76's one convert pipe per vector). `tbl` spreads the bytes into the low bytes
/// of four vectors of 32-bit lanes (its indices past 15 give 0); ORing in [`MAGIC`]'s
/// bits makes each lane the float `MAGIC + byte`; subtracting `MAGIC + z` leaves
/// `byte - z`, exact as every step is on small integers. An i8 is first moved to u8 by
/// flipping its sign bit (x + 128), and its zero point with it.
///
/// # Safety
/// `p` is valid for 16 bytes; `z` is a value of `T` ([`holds`]).
#[inline(always)]
unsafe fn dequant16<T: Byte>(p: *const T, z: i32, spread: &[uint8x16_t; 4]) -> [float32x4_t; 4] {
    // SAFETY: the caller's 16 bytes; the rest is register arithmetic.
    unsafe {
        let mut v = vld1q_u8(p as *const u8);
        let mut z = z as f32;
        if T::SIGNED {
            v = veorq_u8(v, vdupq_n_u8(0x80));
            z += 128.0;
        }
        let (bits, base) = (vdupq_n_u32(MAGIC.to_bits()), vdupq_n_f32(MAGIC + z));
        let lane = |k: usize| {
            let x = vorrq_u32(vreinterpretq_u32_u8(vqtbl1q_u8(v, spread[k])), bits);
            vsubq_f32(vreinterpretq_f32_u32(x), base)
        };
        [lane(0), lane(1), lane(2), lane(3)]
    }
}

/// `tbl` indices that spread bytes 4k..4k+3 of a vector into the low bytes of four
/// 32-bit lanes, the other bytes 0.
fn spreads() -> [uint8x16_t; 4] {
    let idx = |k: u8| -> [u8; 16] {
        std::array::from_fn(|i| {
            if i % 4 == 0 {
                4 * k + i as u8 / 4
            } else {
                0xff
            }
        })
    };
    // SAFETY: NEON is part of aarch64; 16 bytes each.
    [0, 1, 2, 3].map(|k| unsafe { vld1q_u8(idx(k).as_ptr()) })
}

/// Whether `z` is a value of `T`, as an ONNX zero point of a `T` tensor is.
fn holds<T: Byte>(z: i32) -> bool {
    if T::SIGNED {
        (-128..=127).contains(&z)
    } else {
        (0..=255).contains(&z)
    }
}

/// The residual add's loop (`add_loop`) over the first whole sixteens of `o`; returns how
/// many elements it wrote, for the scalar loop to finish. 0 where a zero point is not a
/// value of its type (which no ONNX model has), so that every step here is exact.
pub(crate) fn add<A: Byte, B: Byte, T: Byte, const DIV: bool>(
    a: &[A],
    b: &[B],
    o: &mut [T],
    c: &AddConsts,
) -> usize {
    let Some(rq) = Requant::new(c.zp, c.lo, c.hi) else {
        return 0;
    };
    if !(holds::<A>(c.a_zero_point) && holds::<B>(c.b_zero_point)) {
        return 0;
    }
    let n = o.len().min(a.len()).min(b.len()) / 16 * 16;
    // SAFETY: NEON is part of aarch64; every pointer below is at most `i + 16 <= n`
    // elements of a slice at least `n` long.
    unsafe {
        let (sa, sb) = (vdupq_n_f32(c.a_scale), vdupq_n_f32(c.b_scale));
        let (floor, inv, s) = (vdupq_n_f32(c.floor), vdupq_n_f32(c.inv), vdupq_n_f32(c.s));
        let spread = spreads();
        for i in (0..n).step_by(16) {
            let x = dequant16(a.as_ptr().add(i), c.a_zero_point, &spread);
            let y = dequant16(b.as_ptr().add(i), c.b_zero_point, &spread);
            // (x - za) as f32 * sa + (y - zb) as f32 * sb, max floor, * inv [/ s]
            let sum = |k: usize| {
                let fa = vmulq_f32(x[k], sa);
                let fb = vmulq_f32(y[k], sb);
                let v = vmulq_f32(vmaxnmq_f32(vaddq_f32(fa, fb), floor), inv);
                if DIV { vdivq_f32(v, s) } else { v }
            };
            // An array literal, not `array::from_fn`: that was left a call per element in
            // a row loop once (qconv::pack::four).
            let v = [sum(0), sum(1), sum(2), sum(3)];
            vst1q_u8(o.as_mut_ptr().add(i) as *mut u8, rq.bytes16(v));
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::int8::quantize;

    /// [`Requant`]'s bytes are `quantize`'s where rounding, clamping and NaN could part
    /// them: every quarter from -300 to 300 (the ties among them), the bounds and past
    /// them, values that overflow i32, the infinities and NaN; u8 and i8 bounds with zero
    /// points at both ends, and a raised floor (a ReLU's).
    #[test]
    fn requant_gives_quantizes_bytes() {
        let special = [
            -1e30,
            -3e9,
            3e9,
            1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let mut xs: Vec<f32> = (-1200..=1200).map(|i| i as f32 * 0.25).collect();
        xs.extend(special);
        xs.extend([0.49999997, -0.49999997, -0.0, 126.50001, -128.49998]);
        xs.resize(xs.len().next_multiple_of(16), f32::NAN);
        let cases = [
            (0.0, 0.0, 255.0),
            (128.0, 0.0, 255.0),
            (255.0, 0.0, 255.0),
            (0.0, -128.0, 127.0),
            (-128.0, -128.0, 127.0),
            (127.0, -128.0, 127.0),
            (3.0, 3.0, 255.0),
        ];
        for (zp, lo, hi) in cases {
            let rq = Requant::new(zp, lo, hi).expect("8-bit bounds");
            for x in xs.chunks_exact(16) {
                // SAFETY: NEON is part of aarch64; 16 values, read and written in place.
                let (b16, b8) = unsafe {
                    let v = [0, 4, 8, 12].map(|i| vld1q_f32(x[i..].as_ptr()));
                    let (mut b16, mut b8) = ([0u8; 16], [0u8; 8]);
                    vst1q_u8(b16.as_mut_ptr(), rq.bytes16(v));
                    vst1_u8(b8.as_mut_ptr(), rq.bytes8(v[0], v[1]));
                    (b16, b8)
                };
                for (i, x) in x.iter().enumerate() {
                    let want = quantize(*x, zp, lo, hi) as u8;
                    assert_eq!(b16[i], want, "{x} with zero point {zp} in [{lo}, {hi}]");
                    if i < 8 {
                        assert_eq!(b8[i], want, "{x} (8 lanes), zero point {zp}");
                    }
                }
            }
        }
        assert!(
            Requant::new(0.5, 0.0, 255.0).is_none(),
            "a fractional zero point"
        );
        assert!(
            Requant::new(0.0, -129.0, 255.0).is_none(),
            "a bound no byte holds"
        );
    }
}
