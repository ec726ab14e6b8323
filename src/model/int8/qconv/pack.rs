//! Packing helpers: four input channels interleaved into one C4 group, the layout every
//! kernel reads (the four bytes one `vpdpbusd` or `sdot` lane reduces).

/// `dst[4i + j] = src[j][first + i * step] ^ flip` for the `n` pixels `i < n`: four
/// channels interleaved into C4. `step` is a conv's stride (1 and 2 take the vector
/// path). The sources may run past the pixels wanted (the rest of the channel's plane):
/// vector loads then read ahead instead of gathering the row's tail byte by byte, which
/// is most of a 7- or 14-pixel row; only the plane's last pixels are gathered.
///
/// `dst` may be longer than the `4n` bytes wanted: a run of 16 pixels is then stored
/// whole where `dst` has room for it, writing up to 60 bytes of other pixels past the
/// `n` (the caller rewrites them: `Packing::pack`). A row's last run through a buffer and a copy was most of packing's time on ResNet-50's
/// 28-, 14- and 7-pixel rows.
#[inline]
pub(crate) fn interleave(
    src: &[&[u8]; 4],
    first: usize,
    step: usize,
    flip: u8,
    n: usize,
    dst: &mut [u8],
) {
    let s: [&[u8]; 4] = four(|j| src[j].get(first..).unwrap_or(&[]));
    if step > 2 {
        for (i, o) in dst[..n * 4].chunks_exact_mut(4).enumerate() {
            let x = i * step;
            o.copy_from_slice(&[
                s[0][x] ^ flip,
                s[1][x] ^ flip,
                s[2][x] ^ flip,
                s[3][x] ^ flip,
            ]);
        }
        return;
    }
    let have = s.iter().map(|s| s.len()).min().unwrap_or(0);
    let mut done = 0;
    while done < n {
        let left = (n - done).min(16);
        let at = done * step;
        let room = dst.len() - done * 4;
        if at + 16 * step <= have {
            let run: [&[u8]; 4] = four(|j| &s[j][at..at + 16 * step]);
            if room >= 64 {
                let out = &mut dst[done * 4..done * 4 + 64];
                run16(&run, step, flip, out.try_into().expect("64 bytes"));
            } else {
                let mut full = [0u8; 64];
                run16(&run, step, flip, &mut full);
                dst[done * 4..(done + left) * 4].copy_from_slice(&full[..left * 4]);
            }
        } else {
            let mut tail = [[0u8; 16]; 4];
            for (t, s) in tail.iter_mut().zip(&s) {
                for (i, v) in t[..left].iter_mut().enumerate() {
                    *v = s[at + i * step];
                }
            }
            let mut full = [0u8; 64];
            run16(&tail.each_ref().map(|t| &t[..]), 1, flip, &mut full);
            dst[done * 4..(done + left) * 4].copy_from_slice(&full[..left * 4]);
        }
        done += left;
    }
}

/// `[f(0), f(1), f(2), f(3)]`, always inlined: `std::array::from_fn` was left a call per
/// element in a row loop (about 2 % of a Pi 5's ResNet-50 and of a Zen 4's, measured by
/// tools/arm_model.py and perf).
#[inline(always)]
pub(crate) fn four<T>(f: impl Fn(usize) -> T) -> [T; 4] {
    [f(0), f(1), f(2), f(3)]
}

/// 16 pixels of four channels (`16 * step` bytes each, every `step`-th taken) into 64
/// interleaved bytes. SSE2 is part of x86-64 and NEON of aarch64: no run-time check.
#[inline]
fn run16(s: &[&[u8]; 4], step: usize, flip: u8, out: &mut [u8; 64]) {
    assert!(s.iter().all(|s| s.len() >= 16 * step) && (step == 1 || step == 2));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: each source holds `16 * step` bytes (asserted), `out` 64.
    unsafe {
        use std::arch::x86_64::*;
        let f = _mm_set1_epi8(flip as i8);
        let ld = |j: usize| {
            let p = s[j].as_ptr() as *const __m128i;
            let v = if step == 1 {
                _mm_loadu_si128(p)
            } else {
                // The even bytes of 32: the low byte of each 16-bit lane, packed.
                let m = _mm_set1_epi16(0xff);
                let (lo, hi) = (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)));
                _mm_packus_epi16(_mm_and_si128(lo, m), _mm_and_si128(hi, m))
            };
            _mm_xor_si128(v, f)
        };
        let (a, b, c, d) = (ld(0), ld(1), ld(2), ld(3));
        let (ab_lo, ab_hi) = (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b));
        let (cd_lo, cd_hi) = (_mm_unpacklo_epi8(c, d), _mm_unpackhi_epi8(c, d));
        let p = out.as_mut_ptr() as *mut __m128i;
        _mm_storeu_si128(p, _mm_unpacklo_epi16(ab_lo, cd_lo));
        _mm_storeu_si128(p.add(1), _mm_unpackhi_epi16(ab_lo, cd_lo));
        _mm_storeu_si128(p.add(2), _mm_unpacklo_epi16(ab_hi, cd_hi));
        _mm_storeu_si128(p.add(3), _mm_unpackhi_epi16(ab_hi, cd_hi));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: each source holds `16 * step` bytes (asserted), `out` 64.
    unsafe {
        use std::arch::aarch64::*;
        let f = vdupq_n_u8(flip);
        let ld = |j: usize| {
            let p = s[j].as_ptr();
            let v = if step == 1 {
                vld1q_u8(p)
            } else {
                vld2q_u8(p).0
            };
            veorq_u8(v, f)
        };
        vst4q_u8(out.as_mut_ptr(), uint8x16x4_t(ld(0), ld(1), ld(2), ld(3)));
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    for (i, o) in out.chunks_exact_mut(4).enumerate() {
        o.copy_from_slice(&[0, 1, 2, 3].map(|j| s[j][i * step] ^ flip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector runs and the byte tail against the definition, every length around a
    /// run's edge, both flips, both steps.
    #[test]
    fn interleave_matches_its_definition() {
        let planes: Vec<Vec<u8>> = (0..4u8)
            .map(|j| (0..200u32).map(|i| (i * 7 + j as u32 * 61) as u8).collect())
            .collect();
        let src: [&[u8]; 4] = four(|j| &planes[j][..]);
        for step in [1, 2, 3] {
            for flip in [0, 0x80] {
                for first in [0, 3] {
                    for n in [0usize, 1, 15, 16, 17, 31, 32, 33, 48, 63, 64] {
                        if first + n.saturating_sub(1) * step >= 200 {
                            continue;
                        }
                        let mut got = vec![0u8; n * 4];
                        interleave(&src, first, step, flip, n, &mut got);
                        // The same pixels from sources cut just after the last one.
                        let end = first + n.saturating_sub(1) * step + 1;
                        let cut: [&[u8]; 4] = four(|j| &src[j][..end]);
                        let mut short = vec![0u8; n * 4];
                        interleave(&cut, first, step, flip, n, &mut short);
                        assert_eq!(got, short, "cut sources: step {step} n {n}");
                        // With room after the pixels: the same pixels, and nothing
                        // written more than 60 bytes past them.
                        for room in [1, 40, 64, 70] {
                            let mut long = vec![0x5a_u8; n * 4 + room];
                            interleave(&src, first, step, flip, n, &mut long);
                            assert_eq!(long[..n * 4], got[..], "room {room}: step {step} n {n}");
                            let untouched = &long[(n * 4 + 60).min(long.len())..];
                            assert!(untouched.iter().all(|b| *b == 0x5a), "room {room}");
                        }
                        let want: Vec<u8> = (0..n)
                            .flat_map(|i| (0..4).map(move |j| (i, j)))
                            .map(|(i, j)| src[j][first + i * step] ^ flip)
                            .collect();
                        assert_eq!(got, want, "step {step} flip {flip} first {first} n {n}");
                    }
                }
            }
        }
    }
}
