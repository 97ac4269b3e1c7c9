//! Hugging Face Qwen2 safetensors checkpoints on accelerators, through
//! candle's `qwen2` model (the CPU runs them on `cpu_decoder`). Its KV
//! cache lives inside the model, whose tensors are reference-counted: a
//! clone with a cleared cache is a new sequence over the same weights.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::qwen2::{Config, ModelForCausalLM};

use super::SequenceModel;

pub struct Qwen2Weights {
    model: ModelForCausalLM,
    max_position_embeddings: usize,
    device: Device,
}

impl Qwen2Weights {
    /// `merge`: an adapter merged into the weights as they are read.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        merge: Option<&std::sync::Arc<crate::lora::Adapter>>,
    ) -> anyhow::Result<Self> {
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let config: Config = serde_json::from_value(normalize_config(raw))
            .map_err(|e| anyhow::anyhow!("config.json is not a Qwen2 config: {e}"))?;
        let vb = super::checkpoint::checkpoint_vars(dir, dtype, device, merge)?;
        let model = ModelForCausalLM::new(&config, vb)?;
        Ok(Self {
            model,
            max_position_embeddings: config.max_position_embeddings,
            device: device.clone(),
        })
    }

    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }
}

/// Fills what candle's `qwen2::Config` requires but checkpoints may leave out:
/// without `use_sliding_window`, the window covers every position (candle
/// applies the window always); `rope_theta` may sit in `rope_parameters`
/// (transformers 5).
fn normalize_config(mut config: serde_json::Value) -> serde_json::Value {
    let max_positions = config["max_position_embeddings"].clone();
    let sliding = config["use_sliding_window"].as_bool().unwrap_or(false);
    if !sliding || config["sliding_window"].is_null() {
        config["sliding_window"] = max_positions;
    }
    if config["rope_theta"].is_null() {
        config["rope_theta"] = config["rope_parameters"]["rope_theta"].clone();
    }
    if config["max_window_layers"].is_null() {
        config["max_window_layers"] = config["num_hidden_layers"].clone();
    }
    config["use_sliding_window"] = serde_json::Value::Bool(sliding);
    config
}

#[derive(Clone)]
pub struct Qwen2Sequence {
    model: ModelForCausalLM,
    device: Device,
    position: usize,
}

impl Qwen2Sequence {
    pub fn new(weights: &Qwen2Weights) -> Self {
        let mut model = weights.model.clone();
        model.clear_kv_cache();
        Self {
            model,
            device: weights.device.clone(),
            position: 0,
        }
    }
}

impl SequenceModel for Qwen2Sequence {
    fn forward(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = self.model.forward(&input, self.position)?;
        self.position += tokens.len();
        logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
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
