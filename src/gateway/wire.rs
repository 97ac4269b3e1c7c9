//! The OpenAI wire format: request bodies as callers send them (read, and
//! written again for upstream deployments) and the answer objects qpai
//! writes. `parse_json` reads a body, naming the bad field on error.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::FinishReason;
use crate::error::ApiError;

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Sampling and length fields shared by chat and text completions.
#[derive(Debug, Clone, Default)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; accepted as vLLM and TGI do.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<StopSequences>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// Not in OpenAI's API: generate past end-of-sequence tokens up to
    /// max_tokens (vLLM's and llama.cpp's `ignore_eos`, for load tests).
    pub ignore_eos: Option<bool>,
    pub user: Option<String>,
    pub metadata: Option<BTreeMap<String, Value>>,
}

/// Declares a request body with the shared sampling fields inlined (not
/// `#[serde(flatten)]`ed, so that a bad value is reported with its name) and
/// a `sampling()` accessor gathering them.
macro_rules! request_with_sampling {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$field_meta:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($(#[$field_meta])* pub $field: $ty,)*
            #[serde(skip_serializing_if = "Option::is_none")]
            pub max_tokens: Option<i64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub temperature: Option<f32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub top_p: Option<f32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub top_k: Option<i64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub seed: Option<i64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub stop: Option<StopSequences>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub n: Option<i64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub stream: Option<bool>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub stream_options: Option<StreamOptions>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub frequency_penalty: Option<f32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub presence_penalty: Option<f32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub ignore_eos: Option<bool>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub user: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub metadata: Option<BTreeMap<String, Value>>,
            /// Fields this server does not know or implement: each is refused by name.
            #[serde(flatten)]
            pub other: BTreeMap<String, Value>,
        }

        impl $name {
            pub fn sampling(&self) -> SamplingFields {
                SamplingFields {
                    max_tokens: self.max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    seed: self.seed,
                    stop: self.stop.clone(),
                    n: self.n,
                    stream: self.stream,
                    stream_options: self.stream_options.clone(),
                    frequency_penalty: self.frequency_penalty,
                    presence_penalty: self.presence_penalty,
                    ignore_eos: self.ignore_eos,
                    user: self.user.clone(),
                    metadata: self.metadata.clone(),
                }
            }
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The role name chat templates know (`developer` is the newer name of `system`).
    pub fn template_name(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: Value },
    InputAudio { input_audio: Value },
    File { file: Value },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// Null in an assistant turn of calls (written as null again).
    pub content: Option<MessageContent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A tool turn: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// An assistant turn's refusal, as answers carry it (accepted, not shown
    /// to the model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

request_with_sampling! {
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct ChatCompletionRequest {
        pub model: String,
        /// May be left out when `prompt` gives the turns.
        #[serde(default)]
        pub messages: Vec<ChatMessage>,
        /// A versioned prompt (`prompts/`) whose turns come before
        /// `messages`; qpai's own, never sent upstream.
        #[serde(skip_serializing)]
        pub prompt: Option<PromptRef>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_completion_tokens: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub logprobs: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub top_logprobs: Option<i64>,
        /// qpai's own: never sent upstream (only local models ground).
        #[serde(skip_serializing)]
        pub rag: Option<RagOptions>,
        /// Read by `structured::OutputFormat::parse` (errors name the inner field).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub response_format: Option<Value>,
        /// Read by `structured::ToolUse::parse`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tools: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tool_choice: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub parallel_tool_calls: Option<bool>,
        /// Token id (as a string) to a bias from -100 to 100.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub logit_bias: Option<Value>,
    }
}

/// A prompt named in a request, as OpenAI's Responses API names one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptRef {
    pub id: String,
    /// A number or a string ("3"); the newest when absent.
    #[serde(default)]
    pub version: Option<Value>,
    #[serde(default)]
    pub variables: serde_json::Map<String, Value>,
}

impl ChatMessage {
    /// A plain text turn.
    pub fn text(role: Role, text: String) -> ChatMessage {
        ChatMessage {
            role,
            content: Some(MessageContent::Text(text)),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            refusal: None,
            other: BTreeMap::new(),
        }
    }
}

/// A function call, in an assistant turn (request or answer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// A streamed piece of a call: its id, type and name first, then fragments
/// of its arguments.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// `rag`: answer from a site's content, citing it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RagOptions {
    pub site: String,
    pub top_k: Option<usize>,
    pub mode: Option<crate::rag::SearchMode>,
    pub filter: Option<crate::rag::SearchFilter>,
}

/// A source given to the model, numbered as the answer's `[n]` markers.
#[derive(Debug, Clone, Serialize)]
pub struct Citation {
    pub index: usize,
    pub url: String,
    pub title: String,
    pub chunk_id: String,
    pub score: f32,
}

/// `prompt`: text, a list of texts, token ids, or lists of token ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

request_with_sampling! {
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct CompletionRequest {
        pub model: String,
        pub prompt: Prompt,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub logprobs: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub echo: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub logit_bias: Option<Value>,
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// Null when the answer is tool calls.
    pub content: Option<String>,
    pub refusal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// The sources of a grounded (`rag`) answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub citations: Option<Vec<Citation>>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<ChatChunkChoice>,
    /// Present (null until the last chunk) when `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// The sources of a grounded (`rag`) answer, on each choice's final chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub citations: Option<Vec<Citation>>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// qpai extensions: what the model is and how it is served.
    pub kind: crate::models::ModelKind,
    pub architecture: String,
    pub context_length: usize,
    /// For an adapter (per request or merged): the model it runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Where a local model runs: `cpu` or `cuda:N` (absent for routed names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// Reads a request body: every way it can be wrong (not UTF-8, not JSON,
/// wrong types, unknown variants) becomes a 400 naming the offending
/// field when there is one.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(ApiError::bad_body(
            format!(
                "The request body is not valid UTF-8 (at byte {}).",
                e.valid_up_to()
            ),
            None,
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let param = if inner.is_syntax() || inner.is_eof() {
            None
        } else if path != "." {
            Some(path)
        } else {
            missing_field(&inner.to_string())
        };
        let message = match &param {
            Some(param) => format!("Invalid value for '{param}': {inner}"),
            None => format!("The request body is not valid JSON: {inner}"),
        };
        ApiError::bad_body(message, param)
    })?;
    deserializer.end().map_err(|e| {
        ApiError::bad_body(format!("The request body is not valid JSON: {e}"), None)
    })?;
    Ok(value)
}

/// serde reports a missing field as "missing field `name` at ...".
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_string())
}
