//! The inner kernels: one register block (MR output channels x up to PX vectors of 16
//! pixels) over every tap and input channel, then the bias and the clamp. The portable
//! kernel is the definition; the AVX-512 one is tested bit for bit against it (both
//! accumulate in the same order with fused multiply-adds).

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub(crate) mod portable;

use crate::model::conv_geo::LANES;
use crate::model::fconv::MR;

/// What one register block reads.
pub(crate) struct Tile<'a> {
    pub(crate) packed: &'a [f32],
    /// Byte offset of each tap's first read (the geometry's, shared with the int8 conv:
    /// a multiple of 4).
    pub(crate) offsets: &'a [usize],
    /// Floats between input channels.
    pub(crate) c_stride: usize,
    pub(crate) channels: usize,
    /// First output pixel.
    pub(crate) q0: usize,
    /// This block's weights: [tap][channel][MR].
    pub(crate) w: &'a [f32],
}

impl Tile<'_> {
    /// Every read of a block of `n` vectors lies inside `packed` and `w`.
    /// (Checked arithmetic: a wrapped sum would pass. `FConv::geo` has already proved
    /// this for the op's geometry; the check stays as the wall in front of `unsafe`.)
    // Only the vector kernels need the check: x86's (elsewhere the portable kernel's
    // slices are bounds-checked).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn check(&self, n: usize) {
        let last = (self.channels.saturating_sub(1))
            .checked_mul(self.c_stride)
            .and_then(|v| v.checked_add(self.offsets.iter().max().copied().unwrap_or(0) / 4))
            .and_then(|v| v.checked_add(self.q0.checked_add(n.checked_mul(LANES)?)?));
        assert!(
            self.channels > 0 && last.is_some_and(|l| l <= self.packed.len()),
            "f32 conv tile reads past its input"
        );
        let weights = self.offsets.len().checked_mul(self.channels * MR);
        assert!(weights.is_some_and(|need| self.w.len() >= need));
    }
}

/// Per-block constants of the epilogue: `clamp(acc + bias + skip, lo, hi)`.
pub(crate) struct Epilogue<'a> {
    pub(crate) bias: &'a [f32],
    /// The residual add's operand for the block's rows, laid out as its output (MR rows
    /// `stride` apart), when the kernel writes the op's output itself.
    pub(crate) skip: Option<&'a [f32]>,
    pub(crate) clamp: Option<(f32, f32)>,
}

impl Epilogue<'_> {
    /// One output, of row `m` at `at` in the block's rows: the bias, the skip, then the
    /// clamp as `f32::max` / `f32::min` (a NaN becomes the bound, as with tract's ops
    /// and `_mm512_max_ps(v, lo)`).
    #[inline(always)]
    pub(crate) fn apply(&self, m: usize, at: usize, acc: f32) -> f32 {
        let mut v = acc + self.bias[m];
        if let Some(skip) = self.skip {
            v += skip[at];
        }
        match self.clamp {
            Some((lo, hi)) => v.max(lo).min(hi),
            None => v,
        }
    }
}
