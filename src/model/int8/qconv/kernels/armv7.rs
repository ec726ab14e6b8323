//! The 32-bit ARM NEON kernel (armv7: 32-bit Raspberry Pi OS on a Pi 2-5): `vmull.s8`
//! + `vpadal.s16`, i8 x i8, the same arithmetic as aarch64's `neon::block_mull`.
//!
//! Inline assembly, not intrinsics: Rust's `core::arch::arm` NEON intrinsics and the
//! `neon` target feature are unstable, and the armv7 target does not assume NEON (a
//! VFPv3-D16 core has none), so it is found at run time (`has_neon`) and the assembly
//! declares `.fpu neon` itself.
//!
//! Registers: the accumulators live in q8-q15 (d16-d31). The target is built for
//! VFPv3-D16, so the compiler never allocates d16-d31 (and the ARM procedure call
//! standard makes them caller-saved): they are free here and cannot be named as
//! operands. d0-d7 are declared as clobbers.

use crate::model::int8::qconv::kernels::{Epilogue, Tile, epilogue};
use crate::model::int8::qconv::{LANES, MR, PX};
use std::arch::asm;

/// `HWCAP_NEON` of Linux's arch/arm/include/uapi/asm/hwcap.h.
const HWCAP_NEON: libc::c_ulong = 1 << 12;

/// Whether this CPU has NEON (Advanced SIMD), as the kernel reports it.
pub(crate) fn has_neon() -> bool {
    // SAFETY: getauxval only reads the auxiliary vector; AT_HWCAP is always present.
    unsafe { libc::getauxval(libc::AT_HWCAP) & HWCAP_NEON != 0 }
}

/// Bytes between two output rows of `sums` below.
const ROW_BYTES: usize = LANES * PX * 4;

/// MR channels x `n` vectors of 16 pixels: blocks of 4 channels x 4 pixels, every tap
/// and group each, in the assembly loop below.
///
/// # Safety
/// The CPU must have NEON (`has_neon`), and `t.check(n, MR)` must hold.
pub unsafe fn block(t: &Tile, n: usize, e: &Epilogue, out: &mut [u8], stride: usize) {
    assert!(!t.offsets.is_empty(), "a conv has at least one tap");
    let mut sums = [[0i32; LANES * PX]; MR];
    for px0 in (0..n * LANES).step_by(4) {
        for half in 0..2 {
            // SAFETY: Tile::check bounds every read (16 bytes per group and tap from
            // `packed`, 4 channels' weights of each MR-row group from `w`); the stores
            // are four rows of `sums` at px0..px0 + 4 <= n * LANES.
            unsafe { quad(t, px0, half, sums[half * 4][px0..].as_mut_ptr()) };
        }
    }
    epilogue(&sums, n * LANES, e, &mut out[t.q0..], stride);
}

/// Channels `half * 4 ..+ 4` of the block x pixels `px0 ..+ 4`: their sums over every
/// tap and group, stored as four i32s at `dst` and at three further rows of `sums`.
///
/// Per group: 16 activation bytes (4 pixels x 4 channels) in d0-d1; each channel's four
/// weights loaded into both halves of d4; `vmull.s8` gives 16 exact i16 products
/// (|-128 x -128| < 2^15) and `vpadal.s16` adds adjacent pairs into four i32s per
/// register, which leaves two partial sums per pixel, folded by `vpadd` at the end.
///
/// # Safety
/// NEON; the reads described by `Tile::check` for `px0`; `dst` valid for the writes.
unsafe fn quad(t: &Tile, px0: usize, half: usize, dst: *mut i32) {
    // SAFETY: the caller's contract; every address below stays inside Tile::check.
    unsafe {
        asm!(
            ".fpu neon",
            "vmov.i32 q8, #0",
            "vmov.i32 q9, #0",
            "vmov.i32 q10, #0",
            "vmov.i32 q11, #0",
            "vmov.i32 q12, #0",
            "vmov.i32 q13, #0",
            "vmov.i32 q14, #0",
            "vmov.i32 q15, #0",
            "2:",
            "ldr {xp}, [{offs}], #4",
            "add {xp}, {xp}, {base}",
            "mov {g}, {groups}",
            "3:",
            "vld1.8 {{d0, d1}}, [{xp}], {cbs}",
            "vld1.32 {{d4[]}}, [{wp}]!",
            "vmull.s8 q1, d0, d4",
            "vmull.s8 q3, d1, d4",
            "vpadal.s16 q8, q1",
            "vpadal.s16 q9, q3",
            "vld1.32 {{d4[]}}, [{wp}]!",
            "vmull.s8 q1, d0, d4",
            "vmull.s8 q3, d1, d4",
            "vpadal.s16 q10, q1",
            "vpadal.s16 q11, q3",
            "vld1.32 {{d4[]}}, [{wp}]!",
            "vmull.s8 q1, d0, d4",
            "vmull.s8 q3, d1, d4",
            "vpadal.s16 q12, q1",
            "vpadal.s16 q13, q3",
            "vld1.32 {{d4[]}}, [{wp}]!",
            "vmull.s8 q1, d0, d4",
            "vmull.s8 q3, d1, d4",
            "vpadal.s16 q14, q1",
            "vpadal.s16 q15, q3",
            // The other half's four channels of this group.
            "add {wp}, {wp}, #16",
            "subs {g}, {g}, #1",
            "bne 3b",
            "subs {taps}, {taps}, #1",
            "bne 2b",
            // Channel m's registers hold [p0 c01, p0 c23, p1 c01, p1 c23] and the same
            // for p2, p3: pairwise adds give its four pixels' sums.
            "vpadd.i32 d16, d16, d17",
            "vpadd.i32 d17, d18, d19",
            "vpadd.i32 d20, d20, d21",
            "vpadd.i32 d21, d22, d23",
            "vpadd.i32 d24, d24, d25",
            "vpadd.i32 d25, d26, d27",
            "vpadd.i32 d28, d28, d29",
            "vpadd.i32 d29, d30, d31",
            "vst1.32 {{d16, d17}}, [{dst}]",
            "add {dst}, {dst}, #{rows}",
            "vst1.32 {{d20, d21}}, [{dst}]",
            "add {dst}, {dst}, #{rows}",
            "vst1.32 {{d24, d25}}, [{dst}]",
            "add {dst}, {dst}, #{rows}",
            "vst1.32 {{d28, d29}}, [{dst}]",
            base = in(reg) t.packed.as_ptr().add((t.q0 + px0) * 4),
            offs = inout(reg) t.offsets.as_ptr() => _,
            taps = inout(reg) t.offsets.len() => _,
            groups = in(reg) t.groups,
            cbs = in(reg) t.cb_stride,
            wp = inout(reg) t.w.as_ptr().add(half * 16) => _,
            dst = inout(reg) dst => _,
            rows = const ROW_BYTES,
            xp = out(reg) _,
            g = out(reg) _,
            out("d0") _, out("d1") _, out("d2") _, out("d3") _,
            out("d4") _, out("d5") _, out("d6") _, out("d7") _,
            options(nostack),
        );
    }
}
