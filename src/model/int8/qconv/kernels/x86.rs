//! The AVX-512 VNNI kernel (x86-64): `vpdpbusd`, u8 activations x i8 weights.

use crate::model::int8::AddConsts;
use crate::model::int8::qconv::kernels::{Epilogue, Tile, epilogue};
use crate::model::int8::qconv::{LANES, MR, PX};
use crate::model::int8::x86::{Add16, widen_bytes};
use std::arch::x86_64::*;

/// How far ahead of the weights it multiplies by a kernel asks the cache for them, in
/// bytes. ResNet-50's int8 weights (25 MB) come from memory on every frame, and a block
/// reads its own at 32 bytes per C4 group, one group every ~24 cycles: too slow a stream
/// for the hardware prefetcher to run ahead of. On the 7x7 and 14x14 maps, where a
/// block's weights serve one or a few tiles, their first read cost 0.1-0.3 ms per conv
/// (run twice, the second run was that much faster). The prefetch took r50 from 27.5 to
/// 26.9 ms on a Zen 4. 1 KB ahead is ~800 cycles: more than a DRAM access.
pub(crate) const PREFETCH: usize = 1024;

/// Ask for the cache line `PREFETCH` bytes past `at`.
#[inline(always)]
pub(crate) fn prefetch_ahead<T>(at: *const T) {
    // SAFETY: SSE is part of x86-64. A prefetch never faults, and `wrapping_add` claims
    // nothing about the address: past a block's weights it asks for the next block's, or
    // for nothing of ours.
    unsafe { _mm_prefetch::<_MM_HINT_T0>((at as *const i8).wrapping_add(PREFETCH)) };
}

/// One block: MR output channels x P vectors of 16 pixels, every tap and group.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI, and `t.check(P, MR)` must hold.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn block<const P: usize>(t: &Tile, e: &Epilogue, out: &mut [u8], stride: usize) {
    // The sums start at the bias: i32 addition wraps the same in any order, and the
    // epilogue then has one add less per vector.
    let mut acc: [[__m512i; P]; MR] = std::array::from_fn(|m| [_mm512_set1_epi32(e.bias[m]); P]);
    let mut wp = t.w.as_ptr() as *const i32;
    let base = t.packed.as_ptr();
    for &off in t.offsets {
        // SAFETY (all pointer arithmetic): bounded by Tile::check.
        let mut xp = unsafe { base.add(off + t.q0 * 4) };
        for _ in 0..t.groups {
            prefetch_ahead(wp);
            let x: [__m512i; P] =
                std::array::from_fn(|p| unsafe { _mm512_loadu_si512(xp.add(64 * p) as *const _) });
            for (m, acc) in acc.iter_mut().enumerate() {
                // SAFETY: MR weights per group lie inside `t.w` (Tile::check).
                let k = _mm512_set1_epi32(unsafe { wp.add(m).read_unaligned() });
                for p in 0..P {
                    acc[p] = _mm512_dpbusd_epi32(acc[p], x[p], k);
                }
            }
            // SAFETY: the next group's weights and pixels, still inside Tile::check's bounds
            // (one past the end at most after the last group, never dereferenced).
            wp = unsafe { wp.add(MR) };
            xp = unsafe { xp.add(t.cb_stride) };
        }
    }
    // Each row written out by its own copy of the code (`rows!`): a loop over the rows
    // indexing `acc` made the compiler keep every accumulator in memory, with a store
    // of all 24 per step of the loop above.
    let rq = Requant::new(e);
    let add = e.add.as_ref().map(|f| (f, Add16::new(&f.consts)));
    macro_rules! rows {
        ($($m:literal)*) => {$({
            let at = $m * stride + t.q0;
            let row = &mut out[at..at + P * LANES];
            for (p, a) in acc[$m].iter().enumerate() {
                let mut q = rq.requant(*a, $m);
                if let Some((f, k)) = &add {
                    let skip = &f.skip[at + p * LANES..at + (p + 1) * LANES];
                    // SAFETY: 16 bytes, one load.
                    let y = unsafe { _mm_loadu_si128(skip.as_ptr() as *const __m128i) };
                    q = f.add(k, q, widen_bytes(y, f.skip_signed));
                }
                // SAFETY: `row` holds P * 16 bytes; each lane's low byte is the output's.
                unsafe {
                    _mm_storeu_si128(row.as_mut_ptr().add(p * LANES) as *mut _, _mm512_cvtepi32_epi8(q))
                };
            }
        })*};
    }
    const { assert!(MR == 8) };
    rows!(0 1 2 3 4 5 6 7);
}

/// The epilogue's constants in registers: bias, scale, zero point, clamp. Shared by the
/// VNNI and AMX kernels, so both requantise with the same instructions.
pub(crate) struct Requant<'a> {
    e: &'a Epilogue<'a>,
    lo: __m512,
    hi: __m512,
    zp: __m512i,
}

impl<'a> Requant<'a> {
    #[target_feature(enable = "avx512f")]
    pub(crate) fn new(e: &'a Epilogue<'a>) -> Requant<'a> {
        Requant {
            e,
            lo: _mm512_set1_ps((e.lo - e.y0) as f32),
            hi: _mm512_set1_ps((e.hi - e.y0) as f32),
            zp: _mm512_set1_epi32(e.y0),
        }
    }

    /// Requantise 16 sums of output channel `m` of the block and store them as bytes.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW; `dst` is valid for 16 bytes; `m` is inside the block.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) unsafe fn store(&self, a: __m512i, m: usize, dst: *mut u8) {
        let q = self.requant(_mm512_add_epi32(a, _mm512_set1_epi32(self.e.bias[m])), m);
        // SAFETY: the caller's `dst` holds 16 bytes.
        unsafe { _mm_storeu_si128(dst as *mut _, _mm512_cvtepi32_epi8(q)) };
    }

    /// 16 sums of output channel `m` (bias included) requantised: i32 lanes whose low
    /// bytes are the output's.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn requant(&self, a: __m512i, m: usize) -> __m512i {
        let scale = _mm512_set1_ps(self.e.scales[m]);
        let f = _mm512_mul_ps(_mm512_cvtepi32_ps(a), scale);
        let f = _mm512_min_ps(_mm512_max_ps(f, self.lo), self.hi);
        _mm512_add_epi32(_mm512_cvtps_epi32(f), self.zp)
    }
}

/// A residual add the VNNI kernel does as it requantises, when it writes the op's output
/// itself (`QConv::compute_direct`): the conv's output is the add's `a`, `skip` its `b`.
/// The same operations on the same integers as the add's own pass (`x86::Add16`), without
/// the conv's bytes going out to memory and back in between.
pub(crate) struct FusedAdd<'a> {
    /// The add's constants: `x86::ordinary` ones.
    pub(crate) consts: AddConsts,
    /// The other operand's rows for the block, laid out as the output.
    pub(crate) skip: &'a [u8],
    pub(crate) skip_signed: bool,
    /// Whether the conv's own output is i8 (else u8).
    pub(crate) conv_signed: bool,
}

impl FusedAdd<'_> {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn add(&self, k: &Add16, x: __m512i, y: __m512i) -> __m512i {
        match self.consts.divides() {
            true => k.add::<true>(x, y),
            false => k.add::<false>(x, y),
        }
    }

    /// The add over `row`'s (at most 16) conv outputs, in place.
    ///
    /// Through 16-byte buffers, not masked loads and stores: with `row`'s length known at
    /// compile time (the tail's `N`), LLVM turned the one-byte masked store after
    /// `vpmovdb` into a 4-byte `vmovd`, which wrote three bytes of the next row (and past
    /// the tensor's end on the last).
    #[target_feature(enable = "avx512f")]
    fn add_in_place(&self, k: &Add16, row: &mut [u8], skip: &[u8]) {
        let n = row.len().min(16);
        let (mut x, mut y, mut q) = ([0u8; 16], [0u8; 16], [0u8; 16]);
        x[..n].copy_from_slice(&row[..n]);
        y[..n].copy_from_slice(&skip[..n]);
        // SAFETY: 16-byte buffers, one load or store each.
        unsafe {
            let x = widen_bytes(_mm_loadu_si128(x.as_ptr() as *const _), self.conv_signed);
            let y = widen_bytes(_mm_loadu_si128(y.as_ptr() as *const _), self.skip_signed);
            let sum = _mm512_cvtepi32_epi8(self.add(k, x, y));
            _mm_storeu_si128(q.as_mut_ptr() as *mut _, sum);
        }
        row[..n].copy_from_slice(&q[..n]);
    }
}

/// The last `N` (1 to 8) pixels of the rows, vectorised over the block's 8 output
/// channels instead of over pixels: one C4 group's weights for the block are one 32-byte
/// load, each pixel's four bytes a broadcast. A 16-pixel vector for them would be mostly
/// waste (a 7x7 map's 49 pixels are 3 vectors and 1; a 14x14 map's 196, 12 and 4). The
/// sums are exact integers, so the same as `block`'s.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI, and `t.check(1, MR)` must hold.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn tail<const N: usize>(t: &Tile, e: &Epilogue, out: &mut [u8], stride: usize) {
    const { assert!(N >= 1 && N <= 8 && MR == 8) };
    // SAFETY: the caller's.
    let acc: [__m256i; N] = unsafe {
        match N {
            1 => tail_sums::<N, 8>(t),
            2 => tail_sums::<N, 4>(t),
            _ => tail_sums::<N, 2>(t),
        }
    };
    let mut sums = [[0i32; MR]; N];
    for (s, a) in sums.iter_mut().zip(&acc) {
        // SAFETY: each row of `sums` holds 8 i32s.
        unsafe { _mm256_storeu_si256(s.as_mut_ptr() as *mut __m256i, *a) };
    }
    // The portable epilogue, on the sums transposed to its [row][pixel] order: the same
    // requantisation as the vector one (the kernels' tests hold them equal).
    let mut rows = [[0i32; LANES * PX]; MR];
    for (j, s) in sums.iter().enumerate() {
        for (m, v) in s.iter().enumerate() {
            rows[m][j] = *v;
        }
    }
    epilogue(&rows, N, e, &mut out[t.q0..], stride);
    if let Some(f) = &e.add {
        let k = Add16::new(&f.consts);
        for m in 0..MR {
            let at = m * stride + t.q0;
            f.add_in_place(&k, &mut out[at..at + N], &f.skip[at..at + N]);
        }
    }
}

/// [`tail`]'s sums: its groups dealt out in turn to `S` sets of sums, added at the end.
/// One set would be a chain of dependent `vpdpbusd`s, each waiting for the one before
/// (~4 cycles, and two can start per cycle); with one or two pixels, two sets still
/// left the kernel waiting on them (r50's 7x7 map: one pixel per row block). `S` x `N`
/// sums take at most 16 of the 32 registers.
///
/// # Safety
/// As [`tail`]'s.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tail_sums<const N: usize, const S: usize>(t: &Tile) -> [__m256i; N] {
    // Each set named by a constant index: the loops over `S` unroll (choosing a set by
    // the group's parity at run time kept them in memory, a load and a store around
    // every `vpdpbusd`).
    let mut sets = [[_mm256_setzero_si256(); N]; S];
    let mut wp = t.w.as_ptr();
    let base = t.packed.as_ptr();
    for &off in t.offsets {
        // SAFETY (all pointer arithmetic): bounded by Tile::check(1, MR), N <= 16; each
        // group's weights and pixels are inside its bounds (one past the end at most
        // after the last group, never dereferenced).
        unsafe {
            let mut xp = base.add(off + t.q0 * 4);
            for _ in 0..t.groups / S {
                for (s, set) in sets.iter_mut().enumerate() {
                    tail_group(set, wp.add(s * MR * 4), xp.add(s * t.cb_stride));
                }
                wp = wp.add(S * MR * 4);
                xp = xp.add(S * t.cb_stride);
            }
            for set in sets.iter_mut().take(t.groups % S) {
                tail_group(set, wp, xp);
                wp = wp.add(MR * 4);
                xp = xp.add(t.cb_stride);
            }
        }
    }
    std::array::from_fn(|j| {
        let mut sum = sets[0][j];
        for set in &sets[1..] {
            sum = _mm256_add_epi32(sum, set[j]);
        }
        sum
    })
}

/// One C4 group of [`tail`]: its MR channels' weights at `wp` (one 32-byte load) times
/// each of the `N` pixels at `xp` (a broadcast each), into `acc`.
///
/// # Safety
/// AVX-512 VL and VNNI; `wp` valid for MR x 4 bytes, `xp` for N x 4.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512vnni")]
unsafe fn tail_group<const N: usize>(acc: &mut [__m256i; N], wp: *const i8, xp: *const u8) {
    // SAFETY: the caller's bounds.
    unsafe {
        let w = _mm256_loadu_si256(wp as *const __m256i);
        for (j, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_set1_epi32((xp.add(4 * j) as *const i32).read_unaligned());
            *acc = _mm256_dpbusd_epi32(*acc, x, w);
        }
    }
}
