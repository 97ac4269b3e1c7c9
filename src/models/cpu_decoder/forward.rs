//! The forward pass: one token per row, rows of any number of sequences.
//! Keys and values go to each sequence's blocks in the model's paged KV
//! cache, and attention reads them back through the block tables.

use std::sync::Arc;

use super::sequence::CpuSequence;
use super::{
    Activation, CpuDecoder, Embedding, PARALLEL_ATTENTION_MIN_SCORES, RopeAngles, RopeLayout,
};
use crate::lora::{Projection, UnmergedAdapter};
use crate::models::kv_cache::{BlockId, LayerView};
use crate::models::spin_pool::for_each_chunk_mut;

/// A row of a forward pass: the sequence it belongs to and its position there.
#[derive(Clone, Copy)]
pub(super) struct Row {
    pub seq: usize,
    pub position: usize,
}

/// GELU, tanh approximation, as transformers' `gelu_pytorch_tanh`:
/// `0.5 x (1 + tanh(u)) = x / (1 + exp(-2u))`, one `exp` instead of a `tanh`.
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + (-2.0 * u).exp())
}

/// The positions a query at `position` sees: all before it and itself, or
/// only the last `window` of them.
fn visible(position: usize, window: Option<usize>) -> std::ops::Range<usize> {
    window.map_or(0, |w| (position + 1).saturating_sub(w))..position + 1
}

impl CpuDecoder {
    /// RMS norm of each `width`-long run of `x`, in place.
    fn rms_norm_in_place(&self, x: &mut [f32], weight: &[f32]) {
        let width = weight.len();
        for row in x.chunks_exact_mut(width) {
            let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let scale = 1.0 / (mean_square + self.eps).sqrt();
            row.iter_mut()
                .zip(weight)
                .for_each(|(v, w)| *v = *v * scale * w);
        }
    }

    fn rms_norm(&self, x: &[f32], weight: &[f32]) -> Vec<f32> {
        let mut out = x.to_vec();
        self.rms_norm_in_place(&mut out, weight);
        out
    }

    /// Rotates each head of `x` by its row's angles, pairing dimensions as
    /// the architecture does.
    fn rope(&self, x: &mut [f32], heads: usize, angles: &RopeAngles) {
        let half = self.head_dim / 2;
        let rows = angles
            .cos
            .chunks_exact(half)
            .zip(angles.sin.chunks_exact(half));
        for (token, (cos, sin)) in x.chunks_exact_mut(heads * self.head_dim).zip(rows) {
            for head in token.chunks_exact_mut(self.head_dim) {
                match self.rope_layout {
                    RopeLayout::AdjacentPairs => {
                        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                            let (a, b) = (pair[0], pair[1]);
                            pair[0] = a * cos[i] - b * sin[i];
                            pair[1] = a * sin[i] + b * cos[i];
                        }
                    }
                    RopeLayout::Halves => {
                        let (first, second) = head.split_at_mut(half);
                        for i in 0..half {
                            let (a, b) = (first[i], second[i]);
                            first[i] = a * cos[i] - b * sin[i];
                            second[i] = a * sin[i] + b * cos[i];
                        }
                    }
                }
            }
        }
    }

    /// The embeddings of `tokens`, scaled as the architecture wants.
    fn embed(&self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        let mut x = Vec::with_capacity(tokens.len() * self.hidden);
        for &token in tokens {
            let token = token as usize;
            if token >= self.vocab {
                candle_core::bail!("token id {token} outside the vocabulary");
            }
            let found = match &self.embedding {
                Embedding::Output => self.output.dequantize_row(token, &mut x),
                Embedding::Quantized(table) => table.dequantize_row(token, &mut x),
                Embedding::Dense(table) => {
                    x.extend_from_slice(&table[token * self.hidden..(token + 1) * self.hidden]);
                    true
                }
            };
            if !found {
                candle_core::bail!("token id {token} has no embedding row");
            }
        }
        if self.embedding_scale != 1.0 {
            x.iter_mut().for_each(|v| *v *= self.embedding_scale);
        }
        Ok(x)
    }

    /// Causal attention of `q [rows, n_head, head_dim]`: row `r` attends to
    /// the first `position + 1` positions of its sequence (the last
    /// `window` of them on a sliding-window layer), found through the
    /// sequence's block table.
    fn attention(
        &self,
        layer: LayerView<'_>,
        tables: &[&[BlockId]],
        block_tokens: usize,
        q: &[f32],
        rows: &[Row],
        window: Option<usize>,
    ) -> Vec<f32> {
        let (hd, n_head, n_kv) = (self.head_dim, self.n_head, self.n_kv_head);
        let group = n_head / n_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; rows.len() * n_head * hd];
        let work = |(index, out): (usize, &mut [f32])| {
            let (row, head) = (&rows[index / n_head], index % n_head);
            // The slots of the positions it sees, through the block table.
            let table = tables[row.seq];
            let slots = visible(row.position, window)
                .map(|p| table[p / block_tokens] as usize * block_tokens + p % block_tokens);
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
        let scores: usize = rows.iter().map(|r| visible(r.position, window).len()).sum();
        if scores < PARALLEL_ATTENTION_MIN_SCORES {
            out.chunks_exact_mut(hd).enumerate().for_each(work);
        } else {
            for_each_chunk_mut(&mut out, hd, |index, out| work((index, out)));
        }
        out
    }

    /// Runs one token per row through the model, storing keys and values in
    /// each row's sequence (rows of one sequence come in position order,
    /// from the sequence's current position on), and returns the logits of
    /// the rows listed in `logits_of`.
    pub(super) fn run(
        &self,
        sequences: &mut [&mut CpuSequence],
        tokens: &[u32],
        rows: &[Row],
        logits_of: &[usize],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let n = rows.len();
        if n == 0 || logits_of.is_empty() {
            candle_core::bail!("a forward pass needs at least one row and one row's logits");
        }
        if let Some(row) = rows.iter().find(|r| r.position >= self.positions) {
            candle_core::bail!(
                "position {} past the {} positions this model is served with",
                row.position,
                self.positions
            );
        }
        let mut x = self.embed(tokens)?;
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
        let kv_width = self.n_kv_head * self.head_dim;
        let held: Vec<Option<Arc<UnmergedAdapter>>> = rows
            .iter()
            .map(|r| sequences[r.seq].adapter().cloned())
            .collect();
        let adapters: Vec<Option<&UnmergedAdapter>> = held.iter().map(|a| a.as_deref()).collect();
        let lora = |layer: usize, parts: &[(Projection, usize)], x: &[f32], y: &mut [f32]| {
            crate::lora::unmerged::add_deltas(&adapters, layer, parts, x, y);
        };
        let tables: Vec<&[BlockId]> = sequences.iter().map(|s| s.block_table()).collect();
        let angles: Vec<RopeAngles> = self
            .ropes
            .iter()
            .map(|frequencies| frequencies.angles(rows.iter().map(|r| r.position)))
            .collect();
        for (index, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attention_norm);
            let mut parts = layer.qkv.forward(&h, n)?.into_iter();
            let (mut q, mut k, mut v) = match (parts.next(), parts.next(), parts.next()) {
                (Some(q), Some(k), Some(v)) => (q, k, v),
                _ => candle_core::bail!("qkv projection split"),
            };
            lora(index, &[(Projection::Q, 0)], &h, &mut q);
            lora(index, &[(Projection::K, 0)], &h, &mut k);
            lora(index, &[(Projection::V, 0)], &h, &mut v);
            if let Some(weight) = &layer.q_norm {
                self.rms_norm_in_place(&mut q, weight);
            }
            if let Some(weight) = &layer.k_norm {
                self.rms_norm_in_place(&mut k, weight);
            }
            self.rope(&mut q, self.n_head, &angles[layer.rope]);
            self.rope(&mut k, self.n_kv_head, &angles[layer.rope]);
            for ((&slot, k), v) in slots
                .iter()
                .zip(k.chunks_exact(kv_width))
                .zip(v.chunks_exact(kv_width))
            {
                state.store.write(index, slot, k, v);
            }
            let layer_kv = state.store.layer(index);
            let attended = self.attention(layer_kv, &tables, block_tokens, &q, rows, layer.window);
            let mut o = layer.o.matmul(&attended, n)?;
            lora(index, &[(Projection::O, 0)], &attended, &mut o);
            if let Some(weight) = &layer.post_attention_norm {
                self.rms_norm_in_place(&mut o, weight);
            }
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h = self.rms_norm(&x, &layer.ffn_norm);
            let mut parts = layer.gate_up.forward(&h, n)?.into_iter();
            let (mut gate, mut up) = match (parts.next(), parts.next()) {
                (Some(gate), Some(up)) => (gate, up),
                _ => candle_core::bail!("gate/up projection split"),
            };
            lora(index, &[(Projection::Gate, 0)], &h, &mut gate);
            lora(index, &[(Projection::Up, 0)], &h, &mut up);
            match self.activation {
                Activation::Silu => gate
                    .iter_mut()
                    .zip(&up)
                    .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u),
                Activation::GeluTanh => gate
                    .iter_mut()
                    .zip(&up)
                    .for_each(|(g, u)| *g = gelu_tanh(*g) * u),
            }
            let mut down = layer.down.matmul(&gate, n)?;
            lora(index, &[(Projection::Down, 0)], &gate, &mut down);
            if let Some(weight) = &layer.post_ffn_norm {
                self.rms_norm_in_place(&mut down, weight);
            }
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
        sequences: &mut [&mut CpuSequence],
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

#[cfg(test)]
mod tests {
    use super::gelu_tanh;

    /// The one-`exp` form equals the tanh form to f32 rounding, and stays
    /// finite at the ends.
    #[test]
    fn gelu_tanh_matches_the_tanh_form() {
        for i in -2000..=2000 {
            let x = i as f32 / 100.0;
            let u = 0.797_884_6_f64 * (x as f64 + 0.044_715 * (x as f64).powi(3));
            let reference = 0.5 * x as f64 * (1.0 + u.tanh());
            let got = gelu_tanh(x) as f64;
            assert!(
                (got - reference).abs() <= 1e-6 * reference.abs().max(1e-3),
                "gelu({x}) = {got}, reference {reference}"
            );
        }
        assert_eq!(gelu_tanh(-1e4), 0.0);
        assert_eq!(gelu_tanh(1e4), 1e4);
    }
}
