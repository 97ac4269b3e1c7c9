//! Decoder-only models on the CPU: llama and Gemma 3 GGUF files, and
//! llama-family safetensors checkpoints (Llama, Mistral, Qwen2). Quantized
//! matmuls for GGUF projections (`quant_matmul`), packed f32 ones for
//! checkpoints (`packed_gemm`), and everything between
//! them (norms, rotary embedding, attention over the model's paged KV cache,
//! the gated MLP) as plain loops over f32 slices (`forward`). For one token
//! at a time these small steps cost more as candle tensor ops (an
//! allocation, and for attention a threaded GEMM, per op) than the work they
//! do; keys and values are written once into their block, and grouped-query
//! heads read their shared KV head directly. What sets the architectures
//! apart (Gemma 3's extra norms, GELU, scaled embeddings, rotary layout and
//! sliding-window layers) is read from the file in `load_gguf`, or from
//! config.json in `load_checkpoint`.

mod forward;
mod load_checkpoint;
mod load_gguf;
mod sequence;

use super::kv_cache::KvCache;
use super::quant_matmul::{ProjectionGroup, QuantMatrix};
use crate::lora::{Adapter, HeadLayout, Projection, UnmergedAdapter};

pub use sequence::CpuSequence;

/// Query-key pairs per head below which attention runs on the calling thread.
const PARALLEL_ATTENTION_MIN_SCORES: usize = 64;

/// The architectures this engine runs (llama covers the llama-family
/// checkpoints: Mistral, Qwen2, SmolLM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Gemma3,
}

impl Architecture {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "gemma3" => Some(Self::Gemma3),
            _ => None,
        }
    }

    /// The prefix of its GGUF metadata keys.
    fn key(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// How a head's dimensions are paired for the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RopeLayout {
    /// (0, 1), (2, 3), ...: llama, whose q/k rows GGUF stores permuted for this.
    AdjacentPairs,
    /// (i, i + head_dim / 2): Gemma (GPT-NeoX style).
    Halves,
}

/// The gated MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Silu,
    /// GELU, tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// Rotary inverse frequencies (`head_dim / 2`) for one base frequency.
/// Each pass computes the angles of its own rows' positions, so nothing is
/// sized by the context served.
struct RopeFrequencies {
    inverse: Vec<f32>,
}

/// Rotary angles of one pass: `[rows, head_dim / 2]` cosines and sines.
struct RopeAngles {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeFrequencies {
    /// The frequencies of base `base`, each passed through `scale` (rotary
    /// scaling for long contexts).
    fn new(head_dim: usize, base: f32, scale: impl Fn(f32) -> f32) -> Self {
        let half = head_dim / 2;
        let inverse = (0..half)
            .map(|i| scale(1.0 / base.powf((2 * i) as f32 / head_dim as f32)))
            .collect();
        Self { inverse }
    }

    /// The angles of each of `positions`, in order.
    fn angles(&self, positions: impl Iterator<Item = usize>) -> RopeAngles {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in positions {
            for &f in &self.inverse {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeAngles { cos, sin }
    }
}

/// Token embeddings, looked up one row at a time.
enum Embedding {
    /// The rows of the output projection (tied embeddings).
    Output,
    /// A quantized table of its own, dequantized as rows are looked up.
    Quantized(QuantMatrix),
    /// Dequantized at load (types without a kernel of their own).
    Dense(Vec<f32>),
}

struct Layer {
    attention_norm: Vec<f32>,
    /// q, k and v.
    qkv: ProjectionGroup,
    /// Gemma: RMS norms of each query and key head (`head_dim` weights).
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    o: QuantMatrix,
    /// Gemma: RMS norms of the attention and MLP outputs.
    post_attention_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    /// gate and up.
    gate_up: ProjectionGroup,
    down: QuantMatrix,
    post_ffn_norm: Option<Vec<f32>>,
    /// Index into the model's rotary frequencies.
    rope: usize,
    /// `Some(window)`: each position sees only itself and the `window - 1`
    /// positions before it (Gemma's local layers).
    window: Option<usize>,
}

pub struct CpuDecoder {
    architecture: Architecture,
    embedding: Embedding,
    /// Multiplies looked-up embeddings (Gemma: sqrt(hidden)).
    embedding_scale: f32,
    vocab: usize,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: QuantMatrix,
    hidden: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    eps: f32,
    rope_layout: RopeLayout,
    ropes: Vec<RopeFrequencies>,
    activation: Activation,
    positions: usize,
    /// Every sequence's keys and values.
    kv: KvCache,
}

/// The GGUF tensor name of a projection within a block.
pub(crate) fn gguf_name(projection: Projection) -> &'static str {
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
pub(crate) fn projection_shape(
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

impl CpuDecoder {
    pub fn max_positions(&self) -> usize {
        self.positions
    }

    /// The paged KV cache every sequence of this model uses.
    pub fn kv_cache(&self) -> &KvCache {
        &self.kv
    }

    /// Checks `adapter` fits this base and lays it out for unmerged use.
    pub fn prepare_adapter(&self, adapter: &Adapter) -> Result<UnmergedAdapter, String> {
        if self.architecture != Architecture::Llama {
            return Err(format!(
                "per-request adapters run on llama-family bases only, not {:?}",
                self.architecture
            ));
        }
        let (q_width, kv_width) = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim);
        let ffn = self.layers.first().map_or(0, |l| l.down.cols());
        let hidden = self.hidden;
        adapter.check_base(self.layers.len(), |p| {
            projection_shape(p, hidden, q_width, kv_width, ffn)
        })?;
        // GGUF files store llama's q/k rows permuted for adjacent-pair rotary.
        let gguf_rows = self.rope_layout == RopeLayout::AdjacentPairs;
        UnmergedAdapter::new(adapter, self.layers.len(), self.heads(), gguf_rows)
    }

    fn heads(&self) -> HeadLayout {
        HeadLayout {
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
        }
    }
}
