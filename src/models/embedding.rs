//! Sentence embeddings, mean-pooled over the real tokens and L2-normalised as
//! sentence-transformers computes them, from one of three backends:
//! - on the CPU, qpai's packed BERT encoder (`super::bert`) on a checkpoint
//!   directory (sentence-transformers layout: config.json, model.safetensors,
//!   tokenizer.json, sentence_bert_config.json);
//! - on other devices, candle's `bert` on the same checkpoint;
//! - ONNX Runtime (feature `onnx`) on a directory holding `model.onnx`, its
//!   `tokenizer.json` and the `libonnxruntime` shared library it is run with.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;

/// Texts embedded in one padded forward pass (candle and ONNX Runtime).
const BATCH: usize = 32;

enum Backend {
    Packed(super::bert::BertEncoder),
    Candle {
        model: Box<BertModel>,
        device: Device,
    },
    #[cfg(feature = "onnx")]
    Onnx(super::onnx::OnnxEncoder),
}

pub struct EmbeddingModel {
    pub id: String,
    backend: Backend,
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation, for counting tokens.
    counting: Tokenizer,
    /// Longest input in tokens, special tokens included (longer text is truncated).
    pub max_tokens: usize,
    pub dimensions: usize,
    cls: u32,
    sep: u32,
    /// The worker that batches callers' work (`embed_queued`), started on first use.
    queue: OnceLock<std::sync::mpsc::Sender<super::embedding_queue::Job>>,
    /// Passes the queue's worker has run.
    pub(super) queue_passes: std::sync::atomic::AtomicU64,
}

impl EmbeddingModel {
    /// Loads a directory: ONNX when it holds `model.onnx`, else a BERT checkpoint.
    pub fn load(dir: &Path, id: &str, device: &Device) -> anyhow::Result<Self> {
        if dir.join("model.onnx").is_file() {
            return Self::load_onnx(dir, id);
        }
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)
                .context("config.json is not a BERT config")?;
        let dimensions = config.hidden_size;
        if device.is_cpu() {
            let encoder = super::bert::BertEncoder::load(dir, &config)?;
            return Self::with_tokenizer(dir, id, Backend::Packed(encoder), dimensions);
        }
        let vb = super::checkpoint::checkpoint_vars(dir, DType::F32, device, None)?;
        let model = BertModel::load(vb, &config)?;
        let backend = Backend::Candle {
            model: Box::new(model),
            device: device.clone(),
        };
        Self::with_tokenizer(dir, id, backend, dimensions)
    }

    #[cfg(feature = "onnx")]
    fn load_onnx(dir: &Path, id: &str) -> anyhow::Result<Self> {
        let encoder = super::onnx::OnnxEncoder::load(dir)?;
        let dimensions = encoder.dimensions;
        Self::with_tokenizer(dir, id, Backend::Onnx(encoder), dimensions)
    }

    #[cfg(not(feature = "onnx"))]
    fn load_onnx(dir: &Path, _id: &str) -> anyhow::Result<Self> {
        anyhow::bail!(
            "{} is an ONNX model; this qpai was built without the `onnx` feature",
            dir.display()
        )
    }

    fn with_tokenizer(
        dir: &Path,
        id: &str,
        backend: Backend,
        dimensions: usize,
    ) -> anyhow::Result<Self> {
        let max_tokens = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .unwrap_or(256) as usize;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("reading tokenizer.json: {e}"))?;
        // The shipped tokenizer pads and truncates to a fixed 128; pooling
        // needs the real tokens, and sentence-transformers truncates at max_seq_length.
        tokenizer.with_padding(None);
        let mut counting = tokenizer.clone();
        counting
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let token = |t: &str| {
            tokenizer
                .token_to_id(t)
                .with_context(|| format!("tokenizer lacks {t}"))
        };
        let (cls, sep) = (token("[CLS]")?, token("[SEP]")?);
        Ok(Self {
            id: id.to_string(),
            backend,
            tokenizer,
            counting,
            max_tokens,
            dimensions,
            cls,
            sep,
            queue: OnceLock::new(),
            queue_passes: Default::default(),
        })
    }

    /// Which backend computes the vectors: "packed" (qpai's CPU encoder),
    /// "candle" or "onnx".
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Packed(_) => "packed",
            Backend::Candle { .. } => "candle",
            #[cfg(feature = "onnx")]
            Backend::Onnx(_) => "onnx",
        }
    }

    /// The tokenizer's pieces for `text` without special tokens, with their
    /// byte offsets (for chunking by tokens).
    pub fn token_offsets(&self, text: &str) -> anyhow::Result<Vec<(usize, usize)>> {
        Ok(self
            .counting
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .get_offsets()
            .to_vec())
    }

    /// Token ids of a text, with [CLS] and [SEP], truncated to `max_tokens`.
    pub fn tokenize(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .get_ids()
            .to_vec())
    }

    /// Wraps bare token ids (as clients send them) in [CLS] ... [SEP].
    pub fn wrap_ids(&self, ids: &[u32]) -> Vec<u32> {
        let mut wrapped = Vec::with_capacity(ids.len() + 2);
        wrapped.push(self.cls);
        wrapped.extend_from_slice(ids);
        wrapped.push(self.sep);
        wrapped
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// `embed` through the model's queue: the pass may carry other callers'
    /// inputs too (dynamic batching); the caller's thread is free meanwhile.
    pub async fn embed_queued(
        self: &Arc<Self>,
        inputs: Vec<Vec<u32>>,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let sender = self
            .queue
            .get_or_init(|| super::embedding_queue::start(self));
        super::embedding_queue::embed(sender, inputs).await
    }

    /// Passes `embed_queued` has run (each may have served several callers).
    pub fn queue_passes(&self) -> u64 {
        self.queue_passes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Normalised embeddings of tokenized inputs, in their order: packed
    /// passes on the CPU encoder, else batches of padded rows.
    pub fn embed(&self, inputs: &[Vec<u32>]) -> anyhow::Result<Vec<Vec<f32>>> {
        match &self.backend {
            Backend::Packed(encoder) => encoder.embed(inputs),
            Backend::Candle { model, device } => self.embed_padded(inputs, |ids, mask, shape| {
                let ids = Tensor::from_vec(ids, shape, device)?;
                let mask = Tensor::from_vec(mask.to_vec(), shape, device)?;
                let hidden = model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
                Ok(hidden.flatten_all()?.to_vec1::<f32>()?)
            }),
            #[cfg(feature = "onnx")]
            Backend::Onnx(encoder) => self.embed_padded(inputs, |ids, mask, (rows, width)| {
                encoder.forward(&ids, mask, rows, width)
            }),
        }
    }

    /// Batches of `BATCH` padded rows through `forward` (ids, mask, (rows,
    /// width) → hidden states). Texts of similar length waste the least
    /// padding: they are sorted by length, then put back in the callers' order.
    fn embed_padded(
        &self,
        inputs: &[Vec<u32>],
        forward: impl Fn(Vec<u32>, &[u32], (usize, usize)) -> anyhow::Result<Vec<f32>>,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| inputs[i].len());
        let sorted: Vec<&Vec<u32>> = order.iter().map(|&i| &inputs[i]).collect();
        let mut vectors = Vec::with_capacity(inputs.len());
        for batch in sorted.chunks(BATCH) {
            let width = batch.iter().map(|row| row.len()).max().unwrap_or(0).max(1);
            let mut ids = Vec::with_capacity(batch.len() * width);
            let mut mask = Vec::with_capacity(batch.len() * width);
            for row in batch {
                ids.extend(
                    row.iter()
                        .copied()
                        .chain(std::iter::repeat_n(0, width - row.len())),
                );
                mask.extend((0..width).map(|i| u32::from(i < row.len())));
            }
            let hidden = forward(ids, &mask, (batch.len(), width))?;
            vectors.extend(
                hidden
                    .chunks(width * self.dimensions)
                    .zip(mask.chunks(width))
                    .map(|(states, mask)| {
                        let real = states
                            .chunks(self.dimensions)
                            .zip(mask)
                            .filter(|(_, m)| **m != 0)
                            .map(|(state, _)| state);
                        mean_unit(real, self.dimensions)
                    }),
            );
        }
        let mut out = vec![Vec::new(); inputs.len()];
        for (vector, index) in vectors.into_iter().zip(order) {
            out[index] = vector;
        }
        Ok(out)
    }
}

/// The mean of token states, scaled to unit length: sentence-transformers'
/// mean pooling and normalisation.
pub(super) fn mean_unit<'a>(states: impl Iterator<Item = &'a [f32]>, dims: usize) -> Vec<f32> {
    let mut sum = vec![0f32; dims];
    let mut count = 0f32;
    for state in states {
        count += 1.0;
        sum.iter_mut().zip(state).for_each(|(s, x)| *s += x);
    }
    let count = count.max(1e-9);
    sum.iter_mut().for_each(|s| *s /= count);
    let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    sum.iter_mut().for_each(|s| *s /= norm);
    sum
}
