//! Attention over the KV slab. Sequences feeding one token (decode) attend
//! together: their keys gathered from their slots into one padded batch,
//! each KV head's query heads as the rows of one product. Sequences feeding
//! a prompt chunk attend one at a time over their slot, causally. A pass
//! with both runs each group its way and puts the rows back in order.
//!
//! Everything the layers share (masks, gather rows, the reordering) is
//! uploaded once per pass: a copy to the device waits for its queue, so
//! none happens between layers.

use candle_core::{DType, Tensor};

use super::forward::Rows;
use super::{DeviceDecoder, DeviceSequence};

/// The sequences feeding one token.
struct DecodeGroup {
    count: usize,
    /// Their rows among the pass's rows (None when they are all the rows).
    rows: Option<Tensor>,
    /// `[count, 1, 1, longest]`: 0 where a sequence has a key, -inf past its end.
    mask: Tensor,
    /// The slab rows of each one's keys, `longest` apiece.
    gather: Tensor,
}

/// A sequence feeding a prompt chunk.
struct ChunkSequence {
    slot: usize,
    /// Its first row and row count in the pass.
    first: usize,
    len: usize,
    /// Keys it attends over: its position plus the chunk.
    keys: usize,
    /// `[groups * len, keys]` causal mask.
    mask: Tensor,
}

pub(super) struct AttentionPlan {
    decode: Option<DecodeGroup>,
    chunks: Vec<ChunkSequence>,
    /// Where each row's output sits in [decode rows, then each chunk's rows]
    /// when that is not already row order.
    order: Option<Tensor>,
}

impl DeviceDecoder {
    pub(super) fn attention_plan(
        &self,
        sequences: &[&mut DeviceSequence],
        rows: &Rows,
    ) -> candle_core::Result<AttentionPlan> {
        let groups = self.n_head / self.n_kv_head;
        let (mut decoding, mut chunks) = (Vec::new(), Vec::new());
        for (sequence, &(first, len)) in sequences.iter().zip(&rows.spans) {
            if len == 1 {
                decoding.push((first, sequence.slot, sequence.position));
                continue;
            }
            let keys = sequence.position + len;
            let mut mask = Vec::with_capacity(groups * len * keys);
            for row in 0..groups * len {
                let last = sequence.position + row % len;
                mask.extend((0..keys).map(|j| if j <= last { 0f32 } else { f32::NEG_INFINITY }));
            }
            chunks.push(ChunkSequence {
                slot: sequence.slot,
                first,
                len,
                keys,
                mask: Tensor::from_vec(mask, (groups * len, keys), &self.device)?,
            });
        }
        // Outputs come decode rows first, then each chunk's rows.
        let mut sources: Vec<usize> = decoding.iter().map(|&(first, ..)| first).collect();
        for chunk in &chunks {
            sources.extend(chunk.first..chunk.first + chunk.len);
        }
        let mut order = vec![0u32; sources.len()];
        for (at, &row) in sources.iter().enumerate() {
            order[row] = at as u32;
        }
        let in_order = order.iter().enumerate().all(|(i, &o)| i == o as usize);
        let decode = match decoding.is_empty() {
            true => None,
            false => Some(self.decode_group(&decoding, chunks.is_empty())?),
        };
        Ok(AttentionPlan {
            decode,
            chunks,
            order: match in_order {
                true => None,
                false => Some(Tensor::new(order.as_slice(), &self.device)?),
            },
        })
    }

    /// `decoding`: (row, slot, position) of each sequence feeding one token.
    fn decode_group(
        &self,
        decoding: &[(usize, usize, usize)],
        all_rows: bool,
    ) -> candle_core::Result<DecodeGroup> {
        let longest = decoding.iter().map(|&(.., p)| p + 1).max().unwrap_or(1);
        let (mut mask, mut gather) = (Vec::new(), Vec::new());
        for &(_, slot, position) in decoding {
            mask.extend((0..longest).map(|j| {
                if j <= position {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
            gather.extend((0..longest).map(|j| (slot * self.context + j) as u32));
        }
        let rows: Vec<u32> = decoding.iter().map(|&(row, ..)| row as u32).collect();
        Ok(DecodeGroup {
            count: decoding.len(),
            rows: match all_rows {
                true => None,
                false => Some(Tensor::new(rows.as_slice(), &self.device)?),
            },
            mask: Tensor::from_vec(mask, (decoding.len(), 1, 1, longest), &self.device)?,
            gather: Tensor::new(gather.as_slice(), &self.device)?,
        })
    }

    /// Layer `layer`'s attention output `[rows, heads * head_dim]` for the
    /// rotated queries `q` `[heads, rows, head_dim]`.
    pub(super) fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        plan: &AttentionPlan,
    ) -> candle_core::Result<Tensor> {
        let mut parts = Vec::with_capacity(plan.chunks.len() + 1);
        if let Some(group) = &plan.decode {
            let q = match &group.rows {
                Some(rows) => q.index_select(rows, 1)?,
                None => q.clone(),
            };
            parts.push(self.decode_attention(layer, &q, group)?);
        }
        for chunk in &plan.chunks {
            parts.push(self.chunk_attention(layer, q, chunk)?);
        }
        let all = match parts.len() {
            1 => parts.swap_remove(0),
            _ => Tensor::cat(&parts, 0)?,
        };
        match &plan.order {
            Some(order) => all.index_select(order, 0),
            None => Ok(all),
        }
    }

    fn decode_attention(
        &self,
        layer: usize,
        q: &Tensor,
        group: &DecodeGroup,
    ) -> candle_core::Result<Tensor> {
        let (b, longest) = (group.count, group.mask.dim(3)?);
        let groups = self.n_head / self.n_kv_head;
        let heads = |slab: &Tensor| -> candle_core::Result<Tensor> {
            slab.index_select(&group.gather, 0)?
                .reshape((b, longest, self.n_kv_head, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (k, v) = (heads(&self.kv.keys[layer])?, heads(&self.kv.values[layer])?);
        let q =
            q.transpose(0, 1)?
                .contiguous()?
                .reshape((b, self.n_kv_head, groups, self.head_dim))?;
        let out = self.softmax_attention(&q, &k, &v, &group.mask)?;
        out.reshape((b, self.n_head * self.head_dim))
    }

    fn chunk_attention(
        &self,
        layer: usize,
        q: &Tensor,
        chunk: &ChunkSequence,
    ) -> candle_core::Result<Tensor> {
        let (len, keys) = (chunk.len, chunk.keys);
        let groups = self.n_head / self.n_kv_head;
        let base = chunk.slot * self.context;
        let heads = |slab: &Tensor| -> candle_core::Result<Tensor> {
            slab.narrow(0, base, keys)?
                .reshape((keys, self.n_kv_head, self.head_dim))?
                .transpose(0, 1)?
                .contiguous()
        };
        let (k, v) = (heads(&self.kv.keys[layer])?, heads(&self.kv.values[layer])?);
        let q = q.narrow(1, chunk.first, len)?.contiguous()?.reshape((
            self.n_kv_head,
            groups * len,
            self.head_dim,
        ))?;
        let out = self.softmax_attention(&q, &k, &v, &chunk.mask)?;
        out.reshape((self.n_head, len, self.head_dim))?
            .transpose(0, 1)?
            .reshape((len, self.n_head * self.head_dim))
    }

    /// softmax(q kᵀ / √d + mask) v, the scores in f32.
    fn softmax_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask)?)?;
        weights.to_dtype(self.dtype)?.matmul(v)
    }
}
