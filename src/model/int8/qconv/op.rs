//! The op: one quantised conv's constants, its geometry per input size, the packing of
//! the input into C4 phase images, and the dispatch of channel blocks to the kernel.

use std::cell::RefCell;
use std::sync::Arc;

use tract_core::internal::*;

use crate::model::conv_geo::{Conv2d, Geo, Scratch};
#[cfg(target_arch = "arm")]
use crate::model::int8::qconv::kernels::armv7;
#[cfg(target_arch = "aarch64")]
use crate::model::int8::qconv::kernels::neon;
use crate::model::int8::qconv::kernels::{Epilogue, Excesses, Tile, portable};
#[cfg(target_arch = "x86_64")]
use crate::model::int8::qconv::kernels::{amx, avx2, x86 as vnni};
use crate::model::int8::qconv::pack::{four, interleave};
use crate::model::int8::qconv::{Kernel, LANES, MR};
use crate::model::int8::{Byte, QuantizedAdd, add_chunk};
use crate::model::threads::par_chunks;

/// The share of the kernel's pixels a conv must save to gather its taps' reads first
/// ([`QConv::gather_pays`]).
const GATHER_SAVES: f64 = 0.1;

/// The largest gathered input ([`QConv::gather_pays`]): every block of output channels
/// reads it again, so it must stay in the core's cache. On a Zen 4 (1 MB L2 a core)
/// ResNet-50's 3x3 convs on the 7x7 map (226 KB gathered) ran 9 % (stride 1) and 17 %
/// (stride 2) faster gathered; on the 14x14 map (451 KB) no faster, though it saves 12 %
/// of the VNNI kernel's lanes there too.
const GATHER_BYTES: usize = 256 << 10;

/// A quantised 2-D convolution (NCHW, one group, no dilation) with everything but the
/// input folded in at load time.
#[derive(Debug, Clone, PartialEq)]
pub struct QConv {
    /// Input channels, kernel, strides, pads and the input's byte transform: all that
    /// packing the input needs.
    pub packing: Packing,
    pub cout: usize,
    /// Weights in [co block][tap][c4 group][MR][4] order, zero beyond `cout` and `cin`.
    pub weights: Arc<Vec<i8>>,
    /// What the AVX2 kernel adds to `weights` per block, where a pair of weights would
    /// saturate its `vpmaddubsw` (empty for every other kernel).
    pub excess: Arc<Excesses>,
    /// `bias - x0 * sum(w)` per output channel (padded to a multiple of MR).
    pub bias: Arc<Vec<i32>>,
    /// `(w_scale * x_scale) / y_scale` per output channel (padded).
    pub scales: Arc<Vec<f32>>,
    pub y0: i32,
    pub lo: i32,
    pub hi: i32,
    /// The type of the conv's own (requantised) output.
    pub out_dt: DatumType,
    pub which: Kernel,
    /// A residual add fused in ([`super::fuse_conv_adds`]): the conv's output is its
    /// `a`, the op's second input its `b`, and the op outputs the sum's type.
    pub residual: Option<Box<QuantizedAdd>>,
    /// The output goes straight into the packed input of the one conv that reads it
    /// ([`super::fuse_handoffs`]): a u8 tensor `[N, that conv's packed length]` in that
    /// conv's layout, instead of NCHW planes that conv would pack again.
    pub handoff: Option<Packing>,
    /// The input arrives packed by the conv before (its `handoff`), for an image of this
    /// height and width: this conv packs nothing.
    pub prepacked: Option<(usize, usize)>,
    /// Each tap's reads are gathered into planes of their own before the kernel runs
    /// ([`Geo::gathered`]): decided at load where it pays ([`QConv::gather_pays`]).
    pub gather: bool,
}

/// How a conv lays its input out for its kernel: what packing needs of it. The conv's
/// own, or the next conv's in a handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    pub cin: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    /// (top, left, bottom, right).
    pub pad: (usize, usize, usize, usize),
    /// XOR applied to every input byte to bring it into the kernel's domain: 0x80 maps i8
    /// onto u8 (x + 128) and u8 onto i8 (x - 128).
    pub flip: u8,
    /// The input zero point in the kernel's domain, as a byte: the padding value.
    pub x0: u8,
}

/// The planes packing reads: an NCHW image's (`h` x `w`, one after the other), or a
/// conv's virtual output rows (`row` pixels apart, `chan` apart per channel, the last
/// columns of each row thrown away).
#[derive(Clone, Copy)]
struct Planes<'a> {
    data: &'a [u8],
    channels: usize,
    h: usize,
    w: usize,
    chan: usize,
    row: usize,
}

impl<'a> Planes<'a> {
    fn nchw(data: &'a [u8], channels: usize, h: usize, w: usize) -> Self {
        let (chan, row) = (h * w, w);
        Planes {
            data,
            channels,
            h,
            w,
            chan,
            row,
        }
    }

    /// Channel `c`'s pixels, from its first row's first to its last row's last (vector
    /// loads read ahead into them: `pack::interleave`); `None` beyond the channels.
    fn plane(&self, c: usize) -> Option<&'a [u8]> {
        (c < self.channels).then(|| {
            let end = c * self.chan + (self.h - 1) * self.row + self.w;
            &self.data[c * self.chan..end]
        })
    }

    /// Whether each channel's rows follow one another with nothing between them.
    fn rows_contiguous(&self) -> bool {
        self.row == self.w
    }
}

impl Packing {
    pub(crate) fn groups(&self) -> usize {
        self.cin.div_ceil(4)
    }

    fn shape(&self) -> Conv2d {
        Conv2d {
            cin: self.cin,
            cout: 1, // the output's size plays no part in packing
            kernel: self.kernel,
            stride: self.stride,
            pad: self.pad,
        }
    }

    /// The packed input's geometry for an `h` x `w` image (its `packed_len`, `plane`,
    /// `rows` and `wq`: [`Conv2d::geometry`]).
    pub(crate) fn geo(&self, h: usize, w: usize) -> TractResult<Geo> {
        self.shape().geometry(self.groups(), Some(0), h, w)
    }

    /// Lay one image out as C4 phase images, padding with x0. Each (phase, group of 4
    /// channels) is its own region of `out`, so the regions are filled in parallel over
    /// the model's pool. A phase no tap reads is left as it is, unless `fill_unread`
    /// (`out` is a fresh tensor, not scratch space).
    fn pack(&self, x: Planes, g: &Geo, out: &mut [u8], fill_unread: bool) {
        let (sh, sw) = self.stride;
        let (pt, pl, _, _) = self.pad;
        let (h, w) = (x.h, x.w);
        let groups = self.groups();
        // Long enough for the vector loads' read-ahead (pack::interleave).
        let pad_row = vec![self.x0 ^ self.flip; 2 * w + 32];
        let (kh, kw) = self.kernel;
        par_chunks(&mut out[..g.packed_len], g.plane * 4, |(k, region)| {
            let (phase, cb) = (k / groups, k % groups);
            let (py, px) = (phase / sw, phase % sw);
            // No tap reads this phase (a 1x1 conv of stride 2 reads one of four): its
            // bytes are never read.
            if py >= kh || px >= kw {
                if fill_unread {
                    region.fill(self.x0);
                }
                return;
            }
            // Columns x with (x + pl) % sw == px land in phase (py, px).
            let first = (px + sw - pl % sw) % sw;
            if first >= w {
                region.fill(self.x0);
                return;
            }
            let (c0, n) = ((first + pl) / sw, (w - first).div_ceil(sw));
            let planes: [Option<&[u8]>; 4] = four(|j| x.plane(cb * 4 + j));
            // A 1x1 conv of stride 1 with no padding, from rows with nothing between them:
            // each channel is one run of h x w pixels (ResNet's first conv of a block;
            // row by row, a 7- or 14-pixel row cost more in the loop than in its copy).
            if let [Some(a), Some(b), Some(c), Some(d)] = planes
                && (sh, sw, g.wq, c0, pt, g.rows) == (1, 1, w, 0, 0, h)
                && x.rows_contiguous()
            {
                interleave(&[a, b, c, d], 0, 1, self.flip, h * w, region);
                region[h * w * 4..].fill(self.x0);
                return;
            }
            // Phase row r holds input row r * sh + py - pt, where that is one. (Filtering
            // every input row by `(y + pt) % sh` was a division per row: 0.4 ms of a Pi
            // 5's ResNet-50, tools/arm_model.py.)
            // Rows go in order, each in whole runs of 16 pixels where the region has room
            // (`interleave`): what a row's last run writes past its pixels is written
            // again by the rows after it, or is padding, filled with x0 here before the
            // next row and after the last. Every byte is written once or twice, instead
            // of a fill of the whole region first.
            let mut filled = 0;
            for r in 0..g.rows {
                let Some(y) = (r * sh + py).checked_sub(pt).filter(|y| *y < h) else {
                    continue;
                };
                let src: [&[u8]; 4] = four(|j| match planes[j] {
                    Some(p) => &p[y * x.row..],
                    None => &pad_row[..],
                });
                let base = (r * g.wq + c0) * 4;
                region[filled..base].fill(self.x0);
                interleave(&src, first, sw, self.flip, n, &mut region[base..]);
                filled = base + n * 4;
            }
            region[filled..].fill(self.x0);
        });
    }
}

impl Eq for QConv {}

impl QConv {
    fn taps(&self) -> usize {
        self.packing.kernel.0 * self.packing.kernel.1
    }

    fn groups(&self) -> usize {
        self.packing.groups()
    }

    fn blocks(&self) -> usize {
        self.cout.div_ceil(self.which.rows())
    }

    /// The geometry for an `h` x `w` input ([`Conv2d::geometry`]).
    pub(crate) fn geo(&self, h: usize, w: usize) -> TractResult<Geo> {
        let rows = self.blocks().checked_mul(self.which.rows());
        self.shape().geometry(self.groups(), rows, h, w)
    }

    fn shape(&self) -> Conv2d {
        Conv2d {
            cout: self.cout,
            ..self.packing.shape()
        }
    }

    /// The data type the op outputs: the conv's, or its fused add's.
    pub(crate) fn result_dt(&self) -> DatumType {
        self.residual
            .as_ref()
            .map_or(self.out_dt, |r| r.quantize.dt)
    }

    /// Whether gathering each tap's reads first ([`Geo::gathered`]) pays for a conv of
    /// this geometry: it must save at least [`GATHER_SAVES`] of the pixels the kernel
    /// computes, and the gathered input (read again by every block of output channels)
    /// must stay within [`GATHER_BYTES`]. Decided at load ([`QConv::gather`]).
    pub(crate) fn gather_pays(&self, g: &Geo) -> bool {
        let computed = |n| self.which.pixels_computed(n) as f64;
        // Saturating: a crafted kernel's sizes must not wrap the estimate (`gathered` then
        // checks the real sizes).
        let gathered = [self.groups(), 4, g.hout * g.wout]
            .into_iter()
            .fold(self.taps(), usize::saturating_mul);
        self.taps() > 1
            && computed(g.hout * g.wout) <= (1.0 - GATHER_SAVES) * computed(g.outputs_end())
            && gathered <= GATHER_BYTES
    }

    /// One image: `x` in (`cin` planes, or this conv's packed input if `prepacked`),
    /// `io.out` out: `cout` planes, or the next conv's packed input (`io.next`). `skip`
    /// is the fused add's other operand for this image (`cout` planes of `skip_dt`), when
    /// there is one.
    fn run_image(&self, x: &[u8], (h, w): (usize, usize), g: &Geo, io: Io) -> TractResult<()> {
        let gathered = self.gather.then(|| g.gathered(self.groups())).transpose()?;
        // The geometry of the kernel's reads and of its virtual output rows.
        let kg = gathered.as_ref().unwrap_or(g);
        SCRATCH.with(|s| -> TractResult<()> {
            let mut s = s.borrow_mut();
            let own = if self.prepacked.is_some() {
                0
            } else {
                g.packed_len
            };
            let (bufs, vout) = s.split(
                own + gathered.as_ref().map_or(0, |k| k.packed_len),
                kg.vout_len,
            );
            let (buf, gather_buf) = bufs.split_at_mut(own);
            let packed: &[u8] = match self.prepacked {
                Some(_) => x,
                None => {
                    self.packing
                        .pack(Planes::nchw(x, self.packing.cin, h, w), g, buf, false);
                    buf
                }
            };
            let packed: &[u8] = match &gathered {
                Some(k) => {
                    g.gather(packed, self.groups(), k, gather_buf);
                    gather_buf
                }
                None => packed,
            };
            #[cfg(target_arch = "x86_64")]
            if let Some(add) = self.direct_add(kg, &io) {
                self.compute_direct(packed, kg, add, io.out);
                return Ok(());
            }
            self.compute(packed, &kg.offsets, kg, vout);
            match (io.skip, &self.residual, io.next) {
                (Some((skip, skip_dt)), Some(add), _) => {
                    self.add_out(add, vout, kg, skip, skip_dt, io.out)
                }
                (_, _, Some((next, gn))) => {
                    // The kernel's rows are the next conv's planes: packed straight from
                    // them, with no NCHW tensor between the two convs.
                    let rows = Planes {
                        data: vout,
                        channels: self.cout,
                        h: kg.hout,
                        w: kg.wout,
                        chan: kg.q,
                        row: kg.wq,
                    };
                    next.pack(rows, gn, io.out, true);
                    Ok(())
                }
                _ => {
                    self.keep_valid(kg, vout, io.out, |src, dst, _| dst.copy_from_slice(src));
                    Ok(())
                }
            }
        })
    }

    /// `each(src, dst, at)` for every run of valid pixels, `at` being `dst`'s offset in
    /// `out`: whole planes when the virtual rows have no extra columns, else row by row.
    /// Channels are shared out over the pool.
    fn keep_valid(
        &self,
        g: &Geo,
        vout: &[u8],
        out: &mut [u8],
        each: impl Fn(&[u8], &mut [u8], usize) + Send + Sync,
    ) {
        let plane = g.hout * g.wout;
        par_chunks(&mut out[..self.cout * plane], plane, |(co, dst)| {
            let src = &vout[co * g.q..];
            if g.wq == g.wout {
                each(&src[..plane], dst, co * plane);
            } else {
                for (y, row) in dst.chunks_exact_mut(g.wout).enumerate() {
                    let at = co * plane + y * g.wout;
                    each(&src[y * g.wq..y * g.wq + g.wout], row, at);
                }
            }
        });
    }

    /// The fused add, on the way out of the kernel's rows: `out = add(conv, skip)`.
    fn add_out(
        &self,
        add: &QuantizedAdd,
        vout: &[u8],
        g: &Geo,
        skip: &[u8],
        skip_dt: DatumType,
        out: &mut [u8],
    ) -> TractResult<()> {
        let plane = g.hout * g.wout;
        ensure!(skip.len() == self.cout * plane, "int8 conv: residual size");
        macro_rules! go {
            ($A:ty, $B:ty, $T:ty) => {{
                let c = add.consts_for::<$T>();
                self.keep_valid(g, vout, out, |src, dst, at| {
                    // The skip tensor has the output's layout.
                    let b = &skip[at..at + dst.len()];
                    add_chunk::<$A, $B, $T>(bytes_as(src), bytes_as(b), bytes_as_mut(dst), &c)
                })
            }};
        }
        let dts = (self.out_dt, skip_dt, add.quantize.dt);
        for_add_types!(dts, go, "int8 conv: residual add");
        Ok(())
    }

    /// Every output block: `vout[co][q]` for q < g.q. Blocks of output channels are
    /// independent, so with a multi-threaded model (`threads` > 1) they are shared out
    /// over tract's thread pool; the packed input is read by all.
    fn compute(&self, packed: &[u8], offsets: &[usize], g: &Geo, vout: &mut [u8]) {
        let rows = self.which.rows() * g.q;
        let vout = &mut vout[..self.blocks() * rows];
        par_chunks(vout, rows, |(b, out)| {
            let to = Rows {
                out,
                stride: g.q,
                #[cfg(target_arch = "x86_64")]
                add: None,
            };
            self.compute_block(b, packed, offsets, g, to)
        });
    }

    /// The kernel's vectors of 16 pixels, and the pixels its tail takes one by one (the
    /// VNNI kernel's only), to cover every output of `g`'s virtual rows.
    fn vectors_and_tail(&self, g: &Geo) -> (usize, usize) {
        // The virtual pixels that hold outputs end at the last row's last output; on the
        // VNNI kernel a last vector with at most 8 of them goes to its tail.
        let needed = g.outputs_end();
        match self.which.tail_pixels(needed) {
            0 => (g.q / LANES, 0),
            rem => (needed / LANES, rem),
        }
    }

    /// Whether the kernel writes this conv's output planes itself, the fused add done in
    /// its epilogue ([`QConv::compute_direct`]): the VNNI kernel, on virtual rows that are
    /// the output's rows (a 1x1 conv, or a gathered one) and pixels it covers exactly, in
    /// whole blocks of channels, with an add whose constants it takes.
    #[cfg(target_arch = "x86_64")]
    fn direct_add<'s>(&self, g: &Geo, io: &Io<'s>) -> Option<vnni::FusedAdd<'s>> {
        let plane = g.hout * g.wout;
        let (vecs, tail) = self.vectors_and_tail(g);
        let fits = self.which == Kernel::Avx512Vnni
            && io.next.is_none()
            && g.wq == g.wout
            && vecs * LANES + tail == plane
            && self.cout.is_multiple_of(MR);
        let (add, (skip, skip_dt)) = (self.residual.as_ref()?, io.skip?);
        let consts = match add.quantize.dt {
            DatumType::U8 => add.consts_for::<u8>(),
            DatumType::I8 => add.consts_for::<i8>(),
            _ => return None,
        };
        let types = [self.out_dt, skip_dt]
            .iter()
            .all(|t| matches!(t, DatumType::U8 | DatumType::I8));
        (fits && types && crate::model::int8::x86::ordinary(&consts)).then(|| vnni::FusedAdd {
            consts,
            skip,
            skip_signed: skip_dt == DatumType::I8,
            conv_signed: self.out_dt == DatumType::I8,
        })
    }

    /// Every output block straight into the op's output planes, `add`'s skip added in the
    /// kernel's epilogue: no virtual rows in between, and no pass over them for the add.
    /// ResNet-50's sixteen adds (its last 1x1 conv of each block): about 0.2 ms of 25 on a
    /// Zen 4 (the adds' own AVX-512 loop had already taken most of their cost).
    #[cfg(target_arch = "x86_64")]
    fn compute_direct(&self, packed: &[u8], g: &Geo, add: vnni::FusedAdd, out: &mut [u8]) {
        let plane = g.hout * g.wout;
        par_chunks(&mut out[..self.cout * plane], MR * plane, |(b, out)| {
            let to = Rows {
                out,
                stride: plane,
                add: Some(vnni::FusedAdd {
                    skip: &add.skip[b * MR * plane..(b + 1) * MR * plane],
                    ..add
                }),
            };
            self.compute_block(b, packed, &g.offsets, g, to)
        });
    }

    /// Output channels `b * rows ..` into `to` (`rows` rows `to.stride` apart, where
    /// `rows` is the kernel's block: MR, or AMX's 32).
    fn compute_block(&self, b: usize, packed: &[u8], offsets: &[usize], g: &Geo, to: Rows) {
        let Rows { out, stride, .. } = to;
        let rows = self.which.rows();
        let wblock = self.taps() * self.groups() * rows * 4 * self.which.weight_bytes();
        let epi = Epilogue {
            bias: &self.bias[b * rows..(b + 1) * rows],
            scales: &self.scales[b * rows..(b + 1) * rows],
            y0: self.y0,
            lo: self.lo,
            hi: self.hi,
            #[cfg(target_arch = "x86_64")]
            add: to.add,
        };
        let tile = |v: usize| Tile {
            packed,
            offsets,
            cb_stride: g.plane * 4,
            groups: self.groups(),
            q0: v * LANES,
            w: &self.weights[b * wblock..(b + 1) * wblock],
            excess: self.excess.block(b),
        };
        let needed = g.outputs_end();
        let (vecs, tail) = self.vectors_and_tail(g);
        // SAFETY: AMX is chosen only when it is permitted (Kernel::available).
        #[cfg(target_arch = "x86_64")]
        let _tiles = (self.which == Kernel::Amx).then(|| unsafe { amx::Tiles::configure() });
        let mut v = 0;
        while v < vecs {
            let n = (vecs - v).min(self.which.vectors());
            // The NEON and AVX2 kernels step 8 or 4 pixels: they stop after the last output
            // instead of computing the whole last vector (a 7x7 map's 1x1 convs: 56 pixels,
            // not 64).
            #[cfg(any(target_arch = "aarch64", target_arch = "x86_64"))]
            let pixels = (n * LANES).min(needed.saturating_sub(v * LANES));
            let tile = tile(v);
            match self.which {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: chosen only when the CPU has these features (Kernel::available), and
                // `Tile::check` bounds every read.
                Kernel::Avx512Vnni => unsafe {
                    tile.check(n, MR);
                    match n {
                        3 => vnni::block::<3>(&tile, &epi, out, stride),
                        2 => vnni::block::<2>(&tile, &epi, out, stride),
                        _ => vnni::block::<1>(&tile, &epi, out, stride),
                    }
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: tiles configured above; AMX is offered only beside AVX-512
                // (Kernel::available) and for convs whose groups are a multiple of 16
                // (replace::qconv_for); `Tile::check` bounds every read.
                Kernel::Amx => unsafe {
                    tile.check(n, rows);
                    match n {
                        2 => amx::block::<2>(&tile, &epi, out, stride),
                        _ => amx::block::<1>(&tile, &epi, out, stride),
                    }
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: chosen only when the CPU has AVX2 (Kernel::available);
                // `Tile::check` bounds every read, the excesses' too.
                Kernel::Avx2 => unsafe {
                    tile.check(n, MR);
                    avx2::block(&tile, n, pixels, &epi, out, stride)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as Avx2's; the i16 weights counted as 2 x MR rows.
                Kernel::Avx2Wide => unsafe {
                    tile.check(n, 2 * MR);
                    avx2::block_wide(&tile, n, &epi, out, stride)
                },
                Kernel::Portable => portable::block(&tile, n, &epi, out, stride),
                #[cfg(target_arch = "aarch64")]
                // SAFETY: NEON is part of aarch64; `Tile::check` bounds every read.
                Kernel::Neon => unsafe {
                    tile.check(n, MR);
                    neon::block_mull(&tile, pixels, &epi, out, stride)
                },
                #[cfg(target_arch = "arm")]
                // SAFETY: chosen only when the CPU has NEON (Kernel::available);
                // `Tile::check` bounds every read.
                Kernel::Neon => unsafe {
                    tile.check(n, MR);
                    armv7::block(&tile, n, &epi, out, stride)
                },
                #[cfg(target_arch = "aarch64")]
                // SAFETY: chosen only when the CPU has dotprod (Kernel::available).
                Kernel::NeonDot => unsafe {
                    tile.check(n, MR);
                    neon::block_dot(&tile, pixels, &epi, out, stride)
                },
            }
            v += n;
        }
        #[cfg(target_arch = "x86_64")]
        if tail > 0 {
            let tile = tile(vecs);
            tile.check(1, MR);
            // SAFETY: tails are only taken by the VNNI kernel (above), chosen only when
            // the CPU has AVX-512 F, BW, VL and VNNI (Kernel::available); `Tile::check`
            // bounds the reads of up to 16 pixels, and `out` holds MR rows of g.q.
            unsafe {
                match tail {
                    1 => vnni::tail::<1>(&tile, &epi, out, stride),
                    2 => vnni::tail::<2>(&tile, &epi, out, stride),
                    3 => vnni::tail::<3>(&tile, &epi, out, stride),
                    4 => vnni::tail::<4>(&tile, &epi, out, stride),
                    5 => vnni::tail::<5>(&tile, &epi, out, stride),
                    6 => vnni::tail::<6>(&tile, &epi, out, stride),
                    7 => vnni::tail::<7>(&tile, &epi, out, stride),
                    _ => vnni::tail::<8>(&tile, &epi, out, stride),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = tail;
    }
}

/// Where a block's rows go: the kernel's virtual rows (`stride` the geometry's `q`), or
/// the op's output planes with the fused add done on the way (`compute_direct`).
struct Rows<'a> {
    out: &'a mut [u8],
    stride: usize,
    #[cfg(target_arch = "x86_64")]
    add: Option<vnni::FusedAdd<'a>>,
}

/// One image's output, and the fused add's other operand with its type.
struct Io<'a> {
    out: &'a mut [u8],
    skip: Option<(&'a [u8], DatumType)>,
    /// The next conv's packing and geometry, in a handoff.
    next: Option<(&'a Packing, &'a Geo)>,
}

/// A byte slice as the 8-bit type it holds (u8, or i8's two's complement).
fn bytes_as<T: Byte>(x: &[u8]) -> &[T] {
    // SAFETY: T is u8 or i8 (`Byte`): same size and alignment, every bit pattern valid.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const T, x.len()) }
}

fn bytes_as_mut<T: Byte>(x: &mut [u8]) -> &mut [T] {
    // SAFETY: as in `bytes_as`; the borrow of `x` moves into the result.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut T, x.len()) }
}

thread_local! {
    /// Per thread: packed input and virtual output, reused across frames.
    static SCRATCH: RefCell<Scratch<u8>> = RefCell::new(Scratch::default());
}

/// Fill this thread's scratch with `byte`. Tests run kernels one after another on one
/// thread: a kernel that skipped an output would otherwise pass on the byte the kernel
/// before it left there.
#[cfg(test)]
pub(crate) fn poison_scratch(byte: u8) {
    SCRATCH.with(|s| s.borrow_mut().fill(byte));
}

impl Op for QConv {
    fn name(&self) -> StaticName {
        "EdgesightQConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = vec![
            format!(
                "{}->{} {}x{} stride {}x{} pad {:?}, {:?} kernel -> {:?}{}",
                self.packing.cin,
                self.cout,
                self.packing.kernel.0,
                self.packing.kernel.1,
                self.packing.stride.0,
                self.packing.stride.1,
                self.packing.pad,
                self.which,
                self.out_dt,
                self.residual
                    .as_ref()
                    .map(|r| format!(", + residual -> {}", r.quantize.describe()))
                    .unwrap_or_default()
            ),
            format!(
                "input {}{}, output {}",
                if self.prepacked.is_some() {
                    "packed by the conv before"
                } else {
                    "NCHW"
                },
                if self.gather {
                    ", each tap's reads gathered"
                } else {
                    ""
                },
                if self.handoff.is_some() {
                    "packed for the next conv"
                } else {
                    "NCHW"
                }
            ),
        ];
        if self.excess.len() > 0 {
            info.push(format!(
                "{} fours of weights split (AVX2)",
                self.excess.len()
            ));
        }
        Ok(info)
    }

    tract_core::op_as_typed_op!();
}

impl EvalOp for QConv {
    tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let (n, (h, w)) = self.input_image(input.shape())?;
        let g = self.geo(h, w)?;
        let isz = match self.prepacked {
            Some(_) => g.packed_len,
            None => self.packing.cin * h * w,
        };
        ensure!(
            input.len() == n * isz,
            "int8 conv: {} input bytes, expected {}",
            input.len(),
            n * isz
        );
        let plane_shape = [n, self.cout, g.hout, g.wout];
        let skip = match (&self.residual, inputs.get(1)) {
            (Some(_), Some(s)) => {
                ensure!(
                    s.shape() == plane_shape,
                    "int8 conv: residual shape {:?}, expected {plane_shape:?}",
                    s.shape()
                );
                Some((s.try_as_plain_ram()?, s.datum_type()))
            }
            (None, None) => None,
            _ => bail!("int8 conv: {} inputs", inputs.len()),
        };
        let next = match &self.handoff {
            Some(p) => Some((p, p.geo(g.hout, g.wout)?)),
            None => None,
        };
        let (out_dt, osz) = match &next {
            Some((_, gn)) => (DatumType::U8, gn.packed_len),
            None => (self.result_dt(), self.cout * g.hout * g.wout),
        };
        let oshape: TVec<usize> = match &next {
            Some(_) => tvec![n, osz],
            None => plane_shape.into(),
        };
        // SAFETY: u8/i8 plain data; run_image writes every output byte before the tensor is
        // returned: every pixel of every channel (the virtual rows are copied out in
        // full), or every byte of the next conv's packed input (`fill_unread`).
        let mut out = unsafe { Tensor::uninitialized_dt(out_dt, &oshape)? };
        {
            let x = input.try_as_plain_ram()?;
            let x = x.as_bytes();
            let mut o = out.try_as_plain_ram_mut()?;
            let o = o.as_bytes_mut();
            let psz = self.cout * g.hout * g.wout;
            for i in 0..n {
                let io = Io {
                    out: &mut o[i * osz..(i + 1) * osz],
                    skip: skip
                        .as_ref()
                        .map(|(s, dt)| (&s.as_bytes()[i * psz..(i + 1) * psz], *dt)),
                    next: next.as_ref().map(|(p, gn)| (*p, gn)),
                };
                self.run_image(&x[i * isz..(i + 1) * isz], (h, w), &g, io)?;
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl QConv {
    /// Images and their height and width from the input's shape: `[N, cin, H, W]`, or
    /// `[N, packed length]` with the size the handoff was made for.
    fn input_image<D: DimLike>(&self, shape: &[D]) -> TractResult<(D, (usize, usize))> {
        match self.prepacked {
            Some(hw) => {
                ensure!(
                    shape.len() == 2,
                    "int8 conv: packed input shape {shape:?}, expected [N, bytes]"
                );
                Ok((shape[0].clone(), hw))
            }
            None => {
                ensure!(
                    shape.len() == 4 && shape[1].to_usize().ok() == Some(self.packing.cin),
                    "int8 conv: input shape {shape:?}, expected [N, {}, H, W]",
                    self.packing.cin
                );
                Ok((
                    shape[0].clone(),
                    (shape[2].to_usize()?, shape[3].to_usize()?),
                ))
            }
        }
    }
}

impl TypedOp for QConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        if self.prepacked.is_some() || self.handoff.is_some() {
            // A handoff's sizes are concrete: fuse_handoffs makes one only then.
            let (n, (h, w)) = self.input_image(s)?;
            let g = self.geo(h, w)?;
            return Ok(tvec!(match &self.handoff {
                Some(p) => DatumType::U8.fact(tvec![n, p.geo(g.hout, g.wout)?.packed_len.to_dim()]),
                None => self.result_dt().fact(tvec![
                    n,
                    self.cout.to_dim(),
                    g.hout.to_dim(),
                    g.wout.to_dim()
                ]),
            }));
        }
        ensure!(s.rank() == 4, "int8 conv: input rank {}", s.rank());
        let dim = |d: &TDim, k: usize, s: usize, p: usize| -> TDim { (d.clone() + p - k) / s + 1 };
        let (pt, pl, pb, pr) = self.packing.pad;
        Ok(tvec!(self.result_dt().fact(tvec![
            s[0].clone(),
            self.cout.to_dim(),
            dim(&s[2], self.packing.kernel.0, self.packing.stride.0, pt + pb),
            dim(&s[3], self.packing.kernel.1, self.packing.stride.1, pl + pr),
        ])))
    }

    tract_core::as_op!();
}
