//! Loading a decoder from a GGUF file: its hyperparameters from the
//! metadata of its architecture, its tensors (with a LoRA adapter merged
//! when asked), and the rotary tables sized to the context served.

use std::io::{Read, Seek};

use candle_core::Device;
use candle_core::quantized::{QTensor, gguf_file};

use super::{
    Activation, Architecture, CpuDecoder, Embedding, Layer, RopeFrequencies, RopeLayout, gguf_name,
    projection_shape,
};
use crate::lora::{Adapter, HeadLayout, Projection};
use crate::models::gguf_metadata;
use crate::models::kv_cache::{KvCache, KvCacheConfig, KvShape};
use crate::models::quant_matmul::{ProjectionGroup, QuantMatrix};

/// Gemma 3: every sixth layer is global, the others use the sliding window.
const GEMMA3_SLIDING_WINDOW_PATTERN: usize = 6;

fn vector(t: &QTensor) -> candle_core::Result<Vec<f32>> {
    t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()
}

/// A norm's weights, which must number `len`.
fn norm_weights(t: &QTensor, name: &str, len: usize) -> candle_core::Result<Vec<f32>> {
    let values = vector(t)?;
    if values.len() != len {
        candle_core::bail!("{name} has {} weights, expected {len}", values.len());
    }
    Ok(values)
}

/// Checks that a matrix is `[rows, cols]` (outputs, inputs).
fn check_matrix(t: &QTensor, name: &str, rows: usize, cols: usize) -> candle_core::Result<()> {
    match t.shape().dims2() {
        Ok(dims) if dims == (rows, cols) => Ok(()),
        _ => candle_core::bail!(
            "{name} has shape {:?}, expected [{rows}, {cols}]",
            t.shape()
        ),
    }
}

impl CpuDecoder {
    /// Loads the weights, with `merge`'s adapter merged into them when
    /// given (the loader allows that for llama only); rotary tables cover
    /// `positions` positions.
    pub fn from_gguf<R: Read + Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        architecture: Architecture,
        positions: usize,
        merge: Option<&Adapter>,
        kv_cache: KvCacheConfig,
    ) -> candle_core::Result<Self> {
        let arch = architecture.key();
        let number = |key: &str| -> candle_core::Result<usize> {
            Ok(gguf_metadata(ct, arch, key)?.to_u32()? as usize)
        };
        let float = |key: &str, default: f32| {
            gguf_metadata(ct, arch, key)
                .and_then(|v| v.to_f32())
                .unwrap_or(default)
        };
        let n_head = number("attention.head_count")?;
        let n_kv_head = number("attention.head_count_kv")?;
        let block_count = number("block_count")?;
        let hidden = number("embedding_length")?;
        let eps = gguf_metadata(ct, arch, "attention.layer_norm_rms_epsilon")?.to_f32()?;
        if ct.metadata.contains_key(&format!("{arch}.expert_count")) {
            candle_core::bail!("mixture-of-experts GGUF files are not supported");
        }
        if float("rope.scaling.factor", 1.0) != 1.0 {
            candle_core::bail!("GGUF files with rotary scaling are not supported");
        }
        // Every count sizes something: each is checked against the file's
        // tensors before anything is allocated from it.
        if n_head == 0 || hidden == 0 {
            candle_core::bail!("{arch} metadata gives {n_head} heads of a {hidden}-wide model");
        }
        if block_count == 0
            || !ct
                .tensor_infos
                .contains_key(&format!("blk.{}.attn_q.weight", block_count - 1))
        {
            candle_core::bail!(
                "{arch} metadata gives {block_count} blocks, and the file does not hold them"
            );
        }
        let head_dim = number("attention.key_length").unwrap_or(hidden / n_head);
        let rope_dim = number("rope.dimension_count").unwrap_or(head_dim);
        if rope_dim != head_dim
            || head_dim == 0
            || !head_dim.is_multiple_of(2)
            || n_kv_head == 0
            || !n_head.is_multiple_of(n_kv_head)
        {
            candle_core::bail!(
                "unsupported {arch} head layout ({n_head} heads, {n_kv_head} KV heads, rope dims {rope_dim}, head dim {head_dim})"
            );
        }
        let (q_width, kv_width) = (n_head * head_dim, n_kv_head * head_dim);
        let ffn = ct
            .tensor_infos
            .get("blk.0.ffn_down.weight")
            .and_then(|info| info.shape.dims().last().copied())
            .unwrap_or(0);
        let heads = HeadLayout {
            n_head,
            n_kv_head,
            head_dim,
        };
        if let Some(adapter) = merge {
            // Checked against the file's shapes before any tensor is read.
            adapter
                .check_base(block_count, |p| {
                    projection_shape(p, hidden, q_width, kv_width, ffn)
                })
                .map_err(candle_core::Error::Msg)?;
        }
        // Gemma 3: local layers (sliding window, local rotary base) and
        // every sixth global one.
        let (ropes, window) = match architecture {
            Architecture::Llama => (
                vec![RopeFrequencies::new(
                    head_dim,
                    float("rope.freq_base", 10_000.0),
                    |f| f,
                )],
                None,
            ),
            Architecture::Gemma3 => (
                vec![
                    RopeFrequencies::new(head_dim, float("rope.freq_base", 1_000_000.0), |f| f),
                    RopeFrequencies::new(head_dim, float("rope.local_freq_base", 10_000.0), |f| f),
                ],
                Some(number("attention.sliding_window")?),
            ),
        };
        let device = Device::Cpu;
        let mut tensor = |name: &str| ct.tensor(reader, name, &device);
        let embedding_q = tensor("token_embd.weight")?;
        let (vocab, _) = embedding_q.shape().dims2()?;
        check_matrix(&embedding_q, "token_embd.weight", vocab, hidden)?;
        // Tied embeddings are the output projection's rows; a table of its
        // own stays quantized too; types candle computes are dequantized.
        let table = QuantMatrix::new(embedding_q)?;
        let dense = match table.dequantizes_rows() {
            true => None,
            false => Some(vector(&tensor("token_embd.weight")?)?),
        };
        let (output, own_table) = match tensor("output.weight") {
            Ok(output) => {
                check_matrix(&output, "output.weight", vocab, hidden)?;
                (QuantMatrix::new(output)?, Some(table))
            }
            Err(_) => (table, None),
        };
        let embedding = match (dense, own_table) {
            (Some(values), _) => Embedding::Dense(values),
            (None, Some(table)) => Embedding::Quantized(table),
            (None, None) => Embedding::Output,
        };
        let norm = norm_weights(&tensor("output_norm.weight")?, "output_norm.weight", hidden)?;
        let gemma = architecture == Architecture::Gemma3;
        let mut layers = Vec::with_capacity(block_count);
        for i in 0..block_count {
            let mut t = |suffix: &str| tensor(&format!("blk.{i}.{suffix}"));
            let mut projection = |p: Projection| {
                let name = format!("{}.weight", gguf_name(p));
                let tensor = t(&name)?;
                let (inputs, outputs) = projection_shape(p, hidden, q_width, kv_width, ffn);
                check_matrix(&tensor, &format!("blk.{i}.{name}"), outputs, inputs)?;
                match merge {
                    Some(adapter) => match crate::lora::merge::delta(adapter, i, p, Some(heads))? {
                        Some(delta) => crate::lora::merge::merge_qtensor(tensor, &delta),
                        None => Ok(tensor),
                    },
                    None => Ok(tensor),
                }
            };
            let qkv = vec![
                projection(Projection::Q)?,
                projection(Projection::K)?,
                projection(Projection::V)?,
            ];
            let o = projection(Projection::O)?;
            let gate_up = vec![projection(Projection::Gate)?, projection(Projection::Up)?];
            let down = projection(Projection::Down)?;
            let mut layer_norm = |name: &str, len: usize| {
                norm_weights(
                    &t(&format!("{name}.weight"))?,
                    &format!("blk.{i}.{name}"),
                    len,
                )
            };
            let attention_norm = layer_norm("attn_norm", hidden)?;
            let ffn_norm = layer_norm("ffn_norm", hidden)?;
            let mut gemma_norm =
                |name: &str, len: usize| -> candle_core::Result<Option<Vec<f32>>> {
                    match gemma {
                        true => Ok(Some(layer_norm(name, len)?)),
                        false => Ok(None),
                    }
                };
            let global = (i + 1).is_multiple_of(GEMMA3_SLIDING_WINDOW_PATTERN);
            layers.push(Layer {
                attention_norm,
                qkv: ProjectionGroup::new(qkv)?,
                q_norm: gemma_norm("attn_q_norm", head_dim)?,
                k_norm: gemma_norm("attn_k_norm", head_dim)?,
                o: QuantMatrix::new(o)?.with_panels(),
                post_attention_norm: gemma_norm("post_attention_norm", hidden)?,
                ffn_norm,
                gate_up: ProjectionGroup::new(gate_up)?,
                down: QuantMatrix::new(down)?.with_panels(),
                post_ffn_norm: gemma_norm("post_ffw_norm", hidden)?,
                rope: usize::from(gemma && !global),
                window: window.filter(|_| !global),
            });
        }
        let (rope_layout, activation, embedding_scale) = match architecture {
            Architecture::Llama => (RopeLayout::AdjacentPairs, Activation::Silu, 1.0),
            Architecture::Gemma3 => (
                RopeLayout::Halves,
                Activation::GeluTanh,
                (hidden as f32).sqrt(),
            ),
        };
        Ok(Self {
            architecture,
            embedding,
            embedding_scale,
            vocab,
            layers,
            norm,
            output,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            eps,
            rope_layout,
            ropes,
            activation,
            positions,
            kv: KvCache::new(
                KvShape {
                    layers: block_count,
                    n_kv_head,
                    head_dim,
                },
                kv_cache,
                positions,
            )?,
        })
    }
}
