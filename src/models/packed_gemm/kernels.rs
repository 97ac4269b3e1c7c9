//! The microkernels that read packed panels: AVX-512 F (12 rows x 32
//! columns of sums in registers) and AVX2 + FMA + F16C (groups of up to 6
//! rows x 16 columns), each built for f32, bf16 and f16 panel elements.

pub mod avx512 {
    use std::arch::x86_64::*;

    use super::super::{BF16, F32, PANEL, TILE_ROWS};

    /// 16 weights at `at` (bytes), of element type `E`, widened to f32.
    macro_rules! load16 {
        ($e:expr, $at:expr) => {
            match $e {
                F32 => _mm512_loadu_ps($at as *const f32),
                BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256($at as *const __m256i),
                ))),
                _ => _mm512_cvtph_ps(_mm256_loadu_si256($at as *const __m256i)),
            }
        };
    }

    /// Sums of the first `R` (at most TILE_ROWS) packed rows against one
    /// panel of elements of type `E` (`F32`, `BF16` or `F16`), plus the
    /// bias; stores the first `rows` (at most `R`) rows and `columns`
    /// columns.
    ///
    /// # Safety
    /// AVX-512 F must be available; `x` holds inputs × TILE_ROWS floats
    /// ([k][row]), `panel` inputs × PANEL elements of type `E`, `bias` PANEL
    /// floats, and `out` has room for `rows` rows of `columns` floats at
    /// stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile<const R: usize, const E: u8>(
        x: *const f32,
        inputs: usize,
        panel: *const u8,
        bias: *const f32,
        out: *mut f32,
        ldc: usize,
        rows: usize,
        columns: usize,
    ) {
        let size = if E == F32 { 4 } else { 2 };
        // SAFETY: the contract above covers every offset below: k < inputs,
        // r < TILE_ROWS, column halves < PANEL, stored rows < rows.
        unsafe {
            let bias_low = _mm512_loadu_ps(bias);
            let bias_high = _mm512_loadu_ps(bias.add(16));
            let mut low = [bias_low; R];
            let mut high = [bias_high; R];
            for k in 0..inputs {
                let w = panel.add(k * PANEL * size);
                let w_low = load16!(E, w);
                let w_high = load16!(E, w.add(16 * size));
                let xs = x.add(k * TILE_ROWS);
                for r in 0..R {
                    let v = _mm512_set1_ps(*xs.add(r));
                    low[r] = _mm512_fmadd_ps(v, w_low, low[r]);
                    high[r] = _mm512_fmadd_ps(v, w_high, high[r]);
                }
            }
            let mask = |from: usize| -> __mmask16 {
                let n = columns.saturating_sub(from).min(16);
                ((1u32 << n) - 1) as __mmask16
            };
            let (mask_low, mask_high) = (mask(0), mask(16));
            for r in 0..rows.min(R) {
                let row = out.add(r * ldc);
                _mm512_mask_storeu_ps(row, mask_low, low[r]);
                _mm512_mask_storeu_ps(row.add(16), mask_high, high[r]);
            }
        }
    }
}

pub mod avx2 {
    use std::arch::x86_64::*;

    use super::super::{BF16, F32, PANEL, TILE_ROWS};

    /// 8 weights at `at` (bytes), of element type `E`, widened to f32.
    macro_rules! load8 {
        ($e:expr, $at:expr) => {
            match $e {
                F32 => _mm256_loadu_ps($at as *const f32),
                BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128($at as *const __m128i),
                ))),
                _ => _mm256_cvtph_ps(_mm_loadu_si128($at as *const __m128i)),
            }
        };
    }

    /// The AVX2 counterpart of `avx512::tile`, same contract (AVX2, FMA
    /// and F16C instead of AVX-512 F; `rows` at most TILE_ROWS): each group
    /// of `GROUP` rows is a pass over k per half panel of 16 columns (12
    /// sums in registers for 6 rows), or over the whole panel for one row.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<const GROUP: usize, const E: u8>(
        x: *const f32,
        inputs: usize,
        panel: *const u8,
        bias: *const f32,
        out: *mut f32,
        ldc: usize,
        rows: usize,
        columns: usize,
    ) {
        let size = if E == F32 { 4 } else { 2 };
        // Registers of 8 columns a pass covers.
        let span = if GROUP == 1 { 4 } else { 2 };
        // SAFETY: as for `avx512::tile`: k < inputs, group rows < TILE_ROWS,
        // columns < PANEL, stored rows < rows and stored columns < columns.
        unsafe {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = |from: usize| {
                let n = columns.saturating_sub(from).min(8) as i32;
                _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes)
            };
            for first_column in (0..PANEL).step_by(8 * span) {
                if first_column >= columns {
                    break;
                }
                for first_row in (0..TILE_ROWS).step_by(GROUP) {
                    if first_row >= rows {
                        break;
                    }
                    let mut sums = [[_mm256_setzero_ps(); 4]; GROUP];
                    for row in sums.iter_mut() {
                        for (j, sum) in row.iter_mut().enumerate().take(span) {
                            *sum = _mm256_loadu_ps(bias.add(first_column + 8 * j));
                        }
                    }
                    for k in 0..inputs {
                        let w = panel.add((k * PANEL + first_column) * size);
                        let mut weights = [_mm256_setzero_ps(); 4];
                        for (j, weight) in weights.iter_mut().enumerate().take(span) {
                            *weight = load8!(E, w.add(8 * j * size));
                        }
                        let xs = x.add(k * TILE_ROWS + first_row);
                        for (r, row) in sums.iter_mut().enumerate() {
                            let v = _mm256_set1_ps(*xs.add(r));
                            for (sum, weight) in row.iter_mut().zip(&weights).take(span) {
                                *sum = _mm256_fmadd_ps(v, *weight, *sum);
                            }
                        }
                    }
                    for (r, row) in sums.iter().enumerate().take(rows - first_row) {
                        let at = out.add((first_row + r) * ldc + first_column);
                        for (j, sum) in row.iter().enumerate().take(span) {
                            if first_column + 8 * j >= columns {
                                break;
                            }
                            _mm256_maskstore_ps(at.add(8 * j), mask(first_column + 8 * j), *sum);
                        }
                    }
                }
            }
        }
    }
}
