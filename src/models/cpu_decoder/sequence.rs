//! One sequence of a CPU decoder model: its block table in the model's paged
//! KV cache, the tokens stored there, and the adapter it runs with. Forks
//! share blocks (a shared, partly filled block is copied on the next write);
//! a new sequence may start from an earlier prompt's cached blocks.

use std::sync::Arc;

use super::CpuDecoder;
use super::forward::Row;
use crate::lora::UnmergedAdapter;
use crate::models::SequenceModel;
use crate::models::kv_cache::{BlockId, KvState};

pub struct CpuSequence {
    weights: Arc<CpuDecoder>,
    adapter: Option<Arc<UnmergedAdapter>>,
    /// Block `i` holds positions `i * block_tokens ..`.
    blocks: Vec<BlockId>,
    /// The tokens whose keys and values are stored, in position order.
    tokens: Vec<u32>,
    /// Full blocks already named in the prefix cache, and the chain hash
    /// after the last of them.
    published: usize,
    chain: u64,
}

fn allocate(state: &mut KvState) -> candle_core::Result<BlockId> {
    state.blocks.allocate().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "the KV cache is full ({} blocks of {} tokens); raise --kv-cache-mb",
            state.blocks.total(),
            state.blocks.block_tokens()
        ))
    })
}

impl CpuSequence {
    pub fn new(weights: Arc<CpuDecoder>, adapter: Option<Arc<UnmergedAdapter>>) -> Self {
        let chain = adapter.as_ref().map_or(0, |a| a.cache_seed());
        Self {
            weights,
            adapter,
            blocks: Vec::new(),
            tokens: Vec::new(),
            published: 0,
            chain,
        }
    }

    pub(super) fn adapter(&self) -> Option<&Arc<UnmergedAdapter>> {
        self.adapter.as_ref()
    }

    pub(super) fn block_table(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Positions whose keys and values are stored.
    pub(super) fn stored(&self) -> usize {
        self.tokens.len()
    }

    /// Makes the slot of `position` (the next one to be written) this
    /// sequence's alone, allocating or copying its block as needed; returns
    /// the slot's index in the pool.
    pub(super) fn prepare_slot(
        &mut self,
        state: &mut KvState,
        position: usize,
    ) -> candle_core::Result<usize> {
        let block_tokens = state.blocks.block_tokens();
        let (index, offset) = (position / block_tokens, position % block_tokens);
        if index == self.blocks.len() {
            let block = allocate(state)?;
            self.blocks.push(block);
        } else if index > self.blocks.len() {
            candle_core::bail!("position {position} skips past the sequence's blocks");
        } else if state.blocks.references(self.blocks[index]) > 1 {
            let shared = self.blocks[index];
            let own = allocate(state)?;
            state.store.copy_slots(
                shared as usize * block_tokens,
                own as usize * block_tokens,
                offset,
            );
            state.blocks.release(shared);
            self.blocks[index] = own;
        }
        Ok(self.blocks[index] as usize * block_tokens + offset)
    }

    /// Records a token whose keys and values were just stored, and names
    /// each block it fills in the prefix cache.
    pub(super) fn record(&mut self, state: &mut KvState, token: u32) {
        self.tokens.push(token);
        if !self.weights.kv.config.prefix_cache {
            return;
        }
        let block_tokens = state.blocks.block_tokens();
        while (self.published + 1) * block_tokens <= self.tokens.len() {
            let i = self.published;
            let tokens = &self.tokens[i * block_tokens..(i + 1) * block_tokens];
            self.chain = state.blocks.publish(self.blocks[i], self.chain, tokens);
            self.published += 1;
        }
    }
}

impl Drop for CpuSequence {
    fn drop(&mut self) {
        let mut state = self.weights.kv.lock();
        for &block in &self.blocks {
            state.blocks.release(block);
        }
    }
}

impl SequenceModel for CpuSequence {
    fn forward(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        if tokens.is_empty() {
            candle_core::bail!("forward needs at least one token");
        }
        let weights = self.weights.clone();
        let start = self.stored();
        let rows: Vec<Row> = (0..tokens.len())
            .map(|i| Row {
                seq: 0,
                position: start + i,
            })
            .collect();
        let mut logits = weights.run(&mut [self], tokens, &rows, &[tokens.len() - 1])?;
        Ok(logits.pop().unwrap_or_default())
    }

    fn position(&self) -> usize {
        self.stored()
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn fork(&self) -> Box<dyn SequenceModel> {
        let mut state = self.weights.kv.lock();
        for &block in &self.blocks {
            state.blocks.retain(block);
        }
        Box::new(Self {
            weights: self.weights.clone(),
            adapter: self.adapter.clone(),
            blocks: self.blocks.clone(),
            tokens: self.tokens.clone(),
            published: self.published,
            chain: self.chain,
        })
    }

    /// Starts from the cached blocks of an earlier prompt that `prompt`
    /// begins with (whole blocks, and never the last token: its logits are
    /// still to be computed).
    fn reuse_prefix(&mut self, prompt: &[u32]) -> usize {
        if !self.weights.kv.config.prefix_cache || !self.blocks.is_empty() {
            return 0;
        }
        let usable = &prompt[..prompt.len().saturating_sub(1)];
        let mut state = self.weights.kv.lock();
        let (found, chain) = state.blocks.lookup(self.chain, usable);
        let reused = found.len() * state.blocks.block_tokens();
        self.tokens.extend_from_slice(&prompt[..reused]);
        self.published = found.len();
        self.blocks = found;
        self.chain = chain;
        reused
    }
}
