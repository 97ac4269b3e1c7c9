//! Gemma 3 from GGUF on accelerators, through candle tensor ops and its
//! quantized matmul (the CPU runs it in `cpu_decoder`).
//!
//! Written after candle-transformers' `quantized_gemma3`, with what the
//! reference comparison showed it lacks: the MLP activation is GELU (tanh
//! approximation), as in transformers, not SiLU; sliding-window layers keep
//! only the last `sliding_window` keys and values; rotary tables are shared
//! by the layers and sized to the served context; the token embedding is
//! kept in f16. Weights are shared; each sequence owns only its KV cache.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::SequenceModel;
use super::quant_matmul::QuantMatrix;

/// Every sixth layer is global; the others use the sliding window.
const SLIDING_WINDOW_PATTERN: usize = 6;

struct Layer {
    q: QuantMatrix,
    k: QuantMatrix,
    v: QuantMatrix,
    o: QuantMatrix,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attention_norm: RmsNorm,
    post_attention_norm: RmsNorm,
    ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    gate: QuantMatrix,
    up: QuantMatrix,
    down: QuantMatrix,
    /// `Some(window)` for local layers.
    sliding_window: Option<usize>,
}

/// Rotary tables `[positions, head_dim / 2]`.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(
        head_dim: usize,
        base: f32,
        positions: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
            .collect();
        let inv_freq = Tensor::new(inv_freq.as_slice(), device)?;
        let angles = Tensor::arange(0, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?
            .matmul(&inv_freq.reshape((1, head_dim / 2))?)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    fn apply(&self, x: &Tensor, position: usize) -> candle_core::Result<Tensor> {
        let seq_len = x.dim(2)?;
        let cos = self.cos.narrow(0, position, seq_len)?;
        let sin = self.sin.narrow(0, position, seq_len)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

pub struct Gemma3Weights {
    embedding: Tensor,
    hidden: usize,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QuantMatrix,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    local_rope: Rotary,
    global_rope: Rotary,
    positions: usize,
    device: Device,
}

impl Gemma3Weights {
    /// Loads the weights; rotary tables cover `positions` positions.
    pub fn from_gguf<R: Read + Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        positions: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let n_head = super::gguf_metadata(ct, "gemma3", "attention.head_count")?.to_u32()? as usize;
        let n_kv_head =
            super::gguf_metadata(ct, "gemma3", "attention.head_count_kv")?.to_u32()? as usize;
        let block_count = super::gguf_metadata(ct, "gemma3", "block_count")?.to_u32()? as usize;
        let hidden = super::gguf_metadata(ct, "gemma3", "embedding_length")?.to_u32()? as usize;
        let head_dim =
            super::gguf_metadata(ct, "gemma3", "attention.key_length")?.to_u32()? as usize;
        let eps = super::gguf_metadata(ct, "gemma3", "attention.layer_norm_rms_epsilon")?
            .to_f32()? as f64;
        let window =
            super::gguf_metadata(ct, "gemma3", "attention.sliding_window")?.to_u32()? as usize;
        let global_base = super::gguf_metadata(ct, "gemma3", "rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(1_000_000.0);
        let local_base = super::gguf_metadata(ct, "gemma3", "rope.local_freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);
        let mut tensor = |name: &str| ct.tensor(reader, name, device);
        let embedding_q = tensor("token_embd.weight")?;
        let embedding = embedding_q.dequantize_f16(device)?;
        let output = match tensor("output.weight") {
            Ok(t) => QuantMatrix::new(t)?,
            Err(_) => QuantMatrix::new(embedding_q)?,
        };
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight")?, eps)?;
        let mut layers = Vec::with_capacity(block_count);
        for i in 0..block_count {
            let mut t = |suffix: &str| tensor(&format!("blk.{i}.{suffix}"));
            let q = QuantMatrix::new(t("attn_q.weight")?)?;
            let k = QuantMatrix::new(t("attn_k.weight")?)?;
            let v = QuantMatrix::new(t("attn_v.weight")?)?;
            let o = QuantMatrix::new(t("attn_output.weight")?)?;
            let gate = QuantMatrix::new(t("ffn_gate.weight")?)?;
            let up = QuantMatrix::new(t("ffn_up.weight")?)?;
            let down = QuantMatrix::new(t("ffn_down.weight")?)?;
            let mut norm = |suffix: &str| RmsNorm::from_qtensor(t(suffix)?, eps);
            layers.push(Layer {
                q_norm: norm("attn_q_norm.weight")?,
                k_norm: norm("attn_k_norm.weight")?,
                attention_norm: norm("attn_norm.weight")?,
                post_attention_norm: norm("post_attention_norm.weight")?,
                ffn_norm: norm("ffn_norm.weight")?,
                post_ffn_norm: norm("post_ffw_norm.weight")?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
                sliding_window: ((i + 1) % SLIDING_WINDOW_PATTERN != 0).then_some(window),
            });
        }
        Ok(Self {
            embedding,
            hidden,
            layers,
            norm,
            output,
            n_head,
            n_kv_head,
            head_dim,
            local_rope: Rotary::new(head_dim, local_base, positions, device)?,
            global_rope: Rotary::new(head_dim, global_base, positions, device)?,
            positions,
            device: device.clone(),
        })
    }

    /// Positions the rotary tables cover: the longest context it can serve.
    pub fn max_positions(&self) -> usize {
        self.positions
    }
}

/// Additive mask `[seq, kv]`: query `position + i` sees cached key `start + j`
/// when it is not in the future and, for local layers, within the window.
fn mask(
    seq_len: usize,
    kv_start: usize,
    kv_len: usize,
    position: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            let q = position + i;
            (0..kv_len).map(move |j| {
                let k = kv_start + j;
                let visible = k <= q && window.is_none_or(|w| q - k < w);
                if visible { 0.0 } else { f32::NEG_INFINITY }
            })
        })
        .collect();
    Tensor::from_vec(values, (seq_len, kv_len), device)
}

/// One sequence: per-layer KV caches and the position of the next token.
#[derive(Clone)]
pub struct Gemma3Sequence {
    weights: Arc<Gemma3Weights>,
    /// Per layer: keys and values `[1, kv_heads, len, head_dim]` and the position of the first.
    cache: Vec<Option<(Tensor, Tensor, usize)>>,
    position: usize,
}

impl Gemma3Sequence {
    pub fn new(weights: Arc<Gemma3Weights>) -> Self {
        let layers = weights.layers.len();
        Self {
            weights,
            cache: vec![None; layers],
            position: 0,
        }
    }

    fn attention(&mut self, index: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = &self.weights;
        let layer = &w.layers[index];
        let (b, seq_len, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| t.reshape((b, seq_len, n, w.head_dim))?.transpose(1, 2);
        let q = layer
            .q_norm
            .forward(&heads(layer.q.forward(x)?, w.n_head)?.contiguous()?)?;
        let k = layer
            .k_norm
            .forward(&heads(layer.k.forward(x)?, w.n_kv_head)?.contiguous()?)?;
        let v = heads(layer.v.forward(x)?, w.n_kv_head)?.contiguous()?;
        let rope = if layer.sliding_window.is_some() {
            &w.local_rope
        } else {
            &w.global_rope
        };
        let q = rope.apply(&q, self.position)?;
        let k = rope.apply(&k, self.position)?;
        let (k, v, kv_start) = match self.cache[index].take() {
            Some((ck, cv, start)) => (
                Tensor::cat(&[&ck, &k], 2)?,
                Tensor::cat(&[&cv, &v], 2)?,
                start,
            ),
            None => (k, v, self.position),
        };
        let kv_len = k.dim(2)?;
        // A single new token sees the whole cache (trimmed to the window below).
        let mask = (seq_len > 1)
            .then(|| {
                mask(
                    seq_len,
                    kv_start,
                    kv_len,
                    self.position,
                    layer.sliding_window,
                    &w.device,
                )
            })
            .transpose()?;
        let group = w.n_head / w.n_kv_head;
        let k_rep = candle_transformers::utils::repeat_kv(k.clone(), group)?;
        let v_rep = candle_transformers::utils::repeat_kv(v.clone(), group)?;
        let scores = (q.matmul(&k_rep.t()?)? / (w.head_dim as f64).sqrt())?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        let attended = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v_rep.contiguous()?)?;
        // The next token of a local layer sees itself and the `window - 1` before it.
        let (k, v, kv_start) = match layer.sliding_window {
            Some(win) if kv_len >= win => {
                let keep = win - 1;
                let drop = kv_len - keep;
                (
                    k.narrow(2, drop, keep)?,
                    v.narrow(2, drop, keep)?,
                    kv_start + drop,
                )
            }
            _ => (k, v, kv_start),
        };
        self.cache[index] = Some((k, v, kv_start));
        let attended = attended
            .transpose(1, 2)?
            .reshape((b, seq_len, w.n_head * w.head_dim))?;
        layer.o.forward(&attended)
    }
}

impl SequenceModel for Gemma3Sequence {
    fn forward(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        let weights = self.weights.clone();
        if self.position + tokens.len() > weights.positions {
            candle_core::bail!(
                "sequence longer than the {} positions this model is served with",
                weights.positions
            );
        }
        let ids = Tensor::new(tokens, &weights.device)?;
        let mut x = weights
            .embedding
            .index_select(&ids, 0)?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?;
        x = (x * (weights.hidden as f64).sqrt())?;
        for (index, layer) in weights.layers.iter().enumerate() {
            let attended = self.attention(index, &layer.attention_norm.forward(&x)?)?;
            x = (layer.post_attention_norm.forward(&attended)? + &x)?;
            let h = layer.ffn_norm.forward(&x)?;
            let mlp = layer
                .down
                .forward(&(layer.gate.forward(&h)?.gelu()? * layer.up.forward(&h)?)?)?;
            x = (layer.post_ffn_norm.forward(&mlp)? + &x)?;
        }
        self.position += tokens.len();
        let last = x.i((.., tokens.len() - 1, ..))?;
        let logits = weights.output.forward(&weights.norm.forward(&last)?)?;
        logits.squeeze(0)?.to_vec1::<f32>()
    }

    fn position(&self) -> usize {
        self.position
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn fork(&self) -> Box<dyn SequenceModel> {
        Box::new(self.clone())
    }
}
