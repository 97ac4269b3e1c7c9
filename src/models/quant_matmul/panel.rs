//! Prefill panels: a weight matrix's rows interleaved eight at a time, as
//! llama.cpp's repacked GEMM lays them out, so that one integer dot-product
//! instruction computes four columns of eight rows at once. Sums then stay
//! in integer lanes for a whole block of 32, one lane per weight row, and the
//! block's scales are applied once per block and row group instead of once
//! per block and row: about a third of the vector instructions of the
//! row-by-row kernels on prompts.
//!
//! Weights are signed bytes (every type's integer quants: nibbles, q - 16,
//! Q8_0 and Q6_K values); activations go in as unsigned bytes (q + 128),
//! with 128 times each weight block's sum subtracted again, so the unsigned
//! x signed products of `vpdpbusd` are exact. Each lane adds its blocks to
//! its row's total as `blocks::accumulate` does, so panels give the bits the
//! row kernels give: a prompt's rows and a decode step's agree exactly.

use crate::models::spin_pool::for_each_chunk_mut;

use super::blocks::{ActivationBlock, QuantBlock};
use super::level::CpuLevel;

/// Weight rows interleaved in a panel.
pub const PANEL_ROWS: usize = 8;
/// Activation rows one kernel call computes.
pub const PANEL_COLUMNS: usize = 4;
/// Row groups one task computes.
const GROUPS_PER_TASK: usize = 4;

/// Eight weight rows of one block of 32 columns.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct PanelBlock {
    /// `qs[g][4 * row + j]`: element `4 * g + j` of row `row`.
    pub qs: [[i8; 32]; 8],
    /// Scales of elements 0..16 and 16..32 (equal unless the type has two).
    pub d: [[f32; PANEL_ROWS]; 2],
    /// 128 times the sum of each half's quants.
    pub c: [[i32; PANEL_ROWS]; 2],
    /// Offsets (Q4_1, Q4_K): `value = d * q + m`.
    pub m: [f32; PANEL_ROWS],
}

/// One block of activations as unsigned bytes: `qs = q + 128`.
#[derive(Clone, Copy)]
pub struct ShiftedBlock {
    pub qs: [u8; 32],
    pub d: f32,
    pub s: f32,
}

impl ShiftedBlock {
    pub fn new(a: &ActivationBlock) -> Self {
        Self {
            qs: a.qs.map(|q| (q as u8) ^ 0x80),
            d: a.d,
            s: a.s,
        }
    }
}

/// What a kernel must do beyond the integer sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PanelShape {
    /// Two scales per block (Q6_K).
    pub split: bool,
    /// Offsets to add (Q4_1, Q4_K).
    pub offset: bool,
}

/// `group` (one panel row group, every block) against four activation
/// rows: `[activation row][weight row]`.
pub type PanelKernel = fn(&[PanelBlock], [&[ShiftedBlock]; PANEL_COLUMNS]) -> [[f32; 8]; 4];

/// A matrix as panels.
pub struct Panels {
    blocks: Vec<PanelBlock>,
    rows: usize,
    per_row: usize,
    shape: PanelShape,
    /// Every quant within +-64: the AVX2 kernel's 16-bit pair sums cannot overflow.
    narrow: bool,
}

impl Panels {
    pub fn build<B: QuantBlock>(weights: &[B], rows: usize, per_row: usize) -> Self {
        let groups = rows.div_ceil(PANEL_ROWS);
        let mut max_abs = 0;
        let mut blocks = Vec::with_capacity(groups * per_row);
        for group in 0..groups {
            for b in 0..per_row {
                let mut panel = PanelBlock {
                    qs: [[0; 32]; 8],
                    d: [[0.0; PANEL_ROWS]; 2],
                    c: [[0; PANEL_ROWS]; 2],
                    m: [0.0; PANEL_ROWS],
                };
                for r in 0..PANEL_ROWS {
                    let row = group * PANEL_ROWS + r;
                    if row >= rows {
                        continue;
                    }
                    let block = &weights[row * per_row + b];
                    let (q, d) = (block.integers(), block.d());
                    for (k, &v) in q.iter().enumerate() {
                        panel.qs[k / 4][4 * r + k % 4] = v;
                        max_abs = max_abs.max(v.unsigned_abs());
                    }
                    let correction = |range: std::ops::Range<usize>| -> i32 {
                        128 * q[range].iter().map(|&v| v as i32).sum::<i32>()
                    };
                    // With one scale, the first half's correction covers the whole block.
                    let c = if B::SPLIT {
                        [correction(0..16), correction(16..32)]
                    } else {
                        [correction(0..32), 0]
                    };
                    for half in 0..2 {
                        panel.d[half][r] = d[half];
                        panel.c[half][r] = c[half];
                    }
                    panel.m[r] = block.m();
                }
                blocks.push(panel);
            }
        }
        Self {
            blocks,
            rows,
            per_row,
            shape: PanelShape {
                split: B::SPLIT,
                offset: B::OFFSET,
            },
            narrow: max_abs <= 64,
        }
    }

    /// The kernel of `level` for these panels, if it has one.
    pub fn kernel(&self, level: CpuLevel) -> Option<PanelKernel> {
        level.panel_kernel(self.shape, self.narrow)
    }

    /// `activations [m rows of per_row blocks]` against every row:
    /// `[m, rows]`.
    pub fn product(
        &self,
        kernel: PanelKernel,
        activations: &[ActivationBlock],
        m: usize,
    ) -> Vec<f32> {
        let shifted: Vec<ShiftedBlock> = activations.iter().map(ShiftedBlock::new).collect();
        let row_of = |i: usize| &shifted[i.min(m - 1) * self.per_row..][..self.per_row];
        let task_rows = GROUPS_PER_TASK * PANEL_ROWS;
        // Each task: its rows for every activation row, `[m, task_rows]`.
        let task_blocks = GROUPS_PER_TASK * self.per_row;
        let tasks = self.blocks.len().div_ceil(task_blocks);
        let mut parts = vec![0f32; tasks * m * task_rows];
        for_each_chunk_mut(&mut parts, m * task_rows, |task, out| {
            let groups = &self.blocks[task * task_blocks..];
            let groups = &groups[..task_blocks.min(groups.len())];
            for (g, group) in groups.chunks_exact(self.per_row).enumerate() {
                for first in (0..m).step_by(PANEL_COLUMNS) {
                    let columns = [0, 1, 2, 3].map(|c| row_of(first + c));
                    let values = kernel(group, columns);
                    for (c, values) in values.iter().enumerate().take(m - first) {
                        let at = (first + c) * task_rows + g * PANEL_ROWS;
                        out[at..at + PANEL_ROWS].copy_from_slice(values);
                    }
                }
            }
        });
        let mut out = vec![0f32; m * self.rows];
        for (task, part) in parts.chunks_exact(m * task_rows).enumerate() {
            let start = task * task_rows;
            let width = task_rows.min(self.rows - start);
            for (i, values) in part.chunks_exact(task_rows).enumerate() {
                out[i * self.rows + start..][..width].copy_from_slice(&values[..width]);
            }
        }
        out
    }
}

/// The reference every panel kernel is tested against: the same integer
/// sums and the same scales, in plain Rust.
pub fn scalar_kernel<const SPLIT: bool, const OFFSET: bool>(
    group: &[PanelBlock],
    columns: [&[ShiftedBlock]; PANEL_COLUMNS],
) -> [[f32; 8]; 4] {
    columns.map(|column| {
        std::array::from_fn(|r| {
            let mut acc = 0f32;
            for (panel, a) in group.iter().zip(column) {
                let dot = |range: std::ops::Range<usize>| -> i32 {
                    range
                        .map(|k| panel.qs[k / 4][4 * r + k % 4] as i32 * a.qs[k] as i32)
                        .sum()
                };
                if SPLIT {
                    acc = (panel.d[0][r] * a.d).mul_add((dot(0..16) - panel.c[0][r]) as f32, acc);
                    acc = (panel.d[1][r] * a.d).mul_add((dot(16..32) - panel.c[1][r]) as f32, acc);
                } else {
                    acc = (panel.d[0][r] * a.d).mul_add((dot(0..32) - panel.c[0][r]) as f32, acc);
                }
                if OFFSET {
                    acc = panel.m[r].mul_add(a.s, acc);
                }
            }
            acc
        })
    })
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    //! The panel kernels in three builds: AVX-VNNI and AVX-512 VNNI (256-bit
    //! `vpdpbusd`), and AVX2 (`vpmaddubsw` then `vpmaddwd`, for panels whose
    //! quants are small enough that its 16-bit pair sums cannot overflow).

    use super::{PANEL_COLUMNS, PanelBlock, ShiftedBlock};

    macro_rules! panel_kernels {
        ($module:ident, $features:literal, |$acc:ident, $u:ident, $s:ident| $dot:expr) => {
            pub mod $module {
                use std::arch::x86_64::*;

                use super::{PANEL_COLUMNS, PanelBlock, ShiftedBlock};

                #[target_feature(enable = $features)]
                fn dot($acc: __m256i, $u: __m256i, $s: __m256i) -> __m256i {
                    $dot
                }

                /// Four activation rows against one row group: every block's
                /// 8 x 4 integer sums stay in i32 lanes (one per weight row),
                /// then take the block's scales.
                #[target_feature(enable = $features)]
                pub fn gemm<const SPLIT: bool, const OFFSET: bool>(
                    group: &[PanelBlock],
                    columns: [&[ShiftedBlock]; PANEL_COLUMNS],
                ) -> [[f32; 8]; 4] {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    for (b, panel) in group.iter().enumerate() {
                        let mut sums = [[_mm256_setzero_si256(); 4]; 2];
                        for g in 0..8 {
                            // SAFETY: qs[g] is 32 bytes; loadu has no alignment needs.
                            let w = unsafe {
                                _mm256_loadu_si256(panel.qs[g].as_ptr() as *const __m256i)
                            };
                            let half = if SPLIT { g / 4 } else { 0 };
                            for c in 0..4 {
                                let bytes = &columns[c][b].qs[4 * g..4 * g + 4];
                                let x = _mm256_set1_epi32(i32::from_le_bytes([
                                    bytes[0], bytes[1], bytes[2], bytes[3],
                                ]));
                                sums[half][c] = dot(sums[half][c], x, w);
                            }
                        }
                        for half in 0..(1 + SPLIT as usize) {
                            // SAFETY: each is 8 lanes of 4 bytes.
                            let (d, correction) = unsafe {
                                (
                                    _mm256_loadu_ps(panel.d[half].as_ptr()),
                                    _mm256_loadu_si256(panel.c[half].as_ptr() as *const __m256i),
                                )
                            };
                            for c in 0..4 {
                                let exact =
                                    _mm256_cvtepi32_ps(_mm256_sub_epi32(sums[half][c], correction));
                                let scale = _mm256_mul_ps(d, _mm256_set1_ps(columns[c][b].d));
                                acc[c] = _mm256_fmadd_ps(scale, exact, acc[c]);
                            }
                        }
                        if OFFSET {
                            // SAFETY: 8 lanes of 4 bytes.
                            let m = unsafe { _mm256_loadu_ps(panel.m.as_ptr()) };
                            for c in 0..4 {
                                acc[c] =
                                    _mm256_fmadd_ps(m, _mm256_set1_ps(columns[c][b].s), acc[c]);
                            }
                        }
                    }
                    acc.map(|v| {
                        let mut out = [0f32; 8];
                        // SAFETY: out is 8 f32.
                        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
                        out
                    })
                }
            }
        };
    }

    panel_kernels!(avx2, "avx2,fma", |acc, u, s| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    ));
    panel_kernels!(avx_vnni, "avx2,fma,avxvnni", |acc, u, s| {
        _mm256_dpbusd_avx_epi32(acc, u, s)
    });
    panel_kernels!(
        avx512,
        "avx2,fma,avx512f,avx512vl,avx512vnni",
        |acc, u, s| _mm256_dpbusd_epi32(acc, u, s)
    );

    /// Safe entry points: a level only hands these out once `supported`
    /// said the CPU has their features.
    macro_rules! entries {
        ($($name:ident => $module:ident),*) => {
            $(
                pub fn $name<const SPLIT: bool, const OFFSET: bool>(
                    group: &[PanelBlock],
                    columns: [&[ShiftedBlock]; PANEL_COLUMNS],
                ) -> [[f32; 8]; 4] {
                    // SAFETY: see the macro comment.
                    unsafe { $module::gemm::<SPLIT, OFFSET>(group, columns) }
                }
            )*
        };
    }

    entries!(avx2_gemm => avx2, vnni_gemm => avx_vnni, avx512_gemm => avx512);
}
