//! The AVX2 kernels (x86-64 without AVX-512 VNNI: most Intel client CPUs, AMD before
//! Zen 4), both exact.
//!
//! `block` is onnxruntime's AVX2 loop: `vpmaddubsw` (u8 x i8, pairs summed into i16),
//! then `vpmaddwd` by ones (the pairs summed into i32): 32 multiply-adds per two
//! multiplying instructions. `vpmaddubsw` saturates its i16 sum, and 255 x 127 x 2 does
//! not fit, so alone it would differ from the other kernels (and from onnxruntime with
//! VNNI) wherever a pair of weights of one sign is large. Such a pair whose sum is past
//! 128 in magnitude is split in halves ([`split_for_pairs`](super::split_for_pairs)),
//! and the second half is added by the block's [`Excess`] list after the main loop
//! (torchvision's ResNet-50 with its random initial weights: 3 % of its fours).
//!
//! `block_wide` widens u8 to i16 and multiplies by i16 weights with `vpmaddwd`: 16
//! multiply-adds per multiplying instruction, but nothing to split. Intel's ports and
//! Zen's both put the two multiplies of `block` on the pipes `vpmaddwd` uses, so its
//! win is in the rest of the loop (no widening, no horizontal adds) and it costs an
//! excess each time a four is split: convs whose weights split in more than
//! [`WIDE_SHARE`] of their fours run on `block_wide` (Keras's ResNet50 with its random,
//! uniform initial weights: 43 % overall, 74 % before opposite signs were let through).

use crate::model::int8::qconv::kernels::x86::prefetch_ahead;
use crate::model::int8::qconv::kernels::{Epilogue, Excess, Tile};
use crate::model::int8::qconv::{LANES, MR, PX};
use crate::model::int8::x86::low_bytes;
use std::arch::x86_64::*;

/// Pixels per step: one register of eight pixels' four channels (`block`), or two of
/// four pixels' widened (`block_wide`).
const STEP: usize = 8;

/// The share of a conv's fours (one output channel's, one tap's, one C4 group's) split
/// for `block` above which the conv runs on `block_wide`. On Zen 4 ResNet-50's convs
/// split 13-27 % of their fours run as fast on either kernel (r50 60.1 ms with 0.5, 60.9
/// with 0.125), and Keras's ResNet50 (74 % then) is 1.7x slower on `block` (at 43 %
/// under today's rule, 1.2x on a Zen 3: session 37); llvm-mca puts
/// `block`'s main loop at 1.7-1.9x `block_wide`'s on Intel's cores (1.3x measured on Zen
/// 4), where the break-even share is higher (BENCHMARKS.md, session 35).
pub const WIDE_SHARE: f64 = 0.3;

/// MR channels x `n` vectors of 16 pixels, eight pixels at a time (one accumulator per
/// channel, 8 registers), every tap and group each; then the block's excesses. Stops
/// after the eight holding the `pixels`-th (a 7x7 map's 1x1 convs: 56 pixels, not 64).
///
/// # Safety
/// The CPU must have AVX2, `t.check(n, MR)` must hold, and `pixels <= n * 16`.
#[target_feature(enable = "avx2")]
pub unsafe fn block(
    t: &Tile,
    n: usize,
    pixels: usize,
    e: &Epilogue,
    out: &mut [u8],
    stride: usize,
) {
    let mut sums = [[0i32; LANES * PX]; MR];
    let base = t.packed.as_ptr();
    let ones = _mm256_set1_epi16(1);
    let steps = pixels.div_ceil(STEP).min(n * LANES / STEP);
    for px0 in (0..steps * STEP).step_by(STEP) {
        let mut acc = [_mm256_setzero_si256(); MR];
        let mut wp = t.w.as_ptr() as *const i32;
        for &off in t.offsets {
            // SAFETY (all pointer arithmetic and loads): bounded by Tile::check.
            let mut xp = unsafe { base.add(off + (t.q0 + px0) * 4) };
            for _ in 0..t.groups {
                prefetch_ahead(wp);
                let x = unsafe { _mm256_loadu_si256(xp as *const _) };
                for (m, acc) in acc.iter_mut().enumerate() {
                    let k = _mm256_set1_epi32(unsafe { wp.add(m).read_unaligned() });
                    let pairs = _mm256_maddubs_epi16(x, k);
                    *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(pairs, ones));
                }
                wp = unsafe { wp.add(MR) };
                xp = unsafe { xp.add(t.cb_stride) };
            }
        }
        for (m, acc) in acc.iter().enumerate() {
            let row = &mut sums[m][px0..px0 + STEP];
            // SAFETY: `row` holds 8 i32s, one 256-bit store.
            unsafe { _mm256_storeu_si256(row.as_mut_ptr() as *mut _, *acc) };
        }
    }
    // SAFETY: Tile::check bounds each excess's tap, group and channel; steps <= 2n.
    unsafe {
        match steps {
            0 => {}
            1 => add_excess::<1>(t, &mut sums),
            2 => add_excess::<2>(t, &mut sums),
            3 => add_excess::<3>(t, &mut sums),
            4 => add_excess::<4>(t, &mut sums),
            5 => add_excess::<5>(t, &mut sums),
            _ => add_excess::<6>(t, &mut sums),
        }
    }
    Requant::new(e).store_rows(&sums, steps * STEP, &mut out[t.q0..], stride);
}

/// The block's excesses over its `S` steps of eight pixels, summed per output channel
/// in registers and added to that channel's `sums` once. Each excess's weights and
/// address are loaded once for all the steps, whose pixels lie side by side. (An
/// excess's channel is data: indexing the main loop's registers by it would keep them
/// in memory.)
///
/// # Safety
/// AVX2; `t.check(n, MR)` holds, with `S * 8 <= n * 16`.
#[target_feature(enable = "avx2")]
unsafe fn add_excess<const S: usize>(t: &Tile, sums: &mut [[i32; LANES * PX]; MR]) {
    const { assert!(S * STEP <= LANES * PX) };
    let ones = _mm256_set1_epi16(1);
    let base = t.packed.as_ptr();
    for run in t.excess.entries().chunk_by(|a, b| a.m == b.m) {
        let mut acc = [_mm256_setzero_si256(); S];
        for &Excess { tap, group, w, .. } in run {
            let at = t.offsets[tap as usize] + group as usize * t.cb_stride + t.q0 * 4;
            let k = _mm256_set1_epi32(i32::from_le_bytes(w.map(|b| b as u8)));
            for (s, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the same reads as the main loop's for this tap and group.
                let x = unsafe { _mm256_loadu_si256(base.add(at + s * STEP * 4) as *const _) };
                let add = _mm256_madd_epi16(_mm256_maddubs_epi16(x, k), ones);
                *acc = _mm256_add_epi32(*acc, add);
            }
        }
        let row = &mut sums[run[0].m as usize][..S * STEP];
        for (s, acc) in row.chunks_exact_mut(STEP).zip(acc) {
            // SAFETY: each chunk holds 8 i32s.
            unsafe {
                let v = _mm256_loadu_si256(s.as_ptr() as *const _);
                _mm256_storeu_si256(s.as_mut_ptr() as *mut _, _mm256_add_epi32(v, acc));
            }
        }
    }
}

/// The widened kernel, for convs whose weights `block` would split too often
/// ([`WIDE_SHARE`]): MR channels x `n` vectors of 16 pixels, 8 pixels x 4 channels at a
/// time (8 accumulators), every tap and group each. u8 widened to i16, `vpmaddwd` by
/// weights stored widened ([tap][group][MR][4] i16, `Kernel::weight_bytes`, so that each
/// channel's four are one 64-bit broadcast): nothing saturates, whatever the weights.
///
/// # Safety
/// The CPU must have AVX2, and `t.check(n, 2 * MR)` must hold (the weights are i16).
#[target_feature(enable = "avx2")]
pub unsafe fn block_wide(t: &Tile, n: usize, e: &Epilogue, out: &mut [u8], stride: usize) {
    let mut sums = [[0i32; LANES * PX]; MR];
    let base = t.packed.as_ptr();
    let w = t.w.as_ptr() as *const i16;
    for px0 in (0..n * LANES).step_by(STEP) {
        for half in 0..2 {
            let mut acc = [[_mm256_setzero_si256(); 2]; 4];
            // SAFETY (all pointer arithmetic and loads): bounded by Tile::check, with the
            // weights counted as 2 x MR rows of bytes.
            let mut wp = unsafe { w.add(half * 16) };
            for &off in t.offsets {
                let mut xp = unsafe { base.add(off + (t.q0 + px0) * 4) };
                for _ in 0..t.groups {
                    prefetch_ahead(wp);
                    let (x0, x1) = unsafe {
                        (
                            _mm256_cvtepu8_epi16(_mm_loadu_si128(xp as *const _)),
                            _mm256_cvtepu8_epi16(_mm_loadu_si128(xp.add(16) as *const _)),
                        )
                    };
                    for (m, acc) in acc.iter_mut().enumerate() {
                        let k = unsafe { (wp.add(4 * m) as *const i64).read_unaligned() };
                        let k = _mm256_set1_epi64x(k);
                        acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(x0, k));
                        acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(x1, k));
                    }
                    wp = unsafe { wp.add(MR * 4) };
                    xp = unsafe { xp.add(t.cb_stride) };
                }
            }
            for (m, acc) in acc.iter().enumerate() {
                // acc[0] = [p0 c01, p0 c23, p1 .., p1 .. | p2 .., p3 ..], acc[1] the same
                // for p4-p7: the horizontal add gives [p0 p1 p4 p5 | p2 p3 p6 p7], and
                // the 64-bit permutation puts them in order.
                let s = _mm256_permute4x64_epi64::<0xD8>(_mm256_hadd_epi32(acc[0], acc[1]));
                let row = &mut sums[half * 4 + m][px0..px0 + STEP];
                // SAFETY: `row` holds 8 i32s, one 256-bit store.
                unsafe { _mm256_storeu_si256(row.as_mut_ptr() as *mut _, s) };
            }
        }
    }
    Requant::new(e).store_rows(&sums, n * LANES, &mut out[t.q0..], stride);
}

/// The VNNI kernel's requantisation (`x86::Requant`) in 256-bit registers: the same
/// operations, so the same bytes.
struct Requant<'a> {
    e: &'a Epilogue<'a>,
    lo: __m256,
    hi: __m256,
    zp: __m256i,
}

impl<'a> Requant<'a> {
    #[target_feature(enable = "avx2")]
    fn new(e: &'a Epilogue<'a>) -> Requant<'a> {
        Requant {
            e,
            lo: _mm256_set1_ps((e.lo - e.y0) as f32),
            hi: _mm256_set1_ps((e.hi - e.y0) as f32),
            zp: _mm256_set1_epi32(e.y0),
        }
    }

    /// Requantise the first `pixels` (whole eights) of each row of `sums` into the rows of
    /// `out` (`stride` apart): both kernels' epilogue.
    #[target_feature(enable = "avx2")]
    fn store_rows(
        &self,
        sums: &[[i32; LANES * PX]; MR],
        pixels: usize,
        out: &mut [u8],
        stride: usize,
    ) {
        for (m, sums) in sums.iter().enumerate() {
            let row = &mut out[m * stride..m * stride + pixels];
            for (dst, s) in row.chunks_exact_mut(STEP).zip(sums.chunks_exact(STEP)) {
                // SAFETY: 8 i32s in, 8 bytes out; AVX2 is enabled here.
                unsafe {
                    let a = _mm256_loadu_si256(s.as_ptr() as *const _);
                    self.store(a, m, dst.as_mut_ptr());
                }
            }
        }
    }

    /// Requantise 8 sums of output channel `m` and store their low bytes (u8, or i8's
    /// two's complement).
    ///
    /// # Safety
    /// AVX2; `dst` valid for 8 bytes; `m` inside the block.
    #[target_feature(enable = "avx2")]
    unsafe fn store(&self, a: __m256i, m: usize, dst: *mut u8) {
        let bias = _mm256_set1_epi32(self.e.bias[m]);
        let scale = _mm256_set1_ps(self.e.scales[m]);
        let f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a, bias)), scale);
        let f = _mm256_min_ps(_mm256_max_ps(f, self.lo), self.hi);
        let q = _mm256_add_epi32(_mm256_cvtps_epi32(f), self.zp);
        // SAFETY: the caller's `dst` holds 8 bytes.
        unsafe { _mm_storel_epi64(dst as *mut _, low_bytes(q)) };
    }
}
