//! Packing helpers: four input channels interleaved into one C4 group, the layout every
//! kernel reads (the four bytes one `vpdpbusd` or `sdot` lane reduces).

/// `dst[4i + j] = src[j][first + i * step] ^ flip`: four channels interleaved into C4.
#[inline]
pub(crate) fn interleave(src: &[&[u8]; 4], first: usize, step: usize, flip: u8, dst: &mut [u8]) {
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
