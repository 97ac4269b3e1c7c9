//! What the worker needs of a model: sequences to run, one (batched) decode
//! step, and the vocabulary. `LoadedModel` is the real one; the scheduler's
//! tests drive the worker with a small fake.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::lora::UnmergedAdapter;
use crate::models::kv_cache::{KvBudget, KvUsage};
use crate::models::{LoadedModel, SequenceModel};

pub trait StepModel: Send + Sync + 'static {
    /// The served model's id (metrics labels).
    fn id(&self) -> &str;
    /// A fresh sequence, running `adapter` unmerged when given.
    fn new_sequence(
        &self,
        adapter: Option<&Arc<UnmergedAdapter>>,
    ) -> candle_core::Result<Box<dyn SequenceModel>>;
    /// Feeds `inputs[i]` (one token or more) to `sequences[i]`; each one's
    /// next-token logits, or why its feed failed. One forward pass for all
    /// where the model supports it, each sequence alone otherwise.
    fn forward_batch(
        &self,
        sequences: &mut [&mut Box<dyn SequenceModel>],
        inputs: &[&[u32]],
    ) -> Vec<candle_core::Result<Vec<f32>>> {
        sequences
            .iter_mut()
            .zip(inputs)
            .map(|(sequence, input)| sequence.forward(input))
            .collect()
    }
    fn tokenizer(&self) -> &Tokenizer;
    /// Tokens that end generation.
    fn eos_token_ids(&self) -> &[u32];
    /// Positions (prompt + completion) a sequence may use.
    fn context_length(&self) -> usize;
    /// The paged KV cache's budget, for models that have one: admission then
    /// reserves blocks for each request.
    fn kv_budget(&self) -> Option<KvBudget> {
        None
    }
    /// The paged KV cache's blocks and prefix-cache counters (`/metrics`).
    fn kv_usage(&self) -> Option<KvUsage> {
        None
    }
}

impl StepModel for LoadedModel {
    fn id(&self) -> &str {
        &self.id
    }

    fn new_sequence(
        &self,
        adapter: Option<&Arc<UnmergedAdapter>>,
    ) -> candle_core::Result<Box<dyn SequenceModel>> {
        self.new_sequence_with(adapter)
    }

    fn forward_batch(
        &self,
        sequences: &mut [&mut Box<dyn SequenceModel>],
        inputs: &[&[u32]],
    ) -> Vec<candle_core::Result<Vec<f32>>> {
        LoadedModel::forward_batch(self, sequences, inputs)
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    fn context_length(&self) -> usize {
        self.context_length
    }

    fn kv_budget(&self) -> Option<KvBudget> {
        LoadedModel::kv_budget(self).cloned()
    }

    fn kv_usage(&self) -> Option<KvUsage> {
        LoadedModel::kv_usage(self)
    }
}
