//! Llama-family GGUF models on the CPU: quantized matmuls for the projections
//! (`quant_matmul`), and everything between them (norms, rotary embedding,
//! attention over a per-sequence KV cache, SwiGLU) as plain loops over f32
//! slices. For one token at a time these small steps cost more as candle
//! tensor ops (an allocation, and for attention a threaded GEMM, per op) than
//! the work they do; the KV cache grows in place instead of being copied
//! every token, and grouped-query heads read their shared KV head directly.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::gguf_file;
use rayon::prelude::*;

use super::SequenceModel;
use super::quant_matmul::QuantMatrix;
use crate::lora::{Adapter, HeadLayout, Projection, UnmergedAdapter};

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

/// Splits `x [rows, sum(widths)]` into one `[rows, width]` matrix per width.
fn split_columns(x: &[f32], rows: usize, widths: &[usize]) -> Vec<Vec<f32>> {
    let total: usize = widths.iter().sum();
    let mut parts: Vec<Vec<f32>> = widths
        .iter()
        .map(|w| Vec::with_capacity(rows * w))
        .collect();
    for row in x.chunks_exact(total).take(rows) {
        let mut start = 0;
        for (part, &width) in parts.iter_mut().zip(widths) {
            part.extend_from_slice(&row[start..start + width]);
            start += width;
        }
    }
    parts
}

use crate::lora::unmerged::dot;

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
        })
    }

    pub fn max_positions(&self) -> usize {
        self.positions
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

    fn rms_norm(&self, x: &[f32], weight: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(self.hidden) {
            let mean_square = row.iter().map(|v| v * v).sum::<f32>() / self.hidden as f32;
            let scale = 1.0 / (mean_square + self.eps).sqrt();
            out.extend(row.iter().zip(weight).map(|(v, w)| v * scale * w));
        }
        out
    }

    /// Rotates adjacent pairs (GGUF stores llama's q/k rows permuted for this
    /// layout); row `r` of `x` is at `rows[r].position`.
    fn rope(&self, x: &mut [f32], heads: usize, rows: &[Row]) {
        let half = self.head_dim / 2;
        for (token, row) in x.chunks_exact_mut(heads * self.head_dim).zip(rows) {
            let table = row.position * half;
            let (cos, sin) = (
                &self.cos[table..table + half],
                &self.sin[table..table + half],
            );
            for head in token.chunks_exact_mut(self.head_dim) {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * cos[i] - b * sin[i];
                    pair[1] = a * sin[i] + b * cos[i];
                }
            }
        }
    }

    /// Causal attention of `q [rows, n_head, head_dim]`: row `r` attends to
    /// the first `position + 1` cached keys of its sequence.
    fn attention(&self, caches: &[(&[f32], &[f32])], q: &[f32], rows: &[Row]) -> Vec<f32> {
        let (hd, n_head, n_kv) = (self.head_dim, self.n_head, self.n_kv_head);
        let group = n_head / n_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; rows.len() * n_head * hd];
        let work = |(index, out): (usize, &mut [f32])| {
            let (row, head) = (&rows[index / n_head], index % n_head);
            let (keys, values) = caches[row.seq];
            let kv = head / group;
            let query = &q[index * hd..][..hd];
            let mut scores: Vec<f32> = (0..=row.position)
                .map(|t| dot(query, &keys[(t * n_kv + kv) * hd..][..hd]) * scale)
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            for (t, s) in scores.iter().enumerate() {
                let value = &values[(t * n_kv + kv) * hd..][..hd];
                let weight = s / total;
                out.iter_mut()
                    .zip(value)
                    .for_each(|(o, v)| *o += weight * v);
            }
        };
        // Share the work once it outweighs handing it to the thread pool.
        let scores: usize = rows.iter().map(|r| r.position + 1).sum();
        if scores < PARALLEL_ATTENTION_MIN_SCORES {
            out.chunks_exact_mut(hd).enumerate().for_each(work);
        } else {
            out.par_chunks_exact_mut(hd).enumerate().for_each(work);
        }
        out
    }

    /// Runs one token per row through the model, appending keys and values
    /// to each row's sequence (rows of one sequence come in position order),
    /// and returns the logits of the rows listed in `logits_of`.
    fn run(
        &self,
        sequences: &mut [&mut LlamaGgufSequence],
        tokens: &[u32],
        rows: &[Row],
        logits_of: &[usize],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let n = rows.len();
        let vocab = self.embedding.len() / self.hidden;
        let mut x = Vec::with_capacity(n * self.hidden);
        for (&token, row) in tokens.iter().zip(rows) {
            let token = token as usize;
            if token >= vocab {
                candle_core::bail!("token id {token} outside the vocabulary");
            }
            if row.position >= self.positions {
                candle_core::bail!(
                    "sequence longer than the {} positions this model is served with",
                    self.positions
                );
            }
            x.extend_from_slice(&self.embedding[token * self.hidden..(token + 1) * self.hidden]);
        }
        let (q_width, kv_width) = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim);
        let held: Vec<Option<Arc<UnmergedAdapter>>> = rows
            .iter()
            .map(|r| sequences[r.seq].adapter.clone())
            .collect();
        let adapters: Vec<Option<&UnmergedAdapter>> = held.iter().map(|a| a.as_deref()).collect();
        let lora = |layer: usize, parts: &[(Projection, usize)], x: &[f32], y: &mut [f32]| {
            crate::lora::unmerged::add_deltas(&adapters, layer, parts, x, y);
        };
        for (index, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attention_norm);
            let mut qkv = layer.qkv.matmul(&h, n)?;
            lora(
                index,
                &[
                    (Projection::Q, 0),
                    (Projection::K, q_width),
                    (Projection::V, q_width + kv_width),
                ],
                &h,
                &mut qkv,
            );
            let mut parts = split_columns(&qkv, n, &[q_width, kv_width, kv_width]).into_iter();
            let (mut q, mut k, v) = match (parts.next(), parts.next(), parts.next()) {
                (Some(q), Some(k), Some(v)) => (q, k, v),
                _ => candle_core::bail!("qkv projection split"),
            };
            self.rope(&mut q, self.n_head, rows);
            self.rope(&mut k, self.n_kv_head, rows);
            for ((row, k), v) in rows
                .iter()
                .zip(k.chunks_exact(kv_width))
                .zip(v.chunks_exact(kv_width))
            {
                let sequence = &mut sequences[row.seq];
                sequence.keys[index].extend_from_slice(k);
                sequence.values[index].extend_from_slice(v);
            }
            let caches: Vec<(&[f32], &[f32])> = sequences
                .iter()
                .map(|s| (s.keys[index].as_slice(), s.values[index].as_slice()))
                .collect();
            let attended = self.attention(&caches, &q, rows);
            let mut o = layer.o.matmul(&attended, n)?;
            lora(index, &[(Projection::O, 0)], &attended, &mut o);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h = self.rms_norm(&x, &layer.ffn_norm);
            let mut gate_up = layer.gate_up.matmul(&h, n)?;
            let width = gate_up.len() / n / 2;
            lora(
                index,
                &[(Projection::Gate, 0), (Projection::Up, width)],
                &h,
                &mut gate_up,
            );
            let mut parts = split_columns(&gate_up, n, &[width, width]).into_iter();
            let (mut gate, up) = match (parts.next(), parts.next()) {
                (Some(gate), Some(up)) => (gate, up),
                _ => candle_core::bail!("gate/up projection split"),
            };
            gate.iter_mut()
                .zip(&up)
                .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            let mut down = layer.down.matmul(&gate, n)?;
            lora(index, &[(Projection::Down, 0)], &gate, &mut down);
            x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
        }
        let mut last = Vec::with_capacity(logits_of.len() * self.hidden);
        for &r in logits_of {
            last.extend(self.rms_norm(&x[r * self.hidden..(r + 1) * self.hidden], &self.norm));
        }
        let logits = self.output.matmul(&last, logits_of.len())?;
        Ok(logits
            .chunks_exact(logits.len() / logits_of.len().max(1))
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// One decode step for several sequences at once: every matmul reads the
    /// weights once for all of them.
    pub fn decode_batch(
        &self,
        sequences: &mut [&mut LlamaGgufSequence],
        tokens: &[u32],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let rows: Vec<Row> = sequences
            .iter()
            .enumerate()
            .map(|(seq, s)| Row {
                seq,
                position: s.position,
            })
            .collect();
        let all: Vec<usize> = (0..rows.len()).collect();
        let logits = self.run(sequences, tokens, &rows, &all)?;
        for sequence in sequences.iter_mut() {
            sequence.position += 1;
        }
        Ok(logits)
    }
}

/// A row of a forward pass: the sequence it belongs to and its position there.
#[derive(Clone, Copy)]
struct Row {
    seq: usize,
    position: usize,
}

/// One sequence: per-layer keys and values, `[position][kv_head][head_dim]`,
/// and the adapter it runs with, if any.
#[derive(Clone)]
pub struct LlamaGgufSequence {
    weights: Arc<LlamaGgufWeights>,
    adapter: Option<Arc<UnmergedAdapter>>,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    position: usize,
}

impl LlamaGgufSequence {
    pub fn new(weights: Arc<LlamaGgufWeights>, adapter: Option<Arc<UnmergedAdapter>>) -> Self {
        let layers = weights.layers.len();
        Self {
            weights,
            adapter,
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
            position: 0,
        }
    }
}

impl SequenceModel for LlamaGgufSequence {
    fn forward(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        if tokens.is_empty() {
            candle_core::bail!("forward needs at least one token");
        }
        let weights = self.weights.clone();
        let rows: Vec<Row> = (0..tokens.len())
            .map(|i| Row {
                seq: 0,
                position: self.position + i,
            })
            .collect();
        let mut logits = weights.run(&mut [self], tokens, &rows, &[tokens.len() - 1])?;
        self.position += tokens.len();
        Ok(logits.pop().unwrap_or_default())
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
