//! Row kernels, in two builds from one body: AVX2 (`vpmaddubsw` then
//! `vpmaddwd`, as llama.cpp does) and AVX-VNNI (one `vpdpbusd`). Four weight
//! rows against one activation row (the decode step's product): each
//! block's four integer dot products are reduced together to exact i32
//! sums, then added to the four rows' totals with the block's scales, lane
//! by lane, exactly as `blocks::accumulate` does. Signed quants go in as |w|
//! with the activation given w's sign, so every 16-bit pair sum is exact.

use super::blocks::{ActivationBlock, BlockQ4_1, BlockQ4K32, BlockQ5_0, BlockQ6K32, BlockQ8_0};

macro_rules! kernels_256 {
    ($module:ident, $features:literal, |$u:ident, $s:ident| $products:expr) => {
        pub mod $module {
            use std::arch::x86_64::*;

            use super::super::blocks::QuantBlock;
            use super::{ActivationBlock, BlockQ4_1, BlockQ4K32, BlockQ5_0, BlockQ6K32, BlockQ8_0};

            /// Sums of u8 x i8 products, four bytes a lane, in 8 lanes of i32.
            #[target_feature(enable = $features)]
            fn products($u: __m256i, $s: __m256i) -> __m256i {
                $products
            }

            /// Products of signed x and y: |x| and y with x's sign.
            #[target_feature(enable = $features)]
            fn signed_products(x: __m256i, y: __m256i) -> __m256i {
                products(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
            }

            /// The 32 nibbles of a Q4_1-layout block in element order.
            #[target_feature(enable = $features)]
            fn nibbles(qs: &[u8; 16]) -> __m256i {
                // SAFETY: qs is 16 bytes long; loadu has no alignment needs.
                let packed = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
                _mm256_and_si256(
                    _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
                    _mm256_set1_epi8(0x0F),
                )
            }

            #[target_feature(enable = $features)]
            fn load(qs: &[i8; 32]) -> __m256i {
                // SAFETY: qs is 32 bytes long; loadu has no alignment needs.
                unsafe { _mm256_loadu_si256(qs.as_ptr() as *const __m256i) }
            }

            /// 0xFF in byte k where bit k of `bits` is set, else 0.
            #[target_feature(enable = $features)]
            fn bytes_from_bits(bits: u32) -> __m256i {
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(bits as i32),
                    _mm256_set_epi64x(
                        0x0303030303030303,
                        0x0202020202020202,
                        0x0101010101010101,
                        0x0000000000000000,
                    ),
                );
                let others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64);
                _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
            }

            /// A Q5_0 block as signed bytes q - 16: the nibble where the
            /// fifth bit is set, else the nibble with its upper four bits set.
            #[target_feature(enable = $features)]
            fn q5_0(w: &BlockQ5_0) -> __m256i {
                let fifth = bytes_from_bits(u32::from_le_bytes(w.qh));
                _mm256_or_si256(
                    nibbles(&w.qs),
                    _mm256_andnot_si256(fifth, _mm256_set1_epi8(0xF0_u8 as i8)),
                )
            }

            /// Four rows' lanes reduced: lane r of the first result sums
            /// `v[r]`'s lanes 0..4 (elements 0..16), of the second its lanes
            /// 4..8 (elements 16..32).
            #[target_feature(enable = $features)]
            fn halves4(v: [__m256i; 4]) -> (__m128i, __m128i) {
                // A transpose by unpacks: [a0+a2 b0+b2 a1+a3 b1+b3 | lanes 4..8].
                let ab = _mm256_add_epi32(
                    _mm256_unpacklo_epi32(v[0], v[1]),
                    _mm256_unpackhi_epi32(v[0], v[1]),
                );
                let cd = _mm256_add_epi32(
                    _mm256_unpacklo_epi32(v[2], v[3]),
                    _mm256_unpackhi_epi32(v[2], v[3]),
                );
                let sums =
                    _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
                (
                    _mm256_castsi256_si128(sums),
                    _mm256_extracti128_si256(sums, 1),
                )
            }

            /// One block of four rows added to their totals, as
            /// `blocks::accumulate` adds each.
            #[target_feature(enable = $features)]
            fn accumulate4<B: QuantBlock>(
                totals: __m128,
                w: [&B; 4],
                a: &ActivationBlock,
                sums: [__m256i; 4],
            ) -> __m128 {
                let (low, high) = halves4(sums);
                let ad = _mm_set1_ps(a.d);
                // f16 scales and offsets: four blocks' converted at once,
                // [d0 m0 d1 m1 ...] reordered to [d0 d1 d2 d3 m0 m1 m2 m3].
                let halves = B::HALF_SCALES.then(|| {
                    let bits = w.map(|w| w.half_scales() as i32);
                    let both = _mm256_cvtph_ps(_mm_setr_epi32(bits[0], bits[1], bits[2], bits[3]));
                    _mm256_permutevar8x32_ps(both, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7))
                });
                let d0 = match halves {
                    Some(halves) => _mm256_castps256_ps128(halves),
                    None => {
                        let d = w.map(|w| w.d()[0]);
                        _mm_setr_ps(d[0], d[1], d[2], d[3])
                    }
                };
                let d0 = _mm_mul_ps(d0, ad);
                let mut totals = totals;
                if B::SPLIT {
                    let d = w.map(|w| w.d()[1]);
                    let d1 = _mm_mul_ps(_mm_setr_ps(d[0], d[1], d[2], d[3]), ad);
                    totals = _mm_fmadd_ps(d0, _mm_cvtepi32_ps(low), totals);
                    totals = _mm_fmadd_ps(d1, _mm_cvtepi32_ps(high), totals);
                } else {
                    totals = _mm_fmadd_ps(d0, _mm_cvtepi32_ps(_mm_add_epi32(low, high)), totals);
                }
                if B::OFFSET {
                    let m = match halves {
                        Some(halves) => _mm256_extractf128_ps(halves, 1),
                        None => _mm_setr_ps(w[0].m(), w[1].m(), w[2].m(), w[3].m()),
                    };
                    totals = _mm_fmadd_ps(m, _mm_set1_ps(a.s), totals);
                }
                totals
            }

            /// Asks for the cache line at `address` (a hint: never faults).
            #[target_feature(enable = $features)]
            fn prefetch(address: *const i8) {
                _mm_prefetch::<_MM_HINT_T0>(address)
            }

            macro_rules! rows4 {
                ($name:ident, $block:ty, |$w:ident, $y:ident| $sums:expr) => {
                    /// Four weight rows (`rows`, `per_row` blocks each, one
                    /// after the other) against one activation row, with a
                    /// prefetch of the next four rows.
                    #[target_feature(enable = $features)]
                    pub fn $name(
                        rows: &[$block],
                        per_row: usize,
                        activations: &[ActivationBlock],
                    ) -> [f32; 4] {
                        let mut totals = _mm_setzero_ps();
                        for (b, a) in activations[..per_row].iter().enumerate() {
                            let $y = load(&a.qs);
                            let w: [&$block; 4] = [0, 1, 2, 3].map(|r| &rows[r * per_row + b]);
                            for w in w {
                                prefetch(
                                    (w as *const $block).wrapping_add(4 * per_row) as *const i8
                                );
                            }
                            let sums = w.map(|$w| $sums);
                            totals = accumulate4(totals, w, a, sums);
                        }
                        let mut out = [0f32; 4];
                        // SAFETY: out is 4 f32.
                        unsafe { _mm_storeu_ps(out.as_mut_ptr(), totals) };
                        out
                    }
                };
            }

            rows4!(rows4_q4_1, BlockQ4_1, |w, y| products(nibbles(&w.qs), y));
            rows4!(rows4_q4_k, BlockQ4K32, |w, y| products(nibbles(&w.qs), y));
            rows4!(rows4_q5_0, BlockQ5_0, |w, y| signed_products(q5_0(w), y));
            rows4!(rows4_q8_0, BlockQ8_0, |w, y| signed_products(
                load(&w.qs),
                y
            ));
            rows4!(rows4_q6_k, BlockQ6K32, |w, y| signed_products(
                load(&w.qs),
                y
            ));
        }
    };
}

kernels_256!(avx2, "avx2,fma,f16c", |u, s| _mm256_madd_epi16(
    _mm256_maddubs_epi16(u, s),
    _mm256_set1_epi16(1)
));

kernels_256!(avx_vnni, "avx2,fma,f16c,avxvnni", |u, s| {
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
});
