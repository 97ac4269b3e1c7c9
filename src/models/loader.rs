//! Turns files on disk into a `LoadedModel`: a GGUF file (weights, tokenizer
//! and chat template all from the one file) or a Hugging Face safetensors
//! directory (config.json, tokenizer.json, tokenizer_config.json, *.safetensors).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use serde::Deserialize;
use tokenizers::Tokenizer;

use super::cpu_decoder::{Architecture, CpuDecoder};
use super::device_decoder::DeviceDecoder;
use super::gemma3::Gemma3Weights;
use super::gguf_tokenizer::{SpecialTokens, tokenizer_from_gguf};
use super::kv_cache::KvCacheConfig;
use super::{ChatTemplate, LoadedModel, ModelKind, Weights};
use crate::lora::Adapter;

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    SafetensorsDir(PathBuf),
}

impl ModelSource {
    /// A `.gguf` file or a directory holding a checkpoint.
    pub fn from_path(path: &Path) -> anyhow::Result<Self> {
        if path.is_dir() {
            Ok(Self::SafetensorsDir(path.to_path_buf()))
        } else if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            Ok(Self::Gguf(path.to_path_buf()))
        } else {
            bail!(
                "{} is neither a .gguf file nor a model directory",
                path.display()
            )
        }
    }
}

/// How to load: the served id, optional overrides, the device.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub id: String,
    /// Chat or completion; when unset, chat if the model has a chat template.
    pub kind: Option<ModelKind>,
    /// Caps the context length the model is served with.
    pub max_context: Option<usize>,
    /// Weight dtype for safetensors checkpoints on accelerators (default:
    /// the checkpoint's); the CPU computes in f32.
    pub dtype: Option<DType>,
    pub device: Device,
    /// A LoRA adapter merged into the weights at load.
    pub merge: Option<Arc<Adapter>>,
    /// A chat template (Jinja) for a model whose files carry none.
    pub chat_template: Option<String>,
    /// The KV cache's budget: the paged pool on the CPU, the slab of
    /// per-sequence slots on an accelerator.
    pub kv_cache: KvCacheConfig,
    /// Runs llama-family decoders in candle tensor ops (the accelerator
    /// path) on the CPU too: how that path is checked without a GPU.
    pub tensor_ops: bool,
}

impl LoadOptions {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            kind: None,
            max_context: None,
            dtype: None,
            device: super::default_device(),
            merge: None,
            chat_template: None,
            kv_cache: KvCacheConfig::default(),
            tensor_ops: false,
        }
    }
}

#[tracing::instrument(skip_all, fields(model = %options.id))]
pub fn load_model(source: &ModelSource, options: &LoadOptions) -> anyhow::Result<LoadedModel> {
    let started = std::time::Instant::now();
    let model = match source {
        ModelSource::Gguf(path) => load_gguf(path, options),
        ModelSource::SafetensorsDir(dir) => load_safetensors(dir, options),
    }?;
    tracing::info!(
        architecture = %model.architecture,
        context_length = model.context_length,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(model)
}

/// End-of-turn markers of common chat formats: generation stops on them too.
const END_OF_TURN_MARKERS: [&str; 5] = [
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|endoftext|>",
    "</s>",
];

/// The ids generation stops on: the declared end tokens, and the special
/// tokens of common end-of-turn markers the vocabulary has.
pub fn eos_ids(tokenizer: &Tokenizer, declared: &[Option<u32>]) -> Vec<u32> {
    let mut ids: Vec<u32> = declared.iter().flatten().copied().collect();
    for marker in END_OF_TURN_MARKERS {
        if let Some(id) = tokenizer
            .get_added_vocabulary()
            .token_to_id(marker, tokenizer.get_model())
            && tokenizer
                .get_added_tokens_decoder()
                .get(&id)
                .is_some_and(|t| t.special)
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The text of token `id` (empty when there is none), as chat templates
/// get `bos_token` and `eos_token`.
pub fn token_text(tokenizer: &Tokenizer, id: Option<u32>) -> String {
    id.and_then(|id| tokenizer.id_to_token(id))
        .unwrap_or_default()
}

fn choose_kind(options: &LoadOptions, template: &Option<Arc<ChatTemplate>>) -> ModelKind {
    options.kind.unwrap_or(if template.is_some() {
        ModelKind::Chat
    } else {
        ModelKind::Completion
    })
}

fn load_gguf(path: &Path, options: &LoadOptions) -> anyhow::Result<LoadedModel> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = super::gguf_header::read_gguf(&mut file)
        .map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
    let architecture = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .context("GGUF metadata lacks general.architecture")?;
    let (tokenizer, special) = tokenizer_from_gguf(&content)?;
    let SpecialTokens {
        bos,
        eos,
        eot,
        add_bos,
    } = special;
    let template_source = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned())
        .or_else(|| options.chat_template.clone());
    let file_context = content
        .metadata
        .get(&format!("{architecture}.context_length"))
        .and_then(|v| v.to_u32().ok())
        .map(|n| n as usize);
    if options.merge.is_some() && architecture != "llama" {
        bail!("merging an adapter into a GGUF base needs a llama model");
    }
    // The CPU runs qpai's own decoder; accelerators run candle tensor ops.
    let on_cpu = options.device.is_cpu() && !options.tensor_ops;
    let own_decoder = Architecture::from_name(&architecture).filter(|_| on_cpu);
    let served_positions = [file_context, options.max_context]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(4096);
    let (weights, implementation_limit) = match (architecture.as_str(), own_decoder) {
        (_, Some(decoder)) => {
            let positions = [file_context, options.max_context]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(4096);
            let weights = CpuDecoder::from_gguf(
                &content,
                &mut file,
                decoder,
                positions,
                options.merge.as_deref(),
                options.kv_cache,
            )?;
            let positions = weights.max_positions();
            (Weights::CpuDecoder(Arc::new(weights)), positions)
        }
        // Accelerators: every running sequence in one batched pass.
        ("llama", None) => {
            let weights = DeviceDecoder::from_gguf(
                &content,
                &mut file,
                &options.device,
                served_positions,
                options.merge.as_deref(),
                options.kv_cache,
            )?;
            let positions = weights.max_positions();
            (Weights::Device(Arc::new(weights)), positions)
        }
        // Accelerators: candle tensor ops on the device.
        ("gemma3", None) => {
            // Rotary tables are sized to the context actually served.
            let positions = [file_context, options.max_context]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(8192);
            let weights =
                Gemma3Weights::from_gguf(&content, &mut file, positions, &options.device)?;
            let positions = weights.max_positions();
            (Weights::Gemma3(Arc::new(weights)), positions)
        }
        (other, None) => {
            bail!("GGUF architecture `{other}` is not supported (supported: llama, gemma3)")
        }
    };
    let chat_template = template_source
        .map(|source| {
            ChatTemplate::new(
                source,
                token_text(&tokenizer, bos),
                token_text(&tokenizer, eos),
            )
        })
        .transpose()?
        .map(Arc::new);
    let context_length = [
        file_context,
        Some(implementation_limit),
        options.max_context,
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(implementation_limit);
    Ok(LoadedModel {
        id: options.id.clone(),
        parent: None,
        kind: choose_kind(options, &chat_template),
        architecture,
        eos_token_ids: eos_ids(&tokenizer, &[eos, eot]),
        tokenizer: Arc::new(tokenizer),
        chat_template,
        bos_token_id: bos,
        add_bos_token: add_bos,
        context_length,
        weights,
        device: options.device.clone(),
    })
}

/// The fields of config.json qpai reads before choosing an implementation.
#[derive(Deserialize)]
struct CheckpointConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    torch_dtype: Option<String>,
    /// transformers 5 writes `dtype`.
    #[serde(default)]
    dtype: Option<String>,
}

/// tokenizer_config.json: the chat template and special-token strings.
#[derive(Deserialize, Default)]
struct TokenizerConfig {
    chat_template: Option<serde_json::Value>,
    bos_token: Option<serde_json::Value>,
    eos_token: Option<serde_json::Value>,
    add_bos_token: Option<bool>,
}

/// A special token in tokenizer_config.json is a string or `{"content": ...}`.
fn special_token_string(value: &Option<serde_json::Value>) -> Option<String> {
    match value.as_ref()? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => other.get("content")?.as_str().map(str::to_string),
    }
}

/// `chat_template` is a string, or a list of named templates ("default" wins).
fn template_source(value: &Option<serde_json::Value>) -> Option<String> {
    match value.as_ref()? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

fn checkpoint_dtype(config: &CheckpointConfig, options: &LoadOptions) -> DType {
    if let Some(dtype) = options.dtype {
        return dtype;
    }
    match (
        config.dtype.as_deref().or(config.torch_dtype.as_deref()),
        options.device.is_cpu(),
    ) {
        (Some("bfloat16"), false) => DType::BF16,
        (Some("float16"), false) => DType::F16,
        _ => DType::F32,
    }
}

fn load_safetensors(dir: &Path, options: &LoadOptions) -> anyhow::Result<LoadedModel> {
    let config: CheckpointConfig = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json"))
            .with_context(|| format!("reading {}/config.json", dir.display()))?,
    )
    .context("config.json is not valid JSON")?;
    let architecture = config.architectures.first().cloned().unwrap_or_default();
    const SUPPORTED: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";
    if !SUPPORTED.split(", ").any(|a| a == architecture) {
        bail!(
            "safetensors architecture `{architecture}` is not supported (supported: {SUPPORTED})"
        );
    }
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("reading {}/tokenizer.json: {e}", dir.display()))?;
    let tokenizer_config: TokenizerConfig =
        match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => {
                serde_json::from_str(&text).context("tokenizer_config.json is not valid")?
            }
            Err(_) => TokenizerConfig::default(),
        };
    let bos_text = special_token_string(&tokenizer_config.bos_token);
    let eos_text = special_token_string(&tokenizer_config.eos_token);
    let bos = bos_text.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let eos = eos_text.as_deref().and_then(|t| tokenizer.token_to_id(t));
    // transformers 5 writes the template to chat_template.jinja.
    let template_file = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
    let chat_template = template_file
        .or_else(|| template_source(&tokenizer_config.chat_template))
        .or_else(|| options.chat_template.clone())
        .map(|source| {
            ChatTemplate::new(
                source,
                bos_text.clone().unwrap_or_default(),
                eos_text.clone().unwrap_or_default(),
            )
        })
        .transpose()?
        .map(Arc::new);
    let dtype = checkpoint_dtype(&config, options);
    // The CPU runs qpai's own decoder in f32; accelerators run candle tensor ops.
    let (weights, max_positions) = if options.device.is_cpu() && !options.tensor_ops {
        let weights = CpuDecoder::from_checkpoint(
            dir,
            options.merge.as_ref(),
            options.max_context,
            options.kv_cache,
        )?;
        let positions = weights.max_positions();
        (Weights::CpuDecoder(Arc::new(weights)), positions)
    } else {
        let weights = DeviceDecoder::from_checkpoint(
            dir,
            dtype,
            &options.device,
            options.merge.as_ref(),
            options.max_context,
            options.kv_cache,
        )?;
        let positions = weights.max_positions();
        (Weights::Device(Arc::new(weights)), positions)
    };
    let context_length = [Some(max_positions), options.max_context]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(max_positions);
    Ok(LoadedModel {
        id: options.id.clone(),
        parent: None,
        kind: choose_kind(options, &chat_template),
        architecture,
        eos_token_ids: eos_ids(&tokenizer, &[eos]),
        tokenizer: Arc::new(tokenizer),
        chat_template,
        bos_token_id: bos,
        add_bos_token: tokenizer_config.add_bos_token.unwrap_or(false),
        context_length,
        weights,
        device: options.device.clone(),
    })
}
