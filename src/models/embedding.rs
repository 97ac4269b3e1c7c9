//! Sentence embeddings: a BERT checkpoint (sentence-transformers layout:
//! config.json, model.safetensors, tokenizer.json, sentence_bert_config.json)
//! through candle's `bert`, mean-pooled over the real tokens and L2-normalised,
//! as sentence-transformers computes them.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;

/// Texts embedded in one forward pass.
const BATCH: usize = 32;

pub struct EmbeddingModel {
    pub id: String,
    model: BertModel,
    tokenizer: Tokenizer,
    /// Longest input in tokens, special tokens included (longer text is truncated).
    pub max_tokens: usize,
    pub dimensions: usize,
    cls: u32,
    sep: u32,
    device: Device,
}

impl EmbeddingModel {
    pub fn load(dir: &Path, id: &str, device: &Device) -> anyhow::Result<Self> {
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)
                .context("config.json is not a BERT config")?;
        let dimensions = config.hidden_size;
        let max_tokens = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .unwrap_or(512) as usize;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("reading tokenizer.json: {e}"))?;
        // The shipped tokenizer pads and truncates to a fixed 128; pooling
        // needs the real tokens, and sentence-transformers truncates at max_seq_length.
        tokenizer.with_padding(None);
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
        let vb = super::loader::checkpoint_vars(dir, DType::F32, device)?;
        let model = BertModel::load(vb, &config)?;
        Ok(Self {
            id: id.to_string(),
            model,
            tokenizer,
            max_tokens,
            dimensions,
            cls,
            sep,
            device: device.clone(),
        })
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

    /// Normalised embeddings of tokenized inputs, in batches of padded rows.
    pub fn embed(&self, inputs: &[Vec<u32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(inputs.len());
        for batch in inputs.chunks(BATCH) {
            let width = batch.iter().map(Vec::len).max().unwrap_or(0).max(1);
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
            let shape = (batch.len(), width);
            let ids = Tensor::from_vec(ids, shape, &self.device)?;
            let mask = Tensor::from_vec(mask, shape, &self.device)?;
            let hidden = self.model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
            // Mean over the real tokens, then unit length.
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
            let mean = summed.broadcast_div(&counts)?;
            let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            out.extend(mean.broadcast_div(&norms)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }
}
