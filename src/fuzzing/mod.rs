//! Fuzz targets: one function per reader of outside bytes (request
//! bodies, batch files, model files and adapters, chat templates, site
//! pages and feeds, the routing catalog, upstream streams), each taking
//! any bytes through the production code that reads them. The libFuzzer
//! targets in `fuzz/` call these (`cargo +nightly fuzz run NAME`, see
//! `scripts/fuzz.sh`), and the `fuzz_replay` integration test replays
//! every committed input of `fuzz/corpus/NAME` and `fuzz/regressions/NAME`
//! through them on stable Rust.
//!
//! A target ignores what the code under test answers (refusing bad input
//! is a correct answer). It panics only where that code panics (or when a
//! committed file it is built on no longer loads), bounds nothing that
//! production leaves unbounded, and reaches no network and no file.

mod models;
mod requests;
mod routing;
mod sources;
mod stand_ins;

pub use models::{chat_template, gguf, peft_adapter, safetensors_header};
pub use requests::{batch_line, chat_request, completion_request, embedding_request};
pub use routing::{router_toml, sse, token_count, token_count_tables};
pub use sources::{chunker, html, markdown, robots, sitemap, wxr};

/// The messages `data` holds as JSON: a list of them, or an object (a chat
/// request) holding one under `messages`.
fn json_messages(data: &[u8]) -> Option<Vec<serde_json::Value>> {
    use serde_json::Value;
    match serde_json::from_slice::<Value>(data) {
        Ok(Value::Array(items)) => Some(items),
        Ok(Value::Object(mut object)) => match object.remove("messages") {
            Some(Value::Array(items)) => Some(items),
            _ => None,
        },
        _ => None,
    }
}

/// A fuzz target: any bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target by name; each has `fuzz/fuzz_targets/NAME.rs` and seeds in
/// `fuzz/corpus/NAME/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("chat_request", chat_request),
    ("completion_request", completion_request),
    ("embedding_request", embedding_request),
    ("batch_line", batch_line),
    ("chat_template", chat_template),
    ("gguf", gguf),
    ("safetensors_header", safetensors_header),
    ("peft_adapter", peft_adapter),
    ("html", html),
    ("markdown", markdown),
    ("wxr", wxr),
    ("sitemap", sitemap),
    ("robots", robots),
    ("chunker", chunker),
    ("router_toml", router_toml),
    ("sse", sse),
    ("token_count", token_count),
];
