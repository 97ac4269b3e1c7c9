//! Dynamic batching of embedding work across callers, as TEI's queue does:
//! requests, RAG queries and ingest batches of one model wait in one queue,
//! and a worker thread takes everything waiting (up to a token budget) into
//! one pass of the encoder. Callers tokenize on their own threads while the
//! worker runs the model, and many small requests cost one pass instead of
//! one each.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Weak};

use tokio::sync::oneshot;

use super::embedding::EmbeddingModel;

/// Tokens the worker gathers into one pass (it always takes at least one job).
const PASS_TOKENS: usize = 16_384;

pub(super) struct Job {
    inputs: Vec<Vec<u32>>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

impl Job {
    fn tokens(&self) -> usize {
        self.inputs.iter().map(Vec::len).sum()
    }
}

/// Starts the worker of `model`; it ends when the model is dropped.
pub(super) fn start(model: &Arc<EmbeddingModel>) -> Sender<Job> {
    let (sender, receiver) = std::sync::mpsc::channel();
    let model = Arc::downgrade(model);
    let spawned = std::thread::Builder::new()
        .name("qpai-embed".to_string())
        .spawn(move || work(&model, &receiver));
    if let Err(error) = spawned {
        // Every job then fails with the closed channel's error.
        tracing::error!(%error, "cannot start the embedding worker");
    }
    sender
}

/// Queues `inputs` and waits for their vectors.
pub(super) async fn embed(
    sender: &Sender<Job>,
    inputs: Vec<Vec<u32>>,
) -> anyhow::Result<Vec<Vec<f32>>> {
    if inputs.is_empty() {
        return Ok(Vec::new());
    }
    let (reply, answer) = oneshot::channel();
    sender
        .send(Job { inputs, reply })
        .map_err(|_| anyhow::anyhow!("the embedding worker has stopped"))?;
    answer
        .await
        .map_err(|_| anyhow::anyhow!("the embedding worker dropped a job"))?
        .map_err(anyhow::Error::msg)
}

fn work(model: &Weak<EmbeddingModel>, jobs: &Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut tokens = first.tokens();
        let mut batch = vec![first];
        while tokens < PASS_TOKENS {
            match jobs.try_recv() {
                Ok(job) => {
                    tokens += job.tokens();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let Some(model) = model.upgrade() else {
            return;
        };
        run(&model, batch, tokens);
    }
}

fn run(model: &EmbeddingModel, batch: Vec<Job>, tokens: usize) {
    let started = std::time::Instant::now();
    let mut counts = Vec::with_capacity(batch.len());
    let mut inputs = Vec::new();
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        counts.push(job.inputs.len());
        inputs.extend(job.inputs);
        replies.push(job.reply);
    }
    let (requests, texts) = (replies.len(), inputs.len());
    let result = model.embed(&inputs);
    // Counted before any caller is answered, so a caller that reads the
    // count after its answer sees its own pass.
    model
        .queue_passes
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    match result {
        Ok(vectors) => {
            let mut vectors = vectors.into_iter();
            for (reply, count) in replies.into_iter().zip(counts) {
                // A caller that went away no longer wants its vectors.
                let _ = reply.send(Ok(vectors.by_ref().take(count).collect()));
            }
        }
        Err(error) => {
            let message = format!("{error:#}");
            for reply in replies {
                let _ = reply.send(Err(message.clone()));
            }
        }
    }
    metrics::counter!("qpai_embedding_passes_total", "model" => model.id.clone()).increment(1);
    metrics::histogram!("qpai_embedding_pass_requests", "model" => model.id.clone())
        .record(requests as f64);
    tracing::debug!(
        model = %model.id,
        requests,
        texts,
        tokens,
        ms = started.elapsed().as_millis() as u64,
        "embedding pass"
    );
}
