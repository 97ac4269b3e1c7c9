//! From engine events to responses: collecting a whole answer, or streaming
//! it as server-sent events in OpenAI's chunk format (ending with
//! `data: [DONE]`). Chat and text completions differ only in their chunks.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;

use super::wire::Usage;
use crate::engine::{FinishReason, GenerationEvent, GenerationStream, Logprobs};
use crate::error::{ApiError, ApiResult};

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
    type Chunk: Serialize;
    /// Chunks sent before any token (e.g. the assistant role).
    fn opening(&mut self, n: usize) -> Vec<Self::Chunk>;
    /// A chunk for a token, or none when there is nothing to say.
    fn token(
        &mut self,
        choice: usize,
        text: String,
        logprobs: Option<Logprobs>,
    ) -> Option<Self::Chunk>;
    fn end(&mut self, choice: usize, finish_reason: FinishReason) -> Self::Chunk;
    fn usage(&mut self, usage: Usage) -> Self::Chunk;
}

struct StreamState<F: ChunkFormat> {
    format: F,
    stream: GenerationStream,
    queue: VecDeque<Event>,
    open_choices: usize,
    completion_tokens: usize,
    prompt_tokens: usize,
    include_usage: bool,
    finished: bool,
}

fn data<T: Serialize>(chunk: &T) -> Event {
    Event::default().data(serde_json::to_string(chunk).unwrap_or_default())
}

impl<F: ChunkFormat> StreamState<F> {
    fn finish_with_error(&mut self, error: ApiError) {
        self.queue.push_back(data(&error.to_json()));
        self.queue.push_back(Event::default().data("[DONE]"));
        self.finished = true;
    }

    fn on_event(&mut self, event: Option<GenerationEvent>) {
        match event {
            Some(GenerationEvent::Token {
                choice,
                text,
                logprobs,
            }) => {
                if let Some(chunk) = self.format.token(choice, text, logprobs) {
                    self.queue.push_back(data(&chunk));
                }
            }
            Some(GenerationEvent::End {
                choice,
                finish_reason,
                completion_tokens,
            }) => {
                self.queue
                    .push_back(data(&self.format.end(choice, finish_reason)));
                self.completion_tokens += completion_tokens;
                self.open_choices -= 1;
                if self.open_choices == 0 {
                    if self.include_usage {
                        let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
                        self.queue.push_back(data(&self.format.usage(usage)));
                    }
                    self.queue.push_back(Event::default().data("[DONE]"));
                    self.finished = true;
                }
            }
            Some(GenerationEvent::Error(message)) => {
                self.finish_with_error(ApiError::internal(message))
            }
            None => self.finish_with_error(ApiError::internal("generation ended without a result")),
        }
    }
}

/// Streams the answer as SSE. Dropping the response (client gone) drops the
/// generation stream, which cancels the request in the worker.
pub fn sse<F: ChunkFormat>(
    mut format: F,
    stream: GenerationStream,
    n: usize,
    prompt_tokens: usize,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let queue = format.opening(n).iter().map(data).collect();
    let state = StreamState {
        format,
        stream,
        queue,
        open_choices: n,
        completion_tokens: 0,
        prompt_tokens,
        include_usage,
        finished: false,
    };
    let events = futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.queue.pop_front() {
                return Some((Ok(event), state));
            }
            if state.finished {
                return None;
            }
            let event = state.stream.next().await;
            state.on_event(event);
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
