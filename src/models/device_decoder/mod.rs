//! Llama-family decoders (llama GGUF files; Llama, Mistral and Qwen2
//! safetensors checkpoints) in candle tensor ops, for accelerators: the
//! same code runs on CUDA and on the CPU (where the tests check it against
//! transformers; the CPU serves with `cpu_decoder`, which is faster there).
//!
//! Every running sequence goes through one forward pass per step: the
//! projections and the MLP see all rows at once (one read of the weights),
//! decode attention runs batched over the sequences' KV slots, and prompt
//! chunks attend one sequence at a time. GGUF projections stay quantized
//! (candle's quantized matmul kernels); checkpoints run in their bf16 / f16.
//! LoRA adapters run merged (at load) or unmerged, per sequence, mixed in
//! one batch.
//!
//! Keys and values live in one preallocated slab per layer, a slot of the
//! full served context per sequence: its size is fixed at load (and checked
//! against the GPU's free memory), admission reserves a slot for each
//! sequence a request may run, and a request that needs more slots than
//! exist is refused, so a forward pass never allocates KV memory.

mod attention;
mod forward;
mod load;
mod sequence;

use std::sync::{Arc, Mutex};

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use super::cpu_decoder::projection_shape;
use super::kv_cache::KvBudget;
use crate::lora::unmerged::gguf_row_source;
use crate::lora::{Adapter, HeadLayout, Projection, UnmergedAdapter};

pub use sequence::DeviceSequence;

/// A projection's weights: quantized (GGUF) or dense (checkpoints).
enum Weight {
    Quantized(QMatMul),
    Dense(candle_nn::Linear),
}

impl Weight {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Quantized(w) => w.forward(x),
            Self::Dense(w) => w.forward(x),
        }
    }
}

struct Layer {
    attention_norm: Tensor,
    q: Weight,
    k: Weight,
    v: Weight,
    o: Weight,
    ffn_norm: Tensor,
    gate: Weight,
    up: Weight,
    down: Weight,
}

/// How a head's dimensions are paired for the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RopeLayout {
    /// (0, 1), (2, 3), ...: GGUF stores llama's q/k rows permuted for this.
    AdjacentPairs,
    /// (i, i + head_dim / 2): transformers' checkpoints.
    Halves,
}

/// Every sequence's keys and values: per layer, `[slots * context, kv_width]`
/// rows, sequence `s`'s position `p` at row `s * context + p`.
struct KvSlab {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    free: Mutex<Vec<usize>>,
    slots: usize,
}

pub struct DeviceDecoder {
    embedding: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Weight,
    vocab: usize,
    hidden: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    eps: f32,
    rope_layout: RopeLayout,
    /// `[context, head_dim / 2]` in the activations' type.
    cos: Tensor,
    sin: Tensor,
    /// Positions a sequence may use: the slab's slot length.
    context: usize,
    /// The activations' and the KV slab's type.
    dtype: DType,
    device: Device,
    kv: KvSlab,
    budget: KvBudget,
}

/// An adapter's factors on the model's device: for each (layer,
/// projection) it targets, `a_t` `[inputs, rank]` and `b_t` `[rank,
/// outputs]` with the scale folded in, so the delta is `x · a_t · b_t`.
pub struct DeviceAdapter {
    factors: Vec<[Option<(Tensor, Tensor)>; 7]>,
    bytes: usize,
}

impl DeviceAdapter {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl std::fmt::Debug for DeviceAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAdapter")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl DeviceDecoder {
    pub fn max_positions(&self) -> usize {
        self.context
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The KV slots as admission sees them: one block is one sequence's slot.
    pub fn kv_budget(&self) -> &KvBudget {
        &self.budget
    }

    /// Sequences the KV slab holds at once.
    pub fn kv_slots(&self) -> usize {
        self.kv.slots
    }

    fn heads(&self) -> HeadLayout {
        HeadLayout {
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
        }
    }

    /// Checks `adapter` fits this base and copies its factors to the device
    /// (q/k rows reordered as GGUF stores them, for GGUF bases).
    pub fn prepare_adapter(&self, adapter: &Adapter) -> Result<UnmergedAdapter, String> {
        let heads = self.heads();
        let (q_width, kv_width) = (
            heads.n_head * heads.head_dim,
            heads.n_kv_head * heads.head_dim,
        );
        let ffn = self.ffn_width();
        let hidden = self.hidden;
        adapter.check_base(self.layers.len(), |p| {
            projection_shape(p, hidden, q_width, kv_width, ffn)
        })?;
        let fail = |e: candle_core::Error| e.to_string();
        let scale = adapter.scale;
        let mut factors: Vec<[Option<(Tensor, Tensor)>; 7]> =
            (0..self.layers.len()).map(|_| Default::default()).collect();
        let mut bytes = 0;
        for (&(layer, projection), f) in &adapter.factors {
            let a_t = f.a.to_dtype(DType::F32).and_then(|a| a.t()).map_err(fail)?;
            let mut b = (f.b.to_dtype(DType::F64).map_err(fail)? * scale)
                .and_then(|b| b.to_dtype(DType::F32))
                .map_err(fail)?;
            let order = match projection {
                Projection::Q if self.rope_layout == RopeLayout::AdjacentPairs => {
                    Some(gguf_row_source(heads.n_head, heads.head_dim))
                }
                Projection::K if self.rope_layout == RopeLayout::AdjacentPairs => {
                    Some(gguf_row_source(heads.n_kv_head, heads.head_dim))
                }
                _ => None,
            };
            if let Some(order) = order {
                let order: Vec<u32> = order.into_iter().map(|i| i as u32).collect();
                let index = Tensor::new(order.as_slice(), b.device()).map_err(fail)?;
                b = b.index_select(&index, 0).map_err(fail)?;
            }
            let place = |t: Tensor| {
                t.contiguous()
                    .and_then(|t| t.to_dtype(self.dtype))
                    .and_then(|t| t.to_device(&self.device))
                    .map_err(fail)
            };
            let (a_t, b_t) = (place(a_t)?, place(b.t().map_err(fail)?)?);
            bytes += (a_t.elem_count() + b_t.elem_count()) * self.dtype.size_in_bytes();
            let entry = factors
                .get_mut(layer)
                .ok_or_else(|| format!("the adapter has layer {layer}; the base has fewer"))?;
            entry[projection as usize] = Some((a_t, b_t));
        }
        Ok(UnmergedAdapter::on_device(
            adapter,
            Arc::new(DeviceAdapter { factors, bytes }),
        ))
    }

    fn ffn_width(&self) -> usize {
        self.layers.first().map_or(0, |l| match &l.down {
            Weight::Quantized(QMatMul::QTensor(t)) => t.shape().dims()[1],
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims()[1],
            Weight::Dense(w) => w.weight().dims()[1],
        })
    }

    /// Takes a free KV slot, or None when every slot is in use.
    fn take_slot(&self) -> Option<usize> {
        self.kv.free.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn release_slot(&self, slot: usize) {
        self.kv
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(slot);
    }

    /// Copies the first `positions` rows of slot `from` to slot `to`, every layer.
    fn copy_slot(&self, from: usize, to: usize, positions: usize) -> candle_core::Result<()> {
        if positions == 0 {
            return Ok(());
        }
        let rows = |slot: usize| -> candle_core::Result<Tensor> {
            let ids: Vec<u32> = (0..positions)
                .map(|p| (slot * self.context + p) as u32)
                .collect();
            Tensor::new(ids.as_slice(), &self.device)
        };
        let (source, target) = (rows(from)?, rows(to)?);
        for slab in self.kv.keys.iter().chain(&self.kv.values) {
            let width = slab.dim(1)?;
            let part = slab.index_select(&source, 0)?;
            let index = target
                .unsqueeze(1)?
                .broadcast_as((positions, width))?
                .contiguous()?;
            slab.scatter_set(&index, &part, 0)?;
        }
        Ok(())
    }
}
