//! The geometry both of edgesight's own convolutions share (the int8 one in
//! `int8::qconv`, the f32 one in `fconv`): an "implicit GEMM" over a padded image laid
//! out flat, so that every kernel tap of a stride-1 conv reads a *contiguous* run of
//! pixels. Output pixel `q` reads input pixel `q + offset(tap)`; the few outputs that
//! wrap around a row edge are computed and thrown away. Strided convs are split into
//! stride x stride phase images, each of which is then read like a stride-1 image.
//!
//! Every pixel slot is 4 bytes: a C4 group of int8 channels, or one f32. Offsets and
//! lengths below are in bytes.

use tract_core::internal::*;

use crate::model::threads::par_chunks;

/// Output pixels per vector (i32 or f32 lanes of a 512-bit register): the computed
/// pixels are a multiple of it.
pub(crate) const LANES: usize = 16;
/// Vectors of pixels per register block at most: the read-ahead the packed image allows.
pub(crate) const PX: usize = 3;

/// A 2-D convolution's attributes (NCHW, one group, no dilation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Conv2d {
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) kernel: (usize, usize),
    pub(crate) stride: (usize, usize),
    /// (top, left, bottom, right).
    pub(crate) pad: (usize, usize, usize, usize),
}

/// The geometry of one evaluation, from the input's height and width.
pub(crate) struct Geo {
    pub(crate) hout: usize,
    pub(crate) wout: usize,
    /// Width of every phase image (and of the "virtual" output rows).
    pub(crate) wq: usize,
    /// Rows of every phase image.
    pub(crate) rows: usize,
    /// Pixels of one channel group of one phase image (rows * wq plus read-ahead).
    pub(crate) plane: usize,
    /// Output pixels computed, a multiple of LANES (hout * wq rounded up).
    pub(crate) q: usize,
    /// Bytes of the packed input (every phase image, every channel group).
    pub(crate) packed_len: usize,
    /// Elements of the virtual output (every output row of every block, q pixels each).
    pub(crate) vout_len: usize,
    /// Where each tap reads, as a byte offset into the phase images laid end to end
    /// (phase-major, then channel group).
    pub(crate) offsets: Vec<usize>,
}

impl Geo {
    /// Where the virtual pixels that hold outputs end: the last row's last output. The
    /// kernels' tails stop there instead of computing a whole last vector.
    pub(crate) fn outputs_end(&self) -> usize {
        (self.hout - 1) * self.wq + self.wout
    }

    /// The geometry of the same conv with each tap's reads gathered into planes of their
    /// own (im2col, `gather`): tap-major, then channel group, each plane holding the
    /// output pixels only, row after row. The kernel reads it as a 1x1 conv with `taps`
    /// times the groups, and computes no virtual pixel that is not an output: on a 7x7
    /// map a 3x3 conv's virtual rows are 9 wide, 64 lanes for 49 outputs.
    pub(crate) fn gathered(&self, groups: usize) -> TractResult<Geo> {
        let outputs = ck(self.hout.checked_mul(self.wout))?;
        let q = outputs.div_ceil(LANES) * LANES;
        // Every tile of pixels ends at q at most, so no read-ahead is needed.
        let plane = q;
        let region = ck(plane.checked_mul(4))?;
        let taps = self.offsets.len();
        let packed_len = ck(taps.checked_mul(groups).and_then(|v| v.checked_mul(region)))?;
        let vout_rows = self.vout_len / self.q;
        let offsets = (0..taps).map(|t| t * groups * region).collect();
        Ok(Geo {
            hout: self.hout,
            wout: self.wout,
            wq: self.wout,
            rows: self.hout,
            plane,
            q,
            packed_len,
            vout_len: ck(vout_rows.checked_mul(q))?,
            offsets,
        })
    }

    /// Gather `packed` (laid out by this geometry, `groups` C4 groups) into `out` as
    /// [`Geo::gathered`] lays it out (`to`), one (tap, group) plane at a time over the
    /// model's pool. Bytes past each plane's outputs are left as they are: they only feed
    /// lanes whose sums are thrown away.
    pub(crate) fn gather(&self, packed: &[u8], groups: usize, to: &Geo, out: &mut [u8]) {
        let run = self.wout * 4;
        par_chunks(&mut out[..to.packed_len], to.plane * 4, |(k, plane)| {
            let (tap, group) = (k / groups, k % groups);
            let from = self.offsets[tap] + group * self.plane * 4;
            for (y, dst) in plane.chunks_exact_mut(run).take(self.hout).enumerate() {
                let at = from + y * self.wq * 4;
                dst.copy_from_slice(&packed[at..at + run]);
            }
        });
    }
}

/// Scratch space a conv reuses across frames (one per thread): the packed input and the
/// virtual output, grown to the largest conv seen and never shrunk.
pub(crate) struct Scratch<T> {
    buf: Vec<T>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Scratch { buf: Vec::new() }
    }
}

impl<T: Copy + Default> Scratch<T> {
    /// Two slices of `a` and `b` elements.
    pub(crate) fn split(&mut self, a: usize, b: usize) -> (&mut [T], &mut [T]) {
        if self.buf.len() < a + b {
            self.buf.resize(a + b, T::default());
        }
        let (x, y) = self.buf.split_at_mut(a);
        (x, &mut y[..b])
    }

    /// Every element set to `v` (tests: see `qconv::op::poison_scratch`).
    #[cfg(test)]
    pub(crate) fn fill(&mut self, v: T) {
        self.buf.fill(v);
    }
}

/// Every size below comes from a model's attributes: computed with checked arithmetic,
/// since release builds wrap and a wrapped offset would pass the bounds check.
fn ck(v: Option<usize>) -> TractResult<usize> {
    v.ok_or_else(|| format_err!("convolution geometry overflows"))
}

impl Conv2d {
    fn taps(&self) -> usize {
        self.kernel.0 * self.kernel.1
    }

    /// The geometry for an `h` x `w` input packed in `groups` channel groups, the kernel
    /// writing `vout_rows` virtual output rows, checked: no size overflows, no dimension
    /// is zero, and the furthest read of the last block of pixels lies inside the packed
    /// input — the bound the SIMD kernels rely on (their `Tile::check` asserts it again).
    pub(crate) fn geometry(
        &self,
        groups: usize,
        vout_rows: Option<usize>,
        h: usize,
        w: usize,
    ) -> TractResult<Geo> {
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (pt, pl, pb, pr) = self.pad;
        ensure!(
            self.cin > 0 && self.cout > 0 && kh > 0 && kw > 0 && sh > 0 && sw > 0,
            "convolution: zero channels, kernel side or stride"
        );
        ensure!(h > 0 && w > 0, "convolution: empty input {h}x{w}");
        let hp = ck(h.checked_add(pt).and_then(|v| v.checked_add(pb)))?;
        let wp = ck(w.checked_add(pl).and_then(|v| v.checked_add(pr)))?;
        ensure!(
            hp >= kh && wp >= kw,
            "convolution: input {h}x{w} smaller than its kernel"
        );
        let (hout, wout) = ((hp - kh) / sh + 1, (wp - kw) / sw + 1);
        let wq = wp.div_ceil(sw);
        let rows = hout + (kh - 1) / sh + 1;
        let q = ck(hout.checked_mul(wq).map(|v| v.div_ceil(LANES) * LANES))?;
        // Reads run up to q + the largest tap offset; one extra row and a vector of slack.
        let plane = ck(rows.checked_mul(wq).and_then(|v| v.checked_add(LANES * PX)))?;
        let phase_len = ck(groups.checked_mul(plane))?;
        let packed_len = ck(sh
            .checked_mul(sw)
            .and_then(|v| v.checked_mul(phase_len))
            .and_then(|v| v.checked_mul(4)))?;
        let vout_len = ck(vout_rows.and_then(|v| v.checked_mul(q)))?;
        let mut offsets = Vec::with_capacity(self.taps());
        for ky in 0..kh {
            for kx in 0..kw {
                let phase = (ky % sh) * sw + kx % sw;
                let at = (ky / sh)
                    .checked_mul(wq)
                    .and_then(|v| v.checked_add(kx / sw))
                    .and_then(|v| v.checked_add(phase.checked_mul(phase_len)?))
                    .and_then(|v| v.checked_mul(4));
                offsets.push(ck(at)?);
            }
        }
        let furthest = offsets.iter().max().copied().unwrap_or(0);
        let last_read = (groups.saturating_sub(1))
            .checked_mul(plane * 4)
            .and_then(|v| v.checked_add(furthest))
            .and_then(|v| v.checked_add(q.checked_mul(4)?));
        let last_read = ck(last_read)?;
        ensure!(
            groups > 0 && last_read <= packed_len,
            "convolution: reads reach byte {last_read} of a {packed_len}-byte input"
        );
        Ok(Geo {
            hout,
            wout,
            wq,
            rows,
            plane,
            q,
            packed_len,
            vout_len,
            offsets,
        })
    }
}

/// A 2-D pool spec's strides (height, width) and padding (top, left, bottom, right) for
/// an `hw` input: what our conv and pool ops keep of tract's `PoolSpec`.
pub(crate) fn strides_and_pads(
    ps: &tract_core::ops::cnn::PoolSpec,
    hw: &[usize; 2],
) -> ((usize, usize), (usize, usize, usize, usize)) {
    let pads = ps.computed_padding(hw);
    let strides = ps.strides();
    (
        (strides[0], strides[1]),
        (
            pads[0].pad_before,
            pads[1].pad_before,
            pads[0].pad_after,
            pads[1].pad_after,
        ),
    )
}
