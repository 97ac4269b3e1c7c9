//! Answers as they come: a local model's engine events collected whole or
//! turned into OpenAI's stream chunks, and an upstream's server-sent
//! events read into chunks. Both kinds of stream carry their bill and
//! settle it when they end, break off or are dropped (the caller left):
//! a local stream from the engine's own token counts, an upstream one from
//! the provider's usage report (or qpai's count of what came). A stream
//! that settles waits for its row's commit before it yields its last
//! chunks, so a client that read to the end was billed durably.

use std::collections::VecDeque;
use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::Value;

use super::bill::{Bill, Metered};
use super::wire::{ChatCompletionChunk, Completion, Usage};
use crate::engine::{FinishReason, GenerationEvent, GenerationStream, Logprobs};
use crate::error::{ApiError, ApiResult};
use crate::ledger::Outcome;
use crate::ledger::Recorded;
use crate::router::UpstreamError;
use crate::router::metering::{SseData, SseReader, StreamMeter};

/// A chunk of a streamed answer, in OpenAI's format.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Chunk {
    Chat(ChatCompletionChunk),
    Text(Completion),
    /// An upstream's chunk, as it came (its usage aside).
    Upstream(Value),
}

/// What a stream yields: chunks, then possibly an error that ends it.
#[derive(Debug)]
pub enum StreamItem {
    Chunk(Chunk),
    Error(ApiError),
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = StreamItem> + Send>>;

/// Everything generated for one choice.
#[derive(Debug, Default)]
pub struct ChoiceOutput {
    pub text: String,
    pub logprobs: Vec<Logprobs>,
    pub finish_reason: Option<FinishReason>,
    pub completion_tokens: usize,
}

/// Waits for the whole answer.
pub async fn collect(mut stream: GenerationStream, n: usize) -> ApiResult<Vec<ChoiceOutput>> {
    let mut choices: Vec<ChoiceOutput> = (0..n).map(|_| ChoiceOutput::default()).collect();
    let mut open = n;
    while open > 0 {
        match stream.next().await {
            Some(GenerationEvent::Token {
                choice,
                text,
                logprobs,
            }) => {
                let out = &mut choices[choice];
                out.text.push_str(&text);
                out.logprobs.extend(logprobs);
            }
            Some(GenerationEvent::End {
                choice,
                finish_reason,
                completion_tokens,
            }) => {
                choices[choice].finish_reason = Some(finish_reason);
                choices[choice].completion_tokens = completion_tokens;
                open -= 1;
            }
            Some(GenerationEvent::Error(message)) => return Err(ApiError::internal(message)),
            None => return Err(ApiError::internal("generation ended without a result")),
        }
    }
    Ok(choices)
}

/// How one API family writes its stream chunks.
pub trait ChunkFormat: Send + 'static {
    /// Chunks sent before any token (e.g. the assistant role).
    fn opening(&mut self, n: usize) -> Vec<Chunk>;
    /// A chunk for a token, or none when there is nothing to say.
    fn token(&mut self, choice: usize, text: String, logprobs: Option<Logprobs>) -> Option<Chunk>;
    fn end(&mut self, choice: usize, finish_reason: FinishReason) -> Chunk;
    fn usage(&mut self, usage: Usage) -> Chunk;
}

/// A local stream in progress.
struct LocalStream<F: ChunkFormat> {
    format: F,
    events: GenerationStream,
    queue: VecDeque<StreamItem>,
    open_choices: usize,
    prompt_tokens: usize,
    /// Tokens generated so far (one per token event).
    generated: usize,
    /// Completion tokens of the finished choices, as the engine counts them.
    completion_tokens: usize,
    include_usage: bool,
    bill: Option<Bill>,
    /// The settled row's commit, waited on before the chunks after it.
    recorded: Option<Recorded>,
}

impl<F: ChunkFormat> LocalStream<F> {
    fn settle(&mut self, completion_tokens: usize, outcome: Outcome) {
        if let Some(bill) = self.bill.take() {
            let usage = (self.prompt_tokens as u64, completion_tokens as u64);
            self.recorded = Some(bill.settle(Metered::Reported(usage), outcome).recorded);
        }
    }

    fn fail(&mut self, message: String) {
        self.settle(self.generated, Outcome::Cut);
        self.queue
            .push_back(StreamItem::Error(ApiError::internal(message)));
    }

    fn on_event(&mut self, event: Option<GenerationEvent>) {
        match event {
            Some(GenerationEvent::Token {
                choice,
                text,
                logprobs,
            }) => {
                self.generated += 1;
                if let Some(chunk) = self.format.token(choice, text, logprobs) {
                    self.queue.push_back(StreamItem::Chunk(chunk));
                }
            }
            Some(GenerationEvent::End {
                choice,
                finish_reason,
                completion_tokens,
            }) => {
                let end = self.format.end(choice, finish_reason);
                self.queue.push_back(StreamItem::Chunk(end));
                self.completion_tokens += completion_tokens;
                self.open_choices -= 1;
                if self.open_choices == 0 {
                    if self.include_usage {
                        let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
                        let chunk = self.format.usage(usage);
                        self.queue.push_back(StreamItem::Chunk(chunk));
                    }
                    self.settle(self.completion_tokens, Outcome::Ok);
                }
            }
            Some(GenerationEvent::Error(message)) => self.fail(message),
            None => self.fail("generation ended without a result".into()),
        }
    }

    fn finished(&self) -> bool {
        self.bill.is_none()
    }
}

impl<F: ChunkFormat> Drop for LocalStream<F> {
    /// The caller left mid-answer: billed for the tokens generated.
    fn drop(&mut self) {
        self.settle(self.generated, Outcome::Cut);
    }
}

/// Streams a local answer in `format`, billing it from the engine's
/// events. Dropping the stream drops the generation, which cancels the
/// request in the worker.
pub fn local_stream<F: ChunkFormat>(
    mut format: F,
    events: GenerationStream,
    n: usize,
    prompt_tokens: usize,
    include_usage: bool,
    bill: Bill,
) -> ChunkStream {
    let queue = format
        .opening(n)
        .into_iter()
        .map(StreamItem::Chunk)
        .collect();
    let state = LocalStream {
        format,
        events,
        queue,
        open_choices: n,
        prompt_tokens,
        generated: 0,
        completion_tokens: 0,
        include_usage,
        bill: Some(bill),
        recorded: None,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(recorded) = state.recorded.take() {
                recorded.committed().await;
            }
            if let Some(item) = state.queue.pop_front() {
                return Some((item, state));
            }
            if state.finished() {
                return None;
            }
            let event = state.events.next().await;
            state.on_event(event);
        }
    }))
}

/// The bytes of an upstream's stream.
pub type UpstreamBytes = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// An upstream stream in progress.
struct UpstreamStream {
    bytes: UpstreamBytes,
    reader: SseReader,
    meter: StreamMeter,
    queue: VecDeque<StreamItem>,
    /// `data: [DONE]` came.
    done: bool,
    /// The caller asked for the usage chunk (else it is dropped).
    include_usage: bool,
    bill: Option<Bill>,
    /// The settled row's commit, waited on before the chunks after it.
    recorded: Option<Recorded>,
}

impl UpstreamStream {
    fn settle(&mut self, outcome: Outcome) {
        if let Some(bill) = self.bill.take() {
            let usage = match self.meter.usage {
                Some(usage) => Metered::Reported(usage),
                None => Metered::Produced(std::mem::take(&mut self.meter.text)),
            };
            self.recorded = Some(bill.settle(usage, outcome).recorded);
        }
    }

    fn on_data(&mut self, data: SseData) {
        let mut chunk = match data {
            SseData::Done => {
                // The answer is whole: billed now, before the caller's
                // `[DONE]`, whether or not the upstream closes at once.
                self.done = true;
                self.settle(Outcome::Ok);
                return;
            }
            SseData::Other(text) => {
                tracing::debug!(%text, "upstream event that is not JSON, passed over");
                return;
            }
            SseData::Chunk(chunk) => chunk,
        };
        self.meter.observe(&chunk);
        if chunk.get("usage").is_some_and(|u| !u.is_null()) {
            let usage = self.meter.usage.unwrap_or_default();
            let has_choices = chunk
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(|c| !c.is_empty());
            if !self.include_usage {
                if !has_choices {
                    return;
                }
                if let Some(object) = chunk.as_object_mut() {
                    object.remove("usage");
                }
            } else if let (Some(object), Some(bill)) = (chunk.as_object_mut(), &self.bill) {
                let cost = bill.prices().cost(usage.0, usage.1);
                object.insert("x_qpai_cost_usd".into(), Value::String(cost.to_string()));
            }
        }
        self.queue
            .push_back(StreamItem::Chunk(Chunk::Upstream(chunk)));
    }

    fn on_bytes(&mut self, next: Option<Result<Bytes, UpstreamError>>) {
        match next {
            Some(Ok(bytes)) => match self.reader.feed(&bytes) {
                Ok(events) => {
                    for data in events {
                        self.on_data(data);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cutting the stream");
                    self.settle(Outcome::Cut);
                    self.queue.push_back(StreamItem::Error(ApiError {
                        code: Some("upstream_event_too_large"),
                        ..ApiError::unavailable(
                            "The model's stream sent an event too large to read.",
                        )
                    }));
                }
            },
            Some(Err(error)) => {
                tracing::warn!(%error, "the stream broke off");
                self.settle(Outcome::Cut);
                self.queue.push_back(StreamItem::Error(ApiError {
                    code: Some("upstream_broke_off"),
                    ..ApiError::unavailable("The model's stream broke off.")
                }));
            }
            None => {
                if let Some(data) = self.reader.finish() {
                    self.on_data(data);
                }
                let outcome = if self.done || self.meter.usage.is_some() {
                    Outcome::Ok
                } else {
                    Outcome::Cut
                };
                self.settle(outcome);
            }
        }
    }
}

impl UpstreamStream {
    /// Billed: nothing more comes.
    fn finished(&self) -> bool {
        self.bill.is_none()
    }
}

impl Drop for UpstreamStream {
    fn drop(&mut self) {
        self.settle(Outcome::Cut);
    }
}

/// Passes an upstream's stream on chunk by chunk and bills it when it
/// ends, breaks off or is dropped.
pub fn upstream_stream(bytes: UpstreamBytes, include_usage: bool, bill: Bill) -> ChunkStream {
    let state = UpstreamStream {
        bytes,
        reader: SseReader::default(),
        meter: StreamMeter::default(),
        queue: VecDeque::new(),
        done: false,
        include_usage,
        bill: Some(bill),
        recorded: None,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(recorded) = state.recorded.take() {
                recorded.committed().await;
            }
            if let Some(item) = state.queue.pop_front() {
                return Some((item, state));
            }
            if state.finished() {
                return None;
            }
            let next = state.bytes.next().await;
            state.on_bytes(next);
        }
    }))
}
