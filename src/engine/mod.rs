//! The engine: a handle that async code uses to submit generation requests
//! to the worker thread that owns a model. Backpressure is a semaphore: a
//! request that finds no permit is refused at once (429), and the permit
//! travels with the response stream, so it is held exactly as long as the work.

pub mod constraint;
pub mod detokenize;
pub mod sampling;
pub mod step_model;
pub mod types;
mod worker;
#[cfg(test)]
mod worker_tests;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::models::LoadedModel;
pub use types::{
    FinishReason, GenerationEvent, GenerationRequest, Logprobs, Priority, SamplingParams,
    TokenLogprob,
};
use worker::{Job, Worker};

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Requests decoded together; more wait in the queue.
    pub max_running: usize,
    /// Requests accepted at once (queued + running); beyond it: 429.
    pub max_in_flight: usize,
    /// Prompt tokens fed per loop: a long prompt is prefilled over several
    /// loops while the other requests keep decoding.
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_running: 8,
            max_in_flight: 64,
            prefill_chunk: 512,
        }
    }
}

/// Live counters of one engine.
#[derive(Debug)]
pub struct EngineStats {
    /// Requests queued, not yet admitted by the worker.
    pub waiting: AtomicUsize,
    /// Requests being generated.
    pub running: AtomicUsize,
    /// Requests dropped because their client went away.
    pub cancelled: AtomicU64,
    /// The served model's id (the `model` label of the gauges).
    model: String,
    /// False once the worker thread has ended (normally only at shutdown;
    /// earlier means it panicked, and `/health` reports it).
    pub worker_alive: AtomicBool,
}

/// Marks the worker as gone when its thread ends, however it ends.
struct WorkerAlive(Arc<EngineStats>);

impl Drop for WorkerAlive {
    fn drop(&mut self) {
        self.0.worker_alive.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            tracing::error!(model = %self.0.model, "model worker panicked; the model no longer serves");
        }
    }
}

impl EngineStats {
    fn new(model: &str) -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            cancelled: AtomicU64::new(0),
            model: model.to_string(),
            worker_alive: AtomicBool::new(true),
        }
    }

    fn publish_gauges(&self) {
        let model = self.model.clone();
        metrics::gauge!("qpai_queue_depth", "model" => model.clone())
            .set(self.waiting.load(Ordering::SeqCst) as f64);
        metrics::gauge!("qpai_running_requests", "model" => model)
            .set(self.running.load(Ordering::SeqCst) as f64);
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("too many requests in flight")]
    Overloaded,
    #[error("the model worker has stopped")]
    Stopped,
    /// The request could never be admitted: the blocks it may need (prompt
    /// plus `n` times `max_tokens`) exceed the whole KV cache.
    #[error(
        "this request may need {needed_tokens} tokens of KV cache (the prompt plus n times max_tokens), more than this server's {capacity_tokens} (--kv-cache-mb); lower max_tokens or n"
    )]
    KvCacheTooSmall {
        needed_tokens: usize,
        capacity_tokens: usize,
    },
}

struct EngineInner {
    model: LoadedModel,
    grammars: constraint::GrammarCompiler,
    jobs: Mutex<SyncSender<Job>>,
    permits: Arc<Semaphore>,
    stats: Arc<EngineStats>,
}

/// A cheap-to-clone handle to one model's worker thread. The worker stops
/// when the last handle is dropped and its running requests are done.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

/// The events of one submitted request. Dropping it cancels the request.
pub struct GenerationStream {
    events: UnboundedReceiver<GenerationEvent>,
    _permit: OwnedSemaphorePermit,
}

impl GenerationStream {
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        self.events.recv().await
    }
}

impl Engine {
    pub fn start(model: LoadedModel, config: EngineConfig) -> std::io::Result<Self> {
        let config = EngineConfig {
            max_running: config.max_running.max(1),
            max_in_flight: config.max_in_flight.max(1),
            prefill_chunk: config.prefill_chunk.max(1),
        };
        let (sender, receiver) = sync_channel(config.max_in_flight);
        let stats = Arc::new(EngineStats::new(&model.id));
        let worker = Worker::new(Arc::new(model.clone()), config, stats.clone());
        std::thread::Builder::new()
            .name(format!("qpai-worker-{}", model.id))
            .spawn({
                let alive = WorkerAlive(stats.clone());
                move || {
                    let _alive = alive;
                    worker.run(receiver)
                }
            })?;
        Ok(Self {
            inner: Arc::new(EngineInner {
                grammars: constraint::GrammarCompiler::new(
                    model.tokenizer.clone(),
                    model.eos_token_ids.clone(),
                ),
                model,
                jobs: Mutex::new(sender),
                permits: Arc::new(Semaphore::new(config.max_in_flight)),
                stats,
            }),
        })
    }

    pub fn model(&self) -> &LoadedModel {
        &self.inner.model
    }

    /// Compiles output grammars for this model (cached by their source).
    pub fn grammars(&self) -> &constraint::GrammarCompiler {
        &self.inner.grammars
    }

    pub fn stats(&self) -> &EngineStats {
        &self.inner.stats
    }

    /// Queues a checked request. Fails at once when the engine is full.
    pub fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, SubmitError> {
        if let Some(budget) = self.inner.model.kv_budget() {
            let needed =
                budget.blocks_for(request.prompt_ids.len(), request.n, request.max_new_tokens);
            if needed > budget.total_blocks {
                return Err(SubmitError::KvCacheTooSmall {
                    needed_tokens: needed * budget.block_tokens,
                    capacity_tokens: budget.total_blocks * budget.block_tokens,
                });
            }
        }
        let permit = self
            .inner
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| SubmitError::Overloaded)?;
        let (events, receiver) = unbounded_channel();
        let job = Job {
            request,
            events,
            span: tracing::Span::current(),
            enqueued_at: Instant::now(),
        };
        self.inner.stats.waiting.fetch_add(1, Ordering::SeqCst);
        let sent = self
            .inner
            .jobs
            .lock()
            .map_err(|_| SubmitError::Stopped)?
            .try_send(job);
        if let Err(error) = sent {
            self.inner.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(match error {
                TrySendError::Full(_) => SubmitError::Overloaded,
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            });
        }
        self.inner.stats.publish_gauges();
        Ok(GenerationStream {
            events: receiver,
            _permit: permit,
        })
    }
}
