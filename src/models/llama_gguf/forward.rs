//! The forward pass: one token per row, rows of any number of sequences.
//! Keys and values go to each sequence's blocks in the model's paged KV
//! cache, and attention reads them back through the block tables.

use std::sync::Arc;

use rayon::prelude::*;

use super::sequence::LlamaGgufSequence;
use super::{LlamaGgufWeights, PARALLEL_ATTENTION_MIN_SCORES};
use crate::lora::{Projection, UnmergedAdapter};
use crate::models::kv_cache::{BlockId, LayerView};

/// A row of a forward pass: the sequence it belongs to and its position there.
#[derive(Clone, Copy)]
pub(super) struct Row {
    pub seq: usize,
    pub position: usize,
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

impl LlamaGgufWeights {
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
    /// the first `position + 1` positions of its sequence, found through the
    /// sequence's block table.
    fn attention(
        &self,
        layer: LayerView<'_>,
        tables: &[&[BlockId]],
        block_tokens: usize,
        q: &[f32],
        rows: &[Row],
    ) -> Vec<f32> {
        let (hd, n_head, n_kv) = (self.head_dim, self.n_head, self.n_kv_head);
        let group = n_head / n_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; rows.len() * n_head * hd];
        let work = |(index, out): (usize, &mut [f32])| {
            let (row, head) = (&rows[index / n_head], index % n_head);
            // The slots of positions 0..=position, block by block.
            let slots = tables[row.seq]
                .iter()
                .flat_map(|&block| {
                    let first = block as usize * block_tokens;
                    first..first + block_tokens
                })
                .take(row.position + 1);
            let kv = head / group;
            let query = &q[index * hd..][..hd];
            let mut scores: Vec<f32> = slots
                .clone()
                .map(|slot| layer.key_dot(slot, kv, query) * scale)
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            for (slot, s) in slots.zip(&scores) {
                layer.add_value(slot, kv, s / total, out);
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

    /// Runs one token per row through the model, storing keys and values in
    /// each row's sequence (rows of one sequence come in position order,
    /// from the sequence's current position on), and returns the logits of
    /// the rows listed in `logits_of`.
    pub(super) fn run(
        &self,
        sequences: &mut [&mut LlamaGgufSequence],
        tokens: &[u32],
        rows: &[Row],
        logits_of: &[usize],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let n = rows.len();
        if n == 0 || logits_of.is_empty() {
            candle_core::bail!("a forward pass needs at least one row and one row's logits");
        }
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
        let mut next: Vec<usize> = sequences.iter().map(|s| s.stored()).collect();
        for row in rows {
            if row.position != next[row.seq] {
                candle_core::bail!(
                    "row at position {} of a sequence with {} positions stored",
                    row.position,
                    next[row.seq]
                );
            }
            next[row.seq] += 1;
        }
        let mut cache = self.kv.lock();
        let state = &mut *cache;
        let block_tokens = state.blocks.block_tokens();
        let mut slots = Vec::with_capacity(n);
        for row in rows {
            slots.push(sequences[row.seq].prepare_slot(state, row.position)?);
        }
        let (q_width, kv_width) = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim);
        let held: Vec<Option<Arc<UnmergedAdapter>>> = rows
            .iter()
            .map(|r| sequences[r.seq].adapter().cloned())
            .collect();
        let adapters: Vec<Option<&UnmergedAdapter>> = held.iter().map(|a| a.as_deref()).collect();
        let lora = |layer: usize, parts: &[(Projection, usize)], x: &[f32], y: &mut [f32]| {
            crate::lora::unmerged::add_deltas(&adapters, layer, parts, x, y);
        };
        let tables: Vec<&[BlockId]> = sequences.iter().map(|s| s.block_table()).collect();
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
            for ((&slot, k), v) in slots
                .iter()
                .zip(k.chunks_exact(kv_width))
                .zip(v.chunks_exact(kv_width))
            {
                state.store.write(index, slot, k, v);
            }
            let attended =
                self.attention(state.store.layer(index), &tables, block_tokens, &q, rows);
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
        drop(tables);
        for (row, &token) in rows.iter().zip(tokens) {
            sequences[row.seq].record(state, token);
        }
        drop(cache);
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

    /// One forward pass over several sequences: `inputs[i]` (one token or
    /// more) is fed to `sequences[i]`, every matmul reading the weights once
    /// for all rows; returns the logits after each sequence's last token.
    pub fn forward_batch(
        &self,
        sequences: &mut [&mut LlamaGgufSequence],
        inputs: &[&[u32]],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        if inputs.len() != sequences.len() || inputs.iter().any(|i| i.is_empty()) {
            candle_core::bail!("every sequence of a batch needs at least one token");
        }
        let mut rows = Vec::new();
        let mut tokens = Vec::new();
        let mut last = Vec::with_capacity(inputs.len());
        for (seq, (sequence, input)) in sequences.iter().zip(inputs).enumerate() {
            let start = sequence.stored();
            rows.extend((0..input.len()).map(|i| Row {
                seq,
                position: start + i,
            }));
            tokens.extend_from_slice(input);
            last.push(rows.len() - 1);
        }
        self.run(sequences, &tokens, &rows, &last)
    }
}
