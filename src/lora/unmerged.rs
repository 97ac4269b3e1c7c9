//! An adapter laid out for the CPU llama engine, applied unmerged:
//! `y = W x + scale * B (A x)`. Every factor lives in one contiguous buffer,
//! so dropping the last reference returns the whole adapter's memory at
//! once. Factors that bf16 holds exactly (an adapter saved in bf16, as PEFT
//! often does) are kept in bf16: half the memory traffic per token, and the
//! same values.

use crate::models::spin_pool::for_each_chunk_mut;
use half::bf16;

use super::adapter::Adapter;
use super::projection::Projection;

/// Rows (tokens) with an adapter below which the deltas are computed on
/// the calling thread.
const PARALLEL_MIN_ROWS: usize = 2;

/// Where one projection's factors sit in the buffer.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// `A`, `[rank, inputs]` row-major.
    a: usize,
    /// `B` transposed, `[rank, outputs]` row-major.
    b: usize,
    inputs: usize,
    outputs: usize,
}

/// The head layout of the base, for the GGUF row order of q and k.
#[derive(Debug, Clone, Copy)]
pub struct HeadLayout {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// For each row of a GGUF q/k projection, the row of the Hugging Face layout
/// it holds. llama.cpp's converter reorders each head's rows from
/// `[first halves..., second halves...]` to interleaved pairs so that rope
/// rotates adjacent values: GGUF row `2i + s` of a head is HF row `s * half + i`.
pub fn gguf_row_source(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    (0..heads * head_dim)
        .map(|row| {
            let (head, within) = (row / head_dim, row % head_dim);
            head * head_dim + (within % 2) * half + within / 2
        })
        .collect()
}

/// A factor element, widened to f32 where it is used.
pub(crate) trait Element: Copy + Send + Sync {
    fn value(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn value(self) -> f32 {
        self.to_f32()
    }
}

enum Factors {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// `a . x` in 16 independent lanes, so that it vectorizes.
pub(crate) fn dot<E: Element>(a: &[E], x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a_chunks, x_chunks) = (a.chunks_exact(16), x.chunks_exact(16));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(x_chunks.remainder())
        .map(|(a, x)| a.value() * x)
        .sum();
    for (a, x) in a_chunks.zip(x_chunks) {
        for lane in 0..16 {
            lanes[lane] += a[lane].value() * x[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `y += scale * B (A x)` for one token.
fn add_product<E: Element>(
    data: &[E],
    rank: usize,
    scale: f32,
    slot: &Slot,
    x: &[f32],
    y: &mut [f32],
) {
    let mut t = [0f32; 64];
    let mut wide = Vec::new();
    let t: &mut [f32] = if rank <= t.len() {
        &mut t[..rank]
    } else {
        wide.resize(rank, 0.0);
        &mut wide
    };
    let a = &data[slot.a..slot.a + rank * slot.inputs];
    for (t, a_row) in t.iter_mut().zip(a.chunks_exact(slot.inputs)) {
        *t = dot(a_row, x) * scale;
    }
    let b = &data[slot.b..slot.b + rank * slot.outputs];
    for (&t, b_row) in t.iter().zip(b.chunks_exact(slot.outputs)) {
        y.iter_mut()
            .zip(b_row)
            .for_each(|(y, b)| *y += t * b.value());
    }
}

pub struct UnmergedAdapter {
    rank: usize,
    scale: f32,
    data: Factors,
    /// `slots[layer][projection]`.
    slots: Vec<[Option<Slot>; 7]>,
    /// Names this adapter in the prefix cache's hashes: unique for the
    /// process's life, so a reloaded adapter never meets an earlier one's blocks.
    cache_seed: u64,
    /// The factors on an accelerator, for a base run by the device decoder
    /// (the CPU factors are then empty).
    device: Option<std::sync::Arc<crate::models::device_decoder::DeviceAdapter>>,
}

/// The next adapter's `cache_seed` (0 is the base model's).
static NEXT_CACHE_SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl std::fmt::Debug for UnmergedAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnmergedAdapter")
            .field("rank", &self.rank)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl UnmergedAdapter {
    /// Lays `adapter` out for a base with `layers` layers and `heads`'
    /// layout, its q/k factors reordered to the GGUF rows when `gguf_rows`.
    /// The adapter must have been checked against the base's shapes.
    pub fn new(
        adapter: &Adapter,
        layers: usize,
        heads: HeadLayout,
        gguf_rows: bool,
    ) -> Result<Self, String> {
        let rank = adapter.config.r;
        let total: usize = adapter
            .factors
            .values()
            .map(|f| f.a.elem_count() + f.b.elem_count())
            .sum();
        let mut data = Vec::with_capacity(total);
        let mut slots = vec![[None; 7]; layers];
        let fail = |e: candle_core::Error| e.to_string();
        for (&(layer, projection), factors) in &adapter.factors {
            let (outputs, inputs) = (factors.b.dims()[0], factors.a.dims()[1]);
            let a = factors.a.flatten_all().and_then(|t| t.to_vec1::<f32>());
            let b = factors
                .b
                .t()
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>());
            let (a, b_t) = (a.map_err(fail)?, b.map_err(fail)?);
            let order = match projection {
                Projection::Q if gguf_rows => Some(gguf_row_source(heads.n_head, heads.head_dim)),
                Projection::K if gguf_rows => {
                    Some(gguf_row_source(heads.n_kv_head, heads.head_dim))
                }
                _ => None,
            };
            let slot = Slot {
                a: data.len(),
                b: data.len() + a.len(),
                inputs,
                outputs,
            };
            data.extend_from_slice(&a);
            for row in b_t.chunks_exact(outputs) {
                match &order {
                    Some(order) => data.extend(order.iter().map(|&source| row[source])),
                    None => data.extend_from_slice(row),
                }
            }
            let entry = slots
                .get_mut(layer)
                .ok_or_else(|| format!("the adapter has layer {layer}; the base has {layers}"))?;
            entry[projection as usize] = Some(slot);
        }
        let exact_in_bf16 = data.iter().all(|&v| bf16::from_f32(v).to_f32() == v);
        let data = if exact_in_bf16 {
            Factors::Bf16(data.into_iter().map(bf16::from_f32).collect())
        } else {
            Factors::F32(data)
        };
        Ok(Self {
            rank,
            scale: adapter.scale as f32,
            data,
            slots,
            cache_seed: NEXT_CACHE_SEED.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            device: None,
        })
    }

    /// An adapter whose factors live on the device decoder's device.
    pub fn on_device(
        adapter: &Adapter,
        factors: std::sync::Arc<crate::models::device_decoder::DeviceAdapter>,
    ) -> Self {
        Self {
            rank: adapter.config.r,
            scale: adapter.scale as f32,
            data: Factors::F32(Vec::new()),
            slots: Vec::new(),
            cache_seed: NEXT_CACHE_SEED.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            device: Some(factors),
        }
    }

    /// The factors on the device, for adapters made by `on_device`.
    pub fn device_factors(&self) -> Option<&crate::models::device_decoder::DeviceAdapter> {
        self.device.as_deref()
    }

    /// Where this adapter's prefix-cache hash chains start.
    pub fn cache_seed(&self) -> u64 {
        self.cache_seed
    }

    /// Bytes of factors held.
    pub fn bytes(&self) -> usize {
        let device = self.device.as_ref().map_or(0, |d| d.bytes());
        device
            + match &self.data {
                Factors::F32(data) => data.len() * 4,
                Factors::Bf16(data) => data.len() * 2,
            }
    }

    /// Adds the delta of `projection` for one token: `x` is the projection's
    /// input, `y` its output (this projection's columns only).
    fn add_row(&self, slot: &Slot, x: &[f32], y: &mut [f32]) {
        match &self.data {
            Factors::F32(data) => add_product(data, self.rank, self.scale, slot, x, y),
            Factors::Bf16(data) => add_product(data, self.rank, self.scale, slot, x, y),
        }
    }

    /// Adds this adapter's deltas for one token to `y`, the stacked outputs
    /// of `parts` (each projection and its first column); `x` is their input.
    pub fn add_to_row(
        &self,
        layer: usize,
        parts: &[(Projection, usize)],
        x: &[f32],
        y: &mut [f32],
    ) {
        let Some(slots) = self.slots.get(layer) else {
            return;
        };
        for &(projection, column) in parts {
            if let Some(slot) = &slots[projection as usize] {
                self.add_row(slot, x, &mut y[column..column + slot.outputs]);
            }
        }
    }
}

/// Adds each row's adapter deltas: row `r` of `x` (`[n, x_width]`) and `y`
/// (`[n, y_width]`) runs with `adapters[r]`. Rows are shared between the
/// threads once two or more carry an adapter.
pub fn add_deltas(
    adapters: &[Option<&UnmergedAdapter>],
    layer: usize,
    parts: &[(Projection, usize)],
    x: &[f32],
    y: &mut [f32],
) {
    let with_adapter = adapters.iter().filter(|a| a.is_some()).count();
    if with_adapter == 0 {
        return;
    }
    let n = adapters.len();
    let (x_width, y_width) = (x.len() / n, y.len() / n);
    let work = |(row, y_row): (usize, &mut [f32])| {
        if let Some(adapter) = adapters[row] {
            adapter.add_to_row(layer, parts, &x[row * x_width..(row + 1) * x_width], y_row);
        }
    };
    if with_adapter < PARALLEL_MIN_ROWS {
        y.chunks_exact_mut(y_width).enumerate().for_each(work);
    } else {
        for_each_chunk_mut(y, y_width, |row, y_row| work((row, y_row)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_rows_interleave_each_heads_halves() {
        // One head of 4: HF rows [a0 a1 b0 b1] are stored as [a0 b0 a1 b1].
        assert_eq!(gguf_row_source(1, 4), vec![0, 2, 1, 3]);
        assert_eq!(gguf_row_source(2, 4), vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }
}
