//! Llama-family GGUF models on the CPU: quantized matmuls for the projections
//! (`quant_matmul`), and everything between them (norms, rotary embedding,
//! attention over the model's paged KV cache, SwiGLU) as plain loops over f32
//! slices (`forward`). For one token at a time these small steps cost more as
//! candle tensor ops (an allocation, and for attention a threaded GEMM, per
//! op) than the work they do; keys and values are written once into their
//! block, and grouped-query heads read their shared KV head directly.

mod forward;
mod sequence;

use std::io::{Read, Seek};

use candle_core::Device;
use candle_core::quantized::gguf_file;

use super::kv_cache::{KvCache, KvCacheConfig, KvShape};
use super::quant_matmul::QuantMatrix;
use crate::lora::{Adapter, HeadLayout, Projection, UnmergedAdapter};

pub use sequence::LlamaGgufSequence;

/// Query-key pairs per head below which attention runs on the calling thread.
const PARALLEL_ATTENTION_MIN_SCORES: usize = 64;

struct Layer {
    attention_norm: Vec<f32>,
    /// q, k and v projections stacked by rows: one matmul instead of three.
    qkv: QuantMatrix,
    o: QuantMatrix,
    ffn_norm: Vec<f32>,
    /// gate and up projections stacked by rows.
    gate_up: QuantMatrix,
    down: QuantMatrix,
}

/// The GGUF tensor name of a projection within a block.
fn gguf_name(projection: Projection) -> &'static str {
    match projection {
        Projection::Q => "attn_q",
        Projection::K => "attn_k",
        Projection::V => "attn_v",
        Projection::O => "attn_output",
        Projection::Gate => "ffn_gate",
        Projection::Up => "ffn_up",
        Projection::Down => "ffn_down",
    }
}

/// (inputs, outputs) of a projection.
fn projection_shape(
    projection: Projection,
    hidden: usize,
    q_width: usize,
    kv_width: usize,
    ffn: usize,
) -> (usize, usize) {
    match projection {
        Projection::Q => (hidden, q_width),
        Projection::K | Projection::V => (hidden, kv_width),
        Projection::O => (q_width, hidden),
        Projection::Gate | Projection::Up => (hidden, ffn),
        Projection::Down => (ffn, hidden),
    }
}

/// Checks an adapter to merge against the file's shapes before any tensor is read.
fn check_adapter(
    ct: &gguf_file::Content,
    adapter: &Adapter,
    layers: usize,
    heads: HeadLayout,
) -> candle_core::Result<()> {
    let hidden = heads.n_head * heads.head_dim;
    let ffn = ct
        .tensor_infos
        .get("blk.0.ffn_down.weight")
        .map_or(0, |info| info.shape.dims()[info.shape.rank() - 1]);
    let kv_width = heads.n_kv_head * heads.head_dim;
    adapter
        .check_base(layers, |p| {
            projection_shape(p, hidden, hidden, kv_width, ffn)
        })
        .map_err(candle_core::Error::Msg)
}

pub struct LlamaGgufWeights {
    /// `[vocab, hidden]`, dequantized.
    embedding: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: QuantMatrix,
    hidden: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    eps: f32,
    /// `[positions, head_dim / 2]` rotary tables.
    cos: Vec<f32>,
    sin: Vec<f32>,
    positions: usize,
    /// Every sequence's keys and values.
    kv: KvCache,
}

fn vector(t: &candle_core::quantized::QTensor) -> candle_core::Result<Vec<f32>> {
    t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()
}

impl LlamaGgufWeights {
    /// Loads the weights, with `merge`'s adapter merged into them when
    /// given; rotary tables cover `positions` positions.
    pub fn from_gguf<R: Read + Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        positions: usize,
        merge: Option<&Adapter>,
        kv_cache: KvCacheConfig,
    ) -> candle_core::Result<Self> {
        let n_head = super::gguf_metadata(ct, "llama", "attention.head_count")?.to_u32()? as usize;
        let n_kv_head =
            super::gguf_metadata(ct, "llama", "attention.head_count_kv")?.to_u32()? as usize;
        let block_count = super::gguf_metadata(ct, "llama", "block_count")?.to_u32()? as usize;
        let hidden = super::gguf_metadata(ct, "llama", "embedding_length")?.to_u32()? as usize;
        let eps =
            super::gguf_metadata(ct, "llama", "attention.layer_norm_rms_epsilon")?.to_f32()?;
        let base = super::gguf_metadata(ct, "llama", "rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);
        if ct.metadata.contains_key("llama.expert_count") {
            candle_core::bail!("mixture-of-experts llama GGUF files are not supported");
        }
        let head_dim = hidden / n_head;
        let rope_dim = super::gguf_metadata(ct, "llama", "rope.dimension_count")
            .map_or(Ok(head_dim as u32), |v| v.to_u32())? as usize;
        if rope_dim != head_dim || !n_head.is_multiple_of(n_kv_head) {
            candle_core::bail!(
                "unsupported llama head layout (rope dims {rope_dim}, head dim {head_dim})"
            );
        }
        let device = Device::Cpu;
        let heads = HeadLayout {
            n_head,
            n_kv_head,
            head_dim,
        };
        let mut tensor = |name: &str| ct.tensor(reader, name, &device);
        let embedding_q = tensor("token_embd.weight")?;
        let embedding = vector(&embedding_q)?;
        let output = match tensor("output.weight") {
            Ok(t) => QuantMatrix::new(t)?,
            Err(_) => QuantMatrix::new(embedding_q)?,
        };
        let norm = vector(&tensor("output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(block_count);
        if let Some(adapter) = merge {
            check_adapter(ct, adapter, block_count, heads)?;
        }
        for i in 0..block_count {
            let mut t = |suffix: &str| tensor(&format!("blk.{i}.{suffix}"));
            let mut projection = |p: Projection| {
                let tensor = t(&format!("{}.weight", gguf_name(p)))?;
                match merge {
                    Some(adapter) => match crate::lora::merge::delta(adapter, i, p, Some(heads))? {
                        Some(delta) => crate::lora::merge::merge_qtensor(tensor, &delta),
                        None => Ok(tensor),
                    },
                    None => Ok(tensor),
                }
            };
            let (q, k, v) = (
                projection(Projection::Q)?,
                projection(Projection::K)?,
                projection(Projection::V)?,
            );
            let o = projection(Projection::O)?;
            let (gate, up) = (projection(Projection::Gate)?, projection(Projection::Up)?);
            let down = projection(Projection::Down)?;
            let same_type = crate::lora::merge::same_type;
            layers.push(Layer {
                attention_norm: vector(&t("attn_norm.weight")?)?,
                qkv: QuantMatrix::stack(same_type(vec![q, k, v])?)?,
                o: QuantMatrix::new(o)?,
                ffn_norm: vector(&t("ffn_norm.weight")?)?,
                gate_up: QuantMatrix::stack(same_type(vec![gate, up])?)?,
                down: QuantMatrix::new(down)?,
            });
        }
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        for p in 0..positions {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            embedding,
            layers,
            norm,
            output,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            eps,
            cos,
            sin,
            positions,
            kv: KvCache::new(
                KvShape {
                    layers: block_count,
                    n_kv_head,
                    head_dim,
                },
                kv_cache,
                positions,
            ),
        })
    }

    pub fn max_positions(&self) -> usize {
        self.positions
    }

    /// The paged KV cache every sequence of this model uses.
    pub fn kv_cache(&self) -> &KvCache {
        &self.kv
    }

    /// Checks `adapter` fits this base and lays it out for unmerged use.
    pub fn prepare_adapter(&self, adapter: &Adapter) -> Result<UnmergedAdapter, String> {
        let (q_width, kv_width) = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim);
        let ffn = self.layers.first().map_or(0, |l| l.down.cols());
        let hidden = self.hidden;
        adapter.check_base(self.layers.len(), |p| {
            projection_shape(p, hidden, q_width, kv_width, ffn)
        })?;
        UnmergedAdapter::for_gguf(adapter, self.layers.len(), self.heads())
    }

    fn heads(&self) -> HeadLayout {
        HeadLayout {
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
        }
    }
}
