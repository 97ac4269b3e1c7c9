//! What one case produced: the answer (text, calls, finish reason), its
//! sources or search results, and how it ran (tokens, exact cost, latency,
//! time to first token, route).

use serde::{Deserialize, Serialize};

use crate::money::Usd;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// A source the answer was given, numbered as its `[n]` markers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub index: usize,
    pub url: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Output {
    pub text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<String>,
    /// Sources given to a grounded answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub citations: Vec<Source>,
    /// Pages in rank order: a search's results, or a grounded answer's
    /// sources.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retrieved: Vec<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Exactly what the ledger billed for it.
    pub cost: Usd,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    /// The deployment (or local model) that answered.
    pub route: Option<String>,
    pub request_id: Option<String>,
    /// Why the call failed (after its retries).
    pub error: Option<String>,
}
