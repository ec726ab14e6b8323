//! The AVX-512 kernel (x86-64): `vfmadd231ps` on 16 pixels of one channel by one weight
//! broadcast, MR x P accumulators (24 of 32 registers).

use std::arch::x86_64::*;

use crate::model::conv_geo::{LANES, PX};
use crate::model::fconv::MR;
use crate::model::fconv::kernels::{Epilogue, Tile};

/// One block: MR output channels x P vectors of 16 pixels, every tap and channel.
///
/// # Safety
/// The CPU must have AVX-512 F, and `t.check(P)` must hold; `out` holds MR rows of
/// `stride` floats, each reaching `t.q0 + P * 16`.
#[target_feature(enable = "avx512f")]
pub unsafe fn block<const P: usize>(t: &Tile, e: &Epilogue, out: &mut [f32], stride: usize) {
    let mut acc = [[_mm512_setzero_ps(); P]; MR];
    let mut wp = t.w.as_ptr();
    let base = t.packed.as_ptr();
    for &off in t.offsets {
        // SAFETY (all pointer arithmetic): bounded by Tile::check.
        let mut xp = unsafe { base.add(off / 4 + t.q0) };
        for _ in 0..t.channels {
            let x: [__m512; P] =
                std::array::from_fn(|p| unsafe { _mm512_loadu_ps(xp.add(LANES * p)) });
            for (m, acc) in acc.iter_mut().enumerate() {
                // SAFETY: MR weights per channel lie inside `t.w` (Tile::check).
                let k = _mm512_set1_ps(unsafe { wp.add(m).read() });
                for p in 0..P {
                    acc[p] = _mm512_fmadd_ps(x[p], k, acc[p]);
                }
            }
            // SAFETY: the next channel's weights and pixels, still inside Tile::check's
            // bounds (one past the end at most after the last, never dereferenced).
            wp = unsafe { wp.add(MR) };
            xp = unsafe { xp.add(t.c_stride) };
        }
    }
    // Out of registers through a plain buffer: the stores below unroll fully, so the
    // loop above keeps every accumulator in a register (an epilogue indexing `acc`
    // directly made the compiler keep all 24 in memory, storing them every step: 2x
    // slower).
    let mut sums = [[0f32; LANES]; PX * MR];
    for (m, acc) in acc.iter().enumerate() {
        for (p, a) in acc.iter().enumerate() {
            // SAFETY: each row of `sums` holds 16 floats.
            unsafe { _mm512_storeu_ps(sums[m * P + p].as_mut_ptr(), *a) };
        }
    }
    let (lo, hi) = e.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    for m in 0..MR {
        let bias = _mm512_set1_ps(e.bias[m]);
        let at = m * stride + t.q0;
        let row = &mut out[at..at + P * LANES];
        let skip = e.skip.map(|s| &s[at..at + P * LANES]);
        for p in 0..P {
            // SAFETY: each row of `sums` holds 16 floats.
            let a = unsafe { _mm512_loadu_ps(sums[m * P + p].as_ptr()) };
            let mut v = _mm512_add_ps(a, bias);
            if let Some(s) = skip {
                // SAFETY: `skip` holds P * 16 floats (sliced above).
                v = _mm512_add_ps(v, unsafe { _mm512_loadu_ps(s.as_ptr().add(p * LANES)) });
            }
            if e.clamp.is_some() {
                // max(v, lo) gives lo for a NaN v, as f32::max does.
                v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            }
            // SAFETY: `row` holds P * 16 floats.
            unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(p * LANES), v) };
        }
    }
}

/// The last `N` (1 to 8) pixels of the rows, vectorised over the block's 8 output
/// channels instead of over pixels: a 16-pixel vector for them would be mostly waste (a
/// 7x7 map's 49 pixels are 3 vectors and 1; a 14x14 map's 196, 12 and 4). Each sum is
/// the same fused multiply-adds in the same order as in `block`, so the same bits.
///
/// # Safety
/// The CPU must have AVX-512 F, and `t.check(1)` must hold; `out` holds MR rows of
/// `stride` floats, each reaching `t.q0 + N`.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn tail<const N: usize>(t: &Tile, e: &Epilogue, out: &mut [f32], stride: usize) {
    const { assert!(N >= 1 && N <= 8 && MR == 8) };
    let mut acc = [_mm256_setzero_ps(); N];
    let mut wp = t.w.as_ptr();
    let base = t.packed.as_ptr();
    for &off in t.offsets {
        // SAFETY (all pointer arithmetic): bounded by Tile::check(1), N <= 16.
        let mut xp = unsafe { base.add(off / 4 + t.q0) };
        for _ in 0..t.channels {
            // SAFETY: MR = 8 weights per channel lie inside `t.w` (Tile::check).
            let w = unsafe { _mm256_loadu_ps(wp) };
            for (j, acc) in acc.iter_mut().enumerate() {
                // SAFETY: pixel q0 + j < q0 + 16, inside Tile::check(1)'s bound.
                let x = _mm256_set1_ps(unsafe { xp.add(j).read() });
                *acc = _mm256_fmadd_ps(x, w, *acc);
            }
            // SAFETY: as in `block`.
            wp = unsafe { wp.add(MR) };
            xp = unsafe { xp.add(t.c_stride) };
        }
    }
    let mut sums = [[0f32; MR]; N];
    for (s, a) in sums.iter_mut().zip(&acc) {
        // SAFETY: each row of `sums` holds 8 floats.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), *a) };
    }
    for m in 0..MR {
        for (j, s) in sums.iter().enumerate() {
            let at = m * stride + t.q0 + j;
            out[at] = e.apply(m, at, s[m]);
        }
    }
}
