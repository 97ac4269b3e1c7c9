//! 512-bit kernels for CPUs with AVX-512 VNNI: two blocks of 32 per vector,
//! their u8 x i8 products summed by one `vpdpbusd`, and each block's scale
//! applied to its half of the lanes. Signed weights (Q5_0, Q8_0) go in as
//! |w| with the activation given w's sign, so every product is exact.
//! A row with an odd number of blocks finishes its last block with the
//! 256-bit AVX-VNNI-free kernel.

use std::arch::x86_64::*;

use super::avx2::avx2 as tail;
use super::blocks::{ActivationBlock, BlockQ5_0, BlockQ8_0, Nibbles};

macro_rules! avx512 {
    ($($item:item)*) => {
        $(
            #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
            $item
        )*
    };
}

avx512! {
    /// The nibbles of two Q4_1 / Q5_0 blocks: block 0's 32 elements, then block 1's.
    fn nibbles_x2(first: &[u8; 16], second: &[u8; 16]) -> __m512i {
        // SAFETY: both are 16 bytes long; loadu has no alignment needs.
        let (p0, p1) = unsafe {
            (
                _mm_loadu_si128(first.as_ptr() as *const __m128i),
                _mm_loadu_si128(second.as_ptr() as *const __m128i),
            )
        };
        let mut v = _mm512_castsi128_si512(p0);
        v = _mm512_inserti32x4(v, _mm_srli_epi16(p0, 4), 1);
        v = _mm512_inserti32x4(v, p1, 2);
        v = _mm512_inserti32x4(v, _mm_srli_epi16(p1, 4), 3);
        _mm512_and_si512(v, _mm512_set1_epi8(0x0F))
    }

    fn load_x2(first: &[i8; 32], second: &[i8; 32]) -> __m512i {
        // SAFETY: both are 32 bytes long; loadu has no alignment needs.
        unsafe {
            _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256(first.as_ptr() as *const __m256i)),
                _mm256_loadu_si256(second.as_ptr() as *const __m256i),
                1,
            )
        }
    }

    /// `first` in the lanes of block 0, `second` in those of block 1.
    fn scales_x2(first: f32, second: f32) -> __m512 {
        _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(first), _mm512_set1_ps(second))
    }

    /// u8 x i8 products of 64 bytes, summed in 16 lanes of i32, as f32.
    fn products(unsigned: __m512i, signed: __m512i) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), unsigned, signed))
    }

    /// Products of signed bytes: |x| against y with x's sign.
    fn signed_products(x: __m512i, y: __m512i) -> __m512 {
        let negative = _mm512_movepi8_mask(x);
        let y = _mm512_mask_sub_epi8(y, negative, _mm512_setzero_si512(), y);
        products(_mm512_abs_epi8(x), y)
    }

    /// A pair of signed weight blocks `x` (with their two scales) against
    /// pair `p` of four activation rows: |x| once, each row given x's sign
    /// (what `signed_products` computes for one row).
    fn signed_pair4(
        acc: &mut [__m512; 4],
        x: __m512i,
        (d0, d1): (f32, f32),
        activations: [&[ActivationBlock]; 4],
        p: usize,
    ) {
        let negative = _mm512_movepi8_mask(x);
        let magnitude = _mm512_abs_epi8(x);
        for r in 0..4 {
            let (a0, a1) = (&activations[r][2 * p], &activations[r][2 * p + 1]);
            let y = load_x2(&a0.qs, &a1.qs);
            let y = _mm512_mask_sub_epi8(y, negative, _mm512_setzero_si512(), y);
            let scale = scales_x2(d0 * a0.d, d1 * a1.d);
            acc[r] = _mm512_fmadd_ps(scale, products(magnitude, y), acc[r]);
        }
    }

    /// Two Q5_0 blocks as signed bytes q - 16.
    fn q5_0_x2(first: &BlockQ5_0, second: &BlockQ5_0) -> __m512i {
        let fifth = u32::from_le_bytes(first.qh) as u64 | (u32::from_le_bytes(second.qh) as u64) << 32;
        let q = _mm512_or_si512(
            nibbles_x2(&first.qs, &second.qs),
            _mm512_maskz_mov_epi8(fifth, _mm512_set1_epi8(0x10)),
        );
        _mm512_sub_epi8(q, _mm512_set1_epi8(16))
    }

    pub fn dot_q4_1<B: Nibbles>(weights: &[B], activations: &[ActivationBlock]) -> f32 {
        let pairs = weights.len() / 2;
        let mut acc = _mm512_setzero_ps();
        let mut offsets = 0f32;
        for p in 0..pairs {
            let (w0, w1) = (&weights[2 * p], &weights[2 * p + 1]);
            let (a0, a1) = (&activations[2 * p], &activations[2 * p + 1]);
            let scale = scales_x2(w0.scale() * a0.d, w1.scale() * a1.d);
            let q = nibbles_x2(w0.nibbles(), w1.nibbles());
            acc = _mm512_fmadd_ps(scale, products(q, load_x2(&a0.qs, &a1.qs)), acc);
            offsets += w0.offset() * a0.s + w1.offset() * a1.s;
        }
        let rest = tail::dot_q4_1(&weights[2 * pairs..], &activations[2 * pairs..]);
        _mm512_reduce_add_ps(acc) + offsets + rest
    }

    /// One weight row against four activation rows: each pair of weight
    /// blocks is unpacked once.
    pub fn dot4_q4_1<B: Nibbles>(weights: &[B], activations: [&[ActivationBlock]; 4]) -> [f32; 4] {
        let pairs = weights.len() / 2;
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut offsets = [0f32; 4];
        for p in 0..pairs {
            let (w0, w1) = (&weights[2 * p], &weights[2 * p + 1]);
            let q = nibbles_x2(w0.nibbles(), w1.nibbles());
            let (d0, d1, m0, m1) = (w0.scale(), w1.scale(), w0.offset(), w1.offset());
            for r in 0..4 {
                let (a0, a1) = (&activations[r][2 * p], &activations[r][2 * p + 1]);
                let scale = scales_x2(d0 * a0.d, d1 * a1.d);
                acc[r] = _mm512_fmadd_ps(scale, products(q, load_x2(&a0.qs, &a1.qs)), acc[r]);
                offsets[r] += m0 * a0.s + m1 * a1.s;
            }
        }
        [0, 1, 2, 3].map(|r| {
            let rest = tail::dot_q4_1(&weights[2 * pairs..], &activations[r][2 * pairs..]);
            _mm512_reduce_add_ps(acc[r]) + offsets[r] + rest
        })
    }

    pub fn dot_q5_0(weights: &[BlockQ5_0], activations: &[ActivationBlock]) -> f32 {
        let pairs = weights.len() / 2;
        let mut acc = _mm512_setzero_ps();
        for p in 0..pairs {
            let (w0, w1) = (&weights[2 * p], &weights[2 * p + 1]);
            let (a0, a1) = (&activations[2 * p], &activations[2 * p + 1]);
            let scale = scales_x2(w0.d.to_f32() * a0.d, w1.d.to_f32() * a1.d);
            let x = q5_0_x2(w0, w1);
            acc = _mm512_fmadd_ps(scale, signed_products(x, load_x2(&a0.qs, &a1.qs)), acc);
        }
        let rest = tail::dot_q5_0(&weights[2 * pairs..], &activations[2 * pairs..]);
        _mm512_reduce_add_ps(acc) + rest
    }

    pub fn dot4_q5_0(weights: &[BlockQ5_0], activations: [&[ActivationBlock]; 4]) -> [f32; 4] {
        let pairs = weights.len() / 2;
        let mut acc = [_mm512_setzero_ps(); 4];
        for p in 0..pairs {
            let (w0, w1) = (&weights[2 * p], &weights[2 * p + 1]);
            let scales = (w0.d.to_f32(), w1.d.to_f32());
            signed_pair4(&mut acc, q5_0_x2(w0, w1), scales, activations, p);
        }
        [0, 1, 2, 3].map(|r| {
            let rest = tail::dot_q5_0(&weights[2 * pairs..], &activations[r][2 * pairs..]);
            _mm512_reduce_add_ps(acc[r]) + rest
        })
    }

    pub fn dot_q8_0(weights: &[BlockQ8_0], activations: &[ActivationBlock]) -> f32 {
        let pairs = weights.len() / 2;
        let mut acc = _mm512_setzero_ps();
        for p in 0..pairs {
            let (w0, w1) = (&weights[2 * p], &weights[2 * p + 1]);
            let (a0, a1) = (&activations[2 * p], &activations[2 * p + 1]);
            let scale = scales_x2(w0.d.to_f32() * a0.d, w1.d.to_f32() * a1.d);
            let x = load_x2(&w0.qs, &w1.qs);
            acc = _mm512_fmadd_ps(scale, signed_products(x, load_x2(&a0.qs, &a1.qs)), acc);
        }
        let rest = tail::dot_q8_0(&weights[2 * pairs..], &activations[2 * pairs..]);
        _mm512_reduce_add_ps(acc) + rest
    }

    pub fn dot4_q8_0(weights: &[BlockQ8_0], activations: [&[ActivationBlock]; 4]) -> [f32; 4] {
        let pairs = weights.len() / 2;
        let mut acc = [_mm512_setzero_ps(); 4];
        for p in 0..pairs {
            let (w0, w1) = (&weights[2 * p], &weights[2 * p + 1]);
            let scales = (w0.d.to_f32(), w1.d.to_f32());
            signed_pair4(&mut acc, load_x2(&w0.qs, &w1.qs), scales, activations, p);
        }
        [0, 1, 2, 3].map(|r| {
            let rest = tail::dot_q8_0(&weights[2 * pairs..], &activations[r][2 * pairs..]);
            _mm512_reduce_add_ps(acc[r]) + rest
        })
    }

    /// Four weight rows (`rows`, each `per_row` blocks, one after the
    /// other) against one activation row: the decode step's product. Four
    /// independent accumulator chains and a prefetch of the next four rows
    /// keep more of the weights in flight than one row at a time; each row
    /// is summed exactly as `dot_q4_1` sums it, so the results are the same.
    pub fn rows4_q4_1<B: Nibbles>(rows: &[B], per_row: usize, activations: &[ActivationBlock]) -> [f32; 4] {
        let pairs = per_row / 2;
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut offsets = [0f32; 4];
        for p in 0..pairs {
            let (a0, a1) = (&activations[2 * p], &activations[2 * p + 1]);
            let y = load_x2(&a0.qs, &a1.qs);
            for r in 0..4 {
                let w = &rows[r * per_row + 2 * p..];
                let (w0, w1) = (&w[0], &w[1]);
                prefetch(w.as_ptr().wrapping_add(4 * per_row) as *const i8);
                let scale = scales_x2(w0.scale() * a0.d, w1.scale() * a1.d);
                acc[r] = _mm512_fmadd_ps(scale, products(nibbles_x2(w0.nibbles(), w1.nibbles()), y), acc[r]);
                offsets[r] += w0.offset() * a0.s + w1.offset() * a1.s;
            }
        }
        [0, 1, 2, 3].map(|r| {
            let row = &rows[r * per_row..(r + 1) * per_row];
            let rest = tail::dot_q4_1(&row[2 * pairs..], &activations[2 * pairs..per_row]);
            _mm512_reduce_add_ps(acc[r]) + offsets[r] + rest
        })
    }

    /// `rows4_q4_1` for Q8_0, summed exactly as `dot_q8_0` sums each row.
    pub fn rows4_q8_0(rows: &[BlockQ8_0], per_row: usize, activations: &[ActivationBlock]) -> [f32; 4] {
        let pairs = per_row / 2;
        let mut acc = [_mm512_setzero_ps(); 4];
        for p in 0..pairs {
            let (a0, a1) = (&activations[2 * p], &activations[2 * p + 1]);
            let y = load_x2(&a0.qs, &a1.qs);
            for r in 0..4 {
                let w = &rows[r * per_row + 2 * p..];
                let (w0, w1) = (&w[0], &w[1]);
                prefetch(w.as_ptr().wrapping_add(4 * per_row) as *const i8);
                let scale = scales_x2(w0.d.to_f32() * a0.d, w1.d.to_f32() * a1.d);
                acc[r] = _mm512_fmadd_ps(scale, signed_products(load_x2(&w0.qs, &w1.qs), y), acc[r]);
            }
        }
        [0, 1, 2, 3].map(|r| {
            let row = &rows[r * per_row..(r + 1) * per_row];
            let rest = tail::dot_q8_0(&row[2 * pairs..], &activations[2 * pairs..per_row]);
            _mm512_reduce_add_ps(acc[r]) + rest
        })
    }

    /// Asks for the cache line at `address` (a hint: never faults).
    fn prefetch(address: *const i8) {
        _mm_prefetch::<_MM_HINT_T0>(address)
    }
}
