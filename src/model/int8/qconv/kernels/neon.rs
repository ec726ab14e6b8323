//! NEON kernels (aarch64): `sdot` on ARMv8.2 (Pi 5's Cortex-A76) and `smull` + `sadalp`
//! on ARMv8.0 (Pi 4's Cortex-A72), i8 x i8.

use crate::model::int8::neon::Requant;
use crate::model::int8::qconv::MR;
use crate::model::int8::qconv::kernels::{Epilogue, Tile};
use std::arch::aarch64::*;
use std::arch::asm;

/// `acc[p] += x · w[j]` per pixel: the four bytes of pixel p times the four weights in
/// lane j of `w` (one `sdot` by element).
macro_rules! sdot {
    ($acc:expr, $x:expr, $w:expr, $j:literal) => {
        asm!(
            concat!("sdot {a:v}.4s, {x:v}.16b, {w:v}.4b[", $j, "]"),
            a = inout(vreg) $acc,
            x = in(vreg) $x,
            w = in(vreg) $w,
            options(pure, nomem, nostack)
        )
    };
}

/// MR channels x `pixels` pixels (up to the next 8), 8 pixels (two registers) at a
/// time: 16 accumulators, two activation and two weight registers. The accumulators
/// start at the bias, which saves the epilogue its add.
///
/// # Safety
/// The CPU must have the dot product extension, and `t.check(n, MR)` must hold for
/// `n = pixels.div_ceil(16)`.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn block_dot(t: &Tile, pixels: usize, e: &Epilogue, out: &mut [u8], stride: usize) {
    let mut rows = Rows::new(e, out, t.q0, stride);
    let bias = &e.bias[..MR];
    for px0 in (0..pixels).step_by(8) {
        // A plain loop: `array::map` here was left a call per row, and the sums spilled.
        let mut a = [[vdupq_n_s32(0); 2]; MR];
        for (a, b) in a.iter_mut().zip(bias) {
            *a = [vdupq_n_s32(*b); 2];
        }
        let mut wp = t.w.as_ptr();
        for &off in t.offsets {
            // SAFETY (all pointer arithmetic): bounded by Tile::check.
            let mut xp = unsafe { t.packed.as_ptr().add(off + (t.q0 + px0) * 4) } as *const i8;
            for _ in 0..t.groups {
                // SAFETY: 32 bytes at xp and 32 weights at wp lie inside Tile::check's
                // bounds; `sdot` needs dotprod, which the caller guarantees.
                unsafe {
                    let x0 = vld1q_s8(xp);
                    let x1 = vld1q_s8(xp.add(16));
                    let w0 = vld1q_s8(wp);
                    let w1 = vld1q_s8(wp.add(16));
                    sdot!(a[0][0], x0, w0, 0);
                    sdot!(a[0][1], x1, w0, 0);
                    sdot!(a[1][0], x0, w0, 1);
                    sdot!(a[1][1], x1, w0, 1);
                    sdot!(a[2][0], x0, w0, 2);
                    sdot!(a[2][1], x1, w0, 2);
                    sdot!(a[3][0], x0, w0, 3);
                    sdot!(a[3][1], x1, w0, 3);
                    sdot!(a[4][0], x0, w1, 0);
                    sdot!(a[4][1], x1, w1, 0);
                    sdot!(a[5][0], x0, w1, 1);
                    sdot!(a[5][1], x1, w1, 1);
                    sdot!(a[6][0], x0, w1, 2);
                    sdot!(a[6][1], x1, w1, 2);
                    sdot!(a[7][0], x0, w1, 3);
                    sdot!(a[7][1], x1, w1, 3);
                    wp = wp.add(MR * 4);
                    xp = xp.add(t.cb_stride);
                }
            }
        }
        for (m, a) in a.iter().enumerate() {
            rows.store8(m, px0, *a);
        }
    }
}

/// The same without the dot product (ARMv8.0): per channel, `smull` the pixels' bytes
/// by the channel's four weights (i16 products, exact: |-128 x -128| < 2^15) and
/// `sadalp` adjacent pairs into i32, which leaves two partial sums per pixel, added
/// at the end. 4 pixels at a time (`pixels` up to the next 4): 16 accumulators.
///
/// # Safety
/// `t.check(n, MR)` must hold for `n = pixels.div_ceil(16)`.
#[target_feature(enable = "neon")]
pub unsafe fn block_mull(t: &Tile, pixels: usize, e: &Epilogue, out: &mut [u8], stride: usize) {
    let mut rows = Rows::new(e, out, t.q0, stride);
    for px0 in (0..pixels).step_by(4) {
        let mut lo = [vdupq_n_s32(0); MR];
        let mut hi = [vdupq_n_s32(0); MR];
        let mut wp = t.w.as_ptr() as *const i32;
        for &off in t.offsets {
            // SAFETY (this pointer and every load through it): bounded by Tile::check.
            let mut xp = unsafe { t.packed.as_ptr().add(off + (t.q0 + px0) * 4) } as *const i8;
            for _ in 0..t.groups {
                // SAFETY: 16 bytes at xp and MR weights at wp lie inside Tile::check's bounds.
                unsafe {
                    let x = vld1q_s8(xp);
                    let xl = vget_low_s8(x);
                    for m in 0..MR {
                        let w = vreinterpretq_s8_s32(vld1q_dup_s32(wp.add(m)));
                        lo[m] = vpadalq_s16(lo[m], vmull_s8(xl, vget_low_s8(w)));
                        hi[m] = vpadalq_s16(hi[m], vmull_high_s8(x, w));
                    }
                    wp = wp.add(MR);
                    xp = xp.add(t.cb_stride);
                }
            }
        }
        // Out of registers through a plain buffer, as in the x86 kernel: with `lo[m]` read
        // in the epilogue's loop the compiler kept both arrays in memory and stored all
        // 16 sums on every step of the loop above (Pi 4's ResNet-18: 385 ms estimated
        // instead of ~220, tools/arm_model.py).
        let mut sums = [[0i32; 4]; MR];
        for (s, (lo, hi)) in sums.iter_mut().zip(lo.iter().zip(&hi)) {
            // SAFETY: four i32s per row of `sums`.
            unsafe { vst1q_s32(s.as_mut_ptr(), vpaddq_s32(*lo, *hi)) };
        }
        for (m, s) in sums.iter().enumerate() {
            // SAFETY: four i32s per row of `sums`.
            let acc = unsafe { vaddq_s32(vld1q_s32(s.as_ptr()), vdupq_n_s32(e.bias[m])) };
            rows.store4(m, px0, acc);
        }
    }
}

/// The epilogue straight from the accumulators (the bias already in them): scale, then
/// [`Requant`] (the portable `epilogue`'s integers), into row `m` of the block's output
/// at pixel `px`.
/// The bounds of every store are checked: this runs once per accumulator, not per
/// multiply-add.
struct Rows<'a, 'o> {
    e: &'a Epilogue<'a>,
    rq: Requant,
    out: &'o mut [u8],
    q0: usize,
    stride: usize,
}

impl<'a, 'o> Rows<'a, 'o> {
    fn new(e: &'a Epilogue<'a>, out: &'o mut [u8], q0: usize, stride: usize) -> Self {
        let rq = Requant::new(e.y0 as f32, e.lo as f32, e.hi as f32)
            .expect("an 8-bit zero point and bounds (QConv is built with them)");
        Rows {
            e,
            rq,
            out,
            q0,
            stride,
        }
    }

    /// `acc as f32 * scale` per lane, as the portable epilogue computes it.
    #[inline(always)]
    fn scaled(&self, m: usize, acc: int32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of aarch64.
        unsafe { vmulq_f32(vcvtq_f32_s32(acc), vdupq_n_f32(self.e.scales[m])) }
    }

    #[inline(always)]
    fn dst(&mut self, m: usize, px: usize, len: usize) -> &mut [u8] {
        let at = self.q0 + m * self.stride + px;
        &mut self.out[at..at + len]
    }

    /// Eight pixels (two vectors of sums).
    #[inline(always)]
    fn store8(&mut self, m: usize, px: usize, acc: [int32x4_t; 2]) {
        let b = self
            .rq
            .bytes8(self.scaled(m, acc[0]), self.scaled(m, acc[1]));
        // SAFETY: `dst` is 8 bytes long.
        unsafe { vst1_u8(self.dst(m, px, 8).as_mut_ptr(), b) };
    }

    /// Four pixels.
    #[inline(always)]
    fn store4(&mut self, m: usize, px: usize, acc: int32x4_t) {
        let v = self.scaled(m, acc);
        let b = self.rq.bytes8(v, v);
        // SAFETY: `dst` is 4 bytes long; the lane store needs no alignment. NEON is part
        // of aarch64.
        unsafe {
            let p = self.dst(m, px, 4).as_mut_ptr() as *mut u32;
            vst1_lane_u32::<0>(p, vreinterpret_u32_u8(b))
        };
    }
}
