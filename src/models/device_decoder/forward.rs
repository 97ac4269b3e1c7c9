//! One forward pass over every running sequence's new tokens.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::{DeviceDecoder, DeviceSequence, RopeLayout, Weight};
use crate::lora::{Projection, UnmergedAdapter};

/// The rows of one step: which sequence each belongs to and where.
pub(super) struct Rows {
    /// Per sequence: its first row and how many it has.
    pub(super) spans: Vec<(usize, usize)>,
    /// Each row's position in its sequence.
    positions: Tensor,
    /// Each row's row in the KV slab, broadcast to `[rows, kv_width]`.
    slab_rows: Tensor,
    /// Per adapter in the batch, the rows that run it (rows without an
    /// adapter are in none).
    adapters: Vec<(Arc<UnmergedAdapter>, Tensor)>,
    /// The adapter every row runs, when there is one such.
    one_adapter_for_all: Option<Arc<UnmergedAdapter>>,
}

impl DeviceDecoder {
    /// Feeds `inputs[i]` to `sequences[i]` in one pass and returns each
    /// one's next-token logits. When it fails no sequence advances (the
    /// rows it wrote are past their positions and are written again).
    pub fn forward_batch(
        &self,
        sequences: &mut [&mut DeviceSequence],
        inputs: &[&[u32]],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        if sequences.len() != inputs.len() || inputs.iter().any(|i| i.is_empty()) {
            candle_core::bail!("every sequence needs at least one token");
        }
        for (sequence, input) in sequences.iter().zip(inputs) {
            // An id past the table would read outside it on the device.
            if let Some(&id) = input.iter().find(|&&id| id as usize >= self.vocab) {
                candle_core::bail!("token id {id} is outside the vocabulary ({})", self.vocab);
            }
            if sequence.position + input.len() > self.context {
                candle_core::bail!(
                    "the sequence would hold {} positions; this model serves {}",
                    sequence.position + input.len(),
                    self.context
                );
            }
        }
        let rows = self.rows(sequences, inputs)?;
        let ids: Vec<u32> = inputs.iter().flat_map(|i| i.iter().copied()).collect();
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x = self.embedding.index_select(&ids, 0)?;
        let plan = self.attention_plan(sequences, &rows)?;
        let (cos, sin) = (
            self.cos.index_select(&rows.positions, 0)?,
            self.sin.index_select(&rows.positions, 0)?,
        );
        for (index, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attention_norm)?;
            let q = self.project(&layer.q, &h, index, Projection::Q, &rows)?;
            let k = self.project(&layer.k, &h, index, Projection::K, &rows)?;
            let v = self.project(&layer.v, &h, index, Projection::V, &rows)?;
            let q = self.rotate(&q, self.n_head, &cos, &sin)?;
            let k = self.rotate(&k, self.n_kv_head, &cos, &sin)?;
            // Keys back to rows, then every new key and value into the slab.
            let n = ids.dim(0)?;
            let k = k.transpose(0, 1)?.contiguous()?.reshape((n, ()))?;
            self.kv.keys[index].scatter_set(&rows.slab_rows, &k, 0)?;
            self.kv.values[index].scatter_set(&rows.slab_rows, &v.contiguous()?, 0)?;
            let attention = self.attend(index, &q, &plan)?;
            let attention = self.project(&layer.o, &attention, index, Projection::O, &rows)?;
            x = (x + attention)?;
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let gate = self.project(&layer.gate, &h, index, Projection::Gate, &rows)?;
            let up = self.project(&layer.up, &h, index, Projection::Up, &rows)?;
            let mlp = (candle_nn::ops::silu(&gate)? * up)?;
            let mlp = self.project(&layer.down, &mlp, index, Projection::Down, &rows)?;
            x = (x + mlp)?;
        }
        let last: Vec<u32> = rows
            .spans
            .iter()
            .map(|&(first, len)| (first + len - 1) as u32)
            .collect();
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let x = self.rms_norm(&x.index_select(&last, 0)?, &self.norm)?;
        let logits = self.output.forward(&x)?.to_dtype(DType::F32)?.to_vec2()?;
        for (sequence, input) in sequences.iter_mut().zip(inputs) {
            sequence.position += input.len();
        }
        Ok(logits)
    }

    fn rows(
        &self,
        sequences: &[&mut DeviceSequence],
        inputs: &[&[u32]],
    ) -> candle_core::Result<Rows> {
        let mut spans = Vec::with_capacity(inputs.len());
        let (mut positions, mut slab_rows) = (Vec::new(), Vec::new());
        let mut adapter_rows: Vec<(Arc<UnmergedAdapter>, Vec<u32>)> = Vec::new();
        for (sequence, input) in sequences.iter().zip(inputs) {
            let first = positions.len();
            spans.push((first, input.len()));
            for t in 0..input.len() {
                let position = sequence.position + t;
                positions.push(position as u32);
                slab_rows.push((sequence.slot * self.context + position) as u32);
            }
            if let Some(adapter) = sequence.adapter() {
                let rows = (first as u32..(first + input.len()) as u32).collect::<Vec<_>>();
                match adapter_rows
                    .iter_mut()
                    .find(|(a, _)| Arc::ptr_eq(a, adapter))
                {
                    Some((_, list)) => list.extend(rows),
                    None => adapter_rows.push((adapter.clone(), rows)),
                }
            }
        }
        let n = positions.len();
        let one_adapter_for_all = match adapter_rows.as_slice() {
            [(adapter, list)] if list.len() == n => Some(adapter.clone()),
            _ => None,
        };
        let width = self.n_kv_head * self.head_dim;
        let slab_rows = Tensor::new(slab_rows.as_slice(), &self.device)?
            .unsqueeze(1)?
            .broadcast_as((n, width))?
            .contiguous()?;
        let adapters = adapter_rows
            .into_iter()
            .map(|(adapter, list)| Ok((adapter, Tensor::new(list.as_slice(), &self.device)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Rows {
            spans,
            positions: Tensor::new(positions.as_slice(), &self.device)?,
            slab_rows,
            adapters,
            one_adapter_for_all,
        })
    }

    /// Candle's kernel sums in f32 whatever the activations' type.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, weight, self.eps)
    }

    /// `weight` on `x`, plus each row's adapter delta.
    fn project(
        &self,
        weight: &Weight,
        x: &Tensor,
        layer: usize,
        projection: Projection,
        rows: &Rows,
    ) -> candle_core::Result<Tensor> {
        let mut y = weight.forward(x)?;
        fn factors(
            adapter: &UnmergedAdapter,
            layer: usize,
            projection: Projection,
        ) -> Option<&(Tensor, Tensor)> {
            adapter.device_factors()?.factors.get(layer)?[projection as usize].as_ref()
        }
        if let Some(adapter) = &rows.one_adapter_for_all {
            if let Some((a_t, b_t)) = factors(adapter, layer, projection) {
                y = (y + x.matmul(a_t)?.matmul(b_t)?)?;
            }
            return Ok(y);
        }
        for (adapter, index) in &rows.adapters {
            if let Some((a_t, b_t)) = factors(adapter, layer, projection) {
                let delta = x.index_select(index, 0)?.matmul(a_t)?.matmul(b_t)?;
                y = y.index_add(index, &delta, 0)?;
            }
        }
        Ok(y)
    }

    /// `[rows, heads * head_dim]` to `[heads, rows, head_dim]`, rotated.
    fn rotate(
        &self,
        x: &Tensor,
        heads: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let x = x
            .reshape((n, heads, self.head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?;
        let rotated = match self.rope_layout {
            RopeLayout::AdjacentPairs => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
            RopeLayout::Halves => candle_nn::rotary_emb::rope(&x, cos, sin)?,
        };
        rotated.squeeze(0)
    }
}
