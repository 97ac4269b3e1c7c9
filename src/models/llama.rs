//! Hugging Face safetensors checkpoints of the llama family (Llama, Mistral
//! without its sliding window, SmolLM) on accelerators, through candle's
//! `llama` model, whose KV cache is a separate value: one cache per
//! sequence over shared weights. The CPU runs them on `cpu_decoder`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig};

use super::SequenceModel;

pub struct LlamaWeights {
    model: Llama,
    config: Config,
    dtype: DType,
    device: Device,
}

impl LlamaWeights {
    /// Loads `config.json` and every `*.safetensors` file of `dir`.
    /// `merge`: an adapter merged into the weights as they are read.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        merge: Option<&Arc<crate::lora::Adapter>>,
    ) -> anyhow::Result<Self> {
        let config_text = std::fs::read_to_string(dir.join("config.json"))?;
        let file_config: LlamaConfig = serde_json::from_str(&config_text)
            .map_err(|e| anyhow::anyhow!("config.json is not a llama config: {e}"))?;
        let config = file_config.into_config(false);
        let vb = super::checkpoint::checkpoint_vars(dir, dtype, device, merge)?;
        // candle's loader unwraps a missing tensor inside; turn that into an error.
        let model =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Llama::load(vb, &config)))
                .map_err(|_| anyhow::anyhow!("the checkpoint lacks tensors a llama model needs"))??;
        Ok(Self {
            model,
            config,
            dtype,
            device: device.clone(),
        })
    }

    pub fn max_position_embeddings(&self) -> usize {
        self.config.max_position_embeddings
    }
}

pub struct LlamaSequence {
    weights: Arc<LlamaWeights>,
    cache: Cache,
    position: usize,
}

impl LlamaSequence {
    pub fn new(weights: Arc<LlamaWeights>) -> candle_core::Result<Self> {
        let cache = Cache::new(true, weights.dtype, &weights.config, &weights.device)?;
        Ok(Self {
            weights,
            cache,
            position: 0,
        })
    }
}

impl SequenceModel for LlamaSequence {
    fn forward(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        let input = Tensor::new(tokens, &self.weights.device)?.unsqueeze(0)?;
        let logits = self
            .weights
            .model
            .forward(&input, self.position, &mut self.cache)?;
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
        Box::new(Self {
            weights: self.weights.clone(),
            cache: self.cache.clone(),
            position: self.position,
        })
    }
}
