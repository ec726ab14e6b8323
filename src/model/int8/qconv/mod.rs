//! edgesight's own int8 convolution: one op per quantised conv, computing the integer
//! convolution, the bias, the zero points and the per-channel requantisation in one pass,
//! with no im2col.
//!
//! Why our own: tract 0.23 lowers a quantised conv to im2col, an int8 matmul, a second
//! pass for per-channel requantisation and a chain of zero-point ops; on ResNet-50 that
//! was 3.6-4.4x onnxruntime's time (BENCHMARKS.md). Here the activations are packed once
//! per conv into four-channel groups ("C4": the four bytes one `vpdpbusd` lane or one
//! `sdot` lane reduces), the padded image is laid out flat so that every kernel tap of a
//! stride-1 conv reads a *contiguous* run of pixels (an "implicit GEMM": output pixel `q`
//! reads input pixel `q + offset(tap)`; the few outputs that wrap around a row edge are
//! computed and thrown away), and strided convs are split into stride x stride phase
//! images, each of which is then read like a stride-1 image. The accumulators stay in
//! registers over every tap and channel; only then do they go out (through a small
//! buffer: see `vnni::block`) to be requantised.
//!
//! Arithmetic: `acc = bias + sum (x - x0) * w`, exact in i32, then
//! `clamp(round_half_even(acc as f32 * scale[c]) + y0, lo, hi)` with
//! `scale[c] = (w_scale[c] * x_scale) / y_scale`: the same f32 operations as tract's
//! per-channel lowering and as onnxruntime's requantisation, so outputs are bit-identical
//! to both (tract's: random convs of every shape class, in this file; onnxruntime's:
//! whole models, tests/model.rs).
//!
//! Kernels, chosen at load from what the CPU has: AVX-512 VNNI (`vpdpbusd`, u8 x i8 ->
//! i32, no saturation), NEON `sdot` (ARMv8.2), NEON `smull` + `sadalp` (ARMv8.0); where
//! none applies tract keeps the conv. A portable kernel, the plain definition, is the
//! reference all of them are tested against. All use the same packed layouts. The input
//! zero point is folded into the bias (`bias - x0 * sum w`) and the padding holds `x0`, so
//! padding adds nothing.

use std::cell::RefCell;
use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_core::ops::nn::DataFormat;

/// Output channels per register block.
const MR: usize = 8;
/// Output pixels per vector (i32 lanes of a 512-bit register).
const LANES: usize = 16;
/// Vectors of pixels per block: MR x PX accumulators (24 of AVX-512's 32 registers).
const PX: usize = 3;

/// Which inner kernel runs; chosen once when the op is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    /// `vpdpbusd`: u8 activations x i8 weights.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// ARMv8.0 NEON (Pi 4's Cortex-A72): `smull` + `sadalp`, i8 x i8.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// ARMv8.2 dot product (Pi 5's Cortex-A76): `sdot`, i8 x i8.
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

impl Kernel {
    /// Every kernel this CPU runs, the fastest last.
    pub fn available() -> Vec<Kernel> {
        let mut k = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            k.push(Kernel::Avx512Vnni);
        }
        #[cfg(target_arch = "aarch64")]
        {
            k.push(Kernel::Neon);
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                k.push(Kernel::NeonDot);
            }
        }
        k
    }

    /// The kernel the daemon uses: the fastest this CPU runs, if it has a vector one. The
    /// portable kernel is the reference the others are tested against, not a fallback:
    /// it is ~17x slower than tract's own int8 convolutions (r50: 1.9 s against 115 ms
    /// on Zen 4), so CPUs without one of ours (x86 without AVX-512 VNNI, 32-bit ARM) keep
    /// tract's convolutions.
    pub fn best() -> Option<Kernel> {
        Kernel::available().pop().filter(|k| *k != Kernel::Portable)
    }

    /// Whether the kernel multiplies signed activations (ARM's instructions are i8 x i8;
    /// x86's `vpdpbusd` is u8 x i8). Activations are packed in the kernel's domain.
    fn signed(self) -> bool {
        #[cfg(target_arch = "aarch64")]
        if matches!(self, Kernel::Neon | Kernel::NeonDot) {
            return true;
        }
        false
    }
}

/// A quantised 2-D convolution (NCHW, one group, no dilation) with everything but the
/// input folded in at load time.
#[derive(Debug, Clone, PartialEq)]
pub struct QConv {
    pub cin: usize,
    pub cout: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    /// (top, left, bottom, right).
    pub pad: (usize, usize, usize, usize),
    /// XOR applied to every input byte to bring it into the kernel's domain: 0x80 maps i8
    /// onto u8 (x + 128) and u8 onto i8 (x - 128).
    pub flip: u8,
    /// The input zero point in the kernel's domain, as a byte: the padding value.
    pub x0: u8,
    /// Weights in [co block][tap][c4 group][MR][4] order, zero beyond `cout` and `cin`.
    pub weights: Arc<Vec<i8>>,
    /// `bias - x0 * sum(w)` per output channel (padded to a multiple of MR).
    pub bias: Arc<Vec<i32>>,
    /// `(w_scale * x_scale) / y_scale` per output channel (padded).
    pub scales: Arc<Vec<f32>>,
    pub y0: i32,
    pub lo: i32,
    pub hi: i32,
    pub out_dt: DatumType,
    pub which: Kernel,
}

impl Eq for QConv {}

/// The geometry of one evaluation, from the input's height and width.
struct Geo {
    hout: usize,
    wout: usize,
    /// Width of every phase image (and of the "virtual" output rows).
    wq: usize,
    /// Rows of every phase image.
    rows: usize,
    /// Pixels of one C4 group of one phase image (rows * wq plus read-ahead).
    plane: usize,
    /// Output pixels computed, a multiple of LANES (hout * wq rounded up).
    q: usize,
}

impl QConv {
    fn taps(&self) -> usize {
        self.kernel.0 * self.kernel.1
    }

    fn groups(&self) -> usize {
        self.cin.div_ceil(4)
    }

    fn blocks(&self) -> usize {
        self.cout.div_ceil(MR)
    }

    fn geo(&self, h: usize, w: usize) -> TractResult<Geo> {
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (pt, pl, pb, pr) = self.pad;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        ensure!(
            hp >= kh && wp >= kw,
            "convolution: input {h}x{w} smaller than its kernel"
        );
        let (hout, wout) = ((hp - kh) / sh + 1, (wp - kw) / sw + 1);
        let wq = wp.div_ceil(sw);
        let rows = hout + (kh - 1) / sh + 1;
        let q = (hout * wq).div_ceil(LANES) * LANES;
        // Reads run up to q + the largest tap offset; one extra row and a vector of slack.
        let plane = rows * wq + LANES * PX;
        Ok(Geo {
            hout,
            wout,
            wq,
            rows,
            plane,
            q,
        })
    }

    /// Where each tap reads, as a byte offset into the phase images laid end to end
    /// (phase-major, then C4 group).
    fn tap_offsets(&self, g: &Geo) -> Vec<usize> {
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let phase_len = self.groups() * g.plane;
        let mut offsets = Vec::with_capacity(kh * kw);
        for ky in 0..kh {
            for kx in 0..kw {
                let phase = (ky % sh) * sw + kx % sw;
                offsets.push((phase * phase_len + (ky / sh) * g.wq + kx / sw) * 4);
            }
        }
        offsets
    }

    /// Lay one image (`cin` planes of h x w) out as C4 phase images, padding with x0.
    fn pack(&self, x: &[u8], h: usize, w: usize, g: &Geo, out: &mut [u8]) {
        let (sh, sw) = self.stride;
        let (pt, pl, _, _) = self.pad;
        let groups = self.groups();
        let phase_len = groups * g.plane * 4;
        out.fill(self.x0);
        let pad_row = vec![self.x0 ^ self.flip; w];
        for cb in 0..groups {
            let chan = |j: usize| -> &[u8] {
                let c = cb * 4 + j;
                if c < self.cin {
                    &x[c * h * w..(c + 1) * h * w]
                } else {
                    &[]
                }
            };
            let planes = [chan(0), chan(1), chan(2), chan(3)];
            for y in 0..h {
                let (py, r) = ((y + pt) % sh, (y + pt) / sh);
                if r >= g.rows {
                    continue;
                }
                let src: [&[u8]; 4] = std::array::from_fn(|j| {
                    if planes[j].is_empty() {
                        &pad_row[..]
                    } else {
                        &planes[j][y * w..(y + 1) * w]
                    }
                });
                for px in 0..sw {
                    // Columns x with (x + pl) % sw == px land in phase (py, px).
                    let first = (px + sw - pl % sw) % sw;
                    if first >= w {
                        continue;
                    }
                    let c0 = (first + pl) / sw;
                    let base = (py * sw + px) * phase_len + cb * g.plane * 4 + (r * g.wq + c0) * 4;
                    let n = (w - first).div_ceil(sw);
                    let dst = &mut out[base..base + n * 4];
                    interleave(&src, first, sw, self.flip, dst);
                }
            }
        }
    }

    fn run_image(&self, x: &[u8], h: usize, w: usize, out: &mut [u8]) -> TractResult<()> {
        let g = self.geo(h, w)?;
        let phases = self.stride.0 * self.stride.1;
        let packed_len = phases * self.groups() * g.plane * 4;
        let vout_len = self.blocks() * MR * g.q;
        SCRATCH.with(|s| -> TractResult<()> {
            let mut s = s.borrow_mut();
            let (packed, vout) = s.split(packed_len, vout_len);
            self.pack(x, h, w, &g, packed);
            self.compute(packed, &self.tap_offsets(&g), &g, vout);
            // Keep the valid columns of each virtual output row.
            for co in 0..self.cout {
                let src = &vout[co * g.q..];
                let dst = &mut out[co * g.hout * g.wout..(co + 1) * g.hout * g.wout];
                if g.wq == g.wout {
                    dst.copy_from_slice(&src[..g.hout * g.wout]);
                } else {
                    for (y, row) in dst.chunks_exact_mut(g.wout).enumerate() {
                        row.copy_from_slice(&src[y * g.wq..y * g.wq + g.wout]);
                    }
                }
            }
            Ok(())
        })
    }

    /// Every output block: `vout[co][q]` for q < g.q. Blocks of output channels are
    /// independent, so with a multi-threaded model (`threads` > 1) they are shared out
    /// over tract's thread pool; the packed input is read by all.
    fn compute(&self, packed: &[u8], offsets: &[usize], g: &Geo, vout: &mut [u8]) {
        use rayon::prelude::*;
        use tract_core::internal::tract_linalg::multithread::{Executor, current_tract_executor};
        let rows = MR * g.q;
        let vout = &mut vout[..self.blocks() * rows];
        let work = |(b, out): (usize, &mut [u8])| self.compute_block(b, packed, offsets, g, out);
        match current_tract_executor() {
            Executor::MultiThread(pool) if self.blocks() > 1 => {
                pool.install(|| vout.par_chunks_mut(rows).enumerate().for_each(work))
            }
            Executor::RayonGlobal if self.blocks() > 1 => {
                vout.par_chunks_mut(rows).enumerate().for_each(work)
            }
            _ => vout.chunks_mut(rows).enumerate().for_each(work),
        }
    }

    /// Output channels `b * MR ..` into `out` (MR virtual rows of g.q pixels).
    fn compute_block(&self, b: usize, packed: &[u8], offsets: &[usize], g: &Geo, out: &mut [u8]) {
        let wblock = self.taps() * self.groups() * MR * 4;
        let cb_stride = g.plane * 4;
        let vecs = g.q / LANES;
        let w = &self.weights[b * wblock..(b + 1) * wblock];
        let epi = Epilogue {
            bias: &self.bias[b * MR..(b + 1) * MR],
            scales: &self.scales[b * MR..(b + 1) * MR],
            y0: self.y0,
            lo: self.lo,
            hi: self.hi,
        };
        let mut v = 0;
        while v < vecs {
            let n = (vecs - v).min(PX);
            let tile = Tile {
                packed,
                offsets,
                cb_stride,
                groups: self.groups(),
                q0: v * LANES,
                w,
            };
            match self.which {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: chosen only when the CPU has these features (Kernel::available), and
                // `Tile::check` bounds every read.
                Kernel::Avx512Vnni => unsafe {
                    tile.check(n);
                    match n {
                        3 => vnni::block::<3>(&tile, &epi, out, g.q),
                        2 => vnni::block::<2>(&tile, &epi, out, g.q),
                        _ => vnni::block::<1>(&tile, &epi, out, g.q),
                    }
                },
                Kernel::Portable => portable_block(&tile, n, &epi, out, g.q),
                #[cfg(target_arch = "aarch64")]
                // SAFETY: NEON is part of aarch64; `Tile::check` bounds every read.
                Kernel::Neon => unsafe {
                    tile.check(n);
                    neon::block_mull(&tile, n, &epi, out, g.q)
                },
                #[cfg(target_arch = "aarch64")]
                // SAFETY: chosen only when the CPU has dotprod (Kernel::available).
                Kernel::NeonDot => unsafe {
                    tile.check(n);
                    neon::block_dot(&tile, n, &epi, out, g.q)
                },
            }
            v += n;
        }
    }
}

/// `dst[4i + j] = src[j][first + i * step] ^ flip`: four channels interleaved into C4.
#[inline]
fn interleave(src: &[&[u8]; 4], first: usize, step: usize, flip: u8, dst: &mut [u8]) {
    if step == 1 {
        let (a, b, c, d) = (
            &src[0][first..],
            &src[1][first..],
            &src[2][first..],
            &src[3][first..],
        );
        for ((((o, a), b), c), d) in dst.chunks_exact_mut(4).zip(a).zip(b).zip(c).zip(d) {
            o.copy_from_slice(&[a ^ flip, b ^ flip, c ^ flip, d ^ flip]);
        }
    } else {
        for (i, o) in dst.chunks_exact_mut(4).enumerate() {
            let x = first + i * step;
            o.copy_from_slice(&[
                src[0][x] ^ flip,
                src[1][x] ^ flip,
                src[2][x] ^ flip,
                src[3][x] ^ flip,
            ]);
        }
    }
}

/// What one register block reads.
struct Tile<'a> {
    packed: &'a [u8],
    /// Byte offset of each tap's first read.
    offsets: &'a [usize],
    /// Bytes between C4 groups.
    cb_stride: usize,
    groups: usize,
    /// First output pixel.
    q0: usize,
    /// This block's weights: [tap][group][MR][4].
    w: &'a [i8],
}

impl Tile<'_> {
    /// Every read of a block of `n` vectors lies inside `packed` and `w`.
    fn check(&self, n: usize) {
        let last = self.offsets.iter().max().copied().unwrap_or(0)
            + (self.groups - 1) * self.cb_stride
            + (self.q0 + n * LANES) * 4;
        assert!(last <= self.packed.len(), "conv tile reads past its input");
        assert!(self.w.len() >= self.offsets.len() * self.groups * MR * 4);
    }
}

/// Per-block requantisation constants.
struct Epilogue<'a> {
    bias: &'a [i32],
    scales: &'a [f32],
    y0: i32,
    lo: i32,
    hi: i32,
}

fn portable_block(t: &Tile, n: usize, e: &Epilogue, out: &mut [u8], stride: usize) {
    const W: usize = LANES * PX;
    let mut acc = [[0i32; W]; MR];
    let lanes = n * LANES;
    let mut wi = 0;
    for &off in t.offsets {
        for cb in 0..t.groups {
            let start = off + cb * t.cb_stride + t.q0 * 4;
            let x = &t.packed[start..start + lanes * 4];
            let w = &t.w[wi..wi + MR * 4];
            wi += MR * 4;
            for (m, acc) in acc.iter_mut().enumerate() {
                let k = [
                    w[m * 4] as i32,
                    w[m * 4 + 1] as i32,
                    w[m * 4 + 2] as i32,
                    w[m * 4 + 3] as i32,
                ];
                for (a, x) in acc[..lanes].iter_mut().zip(x.chunks_exact(4)) {
                    *a += x[0] as i32 * k[0]
                        + x[1] as i32 * k[1]
                        + x[2] as i32 * k[2]
                        + x[3] as i32 * k[3];
                }
            }
        }
    }
    epilogue(&acc, lanes, e, &mut out[t.q0..], stride);
}

/// Bias, requantisation and store for `lanes` pixels of MR accumulator rows.
fn epilogue(
    acc: &[[i32; LANES * PX]; MR],
    lanes: usize,
    e: &Epilogue,
    out: &mut [u8],
    stride: usize,
) {
    let (zp, lo, hi) = (e.y0 as f32, e.lo as f32, e.hi as f32);
    for (m, acc) in acc.iter().enumerate() {
        let row = &mut out[m * stride..m * stride + lanes];
        for (o, a) in row.iter_mut().zip(&acc[..lanes]) {
            let v = a.wrapping_add(e.bias[m]);
            // Stored as the output type's byte: u8 0..255 or i8's two's complement.
            *o = crate::model::int8::quantize(v as f32 * e.scales[m], zp, lo, hi) as u8;
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{Epilogue, LANES, MR, PX, Tile, epilogue};
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
    /// The CPU must have the dot product extension, and `t.check(n)` must hold.
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
    /// `t.check(n)` must hold.
    #[target_feature(enable = "neon")]
    pub unsafe fn block_mull(t: &Tile, n: usize, e: &Epilogue, out: &mut [u8], stride: usize) {
        let mut sums = [[0i32; LANES * PX]; MR];
        for px0 in (0..n * LANES).step_by(4) {
            let mut lo = [vdupq_n_s32(0); MR];
            let mut hi = [vdupq_n_s32(0); MR];
            let mut wp = t.w.as_ptr() as *const i32;
            for &off in t.offsets {
                let mut xp = unsafe { t.packed.as_ptr().add(off + (t.q0 + px0) * 4) } as *const i8;
                for _ in 0..t.groups {
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
                unsafe { vst1q_s32(sums[m][px0..].as_mut_ptr(), vpaddq_s32(lo[m], hi[m])) };
            }
        }
        epilogue(&sums, n * LANES, e, &mut out[t.q0..], stride);
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Epilogue, LANES, MR, Tile};
    use std::arch::x86_64::*;

    /// One block: MR output channels x P vectors of 16 pixels, every tap and group.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI, and `t.check(P)` must hold.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn block<const P: usize>(t: &Tile, e: &Epilogue, out: &mut [u8], stride: usize) {
        let mut acc = [[_mm512_setzero_si512(); P]; MR];
        let mut wp = t.w.as_ptr() as *const i32;
        let base = t.packed.as_ptr();
        for &off in t.offsets {
            // SAFETY (all pointer arithmetic): bounded by Tile::check.
            let mut xp = unsafe { base.add(off + t.q0 * 4) };
            for _ in 0..t.groups {
                let x: [__m512i; P] = std::array::from_fn(|p| unsafe {
                    _mm512_loadu_si512(xp.add(64 * p) as *const _)
                });
                for (m, acc) in acc.iter_mut().enumerate() {
                    let k = _mm512_set1_epi32(unsafe { wp.add(m).read_unaligned() });
                    for p in 0..P {
                        acc[p] = _mm512_dpbusd_epi32(acc[p], x[p], k);
                    }
                }
                wp = unsafe { wp.add(MR) };
                xp = unsafe { xp.add(t.cb_stride) };
            }
        }
        // Out of registers through a plain buffer: the stores below unroll fully, so the
        // loop above keeps every accumulator in a register (indexing `acc` in the longer
        // epilogue loop made the compiler keep it in memory and store all 24 per step).
        let mut sums = [[0i32; LANES]; 3 * MR];
        for (m, acc) in acc.iter().enumerate() {
            for (p, a) in acc.iter().enumerate() {
                unsafe { _mm512_storeu_si512(sums[m * P + p].as_mut_ptr() as *mut _, *a) };
            }
        }
        let lo = _mm512_set1_ps((e.lo - e.y0) as f32);
        let hi = _mm512_set1_ps((e.hi - e.y0) as f32);
        let zp = _mm512_set1_epi32(e.y0);
        for m in 0..MR {
            let bias = _mm512_set1_epi32(e.bias[m]);
            let scale = _mm512_set1_ps(e.scales[m]);
            let row = &mut out[m * stride + t.q0..m * stride + t.q0 + P * LANES];
            for p in 0..P {
                let a = unsafe { _mm512_loadu_si512(sums[m * P + p].as_ptr() as *const _) };
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a, bias)), scale);
                let f = _mm512_min_ps(_mm512_max_ps(f, lo), hi);
                let q = _mm512_add_epi32(_mm512_cvtps_epi32(f), zp);
                let bytes = _mm512_cvtepi32_epi8(q);
                // SAFETY: `row` holds P * 16 bytes.
                unsafe { _mm_storeu_si128(row.as_mut_ptr().add(p * LANES) as *mut _, bytes) };
            }
        }
    }
}

/// Scratch space reused across frames (per thread): packed input and virtual output.
#[derive(Default)]
struct Scratch {
    buf: Vec<u8>,
}

impl Scratch {
    fn split(&mut self, a: usize, b: usize) -> (&mut [u8], &mut [u8]) {
        if self.buf.len() < a + b {
            self.buf.resize(a + b, 0);
        }
        let (x, y) = self.buf.split_at_mut(a);
        (x, &mut y[..b])
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl Op for QConv {
    fn name(&self) -> StaticName {
        "EdgesightQConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}->{} {}x{} stride {}x{} pad {:?}, {:?} kernel -> {:?}",
            self.cin,
            self.cout,
            self.kernel.0,
            self.kernel.1,
            self.stride.0,
            self.stride.1,
            self.pad,
            self.which,
            self.out_dt
        )])
    }

    tract_core::op_as_typed_op!();
}

impl EvalOp for QConv {
    tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let shape = input.shape();
        ensure!(
            shape.len() == 4 && shape[1] == self.cin,
            "int8 conv: input shape {shape:?}, expected [N, {}, H, W]",
            self.cin
        );
        let (n, h, w) = (shape[0], shape[2], shape[3]);
        let g = self.geo(h, w)?;
        let mut out =
            unsafe { Tensor::uninitialized_dt(self.out_dt, &[n, self.cout, g.hout, g.wout])? };
        {
            let x = input.try_as_plain_ram()?;
            let x = x.as_bytes();
            let mut o = out.try_as_plain_ram_mut()?;
            let o = o.as_bytes_mut();
            let (isz, osz) = (self.cin * h * w, self.cout * g.hout * g.wout);
            for i in 0..n {
                self.run_image(
                    &x[i * isz..(i + 1) * isz],
                    h,
                    w,
                    &mut o[i * osz..(i + 1) * osz],
                )?;
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        ensure!(s.rank() == 4, "int8 conv: input rank {}", s.rank());
        let dim = |d: &TDim, k: usize, s: usize, p: usize| -> TDim { (d.clone() + p - k) / s + 1 };
        let (pt, pl, pb, pr) = self.pad;
        Ok(tvec!(self.out_dt.fact(tvec![
            s[0].clone(),
            self.cout.to_dim(),
            dim(&s[2], self.kernel.0, self.stride.0, pt + pb),
            dim(&s[3], self.kernel.1, self.stride.1, pl + pr),
        ])))
    }

    tract_core::as_op!();
}

/// The constant input `ix` of `node` as a flat vector of `T`.
fn konst<T: Datum + Copy>(model: &TypedModel, node: &TypedNode, ix: usize) -> Option<Vec<T>> {
    let k = model.outlet_fact(node.inputs[ix]).ok()?.konst.clone()?;
    let k = k.cast_to::<T>().ok()?;
    Some(k.try_as_plain_ram().ok()?.as_slice::<T>().ok()?.to_vec())
}

/// Build our op for a quantised tract `Conv` node, if it is one we run: NCHW, OIHW i8
/// weights with zero point 0, one group, no dilation, u8/i8 in and out, constant
/// parameters, a known input height and width.
fn qconv_for(model: &TypedModel, node: &TypedNode, which: Kernel) -> TractResult<Option<QConv>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::cnn::PoolSpec;

    /// A tiny deterministic generator (xorshift), so the test needs no crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    struct Case {
        cin: usize,
        cout: usize,
        hw: (usize, usize),
        k: (usize, usize),
        stride: (usize, usize),
        pad: (usize, usize, usize, usize),
        signed_x: bool,
        signed_y: bool,
        per_channel: bool,
    }

    /// A model holding one quantised conv as tract builds it from a QLinearConv.
    fn conv_model(c: &Case, rng: &mut Rng) -> TypedModel {
        let mut m = TypedModel::default();
        let xdt = if c.signed_x {
            DatumType::I8
        } else {
            DatumType::U8
        };
        let ydt = if c.signed_y {
            DatumType::I8
        } else {
            DatumType::U8
        };
        let x = m
            .add_source("x", xdt.fact([1, c.cin, c.hw.0, c.hw.1]))
            .unwrap();
        let kernel: Vec<i8> = rng
            .bytes(c.cout * c.cin * c.k.0 * c.k.1)
            .into_iter()
            .map(|b| b as i8)
            .collect();
        let k = tract_ndarray::Array4::from_shape_vec((c.cout, c.cin, c.k.0, c.k.1), kernel)
            .unwrap()
            .into_tensor();
        let bias: Vec<i32> = (0..c.cout)
            .map(|_| (rng.next() % 20001) as i32 - 10000)
            .collect();
        let nks = if c.per_channel { c.cout } else { 1 };
        let ks: Vec<f32> = (0..nks)
            .map(|_| 0.001 + (rng.next() % 1000) as f32 * 1e-5)
            .collect();
        let x0 = if c.signed_x { -7 } else { 131 };
        let y0 = if c.signed_y { 5 } else { 120 };
        let mut konst = |name: &str, t: Tensor| m.add_const(name, t).unwrap();
        let inputs = [
            x,
            konst("k", k),
            konst("bias", tensor1(&bias)),
            konst("x0", tensor0(x0)),
            konst("xs", tensor0(0.02f32)),
            konst("k0", tensor1(&vec![0i32; nks])),
            konst(
                "ks",
                if c.per_channel {
                    tensor1(&ks)
                } else {
                    tensor0(ks[0])
                },
            ),
            konst("y0", tensor0(y0)),
            konst("ys", tensor0(0.05f32)),
        ];
        let op = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![c.k.0, c.k.1],
                padding: PaddingSpec::Explicit(tvec![c.pad.0, c.pad.1], tvec![c.pad.2, c.pad.3]),
                dilations: None,
                strides: Some(tvec![c.stride.0, c.stride.1]),
                input_channels: c.cin,
                output_channels: c.cout,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: Some(ydt),
        };
        let y = m.wire_node("conv", op, &inputs).unwrap();
        m.select_output_outlets(&y).unwrap();
        m
    }

    fn cases() -> Vec<Case> {
        let c = |cin, cout, hw, k, stride, pad| Case {
            cin,
            cout,
            hw,
            k,
            stride,
            pad,
            signed_x: false,
            signed_y: false,
            per_channel: true,
        };
        vec![
            // ResNet's shapes, small: 3x3 stride 1 and 2, 1x1 stride 1 and 2, the 7x7 stem.
            c(16, 16, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1)),
            c(16, 24, (10, 10), (3, 3), (2, 2), (1, 1, 1, 1)),
            c(32, 8, (7, 7), (1, 1), (1, 1), (0, 0, 0, 0)),
            c(32, 16, (8, 8), (1, 1), (2, 2), (0, 0, 0, 0)),
            c(3, 16, (20, 20), (7, 7), (2, 2), (3, 3, 3, 3)),
            // Channels not a multiple of 4 or 8, odd sizes, asymmetric padding, no
            // padding, a non-square kernel and stride, more pixels than one block.
            c(5, 11, (13, 7), (3, 3), (1, 1), (0, 1, 2, 0)),
            c(6, 9, (11, 12), (3, 2), (2, 1), (1, 0, 0, 1)),
            c(4, 8, (5, 5), (3, 3), (1, 1), (0, 0, 0, 0)),
            c(8, 8, (17, 23), (3, 3), (1, 1), (1, 1, 1, 1)),
            c(7, 3, (9, 11), (5, 5), (3, 3), (2, 2, 2, 2)),
            Case {
                signed_x: true,
                signed_y: true,
                ..c(12, 10, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1))
            },
            Case {
                signed_x: true,
                ..c(12, 10, (9, 9), (3, 3), (2, 2), (1, 1, 1, 1))
            },
            Case {
                signed_y: true,
                per_channel: false,
                ..c(12, 10, (9, 9), (1, 1), (1, 1), (0, 0, 0, 0))
            },
            Case {
                per_channel: false,
                ..c(16, 16, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1))
            },
        ]
    }

    fn kernels() -> Vec<Kernel> {
        Kernel::available()
    }

    /// Our op against tract's own lowering of the same conv, bit for bit, with every
    /// kernel this CPU has, on random weights, biases, scales and inputs.
    #[test]
    fn matches_tracts_conv_bit_for_bit() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        println!("int8 conv kernels on this CPU: {:?}", kernels());
        for (i, c) in cases().iter().enumerate() {
            let model = conv_model(c, &mut rng);
            let input = rng.bytes(c.cin * c.hw.0 * c.hw.1);
            let xdt = if c.signed_x {
                DatumType::I8
            } else {
                DatumType::U8
            };
            let shape = [1, c.cin, c.hw.0, c.hw.1];
            let x = if c.signed_x {
                let v: Vec<i8> = input.iter().map(|b| *b as i8).collect();
                Tensor::from_shape(&shape, &v).unwrap()
            } else {
                Tensor::from_shape(&shape, &input).unwrap()
            };
            assert_eq!(x.datum_type(), xdt);
            let want = model
                .clone()
                .into_optimized()
                .unwrap()
                .into_runnable()
                .unwrap()
                .run(tvec!(x.clone().into_tvalue()))
                .unwrap();
            // Every kernel on one thread, and the fastest with its channel blocks shared
            // out over a 2-thread pool.
            let fastest = *kernels().last().unwrap();
            let runs = kernels().into_iter().map(|k| (k, 1)).chain([(fastest, 2)]);
            for (which, threads) in runs {
                let mut ours = model.clone();
                assert_eq!(replace_convs(&mut ours, which).unwrap(), 1, "case {i}");
                let plan = ours.into_runnable().unwrap();
                let run = || plan.run(tvec!(x.clone().into_tvalue())).unwrap();
                let got = if threads > 1 {
                    use tract_core::internal::tract_linalg::multithread::*;
                    multithread_tract_scope(Executor::multithread(threads), run)
                } else {
                    run()
                };
                assert_eq!(got[0].shape(), want[0].shape(), "case {i} {which:?}");
                assert_eq!(*got[0], *want[0], "case {i} {which:?} {threads} threads");
            }
        }
    }

    /// Convs outside what the op handles stay with tract.
    #[test]
    fn leaves_what_it_does_not_handle() {
        let mut rng = Rng(7);
        let c = &cases()[0];
        let mut m = conv_model(c, &mut rng);
        let id = m.node_by_name("conv").unwrap().id;
        let mut op = m.node(id).op_as::<Conv>().unwrap().clone();
        op.pool_spec.dilations = Some(tvec![2, 2]);
        m.node_mut(id).op = Box::new(op);
        assert_eq!(replace_convs(&mut m, Kernel::Portable).unwrap(), 0);
    }
}
