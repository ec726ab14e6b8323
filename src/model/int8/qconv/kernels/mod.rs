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
    /// What the AVX2 kernel adds to `w` ([`Excess`]); empty for every other kernel.
    pub(crate) excess: BlockExcess<'a>,
}

/// Four weights (one output channel's, one C4 group's, one tap's) that the AVX2 kernel's
/// `vpmaddubsw` cannot take whole. It adds two u8 x i8 products into an i16 with
/// saturation, which is exact for every input only while the pair's positive weights sum
/// to at most 128 and its negative ones to at least -128 (255 x 128 = 32640; 255 x 129 =
/// 32895 does not fit): a pair of opposite signs always fits ([`pair_fits`]). A pair
/// beyond that is split in halves, each within the bound: one half stays in the block's
/// weights, the other is added by an `Excess`. How often depends on the weights:
/// torchvision's ResNet-50 with its random, bell-shaped initial weights splits 3 % of its
/// fours; the trained shapes classifier of the tests' fixtures 4-11 % in its 3x3 convs
/// and 21-33 % in its stem and 1x1s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Excess {
    pub tap: u32,
    pub group: u32,
    /// The output channel in the block.
    pub m: u8,
    pub w: [i8; 4],
}

/// Whether `vpmaddubsw` sums `x0 * a + x1 * b` exactly for every u8 `x0`, `x1`: the sum
/// is largest with 255 on the positive weights and smallest with 255 on the negative
/// ones, so those two must fit an i16. (Checking the magnitudes' sum instead split twice
/// as many fours: a pair of opposite signs never saturates.)
pub(crate) fn pair_fits(a: i8, b: i8) -> bool {
    let (a, b) = (a as i32, b as i32);
    a.max(0) + b.max(0) <= 128 && a.min(0) + b.min(0) >= -128
}

/// Split one C4 group's weights into what `vpmaddubsw` takes whole and the rest: each
/// pair (bytes 0-1, 2-3) that does not fit ([`pair_fits`]) gives half of each weight
/// (rounded towards zero) to the rest. Both halves of a pair then lie within -64..=64
/// and fit.
pub(crate) fn split_for_pairs(w: [i8; 4]) -> ([i8; 4], [i8; 4]) {
    let (mut whole, mut rest) = (w, [0i8; 4]);
    for p in [0, 2] {
        if !pair_fits(w[p], w[p + 1]) {
            for j in p..p + 2 {
                whole[j] = w[j] / 2;
                rest[j] = w[j] - w[j] / 2;
            }
        }
    }
    (whole, rest)
}

/// Every block's [`Excess`]es, in order of channel, tap and group within each block.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Excesses {
    entries: Vec<Excess>,
    /// Where each block's entries start, and one past the last block's.
    starts: Vec<usize>,
    /// Per block: one past its entries' largest tap, group and channel.
    ends: Vec<[u64; 3]>,
}

/// One block's excesses, and the bounds of their reads (computed from them when the
/// list was built, so that `Tile::check` compares three numbers per block instead of
/// walking the list: walking it was 3 % of ResNet-50's time on AVX2).
#[derive(Clone, Copy, Default)]
pub(crate) struct BlockExcess<'a> {
    /// Read by the AVX2 kernel only (the other targets build none).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    entries: &'a [Excess],
    ends: [u64; 3],
}

impl<'a> BlockExcess<'a> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn entries(&self) -> &'a [Excess] {
        self.entries
    }
}

impl Excesses {
    /// From each block's entries.
    pub(crate) fn new(blocks: Vec<Vec<Excess>>) -> Excesses {
        let mut e = Excesses::default();
        for mut b in blocks {
            e.starts.push(e.entries.len());
            b.sort_by_key(|x| (x.m, x.tap, x.group));
            let end = |f: fn(&Excess) -> u32| b.iter().map(|x| f(x) as u64 + 1).max().unwrap_or(0);
            e.ends
                .push([end(|x| x.tap), end(|x| x.group), end(|x| x.m as u32)]);
            e.entries.extend(b);
        }
        e.starts.push(e.entries.len());
        e
    }

    /// Block `b`'s entries (none if there are none at all).
    pub(crate) fn block(&self, b: usize) -> BlockExcess<'_> {
        match (self.starts.get(b), self.starts.get(b + 1), self.ends.get(b)) {
            (Some(&s), Some(&e), Some(&ends)) => BlockExcess {
                entries: &self.entries[s..e],
                ends,
            },
            _ => BlockExcess::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
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
        // An excess reads where the block's own weights for its tap and group do.
        let [taps, groups, rows_read] = self.excess.ends;
        let fits = |end: u64, n: usize| end <= n as u64;
        assert!(
            fits(taps, self.offsets.len()) && fits(groups, self.groups) && fits(rows_read, rows)
        );
    }
}

/// Per-block requantisation constants.
pub(crate) struct Epilogue<'a> {
    pub(crate) bias: &'a [i32],
    pub(crate) scales: &'a [f32],
    pub(crate) y0: i32,
    pub(crate) lo: i32,
    pub(crate) hi: i32,
    /// A residual add done in the VNNI kernel's epilogue (`QConv::compute_direct`);
    /// `None` for every other kernel.
    #[cfg(target_arch = "x86_64")]
    pub(crate) add: Option<x86::FusedAdd<'a>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair of weights, in both places of a four: the halves `split_for_pairs`
    /// leaves add up to the weights, and `vpmaddubsw` itself sums each half exactly at the
    /// inputs where a pair's sum is largest and smallest (0 or 255 in each place; the sum
    /// is linear in each input). It splits only pairs that do not fit: those
    /// `vpmaddubsw` would saturate at one of those inputs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn split_pairs_are_exact_on_vpmaddubsw_and_only_split_when_they_must() {
        use std::arch::x86_64::*;
        if !std::arch::is_x86_feature_detected!("avx2") {
            println!("no AVX2 here: nothing to check");
            return;
        }
        #[target_feature(enable = "avx2")]
        fn maddubs(x: [u8; 2], w: [i8; 2]) -> i32 {
            let x = _mm256_set1_epi16(i16::from_le_bytes(x));
            let w = _mm256_set1_epi16(i16::from_le_bytes(w.map(|b| b as u8)));
            _mm256_extract_epi16::<0>(_mm256_maddubs_epi16(x, w)) as i16 as i32
        }
        let corners = [[0u8, 0], [0, 255], [255, 0], [255, 255]];
        // SAFETY: AVX2 is present (checked above).
        let exact = |w: [i8; 2]| {
            corners
                .iter()
                .all(|x| unsafe { maddubs(*x, w) } == x[0] as i32 * w[0] as i32 + x[1] as i32 * w[1] as i32)
        };
        let mut split = 0;
        for a in i8::MIN..=i8::MAX {
            for b in i8::MIN..=i8::MAX {
                let w = [a, b, b, a];
                let (whole, rest) = split_for_pairs(w);
                for j in 0..4 {
                    assert_eq!(whole[j] as i32 + rest[j] as i32, w[j] as i32, "{w:?}");
                }
                for p in [0, 2] {
                    let pair = |h: [i8; 4]| [h[p], h[p + 1]];
                    assert!(
                        exact(pair(whole)) && exact(pair(rest)),
                        "{w:?}: {whole:?} + {rest:?}"
                    );
                    let was_split = pair(rest) != [0, 0];
                    assert_eq!(was_split, !exact(pair(w)), "{w:?}");
                    split += was_split as usize;
                }
            }
        }
        // Both places of each pair. Positive pairs summing to 129 or more: 1 + 2 + .. +
        // 126 = 8001; negative ones to -129 or less: 1 + .. + 128 = 8256. (The sum of
        // magnitudes, the rule before, split 32 513: 16 256 pairs of opposite signs too.)
        assert_eq!(split, 2 * (8001 + 8256));
    }

    /// `Tile::check` refuses an excess past the block's taps, groups or channels (the
    /// bounds the AVX2 kernel's unchecked reads rely on), and passes the last of each.
    #[test]
    fn a_tile_refuses_excesses_past_its_taps_groups_and_channels() {
        let (packed, offsets, w) = (vec![0u8; 4096], [0usize, 4, 8], vec![0i8; 3 * 2 * MR * 4]);
        let checks = |x: Excess| {
            let all = Excesses::new(vec![vec![], vec![x]]);
            let tile = Tile {
                packed: &packed,
                offsets: &offsets,
                cb_stride: 1024,
                groups: 2,
                q0: 0,
                w: &w,
                excess: all.block(1),
            };
            std::panic::catch_unwind(|| tile.check(1, MR)).is_ok()
        };
        let x = |tap, group, m| Excess {
            tap,
            group,
            m,
            w: [1; 4],
        };
        assert!(checks(x(2, 1, 7)));
        assert!(!checks(x(3, 0, 0)), "tap");
        assert!(!checks(x(0, 2, 0)), "group");
        assert!(!checks(x(0, 0, 8)), "channel");
    }
}
