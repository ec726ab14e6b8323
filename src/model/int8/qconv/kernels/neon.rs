//! NEON kernels (aarch64): `sdot` on ARMv8.2 (Pi 5's Cortex-A76) and `smull` + `sadalp`
//! on ARMv8.0 (Pi 4's Cortex-A72), i8 x i8.

use crate::model::int8::qconv::kernels::{Epilogue, Tile, epilogue};
use crate::model::int8::qconv::{LANES, MR, PX};
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

/// MR channels x `n` vectors of 16 pixels, 8 pixels (two registers) at a time:
/// 16 accumulators, two activation and two weight registers.
///
/// # Safety
/// The CPU must have the dot product extension, and `t.check(n, MR)` must hold.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn block_dot(t: &Tile, n: usize, e: &Epilogue, out: &mut [u8], stride: usize) {
    let mut sums = [[0i32; LANES * PX]; MR];
    for px0 in (0..n * LANES).step_by(8) {
        let mut a = [[vdupq_n_s32(0); 2]; MR];
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
            // SAFETY: px0 + 8 <= n * LANES <= the row's LANES * PX entries.
            unsafe {
                vst1q_s32(sums[m][px0..].as_mut_ptr(), a[0]);
                vst1q_s32(sums[m][px0 + 4..].as_mut_ptr(), a[1]);
            }
        }
    }
    epilogue(&sums, n * LANES, e, &mut out[t.q0..], stride);
}

/// The same without the dot product (ARMv8.0): per channel, `smull` the pixels' bytes
/// by the channel's four weights (i16 products, exact: |-128 x -128| < 2^15) and
/// `sadalp` adjacent pairs into i32, which leaves two partial sums per pixel, added
/// at the end. 4 pixels at a time: 16 accumulators.
///
/// # Safety
/// `t.check(n, MR)` must hold.
#[target_feature(enable = "neon")]
pub unsafe fn block_mull(t: &Tile, n: usize, e: &Epilogue, out: &mut [u8], stride: usize) {
    let mut sums = [[0i32; LANES * PX]; MR];
    for px0 in (0..n * LANES).step_by(4) {
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
        for m in 0..MR {
            // SAFETY: px0 + 4 <= n * LANES <= the row's LANES * PX entries.
            unsafe { vst1q_s32(sums[m][px0..].as_mut_ptr(), vpaddq_s32(lo[m], hi[m])) };
        }
    }
    epilogue(&sums, n * LANES, e, &mut out[t.q0..], stride);
}
