//! The portable kernel: the plain definition of a block, the reference the vector
//! kernels are tested against. Fused multiply-adds in the vector kernels' order, so
//! their sums are the same bits.

use crate::model::conv_geo::{LANES, PX};
use crate::model::fconv::MR;
use crate::model::fconv::kernels::{Epilogue, Tile};

/// One block of `n` vectors of pixels into `out` (MR rows `stride` apart).
pub(crate) fn block(t: &Tile, n: usize, e: &Epilogue, out: &mut [f32], stride: usize) {
    const W: usize = LANES * PX;
    let mut acc = [[0f32; W]; MR];
    let lanes = n * LANES;
    let mut wi = 0;
    for &off in t.offsets {
        for c in 0..t.channels {
            let start = off / 4 + c * t.c_stride + t.q0;
            let x = &t.packed[start..start + lanes];
            let w = &t.w[wi..wi + MR];
            wi += MR;
            for (acc, k) in acc.iter_mut().zip(w) {
                for (a, x) in acc[..lanes].iter_mut().zip(x) {
                    *a = x.mul_add(*k, *a);
                }
            }
        }
    }
    for (m, acc) in acc.iter().enumerate() {
        let at = m * stride + t.q0;
        for (l, (o, a)) in out[at..at + lanes].iter_mut().zip(acc).enumerate() {
            *o = e.apply(m, at + l, *a);
        }
    }
}
