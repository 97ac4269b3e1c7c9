//! Models: loading weights, tokenizers and chat templates, and the per-sequence
//! forward pass the engine drives. One file per architecture family.

pub mod bert;
pub mod chat_template;
pub mod checkpoint;
pub mod cpu_decoder;
pub mod device_decoder;
pub mod embedding;
mod embedding_queue;
pub mod gemma3;
pub mod gguf_header;
pub mod gguf_tokenizer;
pub mod kv_cache;
pub mod loader;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod packed_gemm;
pub mod quant_matmul;
pub mod spin_pool;

use std::sync::Arc;

use candle_core::Device;
use tokenizers::Tokenizer;

use crate::lora::{Adapter, UnmergedAdapter};

pub use chat_template::{ChatTemplate, TemplateMessage};
pub use loader::{ModelSource, load_model};

/// The GGUF metadata value `<arch>.<key>`, or an error naming it.
pub(crate) fn gguf_metadata<'a>(
    ct: &'a candle_core::quantized::gguf_file::Content,
    arch: &str,
    key: &str,
) -> candle_core::Result<&'a candle_core::quantized::gguf_file::Value> {
    ct.metadata
        .get(&format!("{arch}.{key}"))
        .ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata lacks {arch}.{key}")))
}

/// The device named `cpu`, `cuda` or `cuda:N` (`--device`).
pub fn parse_device(name: &str) -> anyhow::Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => anyhow::bail!("unknown device `{name}` (cpu, cuda or cuda:N)"),
        },
    };
    #[cfg(feature = "cuda")]
    {
        Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("CUDA device {ordinal}: {e}"))
    }
    #[cfg(not(feature = "cuda"))]
    {
        anyhow::bail!(
            "--device cuda:{ordinal}: this qpai was built without the `cuda` feature (scripts/build-cuda.sh builds one)"
        )
    }
}

/// How `/v1/models` and the logs name a device: `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The device `--device` chose, set once at start.
static CHOSEN_DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// Makes `device` the one every model loads on (`--device`); once per process.
pub fn choose_device(name: &str) -> anyhow::Result<()> {
    let device = parse_device(name)?;
    CHOSEN_DEVICE
        .set(device)
        .map_err(|_| anyhow::anyhow!("the device was already chosen"))
}

/// The chosen device; else CUDA device 0 when built with the `cuda` feature
/// and a GPU is present; else the CPU.
pub fn default_device() -> Device {
    if let Some(device) = CHOSEN_DEVICE.get() {
        return device.clone();
    }
    #[cfg(feature = "cuda")]
    {
        match Device::cuda_if_available(0) {
            Ok(device) => return device,
            Err(error) => tracing::warn!(%error, "CUDA unavailable; using the CPU"),
        }
    }
    Device::Cpu
}

/// What a served model can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Instruction-tuned: chat completions (and plain completions).
    Chat,
    /// Base model: plain text completions.
    Completion,
    /// Sentence embeddings.
    Embedding,
}

/// The weights of a model, shared by every sequence that runs on it.
#[derive(Clone)]
pub enum Weights {
    CpuDecoder(Arc<cpu_decoder::CpuDecoder>),
    /// Llama-family models in candle tensor ops on an accelerator, batched.
    Device(Arc<device_decoder::DeviceDecoder>),
    Gemma3(Arc<gemma3::Gemma3Weights>),
}

/// A loaded model: weights plus everything needed to turn text into tokens and back.
#[derive(Clone)]
pub struct LoadedModel {
    pub id: String,
    /// For a base with an adapter merged at load: the base's id.
    pub parent: Option<String>,
    pub kind: ModelKind,
    pub architecture: String,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub bos_token_id: Option<u32>,
    /// Whether a plain-text prompt starts with BOS (the GGUF `add_bos_token` flag).
    pub add_bos_token: bool,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Maximum number of positions (prompt + completion) this server runs the model at.
    pub context_length: usize,
    pub weights: Weights,
    pub device: Device,
}

impl LoadedModel {
    /// A fresh sequence (empty KV cache) sharing this model's weights.
    pub fn new_sequence(&self) -> candle_core::Result<Box<dyn SequenceModel>> {
        self.new_sequence_with(None)
    }

    /// A fresh sequence that runs with `adapter` unmerged (one prepared by
    /// [`LoadedModel::prepare_adapter`] of this model).
    pub fn new_sequence_with(
        &self,
        adapter: Option<&Arc<UnmergedAdapter>>,
    ) -> candle_core::Result<Box<dyn SequenceModel>> {
        if adapter.is_some() && !matches!(self.weights, Weights::CpuDecoder(_) | Weights::Device(_))
        {
            candle_core::bail!("{} does not run unmerged adapters", self.id);
        }
        Ok(match &self.weights {
            Weights::CpuDecoder(w) => {
                Box::new(cpu_decoder::CpuSequence::new(w.clone(), adapter.cloned()))
            }
            Weights::Device(w) => Box::new(device_decoder::DeviceSequence::new(
                w.clone(),
                adapter.cloned(),
            )?),
            Weights::Gemma3(w) => Box::new(gemma3::Gemma3Sequence::new(w.clone())),
        })
    }

    /// Checks a LoRA adapter against this base and lays it out for use per
    /// sequence. Unmerged adapters run on the CPU decoder's llama-family
    /// bases; other bases take adapters merged at load only.
    pub fn prepare_adapter(&self, adapter: &Adapter) -> Result<Arc<UnmergedAdapter>, String> {
        match &self.weights {
            Weights::CpuDecoder(w) => w.prepare_adapter(adapter).map(Arc::new),
            Weights::Device(w) => w.prepare_adapter(adapter).map(Arc::new),
            _ => Err(format!(
                "{} ({}) takes adapters merged at load only (--merge); per-request adapters need a llama-family base",
                self.id, self.architecture
            )),
        }
    }

    /// One decode step for several sequences of this model: `tokens[i]` is
    /// fed to `sequences[i]`; returns each one's next-token logits.
    pub fn decode_batch(
        &self,
        sequences: &mut [&mut Box<dyn SequenceModel>],
        tokens: &[u32],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let inputs: Vec<&[u32]> = tokens.iter().map(std::slice::from_ref).collect();
        self.forward_batch(sequences, &inputs).into_iter().collect()
    }

    /// Feeds `inputs[i]` (one token, or a chunk of a prompt) to
    /// `sequences[i]` and returns each one's next-token logits. On the llama
    /// engine every row of every sequence goes through one forward pass, so
    /// prompt chunks and decode steps share each read of the weights; other
    /// architectures feed one sequence after the other. The results are the
    /// same either way. A failed batch (nothing was stored) is retried one
    /// sequence at a time, so that only the sequence at fault fails.
    pub fn forward_batch(
        &self,
        sequences: &mut [&mut Box<dyn SequenceModel>],
        inputs: &[&[u32]],
    ) -> Vec<candle_core::Result<Vec<f32>>> {
        if sequences.len() > 1 {
            let batched = match &self.weights {
                Weights::CpuDecoder(w) => {
                    batched_pass(sequences, inputs, |typed| w.forward_batch(typed, inputs))
                }
                Weights::Device(w) => {
                    batched_pass(sequences, inputs, |typed| w.forward_batch(typed, inputs))
                }
                Weights::Gemma3(_) => None,
            };
            match batched {
                Some(Ok(logits)) => return logits.into_iter().map(Ok).collect(),
                Some(Err(error)) => {
                    tracing::warn!(%error, "batched step failed; feeding each sequence alone")
                }
                None => {}
            }
        }
        sequences
            .iter_mut()
            .zip(inputs)
            .map(|(sequence, input)| sequence.forward(input))
            .collect()
    }

    /// The paged KV cache's size and reservations, for models that have one.
    pub fn kv_budget(&self) -> Option<&kv_cache::KvBudget> {
        match &self.weights {
            Weights::CpuDecoder(w) => Some(&w.kv_cache().budget),
            Weights::Device(w) => Some(w.kv_budget()),
            _ => None,
        }
    }

    /// The paged KV cache's state, for models that have one.
    pub fn kv_usage(&self) -> Option<kv_cache::KvUsage> {
        match &self.weights {
            Weights::CpuDecoder(w) => Some(w.kv_cache().usage()),
            _ => None,
        }
    }

    /// Token ids of a plain-text prompt, with BOS when the model wants it.
    pub fn encode_prompt(&self, text: &str) -> tokenizers::Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos_token
            && let Some(bos) = self.bos_token_id
        {
            ids.push(bos);
        }
        ids.extend(self.tokenizer.encode_fast(text, false)?.get_ids());
        Ok(ids)
    }
}

/// Runs `pass` on the sequences as their concrete type `S`; None when one
/// of them is another type (then each is fed alone).
fn batched_pass<S: 'static>(
    sequences: &mut [&mut Box<dyn SequenceModel>],
    inputs: &[&[u32]],
    pass: impl FnOnce(&mut [&mut S]) -> candle_core::Result<Vec<Vec<f32>>>,
) -> Option<candle_core::Result<Vec<Vec<f32>>>> {
    let mut typed: Vec<&mut S> = sequences
        .iter_mut()
        .filter_map(|s| s.as_any_mut().downcast_mut())
        .collect();
    (typed.len() == inputs.len()).then(|| pass(&mut typed))
}

/// One sequence being generated: owns its KV cache.
pub trait SequenceModel: Send {
    /// Feeds `tokens` at the current position and returns the logits of the
    /// next token (f32, vocabulary-sized).
    fn forward(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>>;
    /// Number of tokens already in the KV cache.
    fn position(&self) -> usize;
    /// An independent copy of this sequence (same cache contents).
    fn fork(&self) -> Box<dyn SequenceModel>;
    /// For batching: the concrete sequence type behind the trait object.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
    /// On a fresh sequence: starts from the cached keys and values of an
    /// earlier prompt that `prompt` begins with, and returns how many of
    /// its tokens that covers (the rest are still to be fed). Models
    /// without a prefix cache reuse nothing.
    fn reuse_prefix(&mut self, prompt: &[u32]) -> usize {
        let _ = prompt;
        0
    }
}
