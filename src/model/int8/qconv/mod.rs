//! edgesight's own int8 convolution: one op per quantised conv, computing the integer
//! convolution, the bias, the zero points and the per-channel requantisation in one pass,
//! with no im2col.
//!
//! Why our own: tract 0.23 lowers a quantised conv to im2col, an int8 matmul, a second
//! pass for per-channel requantisation and a chain of zero-point ops; on ResNet-50 that
//! was 3.6-4.4x onnxruntime's time (BENCHMARKS.md). Here the activations are packed once
//! per conv into four-channel groups ("C4": the four bytes one `vpdpbusd` lane or one
//! `sdot` lane reduces), the padded image is laid out flat so that every kernel tap of a
//! stride-1 conv reads a *contiguous* run of pixels (an "implicit GEMM": output pixel `q`
//! reads input pixel `q + offset(tap)`; the few outputs that wrap around a row edge are
//! computed and thrown away), and strided convs are split into stride x stride phase
//! images, each of which is then read like a stride-1 image. The accumulators stay in
//! registers over every tap and channel; only then are they requantised (on x86 through
//! a small buffer: see `vnni::block`; the aarch64 kernels straight from their registers,
//! with `int8::neon::Requant`).
//!
//! Arithmetic: `acc = bias + sum (x - x0) * w`, exact in i32, then
//! `clamp(round_half_even(acc as f32 * scale[c]) + y0, lo, hi)` with
//! `scale[c] = (w_scale[c] * x_scale) / y_scale`: the same f32 operations as tract's
//! per-channel lowering and as onnxruntime's requantisation, so outputs are bit-identical
//! to both (tract's: random convs of every shape class, in this file; onnxruntime's:
//! whole models, tests/model.rs).
//!
//! Kernels, chosen at load from what the CPU has: AMX (`tdpbsud` on 16 x 64-byte tiles,
//! for convs with whole 64s of input channels), AVX-512 VNNI (`vpdpbusd`, u8 x i8 ->
//! i32, no saturation), AVX2 (`vpmaddubsw` with the weight pairs that could saturate it
//! split in two, `kernels::Excess`; or u8 widened to i16 and `vpmaddwd` where too many
//! would split), NEON `sdot` (ARMv8.2), NEON `smull` + `sadalp` (ARMv8.0; on
//! armv7 `vmull.s8` + `vpadal.s16` in assembly); where
//! none applies tract keeps the conv. A portable kernel, the plain definition, is the
//! reference all of them are tested against. All use the same packed layouts. The input
//! zero point is folded into the bias (`bias - x0 * sum w`) and the padding holds `x0`, so
//! padding adds nothing.

//!
//! A residual add whose operand is a conv's output (ResNet's adds) is fused into that
//! conv: the pass that moves the kernel's rows into the output tensor adds the other
//! operand on the way (`fuse_conv_adds`), the add op's arithmetic per element. Where the
//! kernel's rows are the output's rows (a 1x1 conv) and the VNNI kernel covers them
//! exactly, it writes the output itself and adds as it requantises (`compute_direct`,
//! `kernels::x86::FusedAdd`): no rows in between and no pass over them.
//!
//! A conv whose only reader is the next conv (ResNet's first and second conv of every
//! block) packs its kernel's rows straight into that conv's C4 phase layout
//! (`fuse_handoffs`): the tensor between them is the next conv's packed input, not NCHW
//! planes, and the next conv packs nothing.
//!
//! Files: `op` (the tract op: geometry, packing, dispatch over channel blocks, the fused
//! add, the handoff), `pack` (C4 interleaving), `kernels` (the portable reference beside
//! one file per ISA), `replace` (which tract convs become ours, which adds go into them,
//! which convs hand off packed).

mod kernels;
mod op;
mod pack;
mod replace;

pub use op::Packing;
pub use op::QConv;
pub use replace::{fuse_conv_adds, fuse_handoffs, replace_convs};

/// Output channels per register block.
pub(crate) const MR: usize = 8;
/// Output pixels per vector (i32 lanes of a 512-bit register), and vectors of pixels per
/// block: MR x PX accumulators (24 of AVX-512's 32 registers).
pub(crate) use crate::model::conv_geo::{LANES, PX};

/// Which inner kernel runs; chosen once when the op is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    /// AVX2 without VNNI, u8 activations widened to i16, `vpmaddwd` by i16 weights: for
    /// convs whose weights `Avx2` would split too often.
    #[cfg(target_arch = "x86_64")]
    Avx2Wide,
    /// AVX2 without VNNI: `vpmaddubsw` (u8 x i8 in pairs), with the pairs that would
    /// saturate split.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// `vpdpbusd`: u8 activations x i8 weights.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// AMX `tdpbsud`: u8 activations x i8 weights in 16 x 64-byte tiles. Convs whose
    /// input channels are not a multiple of 64 run on the VNNI kernel.
    #[cfg(target_arch = "x86_64")]
    Amx,
    /// NEON without the dot product, i8 x i8: on aarch64 (ARMv8.0, Pi 4's Cortex-A72)
    /// `smull` + `sadalp`; on 32-bit ARM (armv7 Pi OS) the same in `vmull.s8` +
    /// `vpadal.s16`.
    #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
    Neon,
    /// ARMv8.2 dot product (Pi 5's Cortex-A76): `sdot`, i8 x i8.
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

impl Kernel {
    /// Every kernel this CPU runs, the fastest last.
    /// (On x86, what `x86_has` allows: `TRACT_CPU_ISA` can take kernels away.)
    pub fn available() -> Vec<Kernel> {
        #[cfg(target_arch = "x86_64")]
        use {crate::model::cpu::x86_has, tract_linalg::isa::Isa};
        let mut k = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if x86_has(Isa::X86_64Avx2) {
            k.extend([Kernel::Avx2Wide, Kernel::Avx2]);
        }
        #[cfg(target_arch = "x86_64")]
        if x86_has(Isa::X86_64Avx512f)
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && x86_has(Isa::X86_64Avx512Vnni)
        {
            k.push(Kernel::Avx512Vnni);
            if x86_has(Isa::X86_64AmxInt8) && kernels::amx::permitted() {
                k.push(Kernel::Amx);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            k.push(Kernel::Neon);
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                k.push(Kernel::NeonDot);
            }
        }
        #[cfg(target_arch = "arm")]
        if kernels::armv7::has_neon() {
            k.push(Kernel::Neon);
        }
        k
    }

    /// The kernel the daemon uses: the fastest this CPU runs, if it has a vector one. The
    /// portable kernel is the reference the others are tested against, not a fallback:
    /// it is ~17x slower than tract's own int8 convolutions with VNNI (r50: 1.9 s against
    /// 115 ms on Zen 4), so a CPU without one of ours (x86 before AVX2, 32-bit ARM
    /// without NEON) keeps tract's convolutions.
    pub fn best() -> Option<Kernel> {
        Kernel::available().pop().filter(|k| *k != Kernel::Portable)
    }

    /// Output channels of one block: a register block, or AMX's two tiles of 16.
    pub(crate) fn rows(self) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Amx {
            return kernels::amx::ROWS;
        }
        MR
    }

    /// Vectors of 16 pixels one block covers at most.
    pub(crate) fn vectors(self) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Amx {
            return 2;
        }
        PX
    }

    /// The last pixels the kernel takes one by one instead of in a whole vector of 16,
    /// to cover the first `needed`: the VNNI kernel's tail takes the last 1-8 (a 7x7
    /// map's 49 outputs: 3 vectors and 1), every other kernel none.
    pub(crate) fn tail_pixels(self, needed: usize) -> usize {
        match needed % LANES {
            #[cfg(target_arch = "x86_64")]
            rem @ 1..=8 if self == Kernel::Avx512Vnni => rem,
            _ => 0,
        }
    }

    /// The virtual pixels the kernel computes to cover the first `needed`: whole vectors
    /// of 16, but the VNNI kernel's tail takes the last 1-8 one by one
    /// ([`Kernel::tail_pixels`]) and the AVX2 and NEON kernels step 8 or 4 pixels
    /// (`compute_block`).
    pub(crate) fn pixels_computed(self, needed: usize) -> usize {
        let step = match self {
            _ if self.tail_pixels(needed) > 0 => 1,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => 8,
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => 8,
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => 4,
            _ => LANES,
        };
        needed.next_multiple_of(step)
    }

    /// Bytes per weight in the kernel's order: `Avx2Wide` multiplies i16s, and stores its
    /// weights widened so that each channel's four are one load.
    pub(crate) fn weight_bytes(self) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx2Wide {
            return 2;
        }
        1
    }

    /// Whether the kernel adds its weights in saturating pairs, so that pairs too large
    /// for it are split (`Avx2`: `kernels::Excess`).
    pub(crate) fn splits_pairs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx2 {
            return true;
        }
        false
    }

    /// Whether the kernel multiplies signed activations (ARM's instructions are i8 x i8;
    /// x86's `vpdpbusd` is u8 x i8). Activations are packed in the kernel's domain.
    pub(crate) fn signed(self) -> bool {
        // Every ARM kernel but the portable one.
        cfg!(any(target_arch = "aarch64", target_arch = "arm")) && self != Kernel::Portable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::internal::*;
    use tract_core::ops::cnn::PoolSpec;
    use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
    use tract_core::ops::nn::DataFormat;

    /// A tiny deterministic generator (xorshift), so the test needs no crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[derive(Clone)]
    struct Case {
        cin: usize,
        cout: usize,
        hw: (usize, usize),
        k: (usize, usize),
        stride: (usize, usize),
        pad: (usize, usize, usize, usize),
        signed_x: bool,
        signed_y: bool,
        per_channel: bool,
        /// Weights as trained ones are (most within 40 in magnitude, one in four from the
        /// whole range), not uniform: the AVX2 kernel's blocks then mix fours it takes
        /// whole and fours it splits ([`kernels::Excess`]), and some take none.
        narrow: bool,
    }

    /// A model holding one quantised conv as tract builds it from a QLinearConv.
    fn conv_model(c: &Case, rng: &mut Rng) -> TypedModel {
        let mut m = TypedModel::default();
        let x = m.add_source("x", dt(c.signed_x).fact([1, c.cin, c.hw.0, c.hw.1]));
        let y = wire_conv(&mut m, x.unwrap(), c, rng, "conv");
        m.select_output_outlets(&[y]).unwrap();
        m
    }

    fn dt(signed: bool) -> DatumType {
        if signed { DatumType::I8 } else { DatumType::U8 }
    }

    /// One quantised conv on `x`, as tract builds it from a QLinearConv.
    fn wire_conv(m: &mut TypedModel, x: OutletId, c: &Case, rng: &mut Rng, name: &str) -> OutletId {
        let ydt = dt(c.signed_y);
        let kernel: Vec<i8> = rng
            .bytes(c.cout * c.cin * c.k.0 * c.k.1)
            .into_iter()
            .map(|b| match c.narrow && b % 4 != 0 {
                true => (b % 81) as i8 - 40,
                false => b as i8,
            })
            .collect();
        let k = tract_ndarray::Array4::from_shape_vec((c.cout, c.cin, c.k.0, c.k.1), kernel)
            .unwrap()
            .into_tensor();
        let bias: Vec<i32> = (0..c.cout)
            .map(|_| (rng.next() % 20001) as i32 - 10000)
            .collect();
        let nks = if c.per_channel { c.cout } else { 1 };
        let ks: Vec<f32> = (0..nks)
            .map(|_| 0.001 + (rng.next() % 1000) as f32 * 1e-5)
            .collect();
        let x0 = if c.signed_x { -7 } else { 131 };
        let y0 = if c.signed_y { 5 } else { 120 };
        let mut konst = |k: &str, t: Tensor| m.add_const(format!("{name}.{k}"), t).unwrap();
        let inputs = [
            x,
            konst("k", k),
            konst("bias", tensor1(&bias)),
            konst("x0", tensor0(x0)),
            konst("xs", tensor0(0.02f32)),
            konst("k0", tensor1(&vec![0i32; nks])),
            konst(
                "ks",
                if c.per_channel {
                    tensor1(&ks)
                } else {
                    tensor0(ks[0])
                },
            ),
            konst("y0", tensor0(y0)),
            konst("ys", tensor0(0.05f32)),
        ];
        let op = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![c.k.0, c.k.1],
                padding: PaddingSpec::Explicit(tvec![c.pad.0, c.pad.1], tvec![c.pad.2, c.pad.3]),
                dilations: None,
                strides: Some(tvec![c.stride.0, c.stride.1]),
                input_channels: c.cin,
                output_channels: c.cout,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: Some(ydt),
        };
        m.wire_node(name, op, &inputs).unwrap()[0]
    }

    fn cases() -> Vec<Case> {
        let c = |cin, cout, hw, k, stride, pad| Case {
            cin,
            cout,
            hw,
            k,
            stride,
            pad,
            signed_x: false,
            signed_y: false,
            per_channel: true,
            narrow: false,
        };
        vec![
            // ResNet's shapes, small: 3x3 stride 1 and 2, 1x1 stride 1 and 2, the 7x7 stem.
            c(16, 16, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1)),
            c(16, 24, (10, 10), (3, 3), (2, 2), (1, 1, 1, 1)),
            c(32, 8, (7, 7), (1, 1), (1, 1), (0, 0, 0, 0)),
            c(32, 16, (8, 8), (1, 1), (2, 2), (0, 0, 0, 0)),
            c(3, 16, (20, 20), (7, 7), (2, 2), (3, 3, 3, 3)),
            // Channels not a multiple of 4 or 8, odd sizes, asymmetric padding, no
            // padding, a non-square kernel and stride, more pixels than one block.
            c(5, 11, (13, 7), (3, 3), (1, 1), (0, 1, 2, 0)),
            c(6, 9, (11, 12), (3, 2), (2, 1), (1, 0, 0, 1)),
            c(4, 8, (5, 5), (3, 3), (1, 1), (0, 0, 0, 0)),
            c(8, 8, (17, 23), (3, 3), (1, 1), (1, 1, 1, 1)),
            c(7, 3, (9, 11), (5, 5), (3, 3), (2, 2, 2, 2)),
            // Input channels in whole 64s (AMX's step), output channels not in 32s (its
            // block), pixels in odd numbers of 16-pixel vectors, strided and 1x1.
            c(64, 40, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1)),
            c(128, 33, (11, 13), (3, 3), (2, 2), (1, 0, 1, 1)),
            c(192, 64, (7, 7), (1, 1), (1, 1), (0, 0, 0, 0)),
            c(64, 16, (5, 6), (1, 1), (2, 2), (0, 0, 0, 0)),
            Case {
                signed_x: true,
                signed_y: true,
                ..c(12, 10, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1))
            },
            Case {
                signed_x: true,
                ..c(12, 10, (9, 9), (3, 3), (2, 2), (1, 1, 1, 1))
            },
            Case {
                signed_y: true,
                per_channel: false,
                ..c(12, 10, (9, 9), (1, 1), (1, 1), (0, 0, 0, 0))
            },
            Case {
                per_channel: false,
                ..c(16, 16, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1))
            },
            Case {
                narrow: true,
                ..c(64, 24, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1))
            },
            Case {
                narrow: true,
                ..c(6, 16, (12, 11), (1, 1), (2, 2), (0, 0, 0, 0))
            },
        ]
    }

    fn kernels() -> Vec<Kernel> {
        Kernel::available()
    }

    /// Our op against tract's own lowering of the same conv, bit for bit, with every
    /// kernel this CPU has, on random weights, biases, scales and inputs.
    #[test]
    fn matches_tracts_conv_bit_for_bit() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        println!("int8 conv kernels on this CPU: {:?}", kernels());
        for (i, c) in cases().iter().enumerate() {
            check_against_tract(&format!("case {i}"), c, &mut rng);
        }
    }

    /// Fuzz target (a) of the robustness issue: random geometries (channels, sizes,
    /// kernels, strides, pads below the kernel side, signedness, per-tensor or
    /// per-channel) through the replacement, every kernel against the portable one and
    /// tract's lowering (see `check_against_tract`).
    /// `EDGESIGHT_FUZZ_CASES` sets the count (tests/fuzz.rs has the other targets).
    #[test]
    fn random_geometries_match_the_portable_kernel_and_tract() {
        use proptest::prelude::*;
        let n = std::env::var("EDGESIGHT_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .map_or(40, |n| (n / 100).max(40));
        let geometry = (
            1usize..20,
            1usize..20,
            (1usize..14, 1usize..14),
            (1usize..6, 1usize..6),
        )
            .prop_flat_map(|(cin, cout, hw, k)| {
                let pad = (0..k.0, 0..k.1, 0..k.0, 0..k.1);
                let flags = (any::<bool>(), any::<bool>(), any::<bool>(), any::<u64>());
                (Just((cin, cout, hw, k)), (1usize..4, 1usize..4), pad, flags)
            })
            .prop_filter(
                "the kernel fits the padded input",
                |((_, _, hw, k), _, p, _)| hw.0 + p.0 + p.2 >= k.0 && hw.1 + p.1 + p.3 >= k.1,
            );
        let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
            cases: n,
            failure_persistence: None,
            ..Default::default()
        });
        let result = runner.run(&geometry, |((cin, cout, hw, k), stride, pad, f)| {
            let c = Case {
                cin,
                cout,
                hw,
                k,
                stride,
                pad,
                signed_x: f.0,
                signed_y: f.1,
                per_channel: f.2,
                narrow: f.3 & 2 != 0,
            };
            check_against_tract("random geometry", &c, &mut Rng(f.3 | 1));
            Ok(())
        });
        println!("qconv: {n} random geometries against tract");
        result.unwrap();
    }

    /// One conv: our op (every kernel, and the fastest on 2 threads) against the portable
    /// kernel, bit for bit, and within one step of tract's lowering. Not bit for bit with
    /// tract: our requantisation is onnxruntime's f32 arithmetic, and tract's rounds some
    /// ties the other way. The random geometries found one per-tensor case (1 -> 1
    /// channels, 5x5 input, 2x5 kernel, left pad 4, i8 in, u8 out: 122 against 123) and,
    /// in 100 000 geometries, a per-channel one (1 -> 16 channels, 1x1 input, 2x1 kernel,
    /// top pad 1, i8 in, u8 out). Which side onnxruntime takes there is not checked here.
    fn check_against_tract(what: &str, c: &Case, rng: &mut Rng) {
        let model = conv_model(c, rng);
        let input = rng.bytes(c.cin * c.hw.0 * c.hw.1);
        let shape = [1, c.cin, c.hw.0, c.hw.1];
        let x = if c.signed_x {
            let v: Vec<i8> = input.iter().map(|b| *b as i8).collect();
            Tensor::from_shape(&shape, &v).unwrap()
        } else {
            Tensor::from_shape(&shape, &input).unwrap()
        };
        let run_plain = |m: TypedModel| {
            m.into_runnable()
                .unwrap()
                .run(tvec!(x.clone().into_tvalue()))
                .unwrap()
        };
        let tract = run_plain(model.clone().into_optimized().unwrap());
        let mut portable = model.clone();
        assert_eq!(
            replace_convs(&mut portable, Kernel::Portable).unwrap(),
            1,
            "{what}"
        );
        let reference = run_plain(portable);
        assert_eq!(reference[0].shape(), tract[0].shape(), "{what}");
        let ints = |t: &Tensor| -> Vec<i32> {
            let t = t.cast_to::<i32>().unwrap();
            t.try_as_plain_ram()
                .unwrap()
                .as_slice::<i32>()
                .unwrap()
                .to_vec()
        };
        let (ours, theirs) = (ints(&reference[0]), ints(&tract[0]));
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .max()
            .unwrap_or(0);
        assert!(worst <= 1, "{what}: {worst} steps from tract's conv");
        // Every kernel on one thread, and the fastest with its channel blocks shared out
        // over a 2-thread pool: the same integers as the portable one.
        let fastest = *kernels().last().unwrap();
        let runs = kernels().into_iter().map(|k| (k, 1)).chain([(fastest, 2)]);
        // Each with the taps' reads gathered first and without (`QConv::gather`).
        let runs = runs.flat_map(|r| [(r, false), (r, true)]);
        for ((which, threads), gather) in runs {
            let mut ours = model.clone();
            assert_eq!(replace_convs(&mut ours, which).unwrap(), 1, "{what}");
            force_gather(&mut ours, gather);
            let plan = ours.into_runnable().unwrap();
            op::poison_scratch(0xa5);
            let run = || plan.run(tvec!(x.clone().into_tvalue())).unwrap();
            let got = if threads > 1 {
                use tract_core::internal::tract_linalg::multithread::*;
                multithread_tract_scope(Executor::multithread(threads), run)
            } else {
                run()
            };
            let how = format!("{which:?} {threads} threads, gathered {gather}");
            assert_eq!(*got[0], *reference[0], "{what} {how}");
        }
    }

    /// Every conv of `model` with its taps' reads gathered first, or not.
    fn force_gather(model: &mut TypedModel, gather: bool) {
        for id in 0..model.nodes().len() {
            if let Some(op) = model.node(id).op_as::<QConv>() {
                let op = QConv {
                    gather,
                    ..op.clone()
                };
                model.node_mut(id).op = Box::new(op);
            }
        }
    }

    /// Which convs gather their taps' reads at load: where that saves a tenth of the
    /// pixels the kernel computes and the gathered input stays within 256 KB. ResNet-50's
    /// 3x3 convs on its 7x7 map do, on a kernel that stops near the last output; those on
    /// the 14x14 map (451 KB gathered) and every 1x1 conv do not.
    #[test]
    fn gathers_where_it_saves_pixels_and_fits_the_cache() {
        let op = |cin, k, stride, which| QConv {
            which,
            ..bare(cin, k, stride, if k.0 == 3 { [1; 4] } else { [0; 4] })
        };
        for which in kernels() {
            // The kernels that step fewer than 16 pixels: 49 outputs against 61 virtual
            // pixels (stride 1); with stride 2, 49 against 55, where only the VNNI
            // kernel's tail (one pixel at a time) saves a tenth.
            let name = format!("{which:?}");
            let s1 = match name.as_str() {
                "Avx512Vnni" | "Avx2" | "NeonDot" => true,
                "Neon" => !cfg!(target_arch = "arm"),
                _ => false,
            };
            let s2 = name == "Avx512Vnni";
            // (cin, kernel, stride, input side, gathers)
            let cases = [
                (512, (3, 3), (1, 1), 7, s1),
                (512, (3, 3), (2, 2), 14, s2),
                (256, (3, 3), (1, 1), 14, false),
                (2048, (1, 1), (1, 1), 7, false),
                (64, (3, 3), (1, 1), 56, false),
                (3, (7, 7), (2, 2), 224, false),
            ];
            for (cin, k, stride, side, want) in cases {
                let op = op(cin, k, stride, which);
                let g = op.geo(side, side).unwrap();
                let got = op.gather_pays(&g);
                assert_eq!(
                    got, want,
                    "{which:?} {cin} {k:?} {stride:?} on {side}x{side}"
                );
            }
        }
    }

    /// The AVX2 kernel keeps trained-looking weights on `vpmaddubsw`, some of their fours
    /// split (so `matches_tracts_conv_bit_for_bit`'s narrow cases run its excesses), and
    /// sends uniform ones (half their pairs past 128) to the widened kernel; both give the
    /// portable kernel's bytes there.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_splits_trained_weights_and_widens_uniform_ones() {
        if !kernels().contains(&Kernel::Avx2) {
            println!("no AVX2 here: nothing to check");
            return;
        }
        let mut rng = Rng(0x5eed_a7c2_0000_0001);
        let narrow = cases().into_iter().filter(|c| c.narrow).collect::<Vec<_>>();
        assert!(!narrow.is_empty());
        for (c, want) in narrow.iter().map(|c| (c, Kernel::Avx2)).chain([
            (&cases()[0], Kernel::Avx2Wide),
            (&cases()[10], Kernel::Avx2Wide),
        ]) {
            let mut m = conv_model(c, &mut rng);
            assert_eq!(replace_convs(&mut m, Kernel::Avx2).unwrap(), 1);
            let op = m.nodes().iter().find_map(|n| n.op_as::<QConv>()).unwrap();
            assert_eq!(op.which, want, "{}->{} {:?}", c.cin, c.cout, c.k);
            let fours = c.cout * c.k.0 * c.k.1 * c.cin.div_ceil(4);
            if want == Kernel::Avx2 {
                assert!(op.excess.len() > 0, "{}->{}: nothing split", c.cin, c.cout);
                assert!(op.excess.len() as f64 <= kernels::avx2::WIDE_SHARE * fours as f64);
            }
            check_against_tract("avx2's choice", c, &mut rng);
        }
    }

    /// Convs handing their output straight to the next conv's packing (`fuse_handoffs`)
    /// give the bytes the same convs give through NCHW tensors: ResNet's 1x1 -> 3x3 ->
    /// 1x1, a 3x3 of stride 2 after a 1x1 (phase images), channels not in fours (a padded
    /// group), odd sizes and pads, signed and unsigned between the convs, a conv whose
    /// output two ops read (no handoff) and the last conv carrying a fused add; on every
    /// kernel and on two threads.
    #[test]
    fn convs_handing_off_packed_give_the_same_bytes() {
        use crate::model::int8::{Quantize, QuantizedAdd};
        let mut rng = Rng(0x5eed_0ff0_c0de_0001);
        let c = |cin, cout, k, stride, pad, signed: (bool, bool)| Case {
            cin,
            cout,
            hw: (0, 0), // from the conv before
            k,
            stride,
            pad,
            signed_x: signed.0,
            signed_y: signed.1,
            per_channel: true,
            narrow: false,
        };
        let (p0, p1) = ((0, 0, 0, 0), (1, 1, 1, 1));
        // (image, convs, a second reader of conv 0's output, an add after the last)
        type Chain = ((usize, usize), Vec<Case>, bool, bool);
        let chains: [Chain; 5] = [
            (
                (9, 9),
                vec![
                    c(16, 8, (1, 1), (1, 1), p0, (false, false)),
                    c(8, 8, (3, 3), (1, 1), p1, (false, false)),
                    c(8, 32, (1, 1), (1, 1), p0, (false, false)),
                ],
                false,
                false,
            ),
            (
                (11, 10),
                vec![
                    c(12, 6, (1, 1), (1, 1), p0, (true, true)),
                    c(6, 16, (3, 3), (2, 2), p1, (true, false)),
                ],
                false,
                true,
            ),
            (
                (13, 7),
                vec![
                    c(5, 11, (3, 3), (1, 1), (0, 1, 2, 0), (false, true)),
                    c(11, 9, (3, 2), (2, 1), (1, 0, 0, 1), (true, false)),
                    c(9, 3, (5, 5), (3, 3), (2, 2, 2, 2), (false, false)),
                ],
                false,
                false,
            ),
            (
                (7, 7),
                vec![
                    c(64, 64, (3, 3), (1, 1), p1, (false, false)),
                    c(64, 40, (1, 1), (1, 1), p0, (false, true)),
                ],
                false,
                true,
            ),
            (
                (8, 8),
                vec![
                    c(8, 8, (1, 1), (1, 1), p0, (false, false)),
                    c(8, 8, (3, 3), (1, 1), p1, (false, false)),
                ],
                true,
                false,
            ),
        ];
        for (i, (hw, convs, second_reader, add_after)) in chains.into_iter().enumerate() {
            let what = format!("chain {i}");
            let mut m = TypedModel::default();
            let x0 = m.add_source(
                "x",
                dt(convs[0].signed_x).fact([1, convs[0].cin, hw.0, hw.1]),
            );
            let mut y = x0.unwrap();
            let mut first = None;
            for (j, conv) in convs.iter().enumerate() {
                y = wire_conv(&mut m, y, conv, &mut rng, &format!("conv{j}"));
                first.get_or_insert(y);
            }
            let mut outputs = vec![y];
            if second_reader {
                outputs.push(first.unwrap());
            }
            let last = convs.last().unwrap();
            let shape = m.outlet_fact(y).unwrap().shape.clone();
            let mut inputs = tvec![];
            if add_after {
                let skip = m
                    .add_source("skip", DatumType::U8.fact(shape.clone()))
                    .unwrap();
                let dims: Vec<usize> = shape.as_concrete().unwrap().to_vec();
                inputs.push(rng.bytes(dims.iter().product()));
                let add = QuantizedAdd {
                    a_scale: 0.05,
                    a_zero_point: if last.signed_y { 5 } else { 120 },
                    b_scale: 0.0213,
                    b_zero_point: 131,
                    floor: Some(0.0),
                    quantize: Quantize {
                        inv_scale: 1.0 / 0.043,
                        scale: Some(0.043),
                        zero_point: 9,
                        dt: DatumType::U8,
                    },
                    exact_reciprocal: false,
                };
                outputs[0] = m.wire_node("add", add, &[y, skip]).unwrap()[0];
            }
            m.select_output_outlets(&outputs).unwrap();
            let image = rng.bytes(convs[0].cin * hw.0 * hw.1);
            let x = Tensor::from_shape(&[1, convs[0].cin, hw.0, hw.1], &image)
                .unwrap()
                .cast_to_dt(dt(convs[0].signed_x))
                .unwrap()
                .into_owned();
            let mut values: TVec<TValue> = tvec![x.into_tvalue()];
            for b in &inputs {
                values.push(
                    Tensor::from_shape(shape.as_concrete().unwrap(), b)
                        .unwrap()
                        .into(),
                );
            }
            // Every conv reads the one before alone, but for the one with a second
            // reader; the last one's output is the model's.
            let expected = convs.len() - 1 - second_reader as usize;
            let fastest = *kernels().last().unwrap();
            let runs = kernels().into_iter().map(|k| (k, 1)).chain([(fastest, 2)]);
            for (which, threads) in runs {
                let mut apart = m.clone();
                assert_eq!(
                    replace_convs(&mut apart, which).unwrap(),
                    convs.len(),
                    "{what}"
                );
                assert_eq!(
                    fuse_conv_adds(&mut apart).unwrap(),
                    add_after as usize,
                    "{what}"
                );
                let mut handed = apart.clone();
                assert_eq!(fuse_handoffs(&mut handed).unwrap(), expected, "{what}");
                let run = |m: TypedModel| {
                    let plan = m.into_runnable().unwrap();
                    let go = || plan.run(values.clone()).unwrap();
                    if threads > 1 {
                        use tract_core::internal::tract_linalg::multithread::*;
                        multithread_tract_scope(Executor::multithread(threads), go)
                    } else {
                        go()
                    }
                };
                let (want, got) = (run(apart), run(handed));
                assert_eq!(got.len(), want.len(), "{what}");
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(**g, **w, "{what} {which:?} {threads} threads");
                }
            }
        }
    }

    /// A residual add fused into the conv that produces one of its operands
    /// (`fuse_conv_adds`) gives the bytes the conv and the add op give one after the
    /// other: 1x1 (whole planes) and 3x3 and strided convs (row by row), the conv as
    /// either operand, signed and unsigned operands and results, with and without ReLU and
    /// the reciprocal, on every kernel and on two threads.
    #[test]
    fn a_residual_add_fused_into_its_conv_gives_the_same_bytes() {
        use crate::model::int8::{Quantize, QuantizedAdd};
        let mut rng = Rng(0x5eed_add0_c0de_0001);
        let cases = [
            (
                Case {
                    signed_y: false,
                    ..cases()[2].clone()
                },
                false,
                DatumType::U8,
                DatumType::U8,
            ),
            (
                Case {
                    signed_y: true,
                    ..cases()[3].clone()
                },
                true,
                DatumType::I8,
                DatumType::I8,
            ),
            (cases()[0].clone(), true, DatumType::I8, DatumType::U8),
            (cases()[1].clone(), false, DatumType::U8, DatumType::I8),
            (cases()[11].clone(), false, DatumType::I8, DatumType::U8),
            // On the VNNI kernel the add is done in its epilogue where the kernel covers
            // a 1x1 conv's outputs exactly: 12 vectors and a tail of 4 here (a 14x14
            // map), the conv's own output i8; but not 9 outputs (one 16-pixel vector).
            (
                Case {
                    signed_y: true,
                    ..c1x1(16, 16, (14, 14), (1, 1))
                },
                false,
                DatumType::I8,
                DatumType::U8,
            ),
            (
                c1x1(24, 16, (5, 6), (2, 2)),
                true,
                DatumType::U8,
                DatumType::I8,
            ),
        ];
        for (i, (c, conv_is_b, skip_dt, out_dt)) in cases.into_iter().enumerate() {
            let what = format!("case {i}");
            let mut m = conv_model(&c, &mut rng);
            let y = m.output_outlets().unwrap()[0];
            let shape = m.outlet_fact(y).unwrap().shape.clone();
            let skip = m.add_source("skip", skip_dt.fact(shape.clone())).unwrap();
            let scale = 0.031 + i as f32 * 0.0071;
            let mut add = QuantizedAdd {
                a_scale: 0.05,
                a_zero_point: if c.signed_y { 5 } else { 120 },
                b_scale: 0.0213,
                b_zero_point: if skip_dt == DatumType::I8 { -3 } else { 131 },
                floor: (i % 2 == 0).then_some(0.0),
                quantize: Quantize {
                    inv_scale: 1.0 / scale,
                    scale: Some(scale),
                    zero_point: if out_dt == DatumType::I8 { 0 } else { 9 },
                    dt: out_dt,
                },
                exact_reciprocal: false,
            };
            add.exact_reciprocal = add.reciprocal_is_exact();
            let inputs = if conv_is_b { [skip, y] } else { [y, skip] };
            let op = if conv_is_b { add.swapped() } else { add };
            let sum = m.wire_node("add", op, &inputs).unwrap();
            m.select_output_outlets(&sum).unwrap();
            let x = Tensor::from_shape(
                &[1, c.cin, c.hw.0, c.hw.1],
                &rng.bytes(c.cin * c.hw.0 * c.hw.1),
            )
            .unwrap()
            .cast_to_dt(if c.signed_x {
                DatumType::I8
            } else {
                DatumType::U8
            })
            .unwrap()
            .into_owned();
            let dims: Vec<usize> = shape.as_concrete().unwrap().to_vec();
            let b = Tensor::from_shape(&dims, &rng.bytes(dims.iter().product()))
                .unwrap()
                .cast_to_dt(skip_dt)
                .unwrap()
                .into_owned();
            let fastest = *kernels().last().unwrap();
            let runs = kernels().into_iter().map(|k| (k, 1)).chain([(fastest, 2)]);
            for (which, threads) in runs {
                let mut apart = m.clone();
                assert_eq!(replace_convs(&mut apart, which).unwrap(), 1, "{what}");
                let mut fused = apart.clone();
                assert_eq!(fuse_conv_adds(&mut fused).unwrap(), 1, "{what}");
                let ops: Vec<String> = fused.nodes().iter().map(|n| n.op.name().into()).collect();
                assert!(
                    !ops.iter().any(|o| o == "EdgesightQuantizedAdd"),
                    "{what}: {ops:?}"
                );
                let run = |m: TypedModel| {
                    let plan = m.into_runnable().unwrap();
                    let go = || plan.run(tvec!(x.clone().into(), b.clone().into())).unwrap();
                    if threads > 1 {
                        use tract_core::internal::tract_linalg::multithread::*;
                        multithread_tract_scope(Executor::multithread(threads), go)
                    } else {
                        go()
                    }
                };
                let (want, got) = (run(apart), run(fused));
                assert_eq!(got[0].datum_type(), out_dt, "{what}");
                assert_eq!(*got[0], *want[0], "{what} {which:?} {threads} threads");
            }
        }
    }

    /// A 1x1 conv without padding, u8 in and out, per-channel.
    fn c1x1(cin: usize, cout: usize, hw: (usize, usize), stride: (usize, usize)) -> Case {
        Case {
            cin,
            cout,
            hw,
            k: (1, 1),
            stride,
            pad: (0, 0, 0, 0),
            signed_x: false,
            signed_y: false,
            per_channel: true,
            narrow: false,
        }
    }

    /// The op for `cin` -> 8 channels with this geometry (weights irrelevant: `geo` only).
    fn bare(cin: usize, kernel: (usize, usize), stride: (usize, usize), pad: [usize; 4]) -> QConv {
        QConv {
            packing: Packing {
                cin,
                kernel,
                stride,
                pad: (pad[0], pad[1], pad[2], pad[3]),
                flip: 0,
                x0: 0,
            },
            cout: 8,
            weights: std::sync::Arc::new(vec![]),
            excess: Default::default(),
            bias: std::sync::Arc::new(vec![0; MR]),
            scales: std::sync::Arc::new(vec![0.0; MR]),
            y0: 0,
            lo: 0,
            hi: 255,
            out_dt: DatumType::U8,
            which: Kernel::Portable,
            residual: None,
            handoff: None,
            prepacked: None,
            gather: false,
        }
    }

    /// Geometries from crafted attributes are refused by `geo` (which the op's build and
    /// every evaluation go through) instead of wrapping: before, pads near the top of
    /// the range with strides near 2^58 wrapped the tap offsets past `Tile::check`.
    #[test]
    fn crafted_geometries_are_refused() {
        // The same fractions of the range on 32- and 64-bit targets (armv7 runs this too).
        let huge = usize::MAX / 4;
        let (s58, s62) = (usize::MAX >> 6 | 1, usize::MAX >> 2 | 1);
        let refused = [
            bare(3, (3, 3), (s58, s58), [huge; 4]),
            bare(3, (3, 3), (1, 1), [huge, 0, huge, 0]),
            bare(3, (3, 3), (s62, s62), [1; 4]),
            bare(3, (3, 3), (0, 1), [1; 4]),
            bare(3, (0, 3), (1, 1), [0; 4]),
            bare(0, (3, 3), (1, 1), [1; 4]),
            bare(3, (9, 9), (1, 1), [0; 4]),
        ];
        for (i, op) in refused.iter().enumerate() {
            assert!(op.geo(8, 8).is_err(), "case {i} accepted: {op:?}");
        }
        assert!(bare(3, (3, 3), (1, 1), [0; 4]).geo(0, 8).is_err());
        assert!(bare(3, (7, 7), (2, 2), [3; 4]).geo(224, 224).is_ok());
        assert!(bare(64, (1, 1), (2, 2), [0; 4]).geo(56, 56).is_ok());
    }

    /// Convs outside what the op handles stay with tract.
    #[test]
    fn leaves_what_it_does_not_handle() {
        let mut rng = Rng(7);
        let c = &cases()[0];
        let mut m = conv_model(c, &mut rng);
        let id = m.node_by_name("conv").unwrap().id;
        let mut op = m.node(id).op_as::<Conv>().unwrap().clone();
        op.pool_spec.dilations = Some(tvec![2, 2]);
        m.node_mut(id).op = Box::new(op);
        assert_eq!(replace_convs(&mut m, Kernel::Portable).unwrap(), 0);
        // Padding as wide as the kernel: outputs that see only padding.
        let c = Case {
            pad: (3, 0, 0, 3),
            ..cases().remove(0)
        };
        let mut m = conv_model(&c, &mut rng);
        assert_eq!(replace_convs(&mut m, Kernel::Portable).unwrap(), 0);
    }
}
