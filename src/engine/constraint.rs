//! Constrained decoding: grammars (a JSON schema, or a Lark grammar that
//! embeds schemas) compiled by llguidance over the model's own tokenizer,
//! and the per-sequence matcher the worker consults. The mask stays off the
//! hot path: the worker samples first and asks the matcher whether the token
//! is allowed (a few microseconds); only when it is not is the full mask
//! computed and the token drawn again among the allowed ones.
//!
//! Compiled grammars are cached by the hash of their source, so a batch of
//! requests sharing a schema compiles it once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

/// Compiled grammars kept per model.
const CACHED_GRAMMARS: usize = 128;

/// JSON is written compactly with one space after `:` and `,`. Fixed
/// separators bound the whitespace, so a small model cannot loop on blanks
/// until `max_tokens`.
pub fn json_layout() -> Value {
    serde_json::json!({
        "item_separator": ", ",
        "key_separator": ": ",
        "whitespace_flexible": false,
    })
}

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON schema. `lenient`: keywords the grammar engine does not
    /// implement are ignored instead of refused (non-strict schemas).
    JsonSchema { schema: Value, lenient: bool },
    /// A Lark grammar (llguidance's dialect, `%json { ... }` included).
    Lark(String),
}

impl GrammarSpec {
    fn cache_key(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        match self {
            GrammarSpec::JsonSchema { schema, lenient } => {
                hasher.update(if *lenient {
                    b"json-lenient"
                } else {
                    b"json-strict_"
                });
                hasher.update(schema.to_string().as_bytes());
            }
            GrammarSpec::Lark(source) => {
                hasher.update(b"lark________");
                hasher.update(source.as_bytes());
            }
        }
        hasher.finalize().into()
    }

    fn into_grammar(self) -> TopLevelGrammar {
        match self {
            GrammarSpec::JsonSchema {
                mut schema,
                lenient,
            } => {
                if let Some(object) = schema.as_object_mut() {
                    let mut options = json_layout();
                    options["lenient"] = Value::Bool(lenient);
                    object.insert("x-guidance".into(), options);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            GrammarSpec::Lark(source) => TopLevelGrammar::from_lark(source),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConstraintError {
    /// The grammar engine cannot run over this model's tokenizer.
    #[error("constrained decoding is not available for this model: {0}")]
    Unavailable(String),
    /// The grammar is wrong or uses what the engine cannot enforce.
    #[error("{0}")]
    Invalid(String),
}

/// Compiles grammars for one model (its tokenizer and end tokens).
pub struct GrammarCompiler {
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Vec<u32>,
    /// Built on first use: a vocabulary trie takes a moment to build.
    factory: OnceLock<Result<ParserFactory, String>>,
    cache: Mutex<GrammarCache>,
}

#[derive(Default)]
struct GrammarCache {
    compiled: HashMap<[u8; 32], Matcher>,
    order: VecDeque<[u8; 32]>,
}

impl GrammarCompiler {
    pub fn new(tokenizer: Arc<Tokenizer>, eos_token_ids: Vec<u32>) -> Self {
        Self {
            tokenizer,
            eos_token_ids,
            factory: OnceLock::new(),
            cache: Mutex::new(GrammarCache::default()),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, ConstraintError> {
        self.factory
            .get_or_init(|| build_factory(&self.tokenizer, &self.eos_token_ids))
            .as_ref()
            .map_err(|e| ConstraintError::Unavailable(e.clone()))
    }

    /// A fresh constraint for `spec`, compiled or taken from the cache.
    pub fn compile(&self, spec: GrammarSpec) -> Result<Constraint, ConstraintError> {
        let key = spec.cache_key();
        if let Some(matcher) = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.compiled.get(&key).cloned())
        {
            metrics::counter!("qpai_grammar_cache_hits_total").increment(1);
            return Ok(Constraint {
                matcher,
                forcing: true,
            });
        }
        let factory = self.factory()?;
        let started = std::time::Instant::now();
        let parser = factory
            .create_parser(spec.into_grammar())
            .map_err(|e| ConstraintError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(ConstraintError::Invalid(error));
        }
        metrics::histogram!("qpai_grammar_compile_seconds").record(started.elapsed().as_secs_f64());
        if let Ok(mut cache) = self.cache.lock() {
            if cache.order.len() >= CACHED_GRAMMARS
                && let Some(oldest) = cache.order.pop_front()
            {
                cache.compiled.remove(&oldest);
            }
            cache.order.push_back(key);
            cache.compiled.insert(key, matcher.clone());
        }
        Ok(Constraint {
            matcher,
            forcing: true,
        })
    }
}

/// llguidance's view of the tokenizer: every token's bytes in a trie, and
/// the model's end tokens (which end the output where the grammar allows).
fn build_factory(tokenizer: &Tokenizer, eos_token_ids: &[u32]) -> Result<ParserFactory, String> {
    let json = tokenizer.to_string(false).map_err(|e| e.to_string())?;
    let mut bytes = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(json.as_bytes())
        .map_err(|e| e.to_string())?;
    let vocab = tokenizer.get_vocab_size(true) as u32;
    let eos: Vec<u32> = eos_token_ids
        .iter()
        .copied()
        .filter(|&id| id < vocab)
        .collect();
    if !eos.is_empty() {
        bytes.set_eos_tokens(&eos);
    }
    let env = bytes.into_tok_env(None).map_err(|e| e.to_string())?;
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}

/// One sequence's grammar state. Cloned (for the `n` choices of a
/// request) before any token is fed.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// Whether forced tokens are taken without a draw.
    forcing: bool,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

impl Constraint {
    /// Whether the grammar allows `token` next (an end token: whether the
    /// output may end here).
    pub fn allows(&mut self, token: u32) -> bool {
        self.matcher.validate_tokens(&[token]).is_ok_and(|n| n == 1)
    }

    /// Sets the logits of every token the grammar forbids to -inf; false
    /// when it allows none (the grammar is stuck).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<bool, String> {
        let mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let mut any = false;
        for (id, logit) in logits.iter_mut().enumerate() {
            if mask.is_allowed(id as u32) {
                any |= *logit > f32::NEG_INFINITY;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(any)
    }

    /// Feeds the chosen token.
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Tokens the grammar forces next, whatever the model would say.
    pub fn forced_tokens(&mut self) -> Vec<u32> {
        if self.forcing {
            self.matcher.compute_ff_tokens()
        } else {
            Vec::new()
        }
    }

    /// The same grammar with every token drawn, forced or not (to measure
    /// what forcing saves).
    pub fn without_forced_tokens(mut self) -> Self {
        self.forcing = false;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_hash_by_kind_and_content() {
        let schema = serde_json::json!({"type": "object"});
        let strict = GrammarSpec::JsonSchema {
            schema: schema.clone(),
            lenient: false,
        };
        let lenient = GrammarSpec::JsonSchema {
            schema,
            lenient: true,
        };
        assert_ne!(strict.cache_key(), lenient.cache_key());
        assert_eq!(strict.cache_key(), strict.clone().cache_key());
        assert_ne!(
            GrammarSpec::Lark("start: \"a\"".into()).cache_key(),
            GrammarSpec::Lark("start: \"b\"".into()).cache_key()
        );
    }
}
