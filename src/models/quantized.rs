//! GGUF quantized llama-family models through candle's `quantized_llama`.
//! Its KV cache lives inside the weights struct, whose tensors are
//! reference-counted: cloning it is cheap and gives an independent sequence.

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

use super::SequenceModel;

#[derive(Clone)]
pub struct LlamaSequence {
    weights: ModelWeights,
    device: Device,
    position: usize,
}

impl LlamaSequence {
    /// The weights' KV cache is replaced at position 0, so any clone of the
    /// loaded weights starts a fresh sequence.
    pub fn new(weights: ModelWeights, device: Device) -> Self {
        Self {
            weights,
            device,
            position: 0,
        }
    }
}

impl SequenceModel for LlamaSequence {
    fn forward(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = self.weights.forward(&input, self.position)?;
        self.position += tokens.len();
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
