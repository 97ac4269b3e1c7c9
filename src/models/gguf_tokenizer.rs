//! Builds a `tokenizers::Tokenizer` from the tokenizer stored in GGUF metadata,
//! so that a GGUF file alone is a model. Mirrors what Hugging Face transformers'
//! GGUF converters produce:
//! - `gpt2`: byte-level BPE with the stored merges and a pre-tokenizer chosen by
//!   `tokenizer.ggml.pre`;
//! - `llama`: SentencePiece-style BPE with byte fallback, whose merges are
//!   derived from the piece scores.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{Value as Json, json};
use tokenizers::Tokenizer;

/// GGUF `tokenizer.ggml.token_type` values.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Special ids and flags read alongside the tokenizer.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End-of-turn token used by chat templates (e.g. Gemma's `<end_of_turn>`).
    pub eot: Option<u32>,
    pub add_bos: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GgufTokenizerError {
    #[error("GGUF metadata lacks `{0}`")]
    Missing(&'static str),
    #[error("GGUF metadata `{0}` has the wrong type")]
    WrongType(&'static str),
    #[error("unsupported GGUF tokenizer model `{0}`")]
    UnsupportedModel(String),
    #[error("building the tokenizer failed: {0}")]
    Build(String),
}

type Result<T> = std::result::Result<T, GgufTokenizerError>;

fn get<'a>(ct: &'a Content, key: &'static str) -> Result<&'a Value> {
    ct.metadata.get(key).ok_or(GgufTokenizerError::Missing(key))
}

fn strings(ct: &Content, key: &'static str) -> Result<Vec<String>> {
    let values = get(ct, key)?
        .to_vec()
        .map_err(|_| GgufTokenizerError::WrongType(key))?;
    values
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| GgufTokenizerError::WrongType(key))
        })
        .collect()
}

fn optional_u32(ct: &Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok())
}

fn optional_bool(ct: &Content, key: &str) -> Option<bool> {
    ct.metadata.get(key).and_then(|v| v.to_bool().ok())
}

fn token_types(ct: &Content, n: usize) -> Vec<i32> {
    let Some(Ok(values)) = ct
        .metadata
        .get("tokenizer.ggml.token_type")
        .map(|v| v.to_vec())
    else {
        return vec![1; n];
    };
    values
        .iter()
        .map(|v| {
            v.to_i32()
                .or_else(|_| v.to_u32().map(|x| x as i32))
                .unwrap_or(1)
        })
        .collect()
}

fn scores(ct: &Content) -> Result<Vec<f32>> {
    const KEY: &str = "tokenizer.ggml.scores";
    get(ct, KEY)?
        .to_vec()
        .map_err(|_| GgufTokenizerError::WrongType(KEY))?
        .iter()
        .map(|v| v.to_f32().map_err(|_| GgufTokenizerError::WrongType(KEY)))
        .collect()
}

/// Reads the tokenizer and its special tokens from GGUF metadata.
pub fn tokenizer_from_gguf(ct: &Content) -> Result<(Tokenizer, SpecialTokens)> {
    let model = get(ct, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|_| GgufTokenizerError::WrongType("tokenizer.ggml.model"))?
        .clone();
    let tokens = strings(ct, "tokenizer.ggml.tokens")?;
    let types = token_types(ct, tokens.len());
    let special = SpecialTokens {
        bos: optional_u32(ct, "tokenizer.ggml.bos_token_id"),
        eos: optional_u32(ct, "tokenizer.ggml.eos_token_id"),
        eot: optional_u32(ct, "tokenizer.ggml.eot_token_id"),
        add_bos: optional_bool(ct, "tokenizer.ggml.add_bos_token").unwrap_or(model == "llama"),
    };
    let spec = match model.as_str() {
        "gpt2" => byte_level_bpe(ct, &tokens)?,
        "llama" => sentencepiece_bpe(ct, &tokens)?,
        other => return Err(GgufTokenizerError::UnsupportedModel(other.to_string())),
    };
    let mut spec = spec;
    spec["added_tokens"] = added_tokens(&tokens, &types, &special);
    let text =
        serde_json::to_string(&spec).map_err(|e| GgufTokenizerError::Build(e.to_string()))?;
    let tokenizer: Tokenizer = text
        .parse()
        .map_err(|e: tokenizers::Error| GgufTokenizerError::Build(e.to_string()))?;
    Ok((tokenizer, special))
}

/// Control and user-defined tokens are matched whole in the input; control
/// tokens (and the declared special ids) are skipped when decoding.
fn added_tokens(tokens: &[String], types: &[i32], special: &SpecialTokens) -> Json {
    let declared = [special.bos, special.eos, special.eot];
    let added: Vec<Json> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(id, (_, ty))| {
            **ty == TOKEN_TYPE_CONTROL
                || **ty == TOKEN_TYPE_USER_DEFINED
                || declared.contains(&Some(*id as u32))
        })
        .map(|(id, (content, ty))| {
            json!({
                "id": id,
                "content": content,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *ty != TOKEN_TYPE_USER_DEFINED,
            })
        })
        .collect();
    Json::Array(added)
}

fn vocab_map(tokens: &[String]) -> serde_json::Map<String, Json> {
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        // A duplicated piece keeps its first id, as the reference converters do.
        vocab.entry(token.clone()).or_insert(json!(id));
    }
    vocab
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` name (llama.cpp's names).
fn byte_level_pre_tokenizer(pre: &str) -> Json {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    match pre {
        // Single digits split off first, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]})
        }
        "llama3" | "llama-bpe" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
                "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]}),
        _ => byte_level(true),
    }
}

fn byte_level_bpe(ct: &Content, tokens: &[String]) -> Result<Json> {
    let merges = strings(ct, "tokenizer.ggml.merges")?;
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "default".to_string());
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "normalizer": null,
        "pre_tokenizer": byte_level_pre_tokenizer(&pre),
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab_map(tokens),
            "merges": merges,
        },
    }))
}

fn sentencepiece_bpe(ct: &Content, tokens: &[String]) -> Result<Json> {
    let scores = scores(ct)?;
    let add_space_prefix = optional_bool(ct, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let unk = optional_u32(ct, "tokenizer.ggml.unknown_token_id")
        .and_then(|id| tokens.get(id as usize).cloned());
    let merges = merges_from_scores(tokens, &scores);
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        ]})
    } else {
        json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab_map(tokens),
            "merges": merges.into_iter().map(|(l, r)| json!([l, r])).collect::<Vec<_>>(),
        },
    }))
}

/// SentencePiece BPE merges pieces by the score of the merged piece. The
/// equivalent BPE merge list has, for every piece, each split into two known
/// pieces, ranked by that piece's score (highest first), ties broken by longer
/// left then longer right part, otherwise in vocabulary order (a stable sort).
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    struct Candidate<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut candidates: Vec<Candidate> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let score = scores.get(id).copied().unwrap_or(0.0);
        let mut local: Vec<Candidate> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(split, _)| {
                let (left, right) = piece.split_at(split);
                (ids.contains_key(left) && ids.contains_key(right)).then(|| Candidate {
                    left,
                    right,
                    score,
                    left_chars: left.chars().count(),
                    right_chars: right.chars().count(),
                })
            })
            .collect();
        local.sort_by_key(|c| (ids[c.left], ids[c.right]));
        candidates.extend(local);
    }
    candidates.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    candidates
        .into_iter()
        .map(|c| (c.left.to_string(), c.right.to_string()))
        .collect()
}
