//! One case of one variant, asked through the gateway: the request a
//! chat variant makes of a row (its prompt rendered or named, its
//! settings), streamed so that the time to the first token is seen, and
//! read back into an `Output` with the exact cost of its ledger row. A
//! search variant searches the site the way `/v1/sites/{site}/search`
//! does.

use std::time::Instant;

use futures::StreamExt;
use serde_json::{Map, Value, json};

use super::assertions::render_template;
use super::output::{Output, Source, ToolCall};
use super::suite::{Case, ChatVariant, PromptChoice, SearchVariant, Shared};
use crate::error::{ApiError, ApiResult};
use crate::gateway::bill::EvalBilling;
use crate::gateway::wire::ChatCompletionRequest;
use crate::gateway::{AnswerBody, Gateway, Hints, StreamItem};
use crate::prompts::PromptTemplate;
use crate::tenancy::Principal;

/// The body of a chat variant's request for `case`, without the stream
/// options (what the cache key is made of).
pub fn chat_body(shared: &Shared, variant: &ChatVariant, case: &Case) -> Result<Value, String> {
    let mut body = Map::new();
    body.insert("model".into(), variant.request_model().into());
    match &variant.prompt {
        PromptChoice::Registered(template) => {
            let variables = prompt_variables(template, &case.columns);
            template.render(&variables).map_err(|e| e.message)?;
            body.insert(
                "prompt".into(),
                json!({"id": template.name, "version": template.version.to_string(),
                    "variables": Value::Object(variables)}),
            );
        }
        PromptChoice::Inline { messages, .. } => {
            let mut turns = Vec::new();
            for message in messages {
                let content = render_template(&message.content, &case.columns)?;
                turns.push(json!({"role": message.role, "content": content}));
            }
            body.insert("messages".into(), Value::Array(turns));
        }
    }
    for (key, value) in &variant.settings {
        body.insert(key.clone(), value.clone());
    }
    let shared_fields = [
        ("tools", &shared.tools),
        ("tool_choice", &shared.tool_choice),
        ("response_format", &shared.response_format),
        ("rag", &shared.rag),
    ];
    for (key, value) in shared_fields {
        if let Some(value) = value {
            body.insert(key.into(), value.clone());
        }
    }
    let body = Value::Object(body);
    serde_json::from_value::<ChatCompletionRequest>(body.clone()).map_err(|e| e.to_string())?;
    Ok(body)
}

/// The row's columns a prompt has variables for, CSV text read as each
/// variable's type.
fn prompt_variables(template: &PromptTemplate, columns: &Map<String, Value>) -> Map<String, Value> {
    let mut variables = Map::new();
    for (name, variable) in &template.variables {
        let Some(value) = columns.get(name) else {
            continue;
        };
        let value = match value {
            Value::String(text) if !variable.kind.admits(value) => variable
                .kind
                .from_text(text)
                .unwrap_or_else(|| value.clone()),
            other => other.clone(),
        };
        variables.insert(name.clone(), value);
    }
    variables
}

/// The hints of an eval case: its task, its quality floor, its run.
pub fn hints(shared: &Shared, run_id: &str) -> Hints {
    Hints {
        task: shared.task.clone(),
        min_quality: shared.min_quality,
        eval: Some(EvalBilling::new(run_id)),
        ..Hints::default()
    }
}

/// Asks the gateway, as a stream when `stream` (to time the first
/// token); the error is the gateway's (for retry decisions).
pub async fn ask(
    gateway: &Gateway,
    principal: &Principal,
    hints: &Hints,
    body: &Value,
    stream: bool,
) -> ApiResult<Output> {
    let mut body = body.clone();
    if stream {
        body["stream"] = Value::Bool(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let request: ChatCompletionRequest =
        serde_json::from_value(body).map_err(|e| ApiError::bad_body(e.to_string(), None))?;
    let started = Instant::now();
    let answer = gateway.chat(principal, request, hints).await?;
    let mut output = Output {
        route: Some(answer.route.deployment.clone()),
        ..Output::default()
    };
    let mut calls: Vec<ToolCall> = Vec::new();
    match answer.body {
        AnswerBody::Whole { body, .. } => read_whole(&body.to_json(), &mut output, &mut calls),
        AnswerBody::Stream(mut stream) => {
            while let Some(item) = stream.next().await {
                match item {
                    StreamItem::Chunk(chunk) => {
                        let chunk = serde_json::to_value(&chunk).unwrap_or_default();
                        if read_chunk(&chunk, &mut output, &mut calls) && output.ttft_ms.is_none() {
                            output.ttft_ms = Some(elapsed_ms(started));
                        }
                    }
                    StreamItem::Error(error) => output.error = Some(error.message),
                }
            }
        }
    }
    output.latency_ms = elapsed_ms(started);
    output.tool_calls = calls;
    if let Some(row) = hints.eval.as_ref().and_then(EvalBilling::receipt) {
        output.prompt_tokens = row.prompt_tokens;
        output.completion_tokens = row.completion_tokens;
        output.cost = row.cost;
        output.request_id = Some(row.request_id);
    }
    Ok(output)
}

fn elapsed_ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

/// Reads a stream chunk into the output; true when it carried answer text
/// or a call.
fn read_chunk(chunk: &Value, output: &mut Output, calls: &mut Vec<ToolCall>) -> bool {
    let mut produced = false;
    if let Some(choice) = chunk.pointer("/choices/0") {
        if let Some(text) = choice.pointer("/delta/content").and_then(Value::as_str) {
            output.text.push_str(text);
            produced |= !text.is_empty();
        }
        for delta in choice
            .pointer("/delta/tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = delta.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if calls.len() <= index {
                calls.resize(index + 1, ToolCall::default());
            }
            if let Some(name) = delta.pointer("/function/name").and_then(Value::as_str) {
                calls[index].name.push_str(name);
            }
            if let Some(arguments) = delta.pointer("/function/arguments").and_then(Value::as_str) {
                calls[index].arguments.push_str(arguments);
            }
            produced = true;
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            output.finish_reason = Some(reason.to_string());
        }
    }
    read_citations(chunk, output);
    produced
}

fn read_whole(body: &Value, output: &mut Output, calls: &mut Vec<ToolCall>) {
    if let Some(choice) = body.pointer("/choices/0") {
        if let Some(text) = choice.pointer("/message/content").and_then(Value::as_str) {
            output.text = text.to_string();
        }
        for call in choice
            .pointer("/message/tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            calls.push(ToolCall {
                name: call
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                arguments: call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
            });
        }
        output.finish_reason = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    read_citations(body, output);
}

fn read_citations(value: &Value, output: &mut Output) {
    let Some(citations) = value.get("citations").and_then(Value::as_array) else {
        return;
    };
    if !output.citations.is_empty() {
        return;
    }
    for citation in citations {
        let url = citation
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        output.citations.push(Source {
            index: citation.get("index").and_then(Value::as_u64).unwrap_or(0) as usize,
            url: url.clone(),
        });
        if !output.retrieved.contains(&url) {
            output.retrieved.push(url);
        }
    }
}

/// Searches the site for the row's query: the pages in rank order (chunk
/// hits folded into their page, best first).
pub async fn search(
    gateway: &Gateway,
    principal: &Principal,
    variant: &SearchVariant,
    case: &Case,
) -> ApiResult<Output> {
    let query = render_template(&variant.query, &case.columns)
        .map_err(|e| ApiError::invalid_param("query", e))?;
    let site = gateway.site_for(principal, &variant.site).await?;
    let rag = gateway.rag().await?;
    let request = crate::rag::SearchRequest {
        query,
        top_k: variant.top_k,
        mode: variant.mode,
        filter: Default::default(),
    };
    let started = Instant::now();
    let hits = crate::rag::search::search(&rag, &site, &request).await?;
    let mut output = Output {
        latency_ms: elapsed_ms(started),
        route: Some(variant.site.clone()),
        ..Output::default()
    };
    for hit in hits {
        if !output.retrieved.contains(&hit.url) {
            output.retrieved.push(hit.url);
        }
    }
    Ok(output)
}
