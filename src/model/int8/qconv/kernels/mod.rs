//! The inner kernels: one register block (MR output channels x up to PX vectors of
//! pixels) over every tap and C4 group, then bias, requantisation and store. The
//! portable kernel is the definition; each ISA's kernel lives in its own file and is
//! tested bit for bit against it (qconv's tests).

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "arm")]
pub(crate) mod armv7;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
pub(crate) mod portable;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use crate::model::int8::qconv::{LANES, MR, PX};

/// What one register block reads.
pub(crate) struct Tile<'a> {
    pub(crate) packed: &'a [u8],
    /// Byte offset of each tap's first read.
    pub(crate) offsets: &'a [usize],
    /// Bytes between C4 groups.
    pub(crate) cb_stride: usize,
    pub(crate) groups: usize,
    /// First output pixel.
    pub(crate) q0: usize,
    /// This block's weights: [tap][group][MR][4].
    pub(crate) w: &'a [i8],
}

impl Tile<'_> {
    /// Every read of a block of `n` vectors and `rows` output channels lies inside
    /// `packed` and `w`.
    /// (Checked arithmetic: a wrapped sum would pass. `QConv::geo` has already proved
    /// this for the op's geometry; the check stays as the wall in front of `unsafe`.)
    pub(crate) fn check(&self, n: usize, rows: usize) {
        let last = (self.groups.saturating_sub(1))
            .checked_mul(self.cb_stride)
            .and_then(|v| v.checked_add(self.offsets.iter().max().copied().unwrap_or(0)))
            .and_then(|v| {
                v.checked_add(self.q0.checked_add(n.checked_mul(LANES)?)?.checked_mul(4)?)
            });
        assert!(
            self.groups > 0 && last.is_some_and(|l| l <= self.packed.len()),
            "conv tile reads past its input"
        );
        let weights = self.offsets.len().checked_mul(self.groups * rows * 4);
        assert!(weights.is_some_and(|need| self.w.len() >= need));
    }
}

/// Per-block requantisation constants.
pub(crate) struct Epilogue<'a> {
    pub(crate) bias: &'a [i32],
    pub(crate) scales: &'a [f32],
    pub(crate) y0: i32,
    pub(crate) lo: i32,
    pub(crate) hi: i32,
}

/// Bias, requantisation and store for `lanes` pixels of MR accumulator rows.
pub(crate) fn epilogue(
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
