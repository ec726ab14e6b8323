//! The AMX kernel (x86-64, Sapphire Rapids and later): `tdpbsud`, i8 weights x u8
//! activations into i32 tiles, then the VNNI kernel's requantisation.
//!
//! One block is 32 output channels x 32 pixels: two weight tiles (16 channels x 64 bytes:
//! 16 C4 groups), two activation tiles (16 C4 groups x 16 pixels, read straight from the
//! packed input with the group stride: the C4 layout is already what `tdpbsud` wants
//! for its second operand) and four accumulator tiles, all eight of AMX's tiles. Each
//! step is 4 x 16 x 16 x 64 multiply-accumulates, where `vpdpbusd` does 16 x 4.
//!
//! A conv runs here only when its input channels are a multiple of 64 (one full tile
//! of groups per step); others (a ResNet's 3-channel stem) stay on the VNNI kernel.
//! The instructions are written as inline assembly: Rust's AMX intrinsics are not
//! stable. The tile registers are invisible to the compiler; every asm block here has
//! side effects, so the compiler keeps them in order.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::model::int8::qconv::LANES;
use crate::model::int8::qconv::kernels::x86::Requant;
use crate::model::int8::qconv::kernels::{Epilogue, Tile};

/// Output channels of one block (two tiles of 16 rows).
pub(crate) const ROWS: usize = 32;
/// C4 groups one step reduces (a tile row of 64 bytes).
pub(crate) const GROUPS: usize = 16;
/// Bytes of one weight tile.
const TILE: usize = 16 * 64;

/// Whether this CPU has AMX-TILE and AMX-INT8 and the kernel lets this process use them.
/// Linux hands out the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
/// without it the first tile instruction is SIGILL. Asked once per process.
pub(crate) fn permitted() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
        // SAFETY: CPUID exists on every x86-64 CPU. (A safe function in newer Rust; the
        // block keeps rust-version 1.91, where it was `unsafe`, building.)
        #[allow(unused_unsafe)]
        let edx = unsafe { __cpuid_count(7, 0) }.edx;
        if edx & (3 << 24) != 3 << 24 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it only changes which
        // register state this process may use.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    })
}

/// Palette 1, eight tiles of 16 rows x 64 bytes: tmm0-3 the accumulators (channel half
/// x pixel half), tmm4-5 the weights of each channel half, tmm6-7 the pixels of each
/// pixel half.
#[repr(C, align(64))]
struct Config([u8; 64]);

const CONFIG: Config = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    Config(c)
};

/// Tiles configured for [`block`] on this thread, released when dropped (a thread that
/// holds tile state makes every context switch save 8 KiB more).
pub(crate) struct Tiles(());

impl Tiles {
    /// # Safety
    /// [`permitted`] must be true.
    pub(crate) unsafe fn configure() -> Tiles {
        // SAFETY: AMX is permitted (the caller's contract); CONFIG is a valid palette.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        Tiles(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `configure`, so AMX is permitted.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// The weights of one block in this kernel's order: [tap][chunk of 16 groups][channel
/// half][16 channels][16 groups][4], so that each tile is 1 KiB of 64-byte rows.
pub(crate) fn weight_index(t: usize, g: usize, m: usize, j: usize, groups: usize) -> usize {
    let chunks = groups / GROUPS;
    ((((t * chunks + g / GROUPS) * 2 + m / 16) * 16 + m % 16) * GROUPS + g % GROUPS) * 4 + j
}

/// One block: 32 output channels x P vectors of 16 pixels (P is 1 or 2), every tap and
/// group, requantised into `out` (32 rows, `stride` apart).
///
/// # Safety
/// Tiles configured on this thread ([`Tiles::configure`]), the CPU has AVX-512 F and BW,
/// `t.groups` is a multiple of 16 and `t.check(P, ROWS)` holds.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn block<const P: usize>(t: &Tile, e: &Epilogue, out: &mut [u8], stride: usize) {
    // SAFETY (every tile load): Tile::check bounds the 16 rows of 64 bytes each load
    // reads, `cb_stride` apart, and the weights of every step.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let mut w = t.w.as_ptr();
        let base = t.packed.as_ptr().add(t.q0 * 4);
        for &off in t.offsets {
            let mut x = base.add(off);
            for _ in 0..t.groups / GROUPS {
                asm!(
                    "tileloadd tmm4, [{w} + {s64}*1]",
                    "tileloadd tmm5, [{w2} + {s64}*1]",
                    "tileloadd tmm6, [{x} + {cb}*1]",
                    "tdpbsud tmm0, tmm4, tmm6",
                    "tdpbsud tmm2, tmm5, tmm6",
                    w = in(reg) w, w2 = in(reg) w.add(TILE), x = in(reg) x,
                    s64 = in(reg) 64usize, cb = in(reg) t.cb_stride,
                    options(nostack, readonly),
                );
                if P == 2 {
                    asm!(
                        "tileloadd tmm7, [{x} + {cb}*1]",
                        "tdpbsud tmm1, tmm4, tmm7",
                        "tdpbsud tmm3, tmm5, tmm7",
                        x = in(reg) x.add(64), cb = in(reg) t.cb_stride,
                        options(nostack, readonly),
                    );
                }
                w = w.add(2 * TILE);
                x = x.add(GROUPS * t.cb_stride);
            }
        }
    }
    // sums[channel][pixel], 32 x 32 i32: the four accumulator tiles side by side.
    let mut sums = Sums([[0; 2 * LANES]; ROWS]);
    let p = sums.0.as_mut_ptr() as *mut u8;
    let row = 2 * LANES * 4;
    // SAFETY: each store writes 16 rows of 64 bytes, `row` apart, inside `sums`.
    unsafe {
        asm!(
            "tilestored [{a} + {s}*1], tmm0",
            "tilestored [{b} + {s}*1], tmm1",
            "tilestored [{c} + {s}*1], tmm2",
            "tilestored [{d} + {s}*1], tmm3",
            a = in(reg) p, b = in(reg) p.add(64), c = in(reg) p.add(16 * row),
            d = in(reg) p.add(16 * row + 64), s = in(reg) row,
            options(nostack),
        );
    }
    let rq = Requant::new(e);
    for (m, sums) in sums.0.iter().enumerate() {
        let dst = &mut out[m * stride + t.q0..m * stride + t.q0 + P * LANES];
        for p in 0..P {
            // SAFETY: 16 i32s of this row; `dst` holds P * 16 bytes.
            unsafe {
                let a = _mm512_loadu_si512(sums[p * LANES..].as_ptr() as *const _);
                rq.store(a, m, dst.as_mut_ptr().add(p * LANES));
            }
        }
    }
}

#[repr(C, align(64))]
struct Sums([[i32; 2 * LANES]; ROWS]);
