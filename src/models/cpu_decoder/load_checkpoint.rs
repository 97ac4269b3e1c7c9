//! Loading a decoder from a Hugging Face safetensors checkpoint of the
//! llama family (Llama, Mistral, Qwen2, SmolLM): config.json for the
//! hyperparameters; the projections packed for the f32 kernels in the type
//! they are stored in (bf16 and f16 stay 16-bit and widen exactly in the
//! kernels), or in f32 with a LoRA adapter merged when asked.

use std::path::Path;
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{Activation, Architecture, CpuDecoder, Embedding, Layer, RopeFrequencies, RopeLayout};
use crate::lora::Adapter;
use crate::models::checkpoint::{checkpoint_tensors, checkpoint_vars};
use crate::models::kv_cache::{KvCache, KvCacheConfig, KvShape};
use crate::models::packed_gemm::DenseWeights;
use crate::models::quant_matmul::{ProjectionGroup, QuantMatrix};

/// What config.json says, under the names transformers writes.
#[derive(Deserialize)]
struct CheckpointConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    vocab_size: usize,
    max_position_embeddings: usize,
    hidden_act: Option<String>,
    rope_theta: Option<f32>,
    /// transformers 4: rotary scaling, if any.
    rope_scaling: Option<RopeParameters>,
    /// transformers 5: the base frequency and scaling together.
    rope_parameters: Option<RopeParameters>,
    /// Mistral: every layer; Qwen2: with `use_sliding_window`, the layers
    /// from `max_window_layers` on (or as `layer_types` says).
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
}

#[derive(Deserialize, Clone)]
struct RopeParameters {
    rope_theta: Option<f32>,
    /// transformers 4 wrote `type`.
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

/// How the rotary frequencies are scaled for long contexts.
enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear(f32),
    /// Llama 3.1's piecewise scaling of the low frequencies.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
}

impl RopeScaling {
    fn from_config(parameters: Option<&RopeParameters>) -> anyhow::Result<Self> {
        let Some(p) = parameters else {
            return Ok(Self::None);
        };
        let need = |value: Option<f32>, name: &str| {
            value.ok_or_else(|| anyhow::anyhow!("rope scaling lacks `{name}`"))
        };
        Ok(match p.rope_type.as_deref().unwrap_or("default") {
            "default" => Self::None,
            "linear" => Self::Linear(need(p.factor, "factor")?),
            "llama3" => Self::Llama3 {
                factor: need(p.factor, "factor")?,
                low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
                original_context: p.original_max_position_embeddings.ok_or_else(|| {
                    anyhow::anyhow!("rope scaling lacks `original_max_position_embeddings`")
                })?,
            },
            other => anyhow::bail!(
                "rope scaling `{other}` is not supported (supported: default, linear, llama3)"
            ),
        })
    }

    /// The inverse frequency `inv_freq` as this scaling changes it
    /// (transformers' `_compute_linear_scaling_rope_parameters` and
    /// `_compute_llama3_parameters`).
    fn apply(&self, inv_freq: f32) -> f32 {
        match *self {
            Self::None => inv_freq,
            Self::Linear(factor) => inv_freq / factor,
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                let context = original_context as f32;
                let wavelength = 2.0 * std::f32::consts::PI / inv_freq;
                if wavelength < context / high_freq_factor {
                    inv_freq
                } else if wavelength > context / low_freq_factor {
                    inv_freq / factor
                } else {
                    let smooth = (context / wavelength - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }
}

impl CheckpointConfig {
    /// Each layer's sliding window, if it has one.
    fn windows(&self) -> anyhow::Result<Vec<Option<usize>>> {
        let layers = self.num_hidden_layers;
        let Some(window) = self.sliding_window else {
            return Ok(vec![None; layers]);
        };
        if let Some(types) = &self.layer_types {
            anyhow::ensure!(
                types.len() == layers,
                "config.json lists {} layer types for {layers} layers",
                types.len()
            );
            return Ok(types
                .iter()
                .map(|t| (t == "sliding_attention").then_some(window))
                .collect());
        }
        Ok(match self.use_sliding_window {
            // Qwen2: the layers from max_window_layers on.
            Some(true) => {
                let first = self.max_window_layers.unwrap_or(0);
                (0..layers)
                    .map(|i| (i >= first).then_some(window))
                    .collect()
            }
            Some(false) => vec![None; layers],
            // Mistral: every layer.
            None => vec![Some(window); layers],
        })
    }
}

/// The tensors of a checkpoint: in f32 (with an adapter merged, if any),
/// and, without an adapter, as stored, for projections kept in bf16 or f16.
struct Tensors {
    vars: VarBuilder<'static>,
    stored: Option<MmapedSafetensors>,
}

impl Tensors {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> anyhow::Result<Vec<f32>> {
        let tensor = self
            .vars
            .get((rows, cols), name)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        Ok(tensor.flatten_all()?.to_vec1()?)
    }

    /// A projection's weights, in the 16-bit type they are stored in where
    /// that is bf16 or f16 and no adapter was merged into them, else f32.
    fn weights(&self, name: &str, rows: usize, cols: usize) -> anyhow::Result<DenseWeights> {
        if let Some(stored) = &self.stored {
            let tensor = stored
                .load(name, &Device::Cpu)
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            if tensor.dims() != [rows, cols] {
                anyhow::bail!(
                    "{name} has shape {:?}, expected [{rows}, {cols}]",
                    tensor.dims()
                );
            }
            let flat = tensor.flatten_all()?;
            match tensor.dtype() {
                DType::BF16 => {
                    let values = flat.to_vec1::<half::bf16>()?;
                    return Ok(DenseWeights::Bf16(
                        values.iter().map(|v| v.to_bits()).collect(),
                    ));
                }
                DType::F16 => {
                    let values = flat.to_vec1::<half::f16>()?;
                    return Ok(DenseWeights::F16(
                        values.iter().map(|v| v.to_bits()).collect(),
                    ));
                }
                _ => {}
            }
        }
        Ok(DenseWeights::F32(self.matrix(name, rows, cols)?))
    }

    fn vector(&self, name: &str, len: usize) -> anyhow::Result<Vec<f32>> {
        let tensor = self
            .vars
            .get(len, name)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        Ok(tensor.to_vec1()?)
    }

    /// A projection's weights and, where the checkpoint has one, its bias.
    fn linear(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> anyhow::Result<(DenseWeights, Option<Vec<f32>>)> {
        let weight = self.weights(&format!("{name}.weight"), rows, cols)?;
        let bias_name = format!("{name}.bias");
        let bias = match self.vars.contains_tensor(&bias_name) {
            true => Some(self.vector(&bias_name, rows)?),
            false => None,
        };
        Ok((weight, bias))
    }
}

impl CpuDecoder {
    /// Loads a llama-family checkpoint directory, with `merge`'s adapter
    /// merged into its weights when given; serves at most `max_context`
    /// positions when given.
    pub fn from_checkpoint(
        dir: &Path,
        merge: Option<&Arc<Adapter>>,
        max_context: Option<usize>,
        kv_cache: KvCacheConfig,
    ) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(dir.join("config.json"))?;
        let config: CheckpointConfig = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config.json is not a llama-family config: {e}"))?;
        let activation = match config.hidden_act.as_deref().unwrap_or("silu") {
            "silu" => Activation::Silu,
            "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => {
                anyhow::bail!("hidden_act `{other}` is not supported (silu, gelu_pytorch_tanh)")
            }
        };
        let (hidden, n_head) = (config.hidden_size, config.num_attention_heads);
        let n_kv_head = config.num_key_value_heads.unwrap_or(n_head);
        let head_dim = config.head_dim.unwrap_or(hidden / n_head.max(1));
        if n_head == 0
            || n_kv_head == 0
            || !n_head.is_multiple_of(n_kv_head)
            || !head_dim.is_multiple_of(2)
        {
            anyhow::bail!(
                "unsupported head layout ({n_head} heads, {n_kv_head} KV heads, head dim {head_dim})"
            );
        }
        let rope = config
            .rope_parameters
            .as_ref()
            .or(config.rope_scaling.as_ref());
        let scaling = RopeScaling::from_config(rope)?;
        let theta = config
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(config.rope_theta)
            .unwrap_or(10_000.0);
        let positions = max_context.map_or(config.max_position_embeddings, |m| {
            m.min(config.max_position_embeddings)
        });
        let windows = config.windows()?;
        let tensors = Tensors {
            vars: checkpoint_vars(dir, DType::F32, &Device::Cpu, merge)?,
            stored: match merge {
                Some(_) => None,
                None => Some(checkpoint_tensors(dir)?),
            },
        };
        let (vocab, ffn) = (config.vocab_size, config.intermediate_size);
        let (q_width, kv_width) = (n_head * head_dim, n_kv_head * head_dim);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for (i, window) in windows.into_iter().enumerate() {
            let name = |suffix: &str| format!("model.layers.{i}.{suffix}");
            let attention =
                |p: &str, rows, cols| tensors.linear(&name(&format!("self_attn.{p}")), rows, cols);
            let mlp = |p: &str, rows, cols| tensors.linear(&name(&format!("mlp.{p}")), rows, cols);
            let qkv = vec![
                attention("q_proj", q_width, hidden)?,
                attention("k_proj", kv_width, hidden)?,
                attention("v_proj", kv_width, hidden)?,
            ];
            let (o, o_bias) = attention("o_proj", hidden, q_width)?;
            let gate_up = vec![mlp("gate_proj", ffn, hidden)?, mlp("up_proj", ffn, hidden)?];
            let (down, down_bias) = mlp("down_proj", hidden, ffn)?;
            layers.push(Layer {
                attention_norm: tensors.vector(&name("input_layernorm.weight"), hidden)?,
                qkv: ProjectionGroup::dense(qkv, hidden),
                q_norm: None,
                k_norm: None,
                o: QuantMatrix::dense(o, o_bias, hidden, q_width),
                post_attention_norm: None,
                ffn_norm: tensors.vector(&name("post_attention_layernorm.weight"), hidden)?,
                gate_up: ProjectionGroup::dense(gate_up, hidden),
                down: QuantMatrix::dense(down, down_bias, hidden, ffn),
                post_ffn_norm: None,
                rope: 0,
                window,
            });
        }
        let embeddings = "model.embed_tokens.weight";
        // Tied embeddings when the checkpoint has no output matrix of its own.
        let (output, embedding) = match tensors.vars.contains_tensor("lm_head.weight") {
            true => (
                tensors.weights("lm_head.weight", vocab, hidden)?,
                Embedding::Dense(tensors.matrix(embeddings, vocab, hidden)?),
            ),
            false => (
                tensors.weights(embeddings, vocab, hidden)?,
                Embedding::Output,
            ),
        };
        Ok(Self {
            architecture: Architecture::Llama,
            embedding,
            embedding_scale: 1.0,
            vocab,
            norm: tensors.vector("model.norm.weight", hidden)?,
            output: QuantMatrix::dense(output, None, vocab, hidden),
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            eps: config.rms_norm_eps as f32,
            rope_layout: RopeLayout::Halves,
            ropes: vec![RopeFrequencies::new(head_dim, theta, |f| scaling.apply(f))],
            activation,
            positions,
            kv: KvCache::new(
                KvShape {
                    layers: layers.len(),
                    n_kv_head,
                    head_dim,
                },
                kv_cache,
                positions,
            )?,
            layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> CheckpointConfig {
        let mut base = serde_json::json!({
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "rms_norm_eps": 1e-6, "vocab_size": 512,
            "max_position_embeddings": 256
        });
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    /// Mistral's window covers every layer; Qwen2's only with
    /// `use_sliding_window`, from `max_window_layers` on; `layer_types`
    /// (transformers 5) names each layer's kind; no window, no windows.
    #[test]
    fn sliding_windows_are_read_as_each_family_writes_them() {
        let w = Some(32);
        let windows = |extra| config(extra).windows().unwrap();
        assert_eq!(windows(serde_json::json!({})), [None; 4]);
        assert_eq!(windows(serde_json::json!({"sliding_window": 32})), [w; 4]);
        let qwen = serde_json::json!({"sliding_window": 32, "use_sliding_window": true, "max_window_layers": 2});
        assert_eq!(windows(qwen), [None, None, w, w]);
        let off = serde_json::json!({"sliding_window": 32, "use_sliding_window": false});
        assert_eq!(windows(off), [None; 4]);
        let types = serde_json::json!({"sliding_window": 32, "layer_types":
            ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]});
        assert_eq!(windows(types), [w, None, w, None]);
        let short = serde_json::json!({"sliding_window": 32, "layer_types": ["full_attention"]});
        assert!(config(short).windows().is_err());
    }

    /// Llama 3.1's scaling (factor 8, low 1, high 4, original context
    /// 8192) keeps the high frequencies, divides the low ones by the
    /// factor, and blends in between, continuously at both edges.
    #[test]
    fn llama3_rope_scaling_keeps_high_and_divides_low_frequencies() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192,
        };
        let high = 1.0;
        assert_eq!(scaling.apply(high), high);
        let low = 2.0 * std::f32::consts::PI / 10_000.0;
        assert!((scaling.apply(low) - low / 8.0).abs() < 1e-9);
        // The blend meets both sides at the edges of the middle band.
        let edge_high = 2.0 * std::f32::consts::PI / (8192.0 / 4.0);
        let edge_low = 2.0 * std::f32::consts::PI / 8192.0;
        assert!((scaling.apply(edge_high * 0.9999) - edge_high).abs() / edge_high < 1e-3);
        assert!((scaling.apply(edge_low * 1.0001) - edge_low / 8.0).abs() / edge_low < 1e-3);
        assert!(matches!(
            RopeScaling::from_config(Some(&RopeParameters {
                rope_theta: None,
                rope_type: Some("yarn".into()),
                factor: Some(4.0),
                low_freq_factor: None,
                high_freq_factor: None,
                original_max_position_embeddings: None,
            })),
            Err(e) if e.to_string().contains("yarn")
        ));
    }
}
