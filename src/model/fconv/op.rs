//! The op: one f32 conv's constants, its geometry per input size, the packing of the
//! input into padded phase images, and the dispatch of channel blocks to the kernel.

use std::cell::RefCell;
use std::sync::Arc;

use tract_core::internal::*;

use crate::model::conv_geo::{Conv2d, Geo, LANES, PX, Scratch};
#[cfg(target_arch = "x86_64")]
use crate::model::fconv::kernels::avx512;
use crate::model::fconv::kernels::{Epilogue, Tile, portable};
use crate::model::fconv::{Kernel, MR};
use crate::model::threads::par_chunks;

/// An f32 2-D convolution (NCHW, one group, no dilation) with its bias, and what was
/// fused after it: a residual add (the op's second input), then a clamp (ReLU, ReLU6).
#[derive(Debug, Clone, PartialEq)]
pub struct FConv {
    pub(crate) shape: Conv2d,
    /// Weights in [co block][tap][cin][MR] order, zero beyond `cout`.
    pub weights: Arc<Vec<f32>>,
    /// Per output channel, padded to a multiple of MR.
    pub bias: Arc<Vec<f32>>,
    /// Whether the op adds its second input (the output's shape) to the conv's result.
    pub residual: bool,
    /// `clamp(v, lo, hi)` after the bias and the residual add: a fused ReLU or ReLU6.
    pub clamp: Option<(f32, f32)>,
    pub which: Kernel,
}

impl Eq for FConv {}

impl FConv {
    fn blocks(&self) -> usize {
        self.shape.cout.div_ceil(MR)
    }

    /// The geometry for an `h` x `w` input ([`Conv2d::geometry`]), one channel a group.
    pub(crate) fn geo(&self, h: usize, w: usize) -> TractResult<Geo> {
        let rows = self.blocks().checked_mul(MR);
        self.shape.geometry(self.shape.cin, rows, h, w)
    }

    /// Lay one image (`cin` planes of h x w) out as padded phase images, one region per
    /// (phase, channel), filled in parallel over the model's pool. Each region is
    /// written once: the padding as zeros, the rest from the input.
    fn pack(&self, x: &[f32], (h, w): (usize, usize), g: &Geo, out: &mut [f32]) {
        let (sh, sw) = self.shape.stride;
        let (pt, pl, _, _) = self.shape.pad;
        let (kh, kw) = self.shape.kernel;
        let cin = self.shape.cin;
        par_chunks(&mut out[..g.packed_len / 4], g.plane, |(k, region)| {
            let (phase, c) = (k / cin, k % cin);
            let (py, px) = (phase / sw, phase % sw);
            // No tap reads this phase (a 1x1 conv of stride 2 reads one of four).
            if py >= kh || px >= kw {
                return;
            }
            let plane = &x[c * h * w..(c + 1) * h * w];
            // Columns x with (x + pl) % sw == px land in phase column (x + pl) / sw.
            let first = (px + sw - pl % sw) % sw;
            let (c0, n) = if first < w {
                ((first + pl) / sw, (w - first).div_ceil(sw))
            } else {
                (0, 0)
            };
            let (rows, tail) = region.split_at_mut(g.rows * g.wq);
            for (r, row) in rows.chunks_exact_mut(g.wq).enumerate() {
                // Input row y lands in phase row r when y + pt == r * sh + py.
                let y = (r * sh + py).checked_sub(pt).filter(|y| *y < h);
                let Some(y) = y.filter(|_| n > 0) else {
                    row.fill(0.0);
                    continue;
                };
                let src = &plane[y * w + first..];
                row[..c0].fill(0.0);
                let dst = &mut row[c0..c0 + n];
                if sw == 1 {
                    dst.copy_from_slice(&src[..n]);
                } else {
                    for (d, s) in dst.iter_mut().zip(src.iter().step_by(sw)) {
                        *d = *s;
                    }
                }
                row[c0 + n..].fill(0.0);
            }
            tail.fill(0.0);
        });
    }

    /// One image: `x` in, `out` (`cout` planes) out; `skip` the residual add's other
    /// operand for this image, when there is one.
    ///
    /// Two passes over memory are left out where the layout allows: a 1x1 stride-1 conv
    /// without padding reads its input as it is (its planes are already the packed
    /// image, and whole vectors of pixels end at the last plane's end), and a conv whose
    /// virtual rows are its output rows (1x1 convs) writes its output in the kernel,
    /// residual add included.
    fn run_image(&self, x: &[f32], (h, w): (usize, usize), g: &Geo, io: Io) {
        let c = &self.shape;
        let plain = c.kernel == (1, 1) && c.stride == (1, 1) && c.pad == (0, 0, 0, 0);
        let direct_in = plain && g.q == h * w;
        let direct_out = g.wq == g.wout && g.q == g.hout * g.wout && c.cout.is_multiple_of(MR);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let packed_len = if direct_in { 0 } else { g.packed_len / 4 };
            let (packed, vout) = s.split(packed_len, if direct_out { 0 } else { g.vout_len });
            let input = if direct_in {
                Input { x, c_stride: h * w }
            } else {
                self.pack(x, (h, w), g, packed);
                Input {
                    x: packed,
                    c_stride: g.plane,
                }
            };
            if direct_out {
                self.compute(&input, g, io.out, io.skip);
            } else {
                self.compute(&input, g, vout, None);
                self.keep_valid(g, vout, io);
            }
        })
    }

    /// The valid pixels of every virtual row into the output: copied, or with the
    /// residual add and the clamp on the way. Channels are shared out over the pool.
    fn keep_valid(&self, g: &Geo, vout: &[f32], io: Io) {
        let plane = g.hout * g.wout;
        let clamp = self.clamp;
        let each = |src: &[f32], dst: &mut [f32], at: usize| match io.skip {
            None => dst.copy_from_slice(src),
            Some(skip) => {
                let b = &skip[at..at + dst.len()];
                for ((d, s), b) in dst.iter_mut().zip(src).zip(b) {
                    let v = s + b;
                    *d = clamp.map_or(v, |(lo, hi)| v.max(lo).min(hi));
                }
            }
        };
        par_chunks(
            &mut io.out[..self.shape.cout * plane],
            plane,
            |(co, dst)| {
                let src = &vout[co * g.q..];
                if g.wq == g.wout {
                    each(&src[..plane], dst, co * plane);
                } else {
                    for (y, row) in dst.chunks_exact_mut(g.wout).enumerate() {
                        let at = co * plane + y * g.wout;
                        each(&src[y * g.wq..y * g.wq + g.wout], row, at);
                    }
                }
            },
        );
    }

    /// Every output block: `out[co][q]` for q < g.q (the virtual rows, or the output
    /// itself, `skip` then being the residual add's operand laid out as `out`). Blocks of
    /// output channels are independent, so they are shared out over the model's pool;
    /// the input is read by all.
    fn compute(&self, input: &Input, g: &Geo, out: &mut [f32], skip: Option<&[f32]>) {
        let rows = MR * g.q;
        let out = &mut out[..self.blocks() * rows];
        par_chunks(out, rows, |(b, out)| {
            let skip = skip.map(|s| &s[b * rows..(b + 1) * rows]);
            self.compute_block(b, input, &g.offsets, g, Rows { out, skip })
        });
    }

    /// Output channels `b * MR ..` into `rows` (MR rows of g.q pixels).
    fn compute_block(&self, b: usize, input: &Input, offsets: &[usize], g: &Geo, rows: Rows) {
        let taps = self.shape.kernel.0 * self.shape.kernel.1;
        let wblock = taps * self.shape.cin * MR;
        let out = rows.out;
        let epi = Epilogue {
            bias: &self.bias[b * MR..(b + 1) * MR],
            skip: rows.skip,
            // With a residual add the clamp comes after it: here when the skip is, else
            // in `keep_valid`.
            clamp: self.clamp.filter(|_| !self.residual || rows.skip.is_some()),
        };
        let tile = |v: usize| Tile {
            packed: input.x,
            offsets,
            c_stride: input.c_stride,
            channels: self.shape.cin,
            q0: v * LANES,
            w: &self.weights[b * wblock..(b + 1) * wblock],
        };
        // The virtual pixels that hold outputs end at the last row's last output; a
        // last vector with at most 8 of them goes to the kernel's tail.
        let needed = g.outputs_end();
        let (vecs, tail) = match needed % LANES {
            rem @ 1..=8 if self.which != Kernel::Portable => (needed / LANES, rem),
            _ => (g.q / LANES, 0),
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = tail;
        let mut v = 0;
        while v < vecs {
            let n = (vecs - v).min(PX);
            let tile = tile(v);
            match self.which {
                Kernel::Portable => portable::block(&tile, n, &epi, out, g.q),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: chosen only when the CPU has AVX-512 F (Kernel::available);
                // `Tile::check` bounds every read, and `out` holds MR rows of g.q.
                Kernel::Avx512 => unsafe {
                    tile.check(n);
                    match n {
                        3 => avx512::block::<3>(&tile, &epi, out, g.q),
                        2 => avx512::block::<2>(&tile, &epi, out, g.q),
                        _ => avx512::block::<1>(&tile, &epi, out, g.q),
                    }
                },
            }
            v += n;
        }
        #[cfg(target_arch = "x86_64")]
        if tail > 0 {
            let tile = tile(vecs);
            tile.check(1);
            // SAFETY: tails are only taken by the AVX-512 kernel (above), chosen only
            // when the CPU has it; `Tile::check(1)` bounds the reads of up to 16 pixels,
            // and `out` holds MR rows of g.q > vecs * 16 + tail.
            unsafe {
                match tail {
                    1 => avx512::tail::<1>(&tile, &epi, out, g.q),
                    2 => avx512::tail::<2>(&tile, &epi, out, g.q),
                    3 => avx512::tail::<3>(&tile, &epi, out, g.q),
                    4 => avx512::tail::<4>(&tile, &epi, out, g.q),
                    5 => avx512::tail::<5>(&tile, &epi, out, g.q),
                    6 => avx512::tail::<6>(&tile, &epi, out, g.q),
                    7 => avx512::tail::<7>(&tile, &epi, out, g.q),
                    _ => avx512::tail::<8>(&tile, &epi, out, g.q),
                }
            }
        }
    }
}

/// What the kernel reads: the packed image, or the input as it is.
struct Input<'a> {
    x: &'a [f32],
    /// Floats between channels.
    c_stride: usize,
}

/// One block's output rows and the residual add's operand for them.
struct Rows<'a> {
    out: &'a mut [f32],
    skip: Option<&'a [f32]>,
}

/// One image's output, and the residual add's other operand.
struct Io<'a> {
    out: &'a mut [f32],
    skip: Option<&'a [f32]>,
}

thread_local! {
    /// Per thread: packed input and virtual output, reused across frames.
    static SCRATCH: RefCell<Scratch<f32>> = RefCell::new(Scratch::default());
}

impl Op for FConv {
    fn name(&self) -> StaticName {
        "EdgesightFConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let s = &self.shape;
        Ok(vec![format!(
            "{}->{} {}x{} stride {}x{} pad {:?}, {:?} kernel{}{}",
            s.cin,
            s.cout,
            s.kernel.0,
            s.kernel.1,
            s.stride.0,
            s.stride.1,
            s.pad,
            self.which,
            if self.residual { ", + residual" } else { "" },
            self.clamp
                .map(|(lo, hi)| format!(", clamp {lo}..{hi}"))
                .unwrap_or_default()
        )])
    }

    tract_core::op_as_typed_op!();
}

impl EvalOp for FConv {
    tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let shape = input.shape();
        let cin = self.shape.cin;
        ensure!(
            shape.len() == 4 && shape[1] == cin,
            "f32 conv: input shape {shape:?}, expected [N, {cin}, H, W]",
        );
        let (n, h, w) = (shape[0], shape[2], shape[3]);
        let g = self.geo(h, w)?;
        let oshape = [n, self.shape.cout, g.hout, g.wout];
        let skip = match (self.residual, inputs.get(1)) {
            (true, Some(s)) => {
                ensure!(
                    s.shape() == oshape,
                    "f32 conv: residual shape {:?}, expected {oshape:?}",
                    s.shape()
                );
                Some(s.try_as_plain_ram()?)
            }
            (false, None) => None,
            _ => bail!("f32 conv: {} inputs", inputs.len()),
        };
        let skip = skip.as_ref().map(|s| s.as_slice::<f32>()).transpose()?;
        // SAFETY: plain f32 data; run_image writes every output pixel of every channel
        // (`keep_valid` copies the virtual rows out in full) before it is returned.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&oshape)? };
        {
            let x = input.try_as_plain_ram()?;
            let x = x.as_slice::<f32>()?;
            let mut o = out.try_as_plain_ram_mut()?;
            let o = o.as_slice_mut::<f32>()?;
            let (isz, osz) = (cin * h * w, self.shape.cout * g.hout * g.wout);
            for i in 0..n {
                let io = Io {
                    out: &mut o[i * osz..(i + 1) * osz],
                    skip: skip.map(|s| &s[i * osz..(i + 1) * osz]),
                };
                self.run_image(&x[i * isz..(i + 1) * isz], (h, w), &g, io);
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for FConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        ensure!(s.rank() == 4, "f32 conv: input rank {}", s.rank());
        let dim = |d: &TDim, k: usize, s: usize, p: usize| -> TDim { (d.clone() + p - k) / s + 1 };
        let c = &self.shape;
        let (pt, pl, pb, pr) = c.pad;
        Ok(tvec!(f32::fact(tvec![
            s[0].clone(),
            c.cout.to_dim(),
            dim(&s[2], c.kernel.0, c.stride.0, pt + pb),
            dim(&s[3], c.kernel.1, c.stride.1, pl + pr),
        ])))
    }

    tract_core::as_op!();
}
