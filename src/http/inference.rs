//! `POST /v1/chat/completions`, `/v1/completions` and `/v1/embeddings`:
//! the body is read once into its typed request, the routing headers into
//! hints, and the gateway's answer written as JSON (with its route and
//! cost in headers) or as server-sent events ending with `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;

use super::AppState;
use super::extract::{ApiBody, parse_json};
use crate::error::{ApiError, ApiResult};
use crate::experiments::ExperimentCall;
use crate::gateway::wire::{ChatCompletionRequest, CompletionRequest};
use crate::gateway::{Answer, AnswerBody, EmbeddingRequest, Hints, StreamItem};
use crate::tenancy::Principal;

/// Request headers that steer the route.
const TASK_HEADER: &str = "x-qpai-task";
const MIN_QUALITY_HEADER: &str = "x-qpai-min-quality";
/// The experiment a chat request takes part in, and its episode (else
/// its `user`): the unit its variant sticks to.
const EXPERIMENT_HEADER: &str = "x-qpai-experiment";
const EPISODE_HEADER: &str = "x-qpai-episode-id";

#[tracing::instrument(skip_all)]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> ApiResult<Response> {
    let request: ChatCompletionRequest = parse_json(&body)?;
    tracing::Span::current().record("model", request.model.as_str());
    let mut hints = hints(&headers)?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(experiment) = header(EXPERIMENT_HEADER) {
        hints.experiment = Some(ExperimentCall {
            experiment: experiment.to_string(),
            unit: header(EPISODE_HEADER)
                .map(str::to_string)
                .or_else(|| request.user.clone()),
        });
    }
    let answer = state.gateway.chat(&principal, request, &hints).await?;
    Ok(respond(answer))
}

#[tracing::instrument(skip_all)]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> ApiResult<Response> {
    let request: CompletionRequest = parse_json(&body)?;
    let hints = hints(&headers)?;
    let answer = state.gateway.complete(&principal, request, &hints).await?;
    Ok(respond(answer))
}

#[tracing::instrument(skip_all)]
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> ApiResult<Response> {
    let request: EmbeddingRequest = parse_json(&body)?;
    let hints = hints(&headers)?;
    let answer = state.gateway.embed(&principal, request, &hints).await?;
    Ok(respond(answer))
}

/// The routing hints a request's headers give.
fn hints(headers: &HeaderMap) -> ApiResult<Hints> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let min_quality = match header(MIN_QUALITY_HEADER) {
        Some(text) => Some(
            text.trim()
                .parse::<f64>()
                .ok()
                .filter(|q| (0.0..=1.0).contains(q))
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        MIN_QUALITY_HEADER,
                        format!("The header {MIN_QUALITY_HEADER} must be a number from 0 to 1, not {text:?}."),
                    )
                })?,
        ),
        None => None,
    };
    Ok(Hints {
        task: header(TASK_HEADER).map(str::to_string),
        min_quality,
        ..Hints::default()
    })
}

/// The answer as a response: JSON or server-sent events, with its route.
fn respond(answer: Answer) -> Response {
    let Answer { route, body } = answer;
    let (mut response, cost) = match body {
        AnswerBody::Whole { body, cost } => (Json(body).into_response(), Some(cost)),
        AnswerBody::Stream(chunks) => (sse(chunks).into_response(), None),
    };
    let mut pairs = vec![
        ("x-qpai-provider", route.provider.as_str().to_string()),
        ("x-qpai-model", route.model),
        ("x-qpai-deployment", route.deployment),
        ("x-qpai-attempts", route.attempts.to_string()),
        ("x-qpai-max-cost-usd", route.max_cost.to_string()),
        ("x-qpai-request-id", route.request_id),
    ];
    if let Some((experiment, variant)) = route.experiment {
        pairs.push(("x-qpai-experiment", experiment));
        pairs.push(("x-qpai-variant", variant));
    }
    if let Some(cost) = cost {
        pairs.push(("x-qpai-cost-usd", cost.to_string()));
    }
    if let Some(warning) = route.budget_warning {
        pairs.push(("x-qpai-budget-warning", warning));
    }
    let headers = response.headers_mut();
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    response
}

/// Chunks as server-sent events: `data: [DONE]` ends a stream that
/// finished; one that failed ends with its error. Dropping the response
/// (the client left) drops the stream, which bills what was produced and
/// cancels a local generation.
fn sse(
    chunks: crate::gateway::ChunkStream,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let events = futures::stream::unfold((chunks, false), |(mut chunks, over)| async move {
        if over {
            return None;
        }
        Some(match chunks.next().await {
            Some(StreamItem::Chunk(chunk)) => {
                let data = serde_json::to_string(&chunk).unwrap_or_default();
                (Ok(Event::default().data(data)), (chunks, false))
            }
            Some(StreamItem::Error(error)) => {
                let data = error.to_json().to_string();
                (Ok(Event::default().data(data)), (chunks, true))
            }
            None => (Ok(Event::default().data("[DONE]")), (chunks, true)),
        })
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
