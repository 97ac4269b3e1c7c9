//! Model files and the conversations rendered for models: GGUF files read
//! as the loader reads them (header and metadata, the tokenizer and chat
//! template they carry, the CPU decoder's weights), safetensors files and
//! PEFT adapter configurations read as LoRA adapters (those that fit the
//! tiny llama used on it, per request and merged), and chat templates
//! rendering any conversation.

use std::io::Cursor;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::stand_ins;
use crate::gateway::chat_prompt::LocalPrompt;
use crate::gateway::wire::{ChatCompletionRequest, Role, parse_json};
use crate::lora::adapter::parse_key;
use crate::lora::{Adapter, AdapterConfig, Projection};
use crate::models::cpu_decoder::{Architecture, CpuDecoder, CpuSequence};
use crate::models::gguf_header::read_gguf;
use crate::models::gguf_tokenizer::tokenizer_from_gguf;
use crate::models::kv_cache::KvCacheConfig;
use crate::models::loader::{eos_ids, token_text};
use crate::models::{ChatTemplate, SequenceModel, TemplateMessage};

/// A conversation in `data` rendered with each chat template, with and
/// without the generation prompt.
pub fn chat_template(data: &[u8]) {
    let messages = conversation(data);
    for template in stand_ins::chat_templates() {
        for add_generation_prompt in [true, false] {
            let _ = template.render(&messages, add_generation_prompt);
        }
    }
}

/// The conversation in `data`: a chat request's, as qpai's own models
/// read it; else a JSON list of messages (or an object holding one under
/// `messages`); else text, a turn per line, `role:` naming a line's role.
fn conversation(data: &[u8]) -> Vec<TemplateMessage> {
    if let Ok(request) = parse_json::<ChatCompletionRequest>(data)
        && let Ok(prompt) = LocalPrompt::read(&request)
    {
        return prompt.messages;
    }
    match super::json_messages(data) {
        Some(items) => items.iter().map(json_message).collect(),
        None => text_turns(&String::from_utf8_lossy(data)),
    }
}

/// A message given as JSON: its role as the wire format names roles (a
/// user's turn when it names none of them), its content's text (or JSON).
fn json_message(value: &Value) -> TemplateMessage {
    let role = value
        .get("role")
        .and_then(|role| serde_json::from_value::<Role>(role.clone()).ok())
        .unwrap_or(Role::User);
    let content = match value.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    TemplateMessage {
        role: role.template_name().to_string(),
        content,
        name: value
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string),
    }
}

/// Line prefixes that name a turn's role.
const ROLE_PREFIXES: [(&str, Role); 5] = [
    ("system:", Role::System),
    ("developer:", Role::Developer),
    ("user:", Role::User),
    ("assistant:", Role::Assistant),
    ("tool:", Role::Tool),
];

/// A turn per line: user and assistant in turn, unless a prefix names the role.
fn text_turns(text: &str) -> Vec<TemplateMessage> {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let alternate = if i.is_multiple_of(2) {
                Role::User
            } else {
                Role::Assistant
            };
            let named = ROLE_PREFIXES.iter().find_map(|&(prefix, role)| {
                let rest = line.strip_prefix(prefix)?;
                Some((role, rest.trim_start()))
            });
            let (role, content) = named.unwrap_or((alternate, line));
            TemplateMessage {
                role: role.template_name().to_string(),
                content: content.to_string(),
                name: None,
            }
        })
        .collect()
}

/// Positions a model is served with when its file gives no context length
/// (the loader's default).
const DEFAULT_POSITIONS: usize = 4096;
/// Text a model file's tokenizer and chat template are tried on.
const SAMPLE_TEXT: &str = "Hello world, this is a test. <|im_start|>user\nhi<|im_end|> 12345";

/// A GGUF file, from a `Cursor` where the loader reads a `File`, step by
/// step as `loader::load_gguf` goes on the CPU with default options: the
/// header and metadata, the architecture, the tokenizer and special
/// tokens, the context length, the decoder's weights (llama and Gemma 3)
/// and, when they load, a prompt and a decode step through them, the end
/// tokens and the chat template (tried even when the weights are
/// refused, where the loader would stop); then the tokenizer and template
/// at work on a sample.
pub fn gguf(data: &[u8]) {
    let mut reader = Cursor::new(data);
    let Ok(content) = read_gguf(&mut reader) else {
        return;
    };
    let text = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok().cloned())
    };
    let Some(architecture) = text("general.architecture") else {
        return;
    };
    let Ok((tokenizer, special)) = tokenizer_from_gguf(&content) else {
        return;
    };
    let template_source = text("tokenizer.chat_template");
    let file_context = content
        .metadata
        .get(&format!("{architecture}.context_length"))
        .and_then(|v| v.to_u32().ok())
        .map(|n| n as usize);
    if let Some(decoder) = Architecture::from_name(&architecture) {
        let positions = file_context.unwrap_or(DEFAULT_POSITIONS);
        if let Ok(weights) = CpuDecoder::from_gguf(
            &content,
            &mut reader,
            decoder,
            positions,
            None,
            KvCacheConfig::default(),
        ) {
            // A model that loads must step: two tokens of a prompt, then one.
            let mut sequence = CpuSequence::new(Arc::new(weights), None);
            if sequence.forward(&[0, 1]).is_ok() {
                let _ = sequence.forward(&[0]);
            }
        }
    }
    let _ = eos_ids(&tokenizer, &[special.eos, special.eot]);
    // tokenizers keeps a BPE's cache of words in a thread-local map keyed
    // by the tokenizer's id, which outlives the tokenizer: one tokenizer per
    // input would pile them up on the fuzzer's thread (about 1.2 KB an
    // input), so the sample is encoded on a thread that ends with it. The
    // thread is joined (a scope alone returns before its thread-local
    // destructors run, and LeakSanitizer took the map for a leak).
    std::thread::scope(|scope| {
        let encoding = scope.spawn(|| {
            if let Ok(encoding) = tokenizer.encode_fast(SAMPLE_TEXT, false) {
                let _ = tokenizer.decode(encoding.get_ids(), false);
            }
        });
        if let Err(panic) = encoding.join() {
            std::panic::resume_unwind(panic);
        }
    });
    let Some(source) = template_source else {
        return;
    };
    let bos = token_text(&tokenizer, special.bos);
    let eos = token_text(&tokenizer, special.eos);
    if let Ok(template) = ChatTemplate::new(source, bos, eos) {
        let _ = template.render(&text_turns(SAMPLE_TEXT), true);
    }
}

/// The tiny llama of `tests/fixtures/tiny` that adapters are checked
/// against: 2 layers, hidden size 64, 4 heads and 2 KV heads of 16, MLP 128.
const TINY_LLAMA_LAYERS: usize = 2;

/// (inputs, outputs) of each projection of the tiny llama.
fn tiny_llama_shape(projection: Projection) -> (usize, usize) {
    match projection {
        Projection::Q | Projection::O => (64, 64),
        Projection::K | Projection::V => (64, 32),
        Projection::Gate | Projection::Up => (64, 128),
        Projection::Down => (128, 64),
    }
}

/// The adapter configuration safetensors files are read as: rank 4 on
/// every projection (as `tests/fixtures/lora/r4-all`).
const SAFETENSORS_ADAPTER: &str = r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#;

/// A safetensors file, as `Adapter::load` reads `adapter_model.safetensors`
/// (every tensor loaded on the CPU), then checked as an adapter's factors
/// and against the tiny llama; one that fits it is used on it as the
/// server uses adapters (`on_tiny_llama`).
pub fn safetensors_header(data: &[u8]) {
    let Ok(tensors) = candle_core::safetensors::load_buffer(data, &Device::Cpu) else {
        return;
    };
    let Ok(config) = AdapterConfig::parse(SAFETENSORS_ADAPTER) else {
        return;
    };
    if let Ok(adapter) = Adapter::from_tensors(config, tensors)
        && adapter
            .check_base(TINY_LLAMA_LAYERS, tiny_llama_shape)
            .is_ok()
    {
        on_tiny_llama(&adapter);
    }
}

/// The tiny llama as a Q8_0 GGUF file, the base adapters are used on.
const TINY_LLAMA_GGUF: &[u8] = include_bytes!("../../tests/fixtures/tiny/llama-q8_0.gguf");
/// Positions the tiny llama is served with here.
const TINY_LLAMA_POSITIONS: usize = 64;

/// The tiny llama loaded from `TINY_LLAMA_GGUF`, `merge` merged into it.
fn tiny_llama(merge: Option<&Adapter>) -> anyhow::Result<CpuDecoder> {
    let mut reader = Cursor::new(TINY_LLAMA_GGUF);
    let content = read_gguf(&mut reader)?;
    Ok(CpuDecoder::from_gguf(
        &content,
        &mut reader,
        Architecture::Llama,
        TINY_LLAMA_POSITIONS,
        merge,
        KvCacheConfig::default(),
    )?)
}

/// `adapter` on the tiny llama both ways the server uses one: prepared for
/// requests that name it (unmerged, on a base loaded once) and merged into
/// the weights at load (`--merge`), a short prompt stepped through each.
fn on_tiny_llama(adapter: &Adapter) {
    static BASE: std::sync::OnceLock<Arc<CpuDecoder>> = std::sync::OnceLock::new();
    let base = BASE.get_or_init(|| {
        Arc::new(tiny_llama(None).expect("tests/fixtures/tiny/llama-q8_0.gguf loads"))
    });
    if let Ok(unmerged) = base.prepare_adapter(adapter) {
        let mut sequence = CpuSequence::new(base.clone(), Some(Arc::new(unmerged)));
        let _ = sequence.forward(&[0, 1]);
    }
    if let Ok(merged) = tiny_llama(Some(adapter)) {
        let _ = CpuSequence::new(Arc::new(merged), None).forward(&[0, 1]);
    }
}

/// Separates a `peft_adapter` input's adapter_config.json from its tensor
/// names (one per line).
const PEFT_SEPARATOR: u8 = 0;
/// The largest rank of the factors made for `peft_adapter` (a configuration
/// asking more gets factors of this rank, which the checks refuse).
const MAX_FACTOR_RANK: usize = 16;

/// An adapter_config.json and the names of an adapter's tensors: the
/// configuration parsed and checked, each name mapped to its layer and
/// projection, and zero factors under those names checked as the
/// adapter's, and against the tiny llama.
pub fn peft_adapter(data: &[u8]) {
    let (config, names) = match data.iter().position(|&b| b == PEFT_SEPARATOR) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let names_text = String::from_utf8_lossy(names);
    let names: Vec<&str> = names_text.lines().collect();
    for name in &names {
        let _ = parse_key(name);
    }
    // `Adapter::load` reads the configuration as UTF-8 text.
    let Ok(config) = std::str::from_utf8(config) else {
        return;
    };
    let Ok(config) = AdapterConfig::parse(config) else {
        return;
    };
    let _ = config.scale();
    let rank = config.r.min(MAX_FACTOR_RANK);
    let tensors: Vec<(String, Tensor)> = names
        .iter()
        .filter_map(|name| Some((name.to_string(), zero_factor(name, rank)?)))
        .collect();
    if let Ok(adapter) = Adapter::from_tensors(config, tensors) {
        let _ = adapter.check_base(TINY_LLAMA_LAYERS, tiny_llama_shape);
    }
}

/// Zeros shaped as the factor `name` names on the tiny llama: [rank, in]
/// for an A, [out, rank] for a B ([rank, rank] when it names none).
fn zero_factor(name: &str, rank: usize) -> Option<Tensor> {
    let shape = match parse_key(name) {
        Some((_, projection, true)) => (rank, tiny_llama_shape(projection).0),
        Some((_, projection, false)) => (tiny_llama_shape(projection).1, rank),
        None => (rank, rank),
    };
    Tensor::zeros(shape, DType::F32, &Device::Cpu).ok()
}
