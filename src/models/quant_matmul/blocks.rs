//! GGUF weight blocks, 8-bit activation blocks, and the scalar dot products
//! every SIMD kernel is tested against.

use half::f16;

pub const BLOCK: usize = 32;

/// GGUF Q4_1: `value = d * q + m`, q in 0..16; byte j holds elements j (low
/// nibble) and j + 16 (high nibble).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

/// GGUF Q8_0: `value = d * q`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

/// GGUF Q5_0: `value = d * (q - 16)`, q in 0..32: low nibbles as in Q4_1,
/// fifth bits in `qh` (bit j for element j).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// A Q4_K sub-block of 32, repacked at load: its 6-bit scale and minimum
/// multiplied out by the super-block's (exact in f32), `value = d * q + m`,
/// nibbles laid out as in Q4_1.
#[derive(Clone, Copy)]
pub struct BlockQ4K32 {
    pub d: f32,
    pub m: f32,
    pub qs: [u8; 16],
}

/// A Q6_K block of 32, repacked at load: `value = d[j / 16] * qs[j]`, qs in
/// -32..32 (each half of 16 has its own scale, as in Q6_K).
#[derive(Clone, Copy)]
pub struct BlockQ6K32 {
    pub d: [f32; 2],
    pub qs: [i8; 32],
}

/// Values per K-quant super-block.
pub const SUPER_BLOCK: usize = 256;
const Q4_K_BYTES: usize = 144;
const Q6_K_BYTES: usize = 210;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The 6-bit scale and minimum of Q4_K sub-block `j` (ggml's `get_scale_min_k4`).
fn q4_k_scale_min(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// GGUF Q4_K data (super-blocks of 256: f16 d and dmin, 12 bytes of packed
/// scales and minimums, 128 bytes of nibbles) as blocks of 32.
pub fn repack_q4_k(bytes: &[u8]) -> Vec<BlockQ4K32> {
    let mut out = Vec::with_capacity(bytes.len() / Q4_K_BYTES * 8);
    for block in bytes.chunks_exact(Q4_K_BYTES) {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let (scales, qs) = (&block[4..16], &block[16..]);
        for sub in 0..8 {
            let (scale, min) = q4_k_scale_min(sub, scales);
            // Sub-blocks 2c and 2c + 1 are the low and high nibbles of bytes 32c..32c + 32.
            let source = &qs[32 * (sub / 2)..][..32];
            let nibble = |e: usize| {
                if sub % 2 == 0 {
                    source[e] & 0x0F
                } else {
                    source[e] >> 4
                }
            };
            out.push(BlockQ4K32 {
                d: d * scale as f32,
                m: -(dmin * min as f32),
                qs: std::array::from_fn(|j| nibble(j) | nibble(j + 16) << 4),
            });
        }
    }
    out
}

/// GGUF Q6_K data (super-blocks of 256: 128 bytes of low nibbles, 64 of
/// high bit pairs, 16 signed scales, f16 d) as blocks of 32.
pub fn repack_q6_k(bytes: &[u8]) -> Vec<BlockQ6K32> {
    let mut out = Vec::with_capacity(bytes.len() / Q6_K_BYTES * 8);
    for block in bytes.chunks_exact(Q6_K_BYTES) {
        let (ql, qh, scales) = (&block[..128], &block[128..192], &block[192..208]);
        let d = f16_at(block, 208);
        for sub in 0..8 {
            // Each half of 128 values: four runs of 32 sharing ql and qh bytes.
            let (half, run) = (sub / 4, sub % 4);
            let low = &ql[64 * half + 32 * (run % 2)..][..32];
            let high = &qh[32 * half..][..32];
            let scale = |i: usize| d * scales[8 * half + 2 * run + i] as i8 as f32;
            out.push(BlockQ6K32 {
                d: [scale(0), scale(1)],
                qs: std::array::from_fn(|j| {
                    let low = if run < 2 { low[j] & 0x0F } else { low[j] >> 4 };
                    let high = (high[j] >> (2 * run)) & 3;
                    (low | high << 4) as i8 - 32
                }),
            });
        }
    }
    out
}

/// One block of activations: `value ≈ d * q`, and `s = d * sum(q)`.
#[derive(Clone, Copy)]
pub struct ActivationBlock {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; 32],
}

pub fn quantize_block(x: &[f32]) -> ActivationBlock {
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

/// A weight block as the kernels see it: integer quants and their scales.
/// Every kernel (row by row, panels, every CPU level) sums a block as the
/// exact integer dot product of its quants with the activation block's,
/// then adds `d * a.d * sum` (each half on its own when `SPLIT`) and
/// `m * a.s` (when `OFFSET`) to the row's total in that order, with fused
/// multiply-adds; so they all give the same bits.
pub trait QuantBlock: Copy + Sync + Send {
    /// Two scales a block (elements 0..16 and 16..32).
    const SPLIT: bool;
    /// `value = d * q + m`.
    const OFFSET: bool;
    /// The quants as signed bytes.
    fn integers(&self) -> [i8; BLOCK];
    /// Scales of the two halves (equal unless `SPLIT`).
    fn d(&self) -> [f32; 2];
    /// The offset (`OFFSET` types only).
    fn m(&self) -> f32 {
        0.0
    }
    /// The block's values in f32, computed as ggml (and candle)
    /// dequantize them: `d * q`, plus `m` for `OFFSET` types.
    fn values(&self) -> [f32; BLOCK] {
        let (q, d, m) = (self.integers(), self.d(), self.m());
        std::array::from_fn(|j| {
            let value = d[j / 16] * q[j] as f32;
            if Self::OFFSET { value + m } else { value }
        })
    }
    /// Blocks whose scale (and offset) are f16: their bits, `d | m << 16`,
    /// for kernels that convert four blocks' at once.
    const HALF_SCALES: bool = false;
    fn half_scales(&self) -> u32 {
        0
    }
}

fn nibble_integers(qs: &[u8; 16]) -> [i8; BLOCK] {
    std::array::from_fn(|j| {
        if j < 16 {
            (qs[j] & 0x0F) as i8
        } else {
            (qs[j - 16] >> 4) as i8
        }
    })
}

impl QuantBlock for BlockQ4_1 {
    const SPLIT: bool = false;
    const OFFSET: bool = true;
    const HALF_SCALES: bool = true;
    #[inline(always)]
    fn half_scales(&self) -> u32 {
        self.d.to_bits() as u32 | (self.m.to_bits() as u32) << 16
    }
    fn integers(&self) -> [i8; BLOCK] {
        nibble_integers(&self.qs)
    }
    #[inline(always)]
    fn d(&self) -> [f32; 2] {
        [self.d.to_f32(); 2]
    }
    #[inline(always)]
    fn m(&self) -> f32 {
        self.m.to_f32()
    }
}

impl QuantBlock for BlockQ4K32 {
    const SPLIT: bool = false;
    const OFFSET: bool = true;
    fn integers(&self) -> [i8; BLOCK] {
        nibble_integers(&self.qs)
    }
    #[inline(always)]
    fn d(&self) -> [f32; 2] {
        [self.d; 2]
    }
    #[inline(always)]
    fn m(&self) -> f32 {
        self.m
    }
}

impl QuantBlock for BlockQ5_0 {
    const SPLIT: bool = false;
    const OFFSET: bool = false;
    const HALF_SCALES: bool = true;
    #[inline(always)]
    fn half_scales(&self) -> u32 {
        self.d.to_bits() as u32
    }
    fn integers(&self) -> [i8; BLOCK] {
        let high = u32::from_le_bytes(self.qh);
        let low = nibble_integers(&self.qs);
        std::array::from_fn(|j| (low[j] | (((high >> j) & 1) << 4) as i8) - 16)
    }
    #[inline(always)]
    fn d(&self) -> [f32; 2] {
        [self.d.to_f32(); 2]
    }
}

impl QuantBlock for BlockQ8_0 {
    const SPLIT: bool = false;
    const OFFSET: bool = false;
    const HALF_SCALES: bool = true;
    #[inline(always)]
    fn half_scales(&self) -> u32 {
        self.d.to_bits() as u32
    }
    fn integers(&self) -> [i8; BLOCK] {
        self.qs
    }
    #[inline(always)]
    fn d(&self) -> [f32; 2] {
        [self.d.to_f32(); 2]
    }
}

impl QuantBlock for BlockQ6K32 {
    const SPLIT: bool = true;
    const OFFSET: bool = false;
    fn integers(&self) -> [i8; BLOCK] {
        self.qs
    }
    #[inline(always)]
    fn d(&self) -> [f32; 2] {
        self.d
    }
}

/// Adds one block's exact integer sums (`low`: elements 0..16, `high`:
/// 16..32) to a row's total, as every kernel does.
#[inline(always)]
pub fn accumulate<B: QuantBlock>(
    total: f32,
    w: &B,
    a: &ActivationBlock,
    low: i32,
    high: i32,
) -> f32 {
    let d = w.d();
    let mut total = total;
    if B::SPLIT {
        total = (d[0] * a.d).mul_add(low as f32, total);
        total = (d[1] * a.d).mul_add(high as f32, total);
    } else {
        total = (d[0] * a.d).mul_add((low + high) as f32, total);
    }
    if B::OFFSET {
        total = w.m().mul_add(a.s, total);
    }
    total
}

/// A weight row against an activation row: the reference.
pub fn dot<B: QuantBlock>(weights: &[B], activations: &[ActivationBlock]) -> f32 {
    weights.iter().zip(activations).fold(0.0, |total, (w, a)| {
        let q = w.integers();
        let half = |h: usize| -> i32 {
            (16 * h..16 * h + 16)
                .map(|j| q[j] as i32 * a.qs[j] as i32)
                .sum()
        };
        accumulate(total, w, a, half(0), half(1))
    })
}
