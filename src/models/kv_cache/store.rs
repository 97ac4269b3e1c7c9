//! The keys and values themselves: one array per layer, laid out
//! `[block][slot in block][kv head][head_dim]`, in f32, f16 or Q8_0 (int8
//! with one f32 scale per head vector, as llama.cpp's `q8_0` cache type
//! quantizes per 32 values). The arrays are anonymous mappings without a
//! swap reservation, so the operating system commits their pages only as
//! blocks are first written: a pool sized for every sequence at the full
//! context costs memory in proportion to what is used.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use bytemuck::Pod;
use half::f16;
use memmap2::{MmapMut, MmapOptions};

use super::KvDType;

/// A zeroed array of `len` `T`s, committed page by page as it is written.
struct LazyArray<T> {
    map: MmapMut,
    len: usize,
    element: PhantomData<T>,
}

impl<T: Pod> LazyArray<T> {
    fn new(len: usize) -> std::io::Result<Self> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| std::io::Error::other("KV array size overflows"))?;
        // A mapping needs at least one byte; page alignment suits any `T`.
        let map = MmapOptions::new()
            .len(bytes.max(1))
            .no_reserve_swap()
            .map_anon()?;
        Ok(Self {
            map,
            len,
            element: PhantomData,
        })
    }
}

impl<T: Pod> Deref for LazyArray<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        bytemuck::cast_slice(&self.map[..self.len * size_of::<T>()])
    }
}

impl<T: Pod> DerefMut for LazyArray<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.map[..self.len * size_of::<T>()])
    }
}

/// The per-layer arrays of one element type.
enum Arrays {
    F32 {
        keys: Vec<LazyArray<f32>>,
        values: Vec<LazyArray<f32>>,
    },
    /// f16 bit patterns.
    F16 {
        keys: Vec<LazyArray<u16>>,
        values: Vec<LazyArray<u16>>,
    },
    Q8 {
        keys: Vec<LazyArray<i8>>,
        values: Vec<LazyArray<i8>>,
        /// One scale per (slot, kv head).
        key_scales: Vec<LazyArray<f32>>,
        value_scales: Vec<LazyArray<f32>>,
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

fn layers<T: Pod>(shape: KvShape, len: usize) -> std::io::Result<Vec<LazyArray<T>>> {
    (0..shape.layers).map(|_| LazyArray::new(len)).collect()
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

fn copy_within<T: Pod>(arrays: &mut [LazyArray<T>], from: usize, to: usize, len: usize) {
    for array in arrays {
        array.copy_within(from..from + len, to);
    }
}

impl KvStore {
    /// Room for `slots` tokens of `shape`; fails when the address space
    /// cannot hold it.
    pub fn new(shape: KvShape, dtype: KvDType, slots: usize) -> std::io::Result<Self> {
        let len = slots * shape.kv_width();
        let arrays = match dtype {
            KvDType::F32 => Arrays::F32 {
                keys: layers(shape, len)?,
                values: layers(shape, len)?,
            },
            KvDType::F16 => Arrays::F16 {
                keys: layers(shape, len)?,
                values: layers(shape, len)?,
            },
            KvDType::Q8_0 => Arrays::Q8 {
                keys: layers(shape, len)?,
                values: layers(shape, len)?,
                key_scales: layers(shape, slots * shape.n_kv_head)?,
                value_scales: layers(shape, slots * shape.n_kv_head)?,
            },
        };
        Ok(Self { shape, arrays })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// 64 GiB of keys and as much of values, past this machine's memory:
    /// reserving them commits nothing, and a slot at the far end is written
    /// and read back.
    #[test]
    fn a_pool_past_the_machine_is_address_space_until_written() {
        let shape = KvShape {
            layers: 1,
            n_kv_head: 1,
            head_dim: 64,
        };
        let slots = 1 << 28;
        let mut store = KvStore::new(shape, KvDType::F32, slots).unwrap();
        let last = slots - 1;
        let (k, v) = (vec![0.5f32; 64], vec![2.0f32; 64]);
        store.write(0, last, &k, &v);
        let layer = store.layer(0);
        assert_eq!(layer.key_dot(last, 0, &vec![1.0; 64]), 32.0);
        assert_eq!(
            layer.key_dot(0, 0, &vec![1.0; 64]),
            0.0,
            "unwritten slots read zero"
        );
        let mut out = vec![0.0; 64];
        layer.add_value(last, 0, 0.25, &mut out);
        assert_eq!(out, vec![0.5; 64]);
    }
}
