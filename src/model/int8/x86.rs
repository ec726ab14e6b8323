//! The residual adds on x86, written out: AVX-512 16 elements a step, AVX2 8.
//!
//! Why by hand: the compiler vectorises `add_loop` well, but keeps Rust's NaN rules for
//! `max` and `min` (a compare and a blend each, three times) and rounds with `quantize`'s
//! five operations. ResNet-50's sixteen adds, fused into their convs, took ~2 ms of a
//! 27 ms frame on a Zen 4, about 1.3 cycles an element, and 3.4 ms of 65 on a Zen 3
//! (AVX2; onnxruntime's adds took 1.1). Here the clamp comes before the rounding, which
//! is one conversion, as in the conv kernels' epilogue.
//!
//! Exactness: the same IEEE operations as `add_loop` in its order, up to the sum `v` to
//! quantise; then `quantize(v)` as clamp-then-round, the same integers since the bounds
//! are integers. NaN is where the two could part (x86's `max` returns its second operand
//! for a NaN, Rust's the other one); [`ordinary`] admits only constants under which no
//! value on the way can be NaN, and the scalar loop takes the rest.

use std::arch::x86_64::*;

use crate::model::int8::{AddConsts, Byte};

/// Whether no value of `add_loop` can be NaN for any two 8-bit inputs: finite scales small
/// enough that neither product nor their sum overflows, a floor that is not NaN, a finite
/// reciprocal and a finite, non-zero divisor (so neither 0 x inf nor 0 / 0 arises), and
/// zero point and bounds that are integers inside -128..=255 (`lo - zp` and `hi - zp`
/// exact).
pub(crate) fn ordinary(c: &AddConsts) -> bool {
    let scale = |s: f32| s.is_finite() && s.abs() <= 1e30;
    let byte = |v: f32| v.fract() == 0.0 && (-128.0..=255.0).contains(&v);
    let point = |z: i32| (-128..=255).contains(&z);
    scale(c.a_scale)
        && scale(c.b_scale)
        && !c.floor.is_nan()
        && c.inv.is_finite()
        && c.s.is_finite()
        && c.s != 0.0
        && point(c.a_zero_point)
        && point(c.b_zero_point)
        && byte(c.zp)
        && byte(c.lo)
        && byte(c.hi)
}

/// `add_loop` over the first whole sixteens of `o`; returns how many elements it wrote,
/// for the scalar loop to finish. 0 where the constants are not [`ordinary`].
///
/// # Safety
/// The CPU has AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn add<A: Byte, B: Byte, T: Byte, const DIV: bool>(
    a: &[A],
    b: &[B],
    o: &mut [T],
    c: &AddConsts,
) -> usize {
    if !ordinary(c) {
        return 0;
    }
    let k = Add16::new(c);
    let n = o.len().min(a.len()).min(b.len()) / 16 * 16;
    for i in (0..n).step_by(16) {
        // SAFETY: 16 elements from i < n, inside every slice (n is the shortest's,
        // rounded down to a multiple of 16).
        let (x, y) = unsafe { (widen(a.as_ptr().add(i)), widen(b.as_ptr().add(i))) };
        let q = _mm512_cvtepi32_epi8(k.add::<DIV>(x, y));
        // SAFETY: as the loads above; each lane's low byte is u8 or i8's byte.
        unsafe { _mm_storeu_si128(o.as_mut_ptr().add(i) as *mut __m128i, q) };
    }
    n
}

/// A [`QuantizedAdd`](super::QuantizedAdd)'s constants in AVX-512 registers, for 16
/// elements at a time: the loop above, and the VNNI conv kernel that adds as it
/// requantises (`qconv::kernels::x86`).
#[derive(Clone, Copy)]
pub(crate) struct Add16 {
    za: __m512i,
    zb: __m512i,
    sa: __m512,
    sb: __m512,
    floor: __m512,
    inv: __m512,
    s: __m512,
    lo: __m512,
    hi: __m512,
    zp: __m512i,
}

impl Add16 {
    /// The constants of an add: [`ordinary`] ones (others can meet a NaN, where x86's
    /// `max` and Rust's part).
    #[target_feature(enable = "avx512f")]
    pub(crate) fn new(c: &AddConsts) -> Add16 {
        let set = _mm512_set1_ps;
        Add16 {
            za: _mm512_set1_epi32(c.a_zero_point),
            zb: _mm512_set1_epi32(c.b_zero_point),
            sa: set(c.a_scale),
            sb: set(c.b_scale),
            floor: set(c.floor),
            inv: set(c.inv),
            s: set(c.s),
            // `quantize`'s clamp to [lo, hi] after adding the zero point, moved before it.
            lo: set(c.lo - c.zp),
            hi: set(c.hi - c.zp),
            zp: _mm512_set1_epi32(c.zp as i32),
        }
    }

    /// The sums of 16 pairs of elements (as i32 lanes), each lane's low byte the output's.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn add<const DIV: bool>(&self, x: __m512i, y: __m512i) -> __m512i {
        let fa = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(x, self.za)), self.sa);
        let fb = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(y, self.zb)), self.sb);
        let v = _mm512_mul_ps(_mm512_max_ps(_mm512_add_ps(fa, fb), self.floor), self.inv);
        let v = if DIV { _mm512_div_ps(v, self.s) } else { v };
        let v = _mm512_min_ps(_mm512_max_ps(v, self.lo), self.hi);
        // Ties to even, whatever the MXCSR says.
        let q = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        _mm512_add_epi32(q, self.zp)
    }
}

/// `quantize_all` over the first whole sixteens of `x`: `x / s` (`DIV`) or `x * s`, then
/// `quantize` into `lo..=hi` around the zero point `zp`, as bytes. Returns how many it
/// wrote, for the scalar loop to finish; 0 unless `zp`, `lo` and `hi` are integers in
/// -128..=255. The clamp comes before the rounding, as in [`add`]: the same integers,
/// NaN included (below). The compiler's loop, called through `widest`, stayed on SSE (4
/// lanes a step): 0.37 ms of ResNet-50's 25 on a Zen 4, for its 150 528 input values.
///
/// # Safety
/// The CPU has AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn quantize<const DIV: bool>(
    x: &[f32],
    o: &mut [u8],
    s: f32,
    (zp, lo, hi): (f32, f32, f32),
) -> usize {
    let byte = |v: f32| v.fract() == 0.0 && (-128.0..=255.0).contains(&v);
    if !(byte(zp) && byte(lo) && byte(hi)) {
        return 0;
    }
    let n = x.len().min(o.len()) / 16 * 16;
    let k = _mm512_set1_ps(s);
    let (l, h) = (_mm512_set1_ps(lo - zp), _mm512_set1_ps(hi - zp));
    let z = _mm512_set1_epi32(zp as i32);
    for i in (0..n).step_by(16) {
        // SAFETY: 16 elements from i < n, inside both slices.
        let v = unsafe { _mm512_loadu_ps(x.as_ptr().add(i)) };
        let v = if DIV {
            _mm512_div_ps(v, k)
        } else {
            _mm512_mul_ps(v, k)
        };
        // `quantize` rounds a NaN to 2^23 with the NaN's sign (its `min` keeps the
        // bound), which the clamp then takes to `hi` or `lo`; `_mm512_max_ps` would give
        // `lo` for both.
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
        let big = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_set1_epi32(0x4b00_0000)));
        let v = _mm512_mask_mov_ps(v, nan, big);
        let v = _mm512_min_ps(_mm512_max_ps(v, l), h);
        // Ties to even, whatever the MXCSR says.
        let q = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        let q = _mm512_cvtepi32_epi8(_mm512_add_epi32(q, z));
        // SAFETY: as the load; each lane's low byte is u8 or i8's byte.
        unsafe { _mm_storeu_si128(o.as_mut_ptr().add(i) as *mut __m128i, q) };
    }
    n
}

/// [`add`] on AVX2, eight elements a step: the same operations in 256-bit registers, so
/// the same bytes.
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn add_avx2<A: Byte, B: Byte, T: Byte, const DIV: bool>(
    a: &[A],
    b: &[B],
    o: &mut [T],
    c: &AddConsts,
) -> usize {
    if !ordinary(c) {
        return 0;
    }
    let n = o.len().min(a.len()).min(b.len()) / 8 * 8;
    let set = _mm256_set1_ps;
    let (za, zb) = (
        _mm256_set1_epi32(c.a_zero_point),
        _mm256_set1_epi32(c.b_zero_point),
    );
    let (sa, sb, floor, inv, s) = (
        set(c.a_scale),
        set(c.b_scale),
        set(c.floor),
        set(c.inv),
        set(c.s),
    );
    let (lo, hi) = (set(c.lo - c.zp), set(c.hi - c.zp));
    let zp = _mm256_set1_epi32(c.zp as i32);
    for i in (0..n).step_by(8) {
        // SAFETY: 8 elements from i < n, inside every slice (n is the shortest's, rounded
        // down to a multiple of 8).
        let (x, y) = unsafe { (widen8(a.as_ptr().add(i)), widen8(b.as_ptr().add(i))) };
        let fa = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(x, za)), sa);
        let fb = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(y, zb)), sb);
        let v = _mm256_mul_ps(_mm256_max_ps(_mm256_add_ps(fa, fb), floor), inv);
        let v = if DIV { _mm256_div_ps(v, s) } else { v };
        let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        // Ties to even, whatever the MXCSR says; the integer then converts exactly.
        let v = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        let q = _mm256_add_epi32(_mm256_cvttps_epi32(v), zp);
        // SAFETY: as the loads above; each lane's low byte is u8 or i8's byte.
        unsafe { _mm_storel_epi64(o.as_mut_ptr().add(i) as *mut __m128i, low_bytes(q)) };
    }
    n
}

/// The low byte of each of the eight i32 lanes of `q`, in order, in the low 8 bytes: what
/// the AVX2 adds and the AVX2 conv kernel's epilogue store (u8, or i8's two's complement).
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn low_bytes(q: __m256i) -> __m128i {
    // Each lane's low byte to the bottom of its 128-bit half, then the halves' four bytes
    // side by side.
    let low = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, //
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    );
    let halves = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
    _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(
        _mm256_shuffle_epi8(q, low),
        halves,
    ))
}

/// Eight 8-bit elements at `p` as i32 lanes, by their type's sign.
///
/// # Safety
/// The CPU has AVX2; `p` is valid for 8 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn widen8<T: Byte>(p: *const T) -> __m256i {
    // SAFETY: the caller's 8 bytes.
    let v = unsafe { _mm_loadl_epi64(p as *const __m128i) };
    if T::SIGNED {
        _mm256_cvtepi8_epi32(v)
    } else {
        _mm256_cvtepu8_epi32(v)
    }
}

/// Sixteen 8-bit elements at `p` as i32 lanes, by their type's sign.
///
/// # Safety
/// The CPU has AVX-512 F; `p` is valid for 16 bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn widen<T: Byte>(p: *const T) -> __m512i {
    // SAFETY: the caller's 16 bytes.
    widen_bytes(unsafe { _mm_loadu_si128(p as *const __m128i) }, T::SIGNED)
}

/// Sixteen bytes as i32 lanes, as i8s if `signed`, else as u8s.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn widen_bytes(v: __m128i, signed: bool) -> __m512i {
    if signed {
        _mm512_cvtepi8_epi32(v)
    } else {
        _mm512_cvtepu8_epi32(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The written-out quantiser against `quantize`, element by element: ties, both
    /// signs, saturation, values past 2^23 and 2^31, infinities and NaN, dividing and
    /// multiplying, into u8 and i8 around several zero points.
    #[test]
    fn the_written_out_quantiser_gives_quantizes_bytes() {
        if !crate::model::cpu::x86_avx512bw() {
            println!("no AVX-512 here: nothing to check");
            return;
        }
        let mut xs = vec![
            0.0f32,
            -0.0,
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            127.5,
            128.5,
            -128.5,
            300.0,
            -300.0,
            2e9,
            -2e9,
            8388609.0,
            -8388609.0,
            0.49999997,
            3e38,
            -3e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1e-40,
        ];
        xs.extend((0..500).map(|i| (i as f32 * 0.37).sin() * 200.0));
        for (lo, hi, zps) in [
            (0.0, 255.0, [0, 3, 128, 255]),
            (-128.0, 127.0, [-128, -3, 0, 127]),
        ] {
            for zp in zps.map(|z| z as f32) {
                for (s, div) in [(0.7f32, true), (1.0 / 0.7, false), (0.013, true)] {
                    let mut got = vec![0u8; xs.len()];
                    // SAFETY: AVX-512 F and BW, checked above.
                    let done = unsafe {
                        match div {
                            true => quantize::<true>(&xs, &mut got, s, (zp, lo, hi)),
                            false => quantize::<false>(&xs, &mut got, s, (zp, lo, hi)),
                        }
                    };
                    assert_eq!(done, xs.len() / 16 * 16);
                    for (i, x) in xs[..done].iter().enumerate() {
                        let v = if div { x / s } else { x * s };
                        let want = crate::model::int8::quantize(v, zp, lo, hi) as u8;
                        assert_eq!(got[i], want, "{x} s {s} zp {zp} [{lo}, {hi}]");
                    }
                }
            }
        }
    }

    /// The written-out loop takes only constants under which no NaN can arise (where
    /// x86's `max` and Rust's part); a model's usual ones are among them.
    #[test]
    fn only_constants_without_nan_take_the_written_out_loop() {
        let usual = AddConsts {
            a_zero_point: 128,
            a_scale: 0.02,
            b_zero_point: 0,
            b_scale: 0.3,
            floor: f32::NEG_INFINITY,
            inv: 1.0,
            s: 0.05,
            zp: 3.0,
            lo: 0.0,
            hi: 255.0,
        };
        assert!(ordinary(&usual));
        assert!(ordinary(&AddConsts {
            floor: 0.0,
            lo: -128.0,
            hi: 127.0,
            ..usual
        }));
        let refused = [
            AddConsts {
                floor: f32::NAN,
                ..usual
            },
            AddConsts {
                a_scale: f32::INFINITY,
                ..usual
            },
            AddConsts {
                b_scale: 3e38,
                ..usual
            },
            AddConsts {
                b_scale: f32::NAN,
                ..usual
            },
            AddConsts {
                inv: f32::INFINITY,
                ..usual
            },
            AddConsts { s: 0.0, ..usual },
            AddConsts {
                s: f32::NAN,
                ..usual
            },
            AddConsts { zp: 0.5, ..usual },
            AddConsts { hi: 300.0, ..usual },
            AddConsts {
                a_zero_point: 256,
                ..usual
            },
        ];
        for (i, c) in refused.iter().enumerate() {
            assert!(!ordinary(c), "case {i}");
        }
    }
}
