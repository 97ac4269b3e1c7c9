//! Quantized matrix products for GGUF block types candle 0.11 has no SIMD
//! kernel for on x86: Q4_1 and Q5_0 (their `vec_dot` is the generic scalar
//! loop, which took three quarters of SmolLM2's and Gemma 3's time), and Q8_0,
//! in the way llama.cpp
//! computes them: activations quantized to 8 bits per block of 32, integer dot
//! products with AVX2 (`maddubs`), one scale per block pair. Other types go
//! through candle's `QMatMul`.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;
/// Weight rows one task computes (for every activation row).
const ROWS_PER_TASK: usize = 32;

/// GGUF Q4_1: `value = d * q + m`, q in 0..16; byte j holds elements j (low
/// nibble) and j + 16 (high nibble).
#[repr(C)]
#[derive(Clone, Copy)]
struct BlockQ4_1 {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

/// GGUF Q8_0: `value = d * q`.
#[repr(C)]
#[derive(Clone, Copy)]
struct BlockQ8_0 {
    d: f16,
    qs: [i8; 32],
}

/// GGUF Q5_0: `value = d * (q - 16)`, q in 0..32: low nibbles as in Q4_1,
/// fifth bits in `qh` (bit j for element j).
#[repr(C)]
#[derive(Clone, Copy)]
struct BlockQ5_0 {
    d: f16,
    qh: [u8; 4],
    qs: [u8; 16],
}

/// One block of activations: `value ≈ d * q`, and `s = d * sum(q)`.
#[derive(Clone, Copy)]
struct ActivationBlock {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

enum Storage {
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q8_0(Vec<BlockQ8_0>),
    Candle(QMatMul),
}

/// A `[rows, cols]` weight matrix used as `x @ W^T`.
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    storage: Storage,
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
            _ => Storage::Candle(QMatMul::from_qtensor(tensor)?),
        };
        Ok(Self {
            rows,
            cols,
            storage,
        })
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

    /// `x [m, cols] @ W^T -> [m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        if x.len() != m * self.cols {
            candle_core::bail!(
                "matmul input has {} values, expected {m} x {}",
                x.len(),
                self.cols
            );
        }
        match &self.storage {
            Storage::Candle(weight) => {
                let input = Tensor::from_slice(x, (m, self.cols), &Device::Cpu)?;
                weight.forward(&input)?.flatten_all()?.to_vec1()
            }
            Storage::Q4_1(blocks) => Ok(self.product(
                blocks,
                x,
                m,
                Kernel {
                    dot: dot_q4_1,
                    dot4: Some(dot4_q4_1),
                },
            )),
            Storage::Q5_0(blocks) => Ok(self.product(
                blocks,
                x,
                m,
                Kernel {
                    dot: dot_q5_0,
                    dot4: None,
                },
            )),
            Storage::Q8_0(blocks) => Ok(self.product(
                blocks,
                x,
                m,
                Kernel {
                    dot: dot_q8_0,
                    dot4: None,
                },
            )),
        }
    }

    fn product<B: Sync>(&self, weights: &[B], x: &[f32], m: usize, kernel: Kernel<B>) -> Vec<f32> {
        let per_row = self.cols / BLOCK;
        let activations: Vec<ActivationBlock> = x.chunks_exact(BLOCK).map(quantize_block).collect();
        // Computed transposed ([rows, m]) so that each task writes one
        // contiguous run, then turned around.
        let mut transposed = vec![0f32; self.rows * m];
        transposed
            .par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| {
                let first_row = task * ROWS_PER_TASK;
                for (offset, row_out) in out.chunks_exact_mut(m).enumerate() {
                    let row = &weights[(first_row + offset) * per_row..][..per_row];
                    let activation = |i: usize| &activations[i * per_row..][..per_row];
                    // Four activation rows share each unpacked weight block.
                    let mut quads = row_out.chunks_exact_mut(4);
                    let mut i = 0;
                    if let Some(dot4) = kernel.dot4 {
                        for quad in &mut quads {
                            quad.copy_from_slice(&dot4(
                                row,
                                [
                                    activation(i),
                                    activation(i + 1),
                                    activation(i + 2),
                                    activation(i + 3),
                                ],
                            ));
                            i += 4;
                        }
                        for value in quads.into_remainder() {
                            *value = (kernel.dot)(row, activation(i));
                            i += 1;
                        }
                    } else {
                        for (i, value) in row_out.iter_mut().enumerate() {
                            *value = (kernel.dot)(row, activation(i));
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

/// A weight row against four activation rows at once.
type Dot4<B> = fn(&[B], [&[ActivationBlock]; 4]) -> [f32; 4];

/// A weight row against one activation row, and optionally against four.
struct Kernel<B> {
    dot: fn(&[B], &[ActivationBlock]) -> f32,
    dot4: Option<Dot4<B>>,
}

fn quantize_block(x: &[f32]) -> ActivationBlock {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; 32];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * inverse).round() as i8;
        sum += *q as i32;
    }
    ActivationBlock {
        d,
        s: d * sum as f32,
        qs,
    }
}

fn dot_q4_1(weights: &[BlockQ4_1], activations: &[ActivationBlock]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { x86::dot_q4_1(weights, activations) };
    }
    weights
        .iter()
        .zip(activations)
        .map(|(w, a)| {
            let mut sum = 0i32;
            for j in 0..16 {
                sum += (w.qs[j] & 0x0F) as i32 * a.qs[j] as i32
                    + (w.qs[j] >> 4) as i32 * a.qs[j + 16] as i32;
            }
            w.d.to_f32() * a.d * sum as f32 + w.m.to_f32() * a.s
        })
        .sum()
}

fn dot4_q4_1(weights: &[BlockQ4_1], activations: [&[ActivationBlock]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { x86::dot4_q4_1(weights, activations) };
    }
    activations.map(|a| dot_q4_1(weights, a))
}

fn dot_q5_0(weights: &[BlockQ5_0], activations: &[ActivationBlock]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { x86::dot_q5_0(weights, activations) };
    }
    weights
        .iter()
        .zip(activations)
        .map(|(w, a)| {
            let high = u32::from_le_bytes(w.qh);
            let mut sum = 0i32;
            for j in 0..16 {
                let low = ((w.qs[j] & 0x0F) as i32) | (((high >> j) & 1) << 4) as i32;
                let up = ((w.qs[j] >> 4) as i32) | (((high >> (j + 16)) & 1) << 4) as i32;
                sum += (low - 16) * a.qs[j] as i32 + (up - 16) * a.qs[j + 16] as i32;
            }
            w.d.to_f32() * a.d * sum as f32
        })
        .sum()
}

fn dot_q8_0(weights: &[BlockQ8_0], activations: &[ActivationBlock]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { x86::dot_q8_0(weights, activations) };
    }
    weights
        .iter()
        .zip(activations)
        .map(|(w, a)| {
            let sum: i32 =
                w.qs.iter()
                    .zip(&a.qs)
                    .map(|(&x, &y)| x as i32 * y as i32)
                    .sum();
            w.d.to_f32() * a.d * sum as f32
        })
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{ActivationBlock, BlockQ4_1, BlockQ5_0, BlockQ8_0};

    /// Whether this CPU runs the kernels below (checked once, then cached by std).
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    #[target_feature(enable = "avx2,fma")]
    fn horizontal_sum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_add_ss(quad, _mm_movehdup_ps(quad)))
    }

    /// Sum of u8 x i8 products in 8 lanes of i32, as f32.
    #[target_feature(enable = "avx2,fma")]
    fn products(unsigned: __m256i, signed: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(unsigned, signed);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1(weights: &[BlockQ4_1], activations: &[ActivationBlock]) -> f32 {
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let mut offsets = 0f32;
        for (w, a) in weights.iter().zip(activations) {
            // SAFETY (loads): qs are 16 and 32 bytes long; loadu has no alignment needs.
            let packed = unsafe { _mm_loadu_si128(w.qs.as_ptr() as *const __m128i) };
            let nibbles = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
            let q = _mm256_and_si256(nibbles, low_nibbles);
            let y = unsafe { _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i) };
            let scale = _mm256_set1_ps(w.d.to_f32() * a.d);
            acc = _mm256_fmadd_ps(scale, products(q, y), acc);
            offsets += w.m.to_f32() * a.s;
        }
        horizontal_sum(acc) + offsets
    }

    /// One weight row against four activation rows: each weight block is
    /// unpacked once.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4_q4_1(
        weights: &[BlockQ4_1],
        activations: [&[ActivationBlock]; 4],
    ) -> [f32; 4] {
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut offsets = [0f32; 4];
        for (b, w) in weights.iter().enumerate() {
            // SAFETY (loads): qs are 16 and 32 bytes long; loadu has no alignment needs.
            let packed = unsafe { _mm_loadu_si128(w.qs.as_ptr() as *const __m128i) };
            let q = _mm256_and_si256(
                _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
                low_nibbles,
            );
            let (d, m) = (w.d.to_f32(), w.m.to_f32());
            for r in 0..4 {
                let a = &activations[r][b];
                let y = unsafe { _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i) };
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), products(q, y), acc[r]);
                offsets[r] += m * a.s;
            }
        }
        [0, 1, 2, 3].map(|r| horizontal_sum(acc[r]) + offsets[r])
    }

    /// 0xFF in byte k where bit k of `bits` is set, else 0.
    #[target_feature(enable = "avx2,fma")]
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

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q5_0(weights: &[BlockQ5_0], activations: &[ActivationBlock]) -> f32 {
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        for (w, a) in weights.iter().zip(activations) {
            // SAFETY (loads): qs are 16 and 32 bytes long; loadu has no alignment needs.
            let packed = unsafe { _mm_loadu_si128(w.qs.as_ptr() as *const __m128i) };
            let low = _mm256_and_si256(
                _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
                low_nibbles,
            );
            // q - 16 as a signed byte: keep the nibble where the fifth bit is
            // set, else set the upper four bits (nibble - 16).
            let fifth = bytes_from_bits(u32::from_le_bytes(w.qh));
            let x = _mm256_or_si256(
                low,
                _mm256_andnot_si256(fifth, _mm256_set1_epi8(0xF0_u8 as i8)),
            );
            let y = unsafe { _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i) };
            let scale = _mm256_set1_ps(w.d.to_f32() * a.d);
            acc = _mm256_fmadd_ps(
                scale,
                products(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)),
                acc,
            );
        }
        horizontal_sum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(weights: &[BlockQ8_0], activations: &[ActivationBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (w, a) in weights.iter().zip(activations) {
            // SAFETY (loads): both qs are 32 bytes long; loadu has no alignment needs.
            let x = unsafe { _mm256_loadu_si256(w.qs.as_ptr() as *const __m256i) };
            let y = unsafe { _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i) };
            // maddubs wants one unsigned operand: |x| and y with x's sign.
            let scale = _mm256_set1_ps(w.d.to_f32() * a.d);
            acc = _mm256_fmadd_ps(
                scale,
                products(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)),
                acc,
            );
        }
        horizontal_sum(acc)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QTensor;

    use super::*;

    /// The kernels compute what candle's reference implementation computes
    /// from the same quantized weights (within the activation quantization).
    #[test]
    fn kernels_match_candle_for_q4_1_and_q8_0() {
        let (rows, cols, m) = (70, 128, 6);
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
            let expected: Vec<f32> =
                QMatMul::from_qtensor(QTensor::quantize(&weight, dtype).unwrap())
                    .unwrap()
                    .forward(&input)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
            let ours = QuantMatrix::new(q).unwrap();
            assert!(!matches!(ours.storage, Storage::Candle(_)));
            let got = ours.matmul(&x, m).unwrap();
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (g - e).abs() < 2e-2 * e.abs().max(1.0),
                    "{dtype:?}: {g} vs {e}"
                );
            }
        }
    }
}
