//! What a served model would lend the code under test, built once per
//! process from committed files: a tokenizer (the tiny byte-level BPE of
//! `tests/fixtures/tiny`), the chat templates of the default chat model
//! (SmolLM2) and of Gemma 3, a grammar compiler over that tokenizer, and
//! the vocabulary size and context length request checks are held to.

use std::sync::{Arc, OnceLock};

use tokenizers::Tokenizer;

use crate::catalog::{BUILTIN_CATALOG, Catalog};
use crate::engine::constraint::{GrammarCompiler, GrammarSpec};
use crate::models::ChatTemplate;

/// SmolLM2's vocabulary size: token ids in `logit_bias` are checked against it.
pub const VOCAB_SIZE: usize = 49_152;
/// SmolLM2's context length in the catalog: length fields are checked against it.
pub const CONTEXT_LENGTH: usize = 8_192;

const TINY_TOKENIZER: &str = include_str!("../../tests/fixtures/tiny/llama-bf16/tokenizer.json");
/// SmolLM2's chat template and special tokens, as its GGUF file carries them.
const SMOLLM2_TEMPLATE: &str = include_str!("../../tests/fixtures/chat_template_smollm2.json");
/// The catalog entry that lends Gemma 3's turn format to a base model.
const GEMMA3_ENTRY: &str = "gemma3-270m";
const GEMMA3_BOS: &str = "<bos>";
const GEMMA3_EOS: &str = "<eos>";
/// The tiny tokenizer's end-of-turn tokens (what generation stops on).
const END_TOKENS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

/// The tiny tokenizer.
pub fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        TINY_TOKENIZER
            .parse()
            .expect("tests/fixtures/tiny/llama-bf16/tokenizer.json is a tokenizer")
    })
}

/// Tokens of `text` (without special tokens), as a prompt is counted.
pub fn token_count(text: &str) -> usize {
    tokenizer()
        .encode_fast(text, false)
        .map_or(0, |encoding| encoding.get_ids().len())
}

/// Byte offsets of the tokens of `text`, as `EmbeddingModel::token_offsets`
/// gives them from its own tokenizer.
pub fn token_offsets(text: &str) -> Vec<(usize, usize)> {
    tokenizer()
        .encode(text, false)
        .map(|encoding| encoding.get_offsets().to_vec())
        .unwrap_or_default()
}

/// Chat templates as the loader builds them: SmolLM2's (from its GGUF
/// file) and Gemma 3's (from the built-in catalog).
pub fn chat_templates() -> &'static [ChatTemplate] {
    static TEMPLATES: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let smollm2: serde_json::Value = serde_json::from_str(SMOLLM2_TEMPLATE)
            .expect("tests/fixtures/chat_template_smollm2.json is JSON");
        let field = |key: &str| smollm2[key].as_str().unwrap_or_default().to_string();
        let gemma3 = Catalog::parse(BUILTIN_CATALOG)
            .expect("the built-in catalog parses")
            .get(GEMMA3_ENTRY)
            .and_then(|entry| entry.chat_template.clone())
            .expect("the built-in catalog gives Gemma 3 a chat template");
        vec![
            ChatTemplate::new(
                field("chat_template"),
                field("bos_token"),
                field("eos_token"),
            )
            .expect("SmolLM2's chat template compiles"),
            ChatTemplate::new(gemma3, GEMMA3_BOS.into(), GEMMA3_EOS.into())
                .expect("Gemma 3's chat template compiles"),
        ]
    })
}

/// Grammars compiled for the tiny tokenizer, as an engine compiles them
/// for its model (and caches them).
fn grammar_compiler() -> &'static GrammarCompiler {
    static COMPILER: OnceLock<GrammarCompiler> = OnceLock::new();
    COMPILER.get_or_init(|| {
        let tokenizer = tokenizer();
        let end_tokens = END_TOKENS
            .iter()
            .filter_map(|token| tokenizer.token_to_id(token))
            .collect();
        GrammarCompiler::new(Arc::new(tokenizer.clone()), end_tokens)
    })
}

/// Compiles the grammar a request's answer must match and takes the
/// first step of generating under it: the forced tokens and the mask of
/// allowed ones.
pub fn constrain(spec: GrammarSpec) {
    let Ok(mut constraint) = grammar_compiler().compile(spec) else {
        return;
    };
    let _ = constraint.forced_tokens();
    let mut logits = vec![0.0; tokenizer().get_vocab_size(true)];
    let _ = constraint.mask(&mut logits);
}
