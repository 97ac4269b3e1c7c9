//! Quantized matrix products for GGUF block types candle 0.11 has no SIMD
//! kernel for on x86: Q4_1 and Q5_0 (their `vec_dot` is the generic scalar
//! loop, which took three quarters of SmolLM2's and Gemma 3's time), and
//! Q8_0, in the way llama.cpp computes them: activations quantized to 8 bits
//! per block of 32, integer dot products, one scale per block pair. Q4_K and
//! Q6_K (Gemma 3's Q4_K_M files) are repacked at load into blocks of 32 with
//! their sub-block scales multiplied out, and run on the same kernels (Q4_K
//! on Q4_1's); other types go through candle's `QMatMul`. f32 matrices
//! (safetensors checkpoints) run on the packed f32 kernels (`packed_gemm`).
//!
//! A prompt's rows run on prefill panels (`panel`): eight weight rows
//! interleaved, integer sums kept per row for a whole block. A decode step's
//! single row runs on row kernels, four weight rows at a time. Both add the
//! same exact integer block sums with the same scales in the same order
//! (`blocks::accumulate`), so every path and every CPU level gives the same
//! bits. The kernels are chosen at run time from the CPU's features
//! (`CpuLevel`); the scalar reference is what they are all tested against.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod blocks;
mod level;
mod panel;

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use blocks::{
    ActivationBlock, BLOCK, BlockQ4_1, BlockQ4K32, BlockQ5_0, BlockQ6K32, BlockQ8_0, QuantBlock,
    SUPER_BLOCK, quantize_block,
};
pub use level::CpuLevel;
use level::RowKernels;
use panel::{PANEL_COLUMNS, Panels};

use super::packed_gemm::{DenseWeights, PackedLinear};
use super::spin_pool::for_each_chunk_mut;

/// Weight rows one task computes (for every activation row).
const ROWS_PER_TASK: usize = 32;

enum Storage {
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q8_0(Vec<BlockQ8_0>),
    Q4K(Vec<BlockQ4K32>),
    Q6K(Vec<BlockQ6K32>),
    Candle(QMatMul),
    /// f32, bf16 or f16 weights and an optional bias, on the packed f32 kernels.
    Dense(PackedLinear),
}

/// `$body` with `$blocks` bound to the storage's own blocks, whatever their
/// type; `$candle` for candle's matrices, `$dense` for dense ones.
macro_rules! on_blocks {
    ($storage:expr, $blocks:ident => $body:expr,
     candle $weight:pat => $candle:expr, dense $linear:pat => $dense:expr) => {
        match $storage {
            Storage::Q4_1($blocks) => $body,
            Storage::Q5_0($blocks) => $body,
            Storage::Q8_0($blocks) => $body,
            Storage::Q4K($blocks) => $body,
            Storage::Q6K($blocks) => $body,
            Storage::Candle($weight) => $candle,
            Storage::Dense($linear) => $dense,
        }
    };
}

/// A `[rows, cols]` weight matrix used as `x @ W^T`.
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    storage: Storage,
    /// The rows interleaved for products of several activation rows (prompts).
    panels: Option<Panels>,
}

/// Whether candle's CPU dot product of `dtype` would get rows of an odd
/// number of blocks, which its Q4_1, Q5_0 and Q5_1 kernels assert against.
fn odd_pairs(dtype: GgmlDType, cols: usize) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
        && !(cols / dtype.block_size()).is_multiple_of(2)
}

fn blocks_from_bytes<T: Copy>(bytes: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    bytes
        .chunks_exact(size)
        // SAFETY: T is a repr(C) struct of plain integers and f16 (any bit
        // pattern is valid) and the chunk has exactly its size; read_unaligned
        // handles the byte buffer's alignment.
        .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr() as *const T) })
        .collect()
}

impl QuantMatrix {
    pub fn new(tensor: QTensor) -> candle_core::Result<Self> {
        let (rows, cols) = tensor.shape().dims2()?;
        let own = cols.is_multiple_of(BLOCK) && tensor.device().is_cpu();
        let storage = match (own, tensor.dtype()) {
            (true, GgmlDType::Q4_1) => Storage::Q4_1(blocks_from_bytes(&tensor.data()?)),
            (true, GgmlDType::Q5_0) => Storage::Q5_0(blocks_from_bytes(&tensor.data()?)),
            (true, GgmlDType::Q8_0) => Storage::Q8_0(blocks_from_bytes(&tensor.data()?)),
            (true, GgmlDType::Q4K) if cols.is_multiple_of(SUPER_BLOCK) => {
                Storage::Q4K(blocks::repack_q4_k(&tensor.data()?))
            }
            (true, GgmlDType::Q6K) if cols.is_multiple_of(SUPER_BLOCK) => {
                Storage::Q6K(blocks::repack_q6_k(&tensor.data()?))
            }
            _ if tensor.device().is_cpu() && odd_pairs(tensor.dtype(), cols) => {
                // candle's CPU products of these types take blocks in pairs
                // and panic on a row of an odd number of blocks: such a
                // matrix is widened to f32 (exact) and run on the f32 kernels.
                let values = tensor.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
                return Ok(Self::dense(DenseWeights::F32(values), None, rows, cols));
            }
            _ => Storage::Candle(QMatMul::from_qtensor(tensor)?),
        };
        Ok(Self {
            rows,
            cols,
            storage,
            panels: None,
        })
    }

    /// `[rows, cols]` weights (row-major; f32, bf16 or f16) and an
    /// optional bias of `rows` values, packed for the f32 kernels.
    pub fn dense(weight: DenseWeights, bias: Option<Vec<f32>>, rows: usize, cols: usize) -> Self {
        let bias = bias.unwrap_or_else(|| vec![0.0; rows]);
        Self {
            rows,
            cols,
            storage: Storage::Dense(PackedLinear::from_dense(weight, bias, cols, rows)),
            panels: None,
        }
    }

    /// Adds prefill panels (about 1.6 bytes a weight more): products of
    /// `PANEL_COLUMNS` activation rows or more then run on the panel
    /// kernels. Matrices candle computes, and f32 ones (packed already),
    /// are left as they are.
    pub fn with_panels(mut self) -> Self {
        let per_row = self.cols / BLOCK;
        let rows = self.rows;
        self.panels = on_blocks!(&self.storage,
            b => Some(Panels::build(b, rows, per_row)),
            candle _ => None, dense _ => None);
        self
    }

    /// Width of the input.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Stacks matrices of the same type and width by rows (one product
    /// instead of several); falls back to candle for other types.
    pub fn stack(parts: Vec<QTensor>) -> candle_core::Result<Self> {
        let dtype = parts[0].dtype();
        let (_, cols) = parts[0].shape().dims2()?;
        let mut rows = 0;
        let mut bytes = Vec::new();
        for part in &parts {
            let (r, c) = part.shape().dims2()?;
            if part.dtype() != dtype || c != cols {
                candle_core::bail!(
                    "cannot stack {:?} [{r}, {c}] under {dtype:?} [_, {cols}]",
                    part.dtype()
                );
            }
            rows += r;
            bytes.extend_from_slice(&part.data()?);
        }
        let storage =
            candle_core::quantized::QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?;
        Self::new(QTensor::new(storage, (rows, cols))?)
    }

    /// Appends row `row` in f32 (a token embedding looked up in a quantized
    /// table); false for matrices candle computes, or a row out of range.
    pub fn dequantize_row(&self, row: usize, out: &mut Vec<f32>) -> bool {
        fn append<B: QuantBlock>(blocks: &[B], out: &mut Vec<f32>) -> bool {
            for block in blocks {
                out.extend_from_slice(&block.values());
            }
            true
        }
        if row >= self.rows {
            return false;
        }
        let per_row = self.cols / BLOCK;
        let range = row * per_row..(row + 1) * per_row;
        on_blocks!(&self.storage,
        b => append(&b[range], out),
        candle _ => false,
        dense linear => {
            linear.append_row(row, out);
            true
        })
    }

    /// Whether `dequantize_row` can look rows up (own block types).
    pub fn dequantizes_rows(&self) -> bool {
        !matches!(self.storage, Storage::Candle(_))
    }

    /// `x [..., cols] -> [..., rows]` on tensors (for models written with
    /// candle ops); candle-kernel matrices work on the tensor directly.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Storage::Candle(weight) = &self.storage {
            return weight.forward(x);
        }
        let mut dims = x.dims().to_vec();
        let m = x.elem_count() / self.cols;
        let out = self.matmul(&x.flatten_all()?.to_vec1::<f32>()?, m)?;
        if let Some(last) = dims.last_mut() {
            *last = self.rows;
        }
        Tensor::from_vec(out, dims, x.device())
    }

    /// `x [m, cols] @ W^T -> [m, rows]`, with this CPU's best kernels.
    pub fn matmul(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        self.matmul_with(CpuLevel::current(), x, m)
    }

    /// `matmul` with the kernels of `level` (which the CPU must support).
    pub fn matmul_with(
        &self,
        level: CpuLevel,
        x: &[f32],
        m: usize,
    ) -> candle_core::Result<Vec<f32>> {
        if x.len() != m * self.cols {
            candle_core::bail!(
                "matmul input has {} values, expected {m} x {}",
                x.len(),
                self.cols
            );
        }
        if !level.supported() {
            candle_core::bail!("this CPU cannot run the {} kernels", level.name());
        }
        if m == 0 {
            return Ok(Vec::new());
        }
        if m >= PANEL_COLUMNS
            && let Some(panels) = &self.panels
            && let Some(kernel) = panels.kernel(level)
        {
            let activations: Vec<ActivationBlock> =
                x.chunks_exact(BLOCK).map(quantize_block).collect();
            return Ok(panels.product(kernel, &activations, m));
        }
        let candle = |weight: &QMatMul| {
            let input = Tensor::from_slice(x, (m, self.cols), &Device::Cpu)?;
            weight.forward(&input)?.flatten_all()?.to_vec1()
        };
        on_blocks!(&self.storage,
            b => Ok(self.product(b, x, m, level)),
            candle weight => candle(weight),
            dense linear => Ok(linear.forward(x)))
    }

    /// Row by row: four weight rows against each activation row in turn.
    fn product<B: RowKernels>(
        &self,
        weights: &[B],
        x: &[f32],
        m: usize,
        level: CpuLevel,
    ) -> Vec<f32> {
        let per_row = self.cols / BLOCK;
        let activations: Vec<ActivationBlock> = x.chunks_exact(BLOCK).map(quantize_block).collect();
        let rows4 = B::rows4(level);
        // Computed transposed ([rows, m]) so that each task writes one
        // contiguous run, then turned around.
        let mut transposed = vec![0f32; self.rows * m];
        for_each_chunk_mut(&mut transposed, ROWS_PER_TASK * m, |task, out| {
            let first_row = task * ROWS_PER_TASK;
            let rows_here = out.len() / m;
            for quad in (0..rows_here).step_by(4) {
                let at = (first_row + quad) * per_row;
                for i in 0..m {
                    let activation = &activations[i * per_row..][..per_row];
                    match rows4 {
                        Some(rows4) if quad + 4 <= rows_here => {
                            let values = rows4(&weights[at..], per_row, activation);
                            for (r, value) in values.into_iter().enumerate() {
                                out[(quad + r) * m + i] = value;
                            }
                        }
                        _ => {
                            for r in quad..(quad + 4).min(rows_here) {
                                let row = &weights[(first_row + r) * per_row..][..per_row];
                                out[r * m + i] = blocks::dot(row, activation);
                            }
                        }
                    }
                }
            }
        });
        if m == 1 {
            return transposed;
        }
        let mut out = vec![0f32; m * self.rows];
        for (row, values) in transposed.chunks_exact(m).enumerate() {
            for (i, &v) in values.iter().enumerate() {
                out[i * self.rows + row] = v;
            }
        }
        out
    }
}

/// Projections of one input: stacked into one matrix (one pass over the
/// activations) when their types agree, else computed one after the other.
pub enum ProjectionGroup {
    Stacked {
        matrix: QuantMatrix,
        widths: Vec<usize>,
    },
    Separate(Vec<QuantMatrix>),
}

impl ProjectionGroup {
    pub fn new(parts: Vec<QTensor>) -> candle_core::Result<Self> {
        let first = parts[0].dtype();
        if parts.iter().all(|p| p.dtype() == first) {
            let widths = parts
                .iter()
                .map(|p| p.shape().dims2().map(|(rows, _)| rows))
                .collect::<candle_core::Result<_>>()?;
            return Ok(Self::Stacked {
                matrix: QuantMatrix::stack(parts)?.with_panels(),
                widths,
            });
        }
        Ok(Self::Separate(
            parts
                .into_iter()
                .map(|p| QuantMatrix::new(p).map(QuantMatrix::with_panels))
                .collect::<candle_core::Result<_>>()?,
        ))
    }

    /// Dense projections of one `cols`-wide input, each its `[rows, cols]`
    /// weights (row-major) and optional bias: stacked into one matrix when
    /// their types agree, else computed one after the other.
    pub fn dense(parts: Vec<(DenseWeights, Option<Vec<f32>>)>, cols: usize) -> Self {
        let widths: Vec<usize> = parts.iter().map(|(w, _)| w.len() / cols).collect();
        let rows = widths.iter().sum();
        let matrices: Vec<&DenseWeights> = parts.iter().map(|(w, _)| w).collect();
        let Some(weight) = DenseWeights::concat(&matrices) else {
            return Self::Separate(
                parts
                    .into_iter()
                    .zip(&widths)
                    .map(|((w, b), &width)| QuantMatrix::dense(w, b, width, cols))
                    .collect(),
            );
        };
        let biased = parts.iter().any(|(_, b)| b.is_some());
        let bias = biased.then(|| {
            parts
                .into_iter()
                .zip(&widths)
                .flat_map(|((_, b), &width)| b.unwrap_or_else(|| vec![0.0; width]))
                .collect()
        });
        Self::Stacked {
            matrix: QuantMatrix::dense(weight, bias, rows, cols),
            widths,
        }
    }

    /// `x [m, cols]` through every projection: one `[m, width]` matrix each.
    pub fn forward(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<Vec<f32>>> {
        match self {
            Self::Stacked { matrix, widths } => {
                let y = matrix.matmul(x, m)?;
                let total = matrix.rows;
                let mut parts: Vec<Vec<f32>> =
                    widths.iter().map(|w| Vec::with_capacity(m * w)).collect();
                for row in y.chunks_exact(total) {
                    let mut start = 0;
                    for (part, &width) in parts.iter_mut().zip(widths) {
                        part.extend_from_slice(&row[start..start + width]);
                        start += width;
                    }
                }
                Ok(parts)
            }
            Self::Separate(matrices) => matrices.iter().map(|w| w.matmul(x, m)).collect(),
        }
    }
}

/// Four weight rows (one after the other, `per_row` blocks each) against
/// one activation row.
type Rows4<B> = fn(&[B], usize, &[ActivationBlock]) -> [f32; 4];

#[cfg(test)]
mod tests {
    use candle_core::quantized::QTensor;

    use super::*;

    /// Every level this CPU runs gives `reference`'s bits, and one
    /// activation row alone gives what it gives among the others.
    fn assert_every_level_gives(matrix: &QuantMatrix, x: &[f32], m: usize, reference: &[f32]) {
        let (rows, cols) = (matrix.rows, matrix.cols);
        for level in CpuLevel::ALL.into_iter().filter(|l| l.supported()) {
            let got = matrix.matmul_with(level, x, m).unwrap();
            assert_eq!(got, reference, "{} ({cols} columns)", level.name());
            let alone = matrix.matmul_with(level, &x[cols..2 * cols], 1).unwrap();
            assert_eq!(alone, got[rows..2 * rows], "{} alone", level.name());
        }
    }

    /// Weights with every quant value in use, not symmetric about zero.
    fn test_weights(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3 + (i % 7) as f32 * 0.01)
            .collect()
    }

    fn test_activations(m: usize, cols: usize) -> Vec<f32> {
        (0..m * cols)
            .map(|i| (i * 13 % 29) as f32 / 14.0 - 1.0)
            .collect()
    }

    /// candle's own quantized product of `input` with `weight` as `dtype`.
    fn candle_product(weight: &Tensor, input: &Tensor, dtype: GgmlDType) -> Vec<f32> {
        QMatMul::from_qtensor(QTensor::quantize(weight, dtype).unwrap())
            .unwrap()
            .forward(input)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Within the activations' quantization of candle's own product.
    fn assert_near_candle(ours: &[f32], candle: &[f32], dtype: GgmlDType) {
        for (g, e) in ours.iter().zip(candle) {
            assert!(
                (g - e).abs() < 2e-2 * e.abs().max(1.0),
                "{dtype:?}: {g} vs candle {e}"
            );
        }
    }

    /// The matrix's values as the repacked blocks hold them.
    fn repacked_values(matrix: &QuantMatrix) -> Vec<f32> {
        let mut values = Vec::new();
        assert!(matches!(matrix.storage, Storage::Q4K(_) | Storage::Q6K(_)));
        for row in 0..matrix.rows {
            assert!(matrix.dequantize_row(row, &mut values));
        }
        values
    }

    /// Q4_K and Q6_K repacked at load hold exactly the values candle
    /// dequantizes from the file's blocks; every kernel level computes the
    /// scalar reference's bits, which is what candle's own K-quant product
    /// computes (within the activations' quantization).
    #[test]
    fn k_quants_repack_exactly_and_every_kernel_level_matches() {
        for cols in [256, 768] {
            let (rows, m) = (70, 6);
            let (w, x) = (test_weights(rows, cols), test_activations(m, cols));
            let weight = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
            let input = Tensor::from_slice(&x, (m, cols), &Device::Cpu).unwrap();
            for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
                let q = QTensor::quantize(&weight, dtype).unwrap();
                let dequantized: Vec<f32> = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let candle = candle_product(&weight, &input, dtype);
                let ours = QuantMatrix::new(q).unwrap();
                assert_eq!(repacked_values(&ours), dequantized, "{dtype:?} repack");
                let reference = ours.matmul_with(CpuLevel::Scalar, &x, m).unwrap();
                assert_near_candle(&reference, &candle, dtype);
                assert_every_level_gives(&ours, &x, m, &reference);
            }
        }
    }

    /// The panel kernels of every level compute the row-by-row scalar
    /// reference's bits, for every type, with a partial last row group and
    /// a partial last group of activation rows.
    #[test]
    fn panel_products_match_the_row_reference_at_every_level() {
        let (rows, cols, m) = (70, 256, 6);
        let (w, x) = (test_weights(rows, cols), test_activations(m, cols));
        let weight = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let quantized = || QTensor::quantize(&weight, dtype).unwrap();
            let rows_only = QuantMatrix::new(quantized()).unwrap();
            let reference = rows_only.matmul_with(CpuLevel::Scalar, &x, m).unwrap();
            let with_panels = QuantMatrix::new(quantized()).unwrap().with_panels();
            let panels = with_panels.panels.as_ref().unwrap();
            for level in CpuLevel::ALL.into_iter().filter(|l| l.supported()) {
                let Some(kernel) = panels.kernel(level) else {
                    eprintln!("{dtype:?}: no panel kernel at {}", level.name());
                    continue;
                };
                let activations: Vec<ActivationBlock> =
                    x.chunks_exact(BLOCK).map(quantize_block).collect();
                let got = panels.product(kernel, &activations, m);
                assert_eq!(got, reference, "{dtype:?} panels at {}", level.name());
            }
            // matmul takes the panels from four activation rows on.
            assert_eq!(with_panels.matmul(&x, m).unwrap(), reference, "{dtype:?}");
        }
    }

    /// Every kernel level this CPU runs computes the scalar reference's bits
    /// (the same exact integer block sums, added in the same order), and
    /// that is what candle's reference implementation computes from the same
    /// quantized weights (within the activation quantization). 70 rows and
    /// six activation rows exercise the four-row kernels' remainder.
    #[test]
    fn every_kernel_level_matches_the_scalar_reference_and_candle() {
        let levels: Vec<CpuLevel> = CpuLevel::ALL
            .into_iter()
            .filter(|l| l.supported())
            .collect();
        eprintln!("kernel levels tested: {levels:?}");
        // Four blocks a row (candle's Q4_1 reference wants an even number),
        // then five.
        for cols in [128, 160] {
            let (rows, m) = (70, 6);
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3)
                .collect();
            let x: Vec<f32> = (0..m * cols)
                .map(|i| (i * 13 % 29) as f32 / 14.0 - 1.0)
                .collect();
            let weight = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
            let input = Tensor::from_slice(&x, (m, cols), &Device::Cpu).unwrap();
            for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
                let q = QTensor::quantize(&weight, dtype).unwrap();
                let ours = QuantMatrix::new(q).unwrap();
                assert!(!matches!(ours.storage, Storage::Candle(_)));
                let reference = ours.matmul_with(CpuLevel::Scalar, &x, m).unwrap();
                if (cols / BLOCK).is_multiple_of(2) {
                    let candle = candle_product(&weight, &input, dtype);
                    assert_near_candle(&reference, &candle, dtype);
                }
                assert_every_level_gives(&ours, &x, m, &reference);
            }
        }
    }
}
