//! The portable kernel: the plain definition of a block, the reference the vector
//! kernels are tested against.

use crate::model::int8::qconv::kernels::{Epilogue, Tile, epilogue};
use crate::model::int8::qconv::{LANES, MR, PX};

/// One block of `n` vectors of pixels.
pub(crate) fn block(t: &Tile, n: usize, e: &Epilogue, out: &mut [u8], stride: usize) {
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
