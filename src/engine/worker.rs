//! The worker thread: owns the model and every sequence's KV cache. Requests
//! arrive through a bounded channel; each loop admits new requests up to
//! `max_running`, feeds each prompt still being prefilled one chunk, then
//! advances every running choice by one token, so all requests in flight
//! make progress together. A request whose client has
//! gone is dropped before any more compute is spent on it.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::constraint::Constraint;
use super::detokenize::{IncrementalDecoder, StopCheck, StopMatcher};
use super::sampling::{Sampled, Sampler};
use super::step_model::StepModel;
use super::types::{
    FinishReason, GenerationEvent, GenerationRequest, Logprobs, Priority, TokenLogprob,
};
use super::{EngineConfig, EngineStats};
use crate::models::SequenceModel;
use crate::models::kv_cache::{KvBudget, KvReservation};

/// A choice's place in the running list: (request, choice).
type Place = (usize, usize);

/// What a sequence fed in a step belongs to.
#[derive(Clone, Copy)]
enum Feed {
    /// The prompt of a request still being prefilled.
    Prefill,
    /// A choice of a request being decoded.
    Choice(usize),
}
/// Next-token scores over the vocabulary.
type Logits = Vec<f32>;

/// A request on its way to the worker.
pub(crate) struct Job {
    pub request: GenerationRequest,
    pub events: UnboundedSender<GenerationEvent>,
    pub span: tracing::Span,
    pub enqueued_at: Instant,
}

struct Choice {
    index: usize,
    sequence: Box<dyn SequenceModel>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    /// The grammar this choice's output must match, fed each chosen token.
    constraint: Option<Constraint>,
    generated: usize,
    /// Tokens to feed in the next step: the sampled one, then any the
    /// grammar forced after it.
    next_input: Vec<u32>,
    finished: bool,
}

/// A request being run. Fields drop in order: the sequences give their KV
/// blocks back before the reservation ends and before the event stream
/// closes (a caller that sees its stream end finds the blocks free).
struct Running {
    /// The prompt's sequence while the prompt is fed chunk by chunk.
    prefill: Option<Box<dyn SequenceModel>>,
    choices: Vec<Choice>,
    /// KV blocks reserved for this request while it runs.
    _kv: Option<KvReservation>,
    job: Job,
    first_token_at: Instant,
    tokens_sent: usize,
}

impl Running {
    fn finished(&self) -> bool {
        self.prefill.is_none() && self.choices.iter().all(|c| c.finished)
    }

    fn stop(&mut self) {
        self.prefill = None;
        self.choices.iter_mut().for_each(|c| c.finished = true);
    }
}

/// Requests received and not yet admitted: live ones first; batch work
/// only into the slots not kept for live traffic (a quarter of
/// `max_running`, at least one when there are two or more).
#[derive(Default)]
struct Admission {
    live: VecDeque<Job>,
    batch: VecDeque<Job>,
}

impl Admission {
    fn push(&mut self, job: Job) {
        match job.request.priority {
            Priority::Live => self.live.push_back(job),
            Priority::Batch => self.batch.push_back(job),
        }
    }

    fn is_empty(&self) -> bool {
        self.live.is_empty() && self.batch.is_empty()
    }

    /// The next request to admit beside `running`, if any may be: a slot
    /// must be free, and `reserve` must get what it needs (the KV blocks it
    /// may come to hold); otherwise it waits, first in line.
    fn next<R>(
        &mut self,
        running: &[Running],
        max_running: usize,
        reserve: impl Fn(&Job) -> Option<R>,
    ) -> Option<(Job, R)> {
        if running.len() >= max_running {
            return None;
        }
        let queue = if self.live.is_empty() {
            let batch_running = running
                .iter()
                .filter(|r| r.job.request.priority == Priority::Batch)
                .count();
            if batch_running >= batch_slots(max_running) {
                return None;
            }
            &mut self.batch
        } else {
            &mut self.live
        };
        let reserved = reserve(queue.front()?)?;
        queue.pop_front().map(|job| (job, reserved))
    }
}

/// The KV blocks a request may come to hold.
fn kv_blocks_for(request: &GenerationRequest, budget: &KvBudget) -> usize {
    budget.blocks_for(request.prompt_ids.len(), request.n, request.max_new_tokens)
}

/// How many of `max_running` slots batch work may hold.
pub(crate) fn batch_slots(max_running: usize) -> usize {
    let kept = if max_running >= 2 {
        (max_running / 4).max(1)
    } else {
        0
    };
    max_running - kept
}

pub(crate) struct Worker {
    model: Arc<dyn StepModel>,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    /// The model's KV budget, when it has a paged cache.
    kv: Option<KvBudget>,
}

impl Worker {
    pub fn new(model: Arc<dyn StepModel>, config: EngineConfig, stats: Arc<EngineStats>) -> Self {
        Self {
            kv: model.kv_budget(),
            model,
            config,
            stats,
        }
    }

    pub fn run(self, jobs: Receiver<Job>) {
        let mut running: Vec<Running> = Vec::new();
        let mut queue = Admission::default();
        loop {
            if running.is_empty() && queue.is_empty() {
                match jobs.recv() {
                    Ok(job) => queue.push(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                queue.push(job);
            }
            // A bug in one step fails the requests in flight, not the model.
            let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| {
                while let Some((job, kv)) = queue.next(&running, self.config.max_running, |job| {
                    self.reserve_kv(job)
                }) {
                    self.admit(job, kv, &mut running);
                }
                self.step_all(&mut running);
            }));
            if stepped.is_err() {
                tracing::error!("engine step panicked; failing the requests in flight");
                for request in running.iter_mut() {
                    let _ = request
                        .job
                        .events
                        .send(GenerationEvent::Error("engine step panicked".into()));
                    request.stop();
                }
            }
            let before = running.len();
            running.retain(|r| !r.finished());
            for _ in running.len()..before {
                self.stats.running.fetch_sub(1, Ordering::SeqCst);
            }
            self.stats.publish_gauges();
            if let Some(usage) = self.model.kv_usage() {
                usage.publish(self.model.id());
            }
        }
    }

    /// Reserves the KV blocks `job` may come to hold: Some(None) for models
    /// without a paged cache, None while the blocks are not free.
    fn reserve_kv(&self, job: &Job) -> Option<Option<KvReservation>> {
        let Some(budget) = &self.kv else {
            return Some(None);
        };
        budget
            .try_reserve(kv_blocks_for(&job.request, budget))
            .map(Some)
    }

    /// Takes a new request in, starting it from the prefix cache when an
    /// earlier prompt began the same way; its prompt is fed by `step_all`.
    fn admit(&self, job: Job, kv: Option<KvReservation>, running: &mut Vec<Running>) {
        self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        if job.events.is_closed() {
            self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
            self.stats.publish_gauges();
            return;
        }
        let span = job.span.clone();
        let _enter = span.enter();
        metrics::histogram!("qpai_request_queue_duration_seconds", "model" => self.model.id().to_string())
            .record(job.enqueued_at.elapsed().as_secs_f64());
        metrics::counter!("qpai_prompt_tokens_total", "model" => self.model.id().to_string())
            .increment(job.request.prompt_ids.len() as u64);
        let request = match self.model.new_sequence(job.request.adapter.as_ref()) {
            Ok(mut sequence) => {
                let reused = sequence.reuse_prefix(&job.request.prompt_ids);
                if reused > 0 {
                    tracing::debug!(reused, "prompt prefix found in the KV cache");
                }
                Running {
                    prefill: Some(sequence),
                    choices: Vec::new(),
                    _kv: kv,
                    job,
                    first_token_at: Instant::now(),
                    tokens_sent: 0,
                }
            }
            Err(error) => {
                let _ = job.events.send(GenerationEvent::Error(error.to_string()));
                return;
            }
        };
        self.stats.running.fetch_add(1, Ordering::SeqCst);
        running.push(request);
        self.stats.publish_gauges();
    }

    /// After a chunk of a request's prompt was fed: once the whole prompt
    /// is in, samples the first token of each choice.
    fn after_prefill(&self, request: &mut Running, logits: Result<Logits, String>) {
        let _enter = request.job.span.clone().entered();
        let outcome = logits.and_then(|logits| {
            let prompt_len = request.job.request.prompt_ids.len();
            if request
                .prefill
                .as_ref()
                .is_none_or(|s| s.position() < prompt_len)
            {
                return Ok(());
            }
            if let Some(sequence) = request.prefill.take() {
                request.choices = self
                    .first_tokens(&request.job, sequence, logits)
                    .map_err(|e| e.to_string())?;
                request.first_token_at = Instant::now();
                request.tokens_sent = request.choices.len();
                metrics::histogram!("qpai_time_to_first_token_seconds", "model" => self.model.id().to_string())
                    .record((request.first_token_at - request.job.enqueued_at).as_secs_f64());
                if request.finished() {
                    self.record_done(request);
                }
            }
            Ok(())
        });
        if let Err(message) = outcome {
            tracing::error!(%message, "prefill failed");
            let _ = request.job.events.send(GenerationEvent::Error(message));
            request.stop();
        }
    }

    /// Forks the prefilled sequence into the request's `n` choices and
    /// samples each one's first token.
    fn first_tokens(
        &self,
        job: &Job,
        sequence: Box<dyn SequenceModel>,
        logits: Vec<f32>,
    ) -> candle_core::Result<Vec<Choice>> {
        let request = &job.request;
        let mut sequences: Vec<Box<dyn SequenceModel>> =
            (1..request.n).map(|_| sequence.fork()).collect();
        sequences.push(sequence);
        let mut choices = Vec::with_capacity(request.n);
        for (index, sequence) in sequences.into_iter().enumerate() {
            let mut choice = Choice {
                index,
                sequence,
                sampler: Sampler::new(request.sampling.clone(), index as u64),
                decoder: IncrementalDecoder::default(),
                stops: StopMatcher::new(request.stop.clone()),
                constraint: request.constraint.clone(),
                generated: 0,
                next_input: Vec::new(),
                finished: false,
            };
            let mut logits = logits.clone();
            sample(&mut choice, &mut logits, request)
                .and_then(|sampled| self.accept(&mut choice, sampled, job))
                .map_err(candle_core::Error::Msg)?;
            choices.push(choice);
        }
        Ok(choices)
    }

    /// One step of the model for every running request, in one forward
    /// pass where the model supports it: the next chunk of the prompts still
    /// being prefilled (`prefill_chunk` tokens in all, so a long prompt
    /// never stalls the decoding streams by more than one chunk), and the
    /// next token of every unfinished choice (or the tokens its grammar
    /// forced after it).
    fn step_all(&self, running: &mut [Running]) {
        for request in running.iter_mut() {
            if !request.finished() && request.job.events.is_closed() {
                tracing::debug!(parent: &request.job.span, "client gone; request dropped");
                self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
                request.stop();
            }
        }
        let mut feeds: Vec<(usize, Feed)> = Vec::new();
        let mut sequences: Vec<&mut Box<dyn SequenceModel>> = Vec::new();
        let mut inputs: Vec<&[u32]> = Vec::new();
        let mut budget = self.config.prefill_chunk;
        for (r, request) in running.iter_mut().enumerate() {
            let Running {
                job,
                prefill,
                choices,
                ..
            } = request;
            if let Some(sequence) = prefill.as_mut() {
                let prompt = &job.request.prompt_ids;
                let start = sequence.position().min(prompt.len());
                let end = (start + budget).min(prompt.len());
                if budget == 0 {
                    continue;
                }
                budget -= end - start;
                feeds.push((r, Feed::Prefill));
                inputs.push(&prompt[start..end]);
                sequences.push(sequence);
                continue;
            }
            for (c, choice) in choices.iter_mut().enumerate() {
                if choice.finished || choice.next_input.is_empty() {
                    continue;
                }
                feeds.push((r, Feed::Choice(c)));
                inputs.push(&choice.next_input);
                sequences.push(&mut choice.sequence);
            }
        }
        if feeds.is_empty() {
            return;
        }
        let outcomes = self.model.forward_batch(&mut sequences, &inputs);
        drop((sequences, inputs));
        // Each choice's logits, or why its step failed.
        let mut results: Vec<(Place, Result<Logits, String>)> = Vec::new();
        for ((r, feed), outcome) in feeds.into_iter().zip(outcomes) {
            let outcome = outcome.map_err(|e| e.to_string());
            match feed {
                Feed::Prefill => self.after_prefill(&mut running[r], outcome),
                Feed::Choice(c) => results.push(((r, c), outcome)),
            }
        }
        let mut stepped = Vec::with_capacity(results.len());
        for ((r, c), logits) in results {
            stepped.push(r);
            let request = &mut running[r];
            if request.choices[c].finished {
                // Another choice of this request failed in this step.
                continue;
            }
            let outcome = match logits {
                Ok(mut logits) => {
                    let Running {
                        job,
                        choices,
                        tokens_sent,
                        ..
                    } = &mut *request;
                    let _enter = job.span.enter();
                    let choice = &mut choices[c];
                    *tokens_sent += 1;
                    sample(choice, &mut logits, &job.request)
                        .and_then(|sampled| self.accept(choice, sampled, job))
                }
                Err(message) => Err(message),
            };
            if let Err(message) = outcome {
                tracing::error!(parent: &request.job.span, %message, "decode step failed");
                let _ = request.job.events.send(GenerationEvent::Error(message));
                request.stop();
            }
        }
        stepped.sort_unstable();
        stepped.dedup();
        for r in stepped {
            if running[r].finished() {
                self.record_done(&running[r]);
            }
        }
    }

    fn record_done(&self, request: &Running) {
        if request.tokens_sent > request.choices.len() {
            let decode_tokens = (request.tokens_sent - request.choices.len()) as f64;
            metrics::histogram!("qpai_time_per_output_token_seconds", "model" => self.model.id().to_string())
                .record(request.first_token_at.elapsed().as_secs_f64() / decode_tokens);
        }
    }

    /// Takes a sampled token, then the tokens the choice's grammar forces
    /// after it (no draw needed: they are fed to the model together in the
    /// next step). Forced tokens are skipped when logprobs are asked for,
    /// which they would not have.
    fn accept(&self, choice: &mut Choice, sampled: Sampled, job: &Job) -> Result<(), String> {
        choice.next_input.clear();
        let is_eos = self.is_eos(sampled.id, job);
        let logprobs = (!is_eos).then(|| self.logprobs(&sampled)).flatten();
        self.take_token(choice, sampled.id, logprobs, job)?;
        if choice.finished || job.request.top_logprobs.is_some() {
            return Ok(());
        }
        let forced = match choice.constraint.as_mut() {
            Some(constraint) => constraint.forced_tokens(),
            None => return Ok(()),
        };
        if !forced.is_empty() {
            metrics::counter!("qpai_grammar_forced_tokens_total").increment(forced.len() as u64);
        }
        for id in forced {
            if choice.finished {
                break;
            }
            self.take_token(choice, id, None, job)?;
        }
        Ok(())
    }

    /// Takes one token into a choice's output: feeds it to the grammar,
    /// emits its text, checks stop conditions (a complete grammar is one).
    fn take_token(
        &self,
        choice: &mut Choice,
        id: u32,
        logprobs: Option<Logprobs>,
        job: &Job,
    ) -> Result<(), String> {
        metrics::counter!("qpai_generation_tokens_total", "model" => self.model.id().to_string())
            .increment(1);
        choice.generated += 1;
        choice.next_input.push(id);
        let tokenizer = self.model.tokenizer();
        let is_eos = self.is_eos(id, job);
        let mut grammar_done = false;
        if let Some(constraint) = choice.constraint.as_mut()
            && !is_eos
        {
            constraint.commit(id)?;
            grammar_done = constraint.is_finished();
        }
        let mut finish = None;
        let mut text;
        if is_eos {
            text = choice.stops.flush();
            finish = Some(FinishReason::Stop);
        } else {
            let delta = choice.decoder.push(tokenizer, id).unwrap_or_default();
            match choice.stops.push(&delta) {
                StopCheck::Continue(t) => text = t,
                StopCheck::Stopped(t) => {
                    text = t;
                    finish = Some(FinishReason::Stop);
                }
            }
            let fed = choice.sequence.position() + choice.next_input.len();
            let context_full = fed >= self.model.context_length();
            if finish.is_none() && grammar_done {
                text.push_str(&choice.stops.flush());
                finish = Some(FinishReason::Stop);
            }
            if finish.is_none() && (choice.generated >= job.request.max_new_tokens || context_full)
            {
                text.push_str(&choice.stops.flush());
                finish = Some(FinishReason::Length);
            }
        }
        if !is_eos || !text.is_empty() {
            let _ = job.events.send(GenerationEvent::Token {
                choice: choice.index,
                text,
                logprobs,
            });
        }
        if let Some(finish_reason) = finish {
            choice.finished = true;
            let _ = job.events.send(GenerationEvent::End {
                choice: choice.index,
                finish_reason,
                completion_tokens: choice.generated,
            });
        }
        Ok(())
    }

    /// Whether `id` ends this request's generation.
    fn is_eos(&self, id: u32, job: &Job) -> bool {
        !job.request.ignore_eos && self.model.eos_token_ids().contains(&id)
    }

    fn logprobs(&self, sampled: &Sampled) -> Option<Logprobs> {
        let token = |id: u32, logprob: f32| TokenLogprob {
            id,
            text: self
                .model
                .tokenizer()
                .decode(&[id], false)
                .unwrap_or_default(),
            logprob,
        };
        Some(Logprobs {
            chosen: token(sampled.id, sampled.logprob?),
            top: sampled.top.iter().map(|&(id, lp)| token(id, lp)).collect(),
        })
    }
}

/// Draws `choice`'s next token under its request's biases and grammar.
fn sample(
    choice: &mut Choice,
    logits: &mut [f32],
    request: &GenerationRequest,
) -> Result<Sampled, String> {
    choice.sampler.sample_steered(
        logits,
        request.top_logprobs,
        &request.logit_bias,
        choice.constraint.as_mut(),
    )
}
