//! Which of the CPU's vector extensions edgesight's own code may use, and a way to run
//! plain Rust compiled for the widest of them.

/// Call `f` from a function compiled for the widest x86 vectors this CPU has (AVX-512,
/// else AVX2), so that `f`, inlined there, is vectorised for them: the baseline x86-64
/// build has SSE2 only. Elsewhere just `f()`.
#[inline(always)]
pub(crate) fn widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use tract_linalg::isa::Isa;
        if x86_avx512bw() {
            // SAFETY: the CPU has AVX-512 F and BW, checked above.
            return unsafe { with_avx512(f) };
        }
        if x86_has(Isa::X86_64Avx2) {
            // SAFETY: the CPU has AVX2, checked above.
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

/// Whether edgesight's own code may use an x86 feature: the CPU has it and tract's
/// `TRACT_CPU_ISA` knob (e.g. `-avx512f,-avx512vnni`) has not taken it away. One knob
/// makes the whole process, tract's kernels and ours, act as a smaller CPU: the ARM speed
/// model's x86 calibration (tools/arm_model.py) runs natively the code qemu runs.
#[cfg(target_arch = "x86_64")]
pub(crate) fn x86_has(isa: tract_linalg::isa::Isa) -> bool {
    tract_linalg::isa::native().has(isa)
}

/// Whether edgesight's own code may use AVX-512 F and BW ([`x86_has`]).
#[cfg(target_arch = "x86_64")]
pub(crate) fn x86_avx512bw() -> bool {
    x86_has(tract_linalg::isa::Isa::X86_64Avx512f) && is_x86_feature_detected!("avx512bw")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
