//! What the router reads: its catalog (TOML, checked whole, then every
//! name it offers ranked for a few kinds of request), the answers of
//! upstream deployments (server-sent events cut anywhere, and whole JSON
//! answers), metered for usage, and the text it counts tokens of as
//! OpenAI would.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::router::calibration;
use crate::router::catalog::{Capability, RouterCatalog};
use crate::router::metering::{SseData, SseReader, StreamMeter, usage_of};
use crate::router::policy::{self, Needs};
use crate::router::tokens::TokenCounter;

/// Prompt tokens every candidate is ranked with.
const PROMPT_TOKENS: u64 = 1_000;

/// A routing catalog, read as `ModelRouter::load_catalog` reads one; every
/// deployment, logical model and `auto` then ranked for each of
/// `request_kinds`.
pub fn router_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = calibration::split(text);
    let Ok(catalog) = RouterCatalog::parse(text) else {
        return;
    };
    let kinds = request_kinds(&catalog);
    let names = catalog
        .deployments
        .iter()
        .map(|d| d.name.as_str())
        .chain(catalog.models.keys().map(String::as_str))
        .chain([policy::AUTO]);
    for name in names {
        let Some((offered, _pinned)) = policy::offered(&catalog, name) else {
            continue;
        };
        for needs in &kinds {
            let _ = policy::rank(&offered, needs, |_| Ok(PROMPT_TOKENS));
        }
    }
}

/// A plain chat request; a streamed, structured one with tools, of the
/// catalog's first task (and its quality floor), asking 16 choices of as
/// many tokens as there are; and an embedding request.
fn request_kinds(catalog: &RouterCatalog) -> [Needs; 3] {
    let task = catalog.floors.keys().next().cloned();
    let demanding = Needs {
        capabilities: BTreeSet::from([Capability::Streaming, Capability::Json, Capability::Tools]),
        min_quality: task.as_deref().and_then(|task| catalog.floor(task)),
        task,
        max_tokens: Some(u64::MAX),
        choices: 16,
    };
    let embedding = Needs {
        capabilities: BTreeSet::from([Capability::Embeddings]),
        max_tokens: Some(0),
        choices: 1,
        ..Needs::default()
    };
    let plain = Needs {
        choices: 1,
        ..Needs::default()
    };
    [plain, demanding, embedding]
}

/// An upstream's answer: whole (JSON, its usage read), and as a stream of
/// server-sent events after the first byte, fed whole and in pieces of 1
/// to 16 bytes (the first byte says how many) as the network may deliver
/// them, each chunk metered.
pub fn sse(data: &[u8]) {
    if let Ok(answer) = serde_json::from_slice::<Value>(data) {
        let _ = usage_of(&answer);
    }
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    for piece in [stream.len().max(1), usize::from(cut % 16) + 1] {
        let mut reader = SseReader::default();
        let mut meter = StreamMeter::default();
        let mut events = Vec::new();
        for bytes in stream.chunks(piece) {
            events.extend(reader.feed(bytes).unwrap_or_default());
        }
        events.extend(reader.finish());
        for event in &events {
            if let SseData::Chunk(chunk) = event {
                meter.observe(chunk);
            }
        }
    }
}

/// Models whose OpenAI tokenizers count text: o200k_base (also every name
/// OpenAI does not know), cl100k_base and p50k_base.
const COUNTED_AS: [&str; 3] = ["gpt-4o", "gpt-4", "text-davinci-003"];

/// Loads the tables of `COUNTED_AS`'s tokenizers before the first input
/// (as the server loads o200k_base's at start, `tokens::warm_up`): a
/// second or so each, which libFuzzer would otherwise time that input by.
pub fn token_count_tables() {
    for model in COUNTED_AS {
        let _ = TokenCounter::for_remote_model(model);
    }
}

/// Text counted as a remote deployment's tokens (a prompt, an upstream's
/// answer without usage): the bytes as text, with each of OpenAI's
/// tokenizers; and, when they are JSON, as a chat request's messages (a
/// list, or an object holding one under `messages`).
pub fn token_count(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let messages = super::json_messages(data);
    for model in COUNTED_AS {
        let counter = TokenCounter::for_remote_model(model);
        let _ = counter.count(&text);
        if let Some(messages) = &messages {
            let _ = counter.count_messages(messages);
        }
    }
}
