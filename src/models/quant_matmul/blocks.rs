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

pub fn dot_q4_1(weights: &[BlockQ4_1], activations: &[ActivationBlock]) -> f32 {
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

pub fn dot_q5_0(weights: &[BlockQ5_0], activations: &[ActivationBlock]) -> f32 {
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

pub fn dot_q8_0(weights: &[BlockQ8_0], activations: &[ActivationBlock]) -> f32 {
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
