//! Billing a request: its budget hold, its one usage row, and the metering
//! of its answer, whole (usage read from the JSON) or streamed (usage read
//! from the events as they pass; a stream that breaks off or whose client
//! leaves is billed for what was produced). Used by the router and by the
//! endpoints that run on qpai's own models only.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::Value;

use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::ledger::{Outcome, UsageRecord, UsageSource, now_ms};
use crate::money::Usd;
use crate::router::metering::{SseMeter, TokenUsage, usage_of};
use crate::router::tokens::TokenCounter;
use crate::router::{Prices, ProviderKind};
use crate::tenancy::{Principal, Reservation, Tenancy};

/// An answer's body as it comes: bytes, or what broke it off.
pub(super) type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// A request's usage row before its route and usage are known.
pub(super) fn usage_record(
    principal: &Principal,
    endpoint: &str,
    requested_model: &str,
    stream: bool,
) -> UsageRecord {
    UsageRecord {
        request_id: format!("req_{}", uuid::Uuid::new_v4().simple()),
        ts_ms: now_ms(),
        tenant: principal.tenant.clone(),
        key_id: principal.key_id.clone(),
        endpoint: endpoint.into(),
        requested_model: requested_model.into(),
        deployment: String::new(),
        provider: String::new(),
        model: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        cost: Usd::ZERO,
        outcome: Outcome::Error,
        attempts: 0,
        stream,
        usage_source: UsageSource::Counted,
    }
}

/// Everything needed to bill a request once its usage is known. A bill
/// dropped unsettled (the request failed after its budget was held: a full
/// queue, an engine error, a client gone) still writes its one row, as an
/// error that cost nothing.
pub struct Bill {
    pub(super) tenancy: Option<Arc<Tenancy>>,
    pub(super) reservation: Option<Reservation>,
    pub(super) record: UsageRecord,
    pub(super) prices: Prices,
    /// Counts produced text when no usage comes (None: nothing to count).
    pub(super) counter: Option<TokenCounter>,
    /// The row is written.
    pub(super) written: bool,
}

impl Drop for Bill {
    fn drop(&mut self) {
        if !self.written {
            self.write(None, "", Outcome::Error);
        }
    }
}

impl Bill {
    /// Holds budget for a request answered by one of qpai's own models
    /// outside the router (text completions, embeddings), priced by the
    /// routing catalog's `local` deployment of `model` (else free). None
    /// when the server keeps no ledger.
    pub async fn local(
        state: &AppState,
        principal: &Principal,
        endpoint: &str,
        model: &str,
        prompt_tokens: u64,
        max_completion_tokens: u64,
        counter: Option<TokenCounter>,
    ) -> ApiResult<Option<Bill>> {
        let Some(tenancy) = state.tenancy() else {
            return Ok(None);
        };
        let prices = state
            .model_router()
            .local_prices(model)
            .unwrap_or(Prices::FREE);
        tenancy
            .budgets
            .standing(&principal.tenant)
            .await
            .map_err(ApiError::internal)?;
        let reservation = tenancy
            .budgets
            .reserve(
                &principal.tenant,
                prices.cost(prompt_tokens, max_completion_tokens),
            )
            .map_err(|e| ApiError::budget_exceeded(e.to_string()))?;
        Ok(Some(Bill {
            tenancy: Some(tenancy),
            reservation: Some(reservation),
            record: UsageRecord {
                deployment: model.into(),
                provider: ProviderKind::Local.as_str().into(),
                model: model.into(),
                prompt_tokens,
                attempts: 1,
                ..usage_record(principal, endpoint, model, false)
            },
            prices,
            counter,
            written: false,
        }))
    }

    /// Bills a whole answer whose usage qpai produced itself.
    pub fn settle_usage(self, prompt_tokens: u64, completion_tokens: u64) -> Usd {
        self.settle(Some((prompt_tokens, completion_tokens)), "", Outcome::Ok)
    }

    /// Bills a local stream as it passes: its response must end with a
    /// usage chunk, removed unless the client asked for it.
    pub fn meter_stream(mut self, response: Response, client_wants_usage: bool) -> Response {
        self.record.stream = true;
        let (parts, body) = response.into_parts();
        let stream = Box::pin(
            body.into_data_stream()
                .map(|chunk| chunk.map_err(|e| e.to_string())),
        );
        let meter = SseMeter::new(!client_wants_usage, None);
        Response::from_parts(parts, self.metered_body(stream, meter))
    }

    /// A body passing `stream` on through `meter`, billed when it ends.
    pub(super) fn metered_body(self, stream: ByteStream, meter: SseMeter) -> Body {
        Body::from_stream(MeteredStream {
            inner: stream,
            meter,
            bill: Some(self),
            ended: false,
        })
    }

    /// Writes the request's one usage row and settles its budget hold.
    fn settle(mut self, usage: Option<TokenUsage>, produced: &str, outcome: Outcome) -> Usd {
        self.write(usage, produced, outcome)
    }

    fn write(&mut self, usage: Option<TokenUsage>, produced: &str, outcome: Outcome) -> Usd {
        let (prompt, completion, source) = match usage {
            Some((p, c)) => (p, c, UsageSource::Upstream),
            None if outcome == Outcome::Error => (0, 0, UsageSource::Counted),
            None => (
                self.record.prompt_tokens,
                self.counter.as_ref().map_or(0, |c| c.count(produced)),
                UsageSource::Counted,
            ),
        };
        let cost = self.prices.cost(prompt, completion);
        self.written = true;
        self.record.prompt_tokens = prompt;
        self.record.completion_tokens = completion;
        self.record.cost = cost;
        self.record.outcome = outcome;
        self.record.usage_source = source;
        if let Some(reservation) = self.reservation.take() {
            reservation.settle(cost);
        }
        if let Some(tenancy) = &self.tenancy {
            tenancy.ledger.record(self.record.clone());
        }
        cost
    }

    /// A whole answer: billed now, its cost in the headers.
    pub(super) fn whole_answer(self, value: Value) -> Response {
        let usage = usage_of(&value);
        let text = answer_text(&value);
        let cost = self.settle(usage, &text, Outcome::Ok);
        let mut response = axum::Json(value).into_response();
        if let Ok(v) = HeaderValue::from_str(&cost.to_string()) {
            response.headers_mut().insert("x-qpai-cost-usd", v);
        }
        response
    }
}

/// The text a whole answer produced: every choice's content and calls.
fn answer_text(value: &Value) -> String {
    let mut text = String::new();
    let choices = value.get("choices").and_then(Value::as_array);
    for choice in choices.into_iter().flatten() {
        if let Some(content) = choice.pointer("/message/content").and_then(Value::as_str) {
            text.push_str(content);
        }
        let calls = choice
            .pointer("/message/tool_calls")
            .and_then(Value::as_array);
        for call in calls.into_iter().flatten() {
            for part in ["/function/name", "/function/arguments"] {
                if let Some(piece) = call.pointer(part).and_then(Value::as_str) {
                    text.push_str(piece);
                }
            }
        }
    }
    text
}

/// Passes a stream on event by event and bills it when it ends, breaks or
/// is dropped (the client left).
struct MeteredStream {
    inner: ByteStream,
    meter: SseMeter,
    bill: Option<Bill>,
    ended: bool,
}

impl MeteredStream {
    fn settle(&mut self, outcome: Outcome) {
        if let Some(bill) = self.bill.take() {
            bill.settle(self.meter.usage, &self.meter.text, outcome);
        }
    }
}

impl Stream for MeteredStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        loop {
            match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    let out = self.meter.feed(&chunk);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(message))) => {
                    tracing::warn!(%message, "the stream broke off");
                    self.ended = true;
                    self.settle(Outcome::Cut);
                    let error = ApiError {
                        code: Some("upstream_broke_off"),
                        ..ApiError::unavailable("The model's stream broke off.")
                    };
                    let event = format!("data: {}\n\n", error.to_json());
                    return Poll::Ready(Some(Ok(Bytes::from(event))));
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    let rest = self.meter.finish();
                    let outcome = if self.meter.done || self.meter.usage.is_some() {
                        Outcome::Ok
                    } else {
                        Outcome::Cut
                    };
                    self.settle(outcome);
                    return Poll::Ready((!rest.is_empty()).then_some(Ok(rest)));
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        self.settle(Outcome::Cut);
    }
}
