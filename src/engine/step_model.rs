//! What the worker needs of a model: sequences to run, one (batched) decode
//! step, and the vocabulary. `LoadedModel` is the real one; the scheduler's
//! tests drive the worker with a small fake.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::lora::UnmergedAdapter;
use crate::models::{LoadedModel, SequenceModel};

pub trait StepModel: Send + Sync + 'static {
    /// The served model's id (metrics labels).
    fn id(&self) -> &str;
    /// A fresh sequence, running `adapter` unmerged when given.
    fn new_sequence(
        &self,
        adapter: Option<&Arc<UnmergedAdapter>>,
    ) -> candle_core::Result<Box<dyn SequenceModel>>;
    /// Feeds `tokens[i]` to `sequences[i]`; each one's next-token logits.
    fn decode_batch(
        &self,
        sequences: &mut [&mut Box<dyn SequenceModel>],
        tokens: &[u32],
    ) -> candle_core::Result<Vec<Vec<f32>>>;
    fn tokenizer(&self) -> &Tokenizer;
    /// Tokens that end generation.
    fn eos_token_ids(&self) -> &[u32];
    /// Positions (prompt + completion) a sequence may use.
    fn context_length(&self) -> usize;
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

    fn decode_batch(
        &self,
        sequences: &mut [&mut Box<dyn SequenceModel>],
        tokens: &[u32],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        LoadedModel::decode_batch(self, sequences, tokens)
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
}
