//! The keys and values themselves: one array per layer, laid out
//! `[block][slot in block][kv head][head_dim]`, in f32, f16 or Q8_0 (int8
//! with one f32 scale per head vector, as llama.cpp's `q8_0` cache type
//! quantizes per 32 values). The arrays are zero-initialised allocations, so
//! the operating system commits their pages only as blocks are first written.

use half::f16;

use super::KvDType;

/// The per-layer arrays of one element type.
enum Arrays {
    F32 {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    /// f16 bit patterns (u16 so that the zeroed allocation stays lazy).
    F16 {
        keys: Vec<Vec<u16>>,
        values: Vec<Vec<u16>>,
    },
    Q8 {
        keys: Vec<Vec<i8>>,
        values: Vec<Vec<i8>>,
        /// One scale per (slot, kv head).
        key_scales: Vec<Vec<f32>>,
        value_scales: Vec<Vec<f32>>,
    },
}

pub struct KvStore {
    shape: KvShape,
    arrays: Arrays,
}

/// The width of what is stored per token and layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl KvShape {
    pub fn kv_width(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Bytes one token takes over all layers (keys and values).
    pub fn bytes_per_token(&self, dtype: KvDType) -> usize {
        let per_layer = match dtype {
            KvDType::F32 => self.kv_width() * 4,
            KvDType::F16 => self.kv_width() * 2,
            KvDType::Q8_0 => self.kv_width() + self.n_kv_head * 4,
        };
        2 * self.layers * per_layer
    }
}

fn layers<T: Clone + Default>(shape: KvShape, len: usize) -> Vec<Vec<T>> {
    (0..shape.layers).map(|_| vec![T::default(); len]).collect()
}

/// `x ≈ scale * q` with q in -127..=127.
fn quantize(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (q, v) in q.iter_mut().zip(x) {
        *q = (v * inverse).round() as i8;
    }
    scale
}

fn copy_within<T: Copy>(arrays: &mut [Vec<T>], from: usize, to: usize, len: usize) {
    for array in arrays {
        array.copy_within(from..from + len, to);
    }
}

impl KvStore {
    /// Room for `slots` tokens of `shape`.
    pub fn new(shape: KvShape, dtype: KvDType, slots: usize) -> Self {
        let len = slots * shape.kv_width();
        let arrays = match dtype {
            KvDType::F32 => Arrays::F32 {
                keys: layers(shape, len),
                values: layers(shape, len),
            },
            KvDType::F16 => Arrays::F16 {
                keys: layers(shape, len),
                values: layers(shape, len),
            },
            KvDType::Q8_0 => Arrays::Q8 {
                keys: layers(shape, len),
                values: layers(shape, len),
                key_scales: layers(shape, slots * shape.n_kv_head),
                value_scales: layers(shape, slots * shape.n_kv_head),
            },
        };
        Self { shape, arrays }
    }

    /// Stores one token's keys and values (`[kv head][head_dim]` each) in `slot`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let (width, head_dim) = (self.shape.kv_width(), self.shape.head_dim);
        let range = slot * width..(slot + 1) * width;
        match &mut self.arrays {
            Arrays::F32 { keys, values } => {
                keys[layer][range.clone()].copy_from_slice(k);
                values[layer][range].copy_from_slice(v);
            }
            Arrays::F16 { keys, values } => {
                for (out, x) in keys[layer][range.clone()].iter_mut().zip(k) {
                    *out = f16::from_f32(*x).to_bits();
                }
                for (out, x) in values[layer][range].iter_mut().zip(v) {
                    *out = f16::from_f32(*x).to_bits();
                }
            }
            Arrays::Q8 {
                keys,
                values,
                key_scales,
                value_scales,
            } => {
                let heads = self.shape.n_kv_head;
                for (stored, scales, x) in [
                    (&mut keys[layer], &mut key_scales[layer], k),
                    (&mut values[layer], &mut value_scales[layer], v),
                ] {
                    let q = &mut stored[range.clone()];
                    for h in 0..heads {
                        let part = h * head_dim..(h + 1) * head_dim;
                        scales[slot * heads + h] = quantize(&x[part.clone()], &mut q[part]);
                    }
                }
            }
        }
    }

    /// Copies `count` slots from slot `from` to slot `to`, in every layer
    /// (copy on write of a shared, partly filled block).
    pub fn copy_slots(&mut self, from: usize, to: usize, count: usize) {
        let (width, heads) = (self.shape.kv_width(), self.shape.n_kv_head);
        let (from_v, to_v, len_v) = (from * width, to * width, count * width);
        match &mut self.arrays {
            Arrays::F32 { keys, values } => {
                copy_within(keys, from_v, to_v, len_v);
                copy_within(values, from_v, to_v, len_v);
            }
            Arrays::F16 { keys, values } => {
                copy_within(keys, from_v, to_v, len_v);
                copy_within(values, from_v, to_v, len_v);
            }
            Arrays::Q8 {
                keys,
                values,
                key_scales,
                value_scales,
            } => {
                copy_within(keys, from_v, to_v, len_v);
                copy_within(values, from_v, to_v, len_v);
                let (from_s, to_s, len_s) = (from * heads, to * heads, count * heads);
                copy_within(key_scales, from_s, to_s, len_s);
                copy_within(value_scales, from_s, to_s, len_s);
            }
        }
    }

    /// What attention reads of one layer.
    pub fn layer(&self, layer: usize) -> LayerView<'_> {
        let arrays = match &self.arrays {
            Arrays::F32 { keys, values } => LayerArrays::F32 {
                keys: &keys[layer],
                values: &values[layer],
            },
            Arrays::F16 { keys, values } => LayerArrays::F16 {
                keys: &keys[layer],
                values: &values[layer],
            },
            Arrays::Q8 {
                keys,
                values,
                key_scales,
                value_scales,
            } => LayerArrays::Q8 {
                keys: &keys[layer],
                values: &values[layer],
                key_scales: &key_scales[layer],
                value_scales: &value_scales[layer],
            },
        };
        LayerView {
            shape: self.shape,
            arrays,
        }
    }
}

/// One layer's keys and values, read by (slot, kv head).
#[derive(Clone, Copy)]
pub struct LayerView<'a> {
    shape: KvShape,
    arrays: LayerArrays<'a>,
}

#[derive(Clone, Copy)]
enum LayerArrays<'a> {
    F32 {
        keys: &'a [f32],
        values: &'a [f32],
    },
    F16 {
        keys: &'a [u16],
        values: &'a [u16],
    },
    Q8 {
        keys: &'a [i8],
        values: &'a [i8],
        key_scales: &'a [f32],
        value_scales: &'a [f32],
    },
}

impl LayerView<'_> {
    /// Where kv head `head` of `slot` lies in a layer's array, and its scale's index.
    fn place(&self, slot: usize, head: usize) -> (std::ops::Range<usize>, usize) {
        let start = slot * self.shape.kv_width() + head * self.shape.head_dim;
        (
            start..start + self.shape.head_dim,
            slot * self.shape.n_kv_head + head,
        )
    }

    /// `query · key` of kv head `head` at `slot`.
    pub fn key_dot(&self, slot: usize, head: usize, query: &[f32]) -> f32 {
        let (range, scale) = self.place(slot, head);
        match self.arrays {
            LayerArrays::F32 { keys, .. } => crate::lora::unmerged::dot(query, &keys[range]),
            LayerArrays::F16 { keys, .. } => query
                .iter()
                .zip(&keys[range])
                .map(|(q, k)| q * f16::from_bits(*k).to_f32())
                .sum(),
            LayerArrays::Q8 {
                keys, key_scales, ..
            } => {
                let sum: f32 = query
                    .iter()
                    .zip(&keys[range])
                    .map(|(q, k)| q * *k as f32)
                    .sum();
                sum * key_scales[scale]
            }
        }
    }

    /// `out += weight * value` of kv head `head` at `slot`.
    pub fn add_value(&self, slot: usize, head: usize, weight: f32, out: &mut [f32]) {
        let (range, scale) = self.place(slot, head);
        match self.arrays {
            LayerArrays::F32 { values, .. } => out
                .iter_mut()
                .zip(&values[range])
                .for_each(|(o, v)| *o += weight * v),
            LayerArrays::F16 { values, .. } => out
                .iter_mut()
                .zip(&values[range])
                .for_each(|(o, v)| *o += weight * f16::from_bits(*v).to_f32()),
            LayerArrays::Q8 {
                values,
                value_scales,
                ..
            } => {
                let scaled = weight * value_scales[scale];
                out.iter_mut()
                    .zip(&values[range])
                    .for_each(|(o, v)| *o += scaled * *v as f32);
            }
        }
    }
}
