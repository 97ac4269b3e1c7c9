//! 256-bit kernels, in two builds from one body: AVX2 (`maddubs` then
//! `madd`, as llama.cpp does) and AVX-VNNI (one `vpdpbusd`, on CPUs that
//! have it without AVX-512). A block of 32 is one vector; one f32 scale per
//! block (pair) is applied with an FMA.

use super::blocks::{ActivationBlock, BlockQ5_0, BlockQ6K32, BlockQ8_0, Nibbles};

macro_rules! kernels_256 {
    ($module:ident, $features:literal, |$u:ident, $s:ident| $products:expr) => {
        pub mod $module {
            use std::arch::x86_64::*;

            use super::{ActivationBlock, BlockQ5_0, BlockQ6K32, BlockQ8_0, Nibbles};

            #[target_feature(enable = $features)]
            pub(crate) fn horizontal_sum(v: __m256) -> f32 {
                let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
                _mm_cvtss_f32(_mm_add_ss(quad, _mm_movehdup_ps(quad)))
            }

            /// Sum of u8 x i8 products in 8 lanes of i32, as f32.
            #[target_feature(enable = $features)]
            fn products($u: __m256i, $s: __m256i) -> __m256 {
                _mm256_cvtepi32_ps($products)
            }

            /// The 32 nibbles of a Q4_1 / Q5_0 block in element order.
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

            #[target_feature(enable = $features)]
            pub fn dot_q4_1<B: Nibbles>(weights: &[B], activations: &[ActivationBlock]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                let mut offsets = 0f32;
                for (w, a) in weights.iter().zip(activations) {
                    let scale = _mm256_set1_ps(w.scale() * a.d);
                    acc = _mm256_fmadd_ps(scale, products(nibbles(w.nibbles()), load(&a.qs)), acc);
                    offsets += w.offset() * a.s;
                }
                horizontal_sum(acc) + offsets
            }

            /// One weight row against four activation rows: each weight block
            /// is unpacked once.
            #[target_feature(enable = $features)]
            pub fn dot4_q4_1<B: Nibbles>(
                weights: &[B],
                activations: [&[ActivationBlock]; 4],
            ) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut offsets = [0f32; 4];
                for (b, w) in weights.iter().enumerate() {
                    let q = nibbles(w.nibbles());
                    let (d, m) = (w.scale(), w.offset());
                    for r in 0..4 {
                        let a = &activations[r][b];
                        let scale = _mm256_set1_ps(d * a.d);
                        acc[r] = _mm256_fmadd_ps(scale, products(q, load(&a.qs)), acc[r]);
                        offsets[r] += m * a.s;
                    }
                }
                [0, 1, 2, 3].map(|r| horizontal_sum(acc[r]) + offsets[r])
            }

            /// Four weight rows (`rows`, `per_row` blocks each, one after
            /// the other) against one activation row: the decode step's
            /// product. Four independent accumulator chains and a prefetch of
            /// the next four rows keep more weights in flight; each row is
            /// summed exactly as `dot_q4_1` sums it.
            #[target_feature(enable = $features)]
            pub fn rows4_q4_1<B: Nibbles>(
                rows: &[B],
                per_row: usize,
                activations: &[ActivationBlock],
            ) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut offsets = [0f32; 4];
                for (b, a) in activations[..per_row].iter().enumerate() {
                    let y = load(&a.qs);
                    for r in 0..4 {
                        let w = &rows[r * per_row + b..];
                        prefetch(w.as_ptr().wrapping_add(4 * per_row) as *const i8);
                        let scale = _mm256_set1_ps(w[0].scale() * a.d);
                        acc[r] =
                            _mm256_fmadd_ps(scale, products(nibbles(w[0].nibbles()), y), acc[r]);
                        offsets[r] += w[0].offset() * a.s;
                    }
                }
                [0, 1, 2, 3].map(|r| horizontal_sum(acc[r]) + offsets[r])
            }

            /// `rows4_q4_1` for Q8_0, each row summed as `dot_q8_0` sums it.
            #[target_feature(enable = $features)]
            pub fn rows4_q8_0(
                rows: &[BlockQ8_0],
                per_row: usize,
                activations: &[ActivationBlock],
            ) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (b, a) in activations[..per_row].iter().enumerate() {
                    let y = load(&a.qs);
                    for r in 0..4 {
                        let w = &rows[r * per_row + b..];
                        prefetch(w.as_ptr().wrapping_add(4 * per_row) as *const i8);
                        let scale = _mm256_set1_ps(w[0].d.to_f32() * a.d);
                        acc[r] = _mm256_fmadd_ps(scale, signed_products(load(&w[0].qs), y), acc[r]);
                    }
                }
                [0, 1, 2, 3].map(|r| horizontal_sum(acc[r]))
            }

            /// The scales of a Q6_K block's two halves (four lanes each)
            /// times the activation block's.
            #[target_feature(enable = $features)]
            fn q6_k_scales(w: &BlockQ6K32, a: &ActivationBlock) -> __m256 {
                _mm256_set_m128(_mm_set1_ps(w.d[1] * a.d), _mm_set1_ps(w.d[0] * a.d))
            }

            #[target_feature(enable = $features)]
            pub fn dot_q6_k(weights: &[BlockQ6K32], activations: &[ActivationBlock]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                for (w, a) in weights.iter().zip(activations) {
                    let products = signed_products(load(&w.qs), load(&a.qs));
                    acc = _mm256_fmadd_ps(q6_k_scales(w, a), products, acc);
                }
                horizontal_sum(acc)
            }

            /// One Q6_K weight row against four activation rows.
            #[target_feature(enable = $features)]
            pub fn dot4_q6_k(
                weights: &[BlockQ6K32],
                activations: [&[ActivationBlock]; 4],
            ) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (b, w) in weights.iter().enumerate() {
                    let x = load(&w.qs);
                    let magnitude = _mm256_sign_epi8(x, x);
                    for r in 0..4 {
                        let a = &activations[r][b];
                        let y = _mm256_sign_epi8(load(&a.qs), x);
                        acc[r] = _mm256_fmadd_ps(q6_k_scales(w, a), products(magnitude, y), acc[r]);
                    }
                }
                [0, 1, 2, 3].map(|r| horizontal_sum(acc[r]))
            }

            /// `rows4_q4_1` for Q6_K, each row summed as `dot_q6_k` sums it.
            #[target_feature(enable = $features)]
            pub fn rows4_q6_k(
                rows: &[BlockQ6K32],
                per_row: usize,
                activations: &[ActivationBlock],
            ) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (b, a) in activations[..per_row].iter().enumerate() {
                    let y = load(&a.qs);
                    for r in 0..4 {
                        let w = &rows[r * per_row + b..];
                        prefetch(w.as_ptr().wrapping_add(4 * per_row) as *const i8);
                        let products = signed_products(load(&w[0].qs), y);
                        acc[r] = _mm256_fmadd_ps(q6_k_scales(&w[0], a), products, acc[r]);
                    }
                }
                [0, 1, 2, 3].map(|r| horizontal_sum(acc[r]))
            }

            /// Asks for the cache line at `address` (a hint: never faults).
            #[target_feature(enable = $features)]
            fn prefetch(address: *const i8) {
                _mm_prefetch::<_MM_HINT_T0>(address)
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

            /// `products` of signed x and y: |x| and y with x's sign.
            #[target_feature(enable = $features)]
            fn signed_products(x: __m256i, y: __m256i) -> __m256 {
                products(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
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

            #[target_feature(enable = $features)]
            pub fn dot_q5_0(weights: &[BlockQ5_0], activations: &[ActivationBlock]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                for (w, a) in weights.iter().zip(activations) {
                    let scale = _mm256_set1_ps(w.d.to_f32() * a.d);
                    acc = _mm256_fmadd_ps(scale, signed_products(q5_0(w), load(&a.qs)), acc);
                }
                horizontal_sum(acc)
            }

            /// One Q5_0 weight row against four activation rows: each
            /// block is unpacked once, each row summed as `dot_q5_0` sums it.
            #[target_feature(enable = $features)]
            pub fn dot4_q5_0(
                weights: &[BlockQ5_0],
                activations: [&[ActivationBlock]; 4],
            ) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (b, w) in weights.iter().enumerate() {
                    let x = q5_0(w);
                    let magnitude = _mm256_sign_epi8(x, x);
                    let d = w.d.to_f32();
                    for r in 0..4 {
                        let a = &activations[r][b];
                        let y = _mm256_sign_epi8(load(&a.qs), x);
                        let scale = _mm256_set1_ps(d * a.d);
                        acc[r] = _mm256_fmadd_ps(scale, products(magnitude, y), acc[r]);
                    }
                }
                [0, 1, 2, 3].map(|r| horizontal_sum(acc[r]))
            }

            /// `rows4_q4_1` for Q5_0, each row summed as `dot_q5_0` sums it.
            #[target_feature(enable = $features)]
            pub fn rows4_q5_0(
                rows: &[BlockQ5_0],
                per_row: usize,
                activations: &[ActivationBlock],
            ) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (b, a) in activations[..per_row].iter().enumerate() {
                    let y = load(&a.qs);
                    for r in 0..4 {
                        let w = &rows[r * per_row + b..];
                        prefetch(w.as_ptr().wrapping_add(4 * per_row) as *const i8);
                        let scale = _mm256_set1_ps(w[0].d.to_f32() * a.d);
                        acc[r] = _mm256_fmadd_ps(scale, signed_products(q5_0(&w[0]), y), acc[r]);
                    }
                }
                [0, 1, 2, 3].map(|r| horizontal_sum(acc[r]))
            }

            #[target_feature(enable = $features)]
            pub fn dot_q8_0(weights: &[BlockQ8_0], activations: &[ActivationBlock]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                for (w, a) in weights.iter().zip(activations) {
                    let scale = _mm256_set1_ps(w.d.to_f32() * a.d);
                    acc = _mm256_fmadd_ps(scale, signed_products(load(&w.qs), load(&a.qs)), acc);
                }
                horizontal_sum(acc)
            }
        }
    };
}

kernels_256!(avx2, "avx2,fma", |u, s| _mm256_madd_epi16(
    _mm256_maddubs_epi16(u, s),
    _mm256_set1_epi16(1)
));

kernels_256!(
    avx_vnni,
    "avx2,fma,avxvnni",
    |u, s| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
);
