//! `qpai bench`: prefill and decode speed of a model on this machine, from
//! the engine's own forward pass (no HTTP). `scripts/bench.py` runs it beside
//! llama.cpp on the same GGUF file and token ids.

pub mod logits;
pub mod serve;

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::catalog::Catalog;
use crate::catalog::fetch::ModelStore;
use crate::catalog::resolve::resolve;
use crate::config::{BenchArgs, GlobalArgs};
use crate::engine::sampling::argmax;
use crate::lora::UnmergedAdapter;
use crate::models::{LoadedModel, load_model};

/// A fixed English passage, repeated to the wanted prompt length.
const PASSAGE: &str = "Quantum-Page builds and runs websites for small businesses. Each site has pages about \
products, services, opening hours and answers to common questions. Writers ask for new descriptions, \
summaries and replies in the voice of the business, and the engine drafts them quickly and cheaply. ";

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub model: String,
    /// The quantized matmul kernels this CPU ran (`CpuLevel`).
    pub kernels: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub time_to_first_token_ms: f64,
    /// Sequences decoded together in the batched measurement (1: none).
    pub concurrency: usize,
    /// Decode tokens/s summed over the `concurrency` sequences.
    pub batched_decode_tokens_per_s: Option<f64>,
    /// Bytes of the model file: what one decode step reads (every matrix
    /// once; the tied embedding is the output matrix).
    pub weight_bytes: u64,
    /// Memory read bandwidth measured on this machine with the same threads
    /// (GB/s, best of several passes over 1 GiB).
    pub memory_bandwidth_gb_s: f64,
    /// Decode's share of the bandwidth bound: tokens/s x bytes per token
    /// over the bandwidth.
    pub decode_bandwidth_share: f64,
    pub prompt_ids: Vec<u32>,
}

pub fn prompt_ids(model: &LoadedModel, length: usize) -> anyhow::Result<Vec<u32>> {
    let text = PASSAGE.repeat(length / 40 + 2);
    let mut ids = model.encode_prompt(&text).map_err(anyhow::Error::msg)?;
    ids.truncate(length);
    Ok(ids)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn run(args: BenchArgs, global: &GlobalArgs) -> anyhow::Result<BenchResult> {
    let catalog = Catalog::load(global.catalog.as_deref())?;
    let store = ModelStore::new(global.models_dir());
    let mut resolved = resolve(&args.model, &catalog, &store)?;
    // A KV slot for each sequence decoded together (accelerators).
    resolved.options.kv_cache.sequences = resolved.options.kv_cache.sequences.max(args.concurrency);
    let model = load_model(&resolved.source, &resolved.options)?;
    let ids = prompt_ids(&model, args.prompt_tokens)?;
    anyhow::ensure!(
        ids.len() + args.decode_tokens < model.context_length,
        "prompt + decode tokens exceed the context length"
    );
    let (mut prefill, mut decode, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    // One warm-up run, then the measured ones.
    for run in 0..=args.runs.max(1) {
        let mut sequence = model.new_sequence()?;
        let started = Instant::now();
        let logits = sequence.forward(&ids)?;
        let mut next = argmax(&logits) as u32;
        let first = started.elapsed().as_secs_f64();
        let decode_started = Instant::now();
        for _ in 0..args.decode_tokens {
            let logits = sequence.forward(&[next])?;
            next = argmax(&logits) as u32;
        }
        let decode_s = decode_started.elapsed().as_secs_f64();
        if run > 0 {
            prefill.push(ids.len() as f64 / first);
            decode.push(args.decode_tokens as f64 / decode_s);
            ttft.push(first * 1000.0);
        }
    }
    let batched_decode_tokens_per_s = (args.concurrency > 1)
        .then(|| {
            batched_decode(
                &model,
                &ids,
                &vec![None; args.concurrency],
                args.decode_tokens,
            )
        })
        .transpose()?;
    let weight_bytes = match &resolved.source {
        crate::models::ModelSource::Gguf(path) => std::fs::metadata(path)?.len(),
        crate::models::ModelSource::SafetensorsDir(dir) => std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum(),
    };
    let memory_bandwidth_gb_s = memory_bandwidth() / 1e9;
    let decode_tokens_per_s = median(decode);
    let result = BenchResult {
        model: model.id.clone(),
        kernels: qpai_kernels(),
        threads: candle_core::utils::get_num_threads(),
        prompt_tokens: ids.len(),
        decode_tokens: args.decode_tokens,
        prefill_tokens_per_s: median(prefill),
        decode_tokens_per_s,
        time_to_first_token_ms: median(ttft),
        concurrency: args.concurrency,
        batched_decode_tokens_per_s,
        weight_bytes,
        memory_bandwidth_gb_s,
        decode_bandwidth_share: decode_tokens_per_s * weight_bytes as f64
            / (memory_bandwidth_gb_s * 1e9),
        prompt_ids: ids,
    };
    println!(
        "{}: prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({} tokens), TTFT {:.0} ms, {} threads, {} kernels",
        result.model,
        result.prefill_tokens_per_s,
        result.prompt_tokens,
        result.decode_tokens_per_s,
        result.decode_tokens,
        result.time_to_first_token_ms,
        result.threads,
        result.kernels
    );
    println!(
        "{}: decode reads {:.1} MB a token: {:.1} GB/s of the {:.1} GB/s measured ({:.0}% of the bandwidth bound)",
        result.model,
        result.weight_bytes as f64 / 1e6,
        result.decode_tokens_per_s * result.weight_bytes as f64 / 1e9,
        result.memory_bandwidth_gb_s,
        result.decode_bandwidth_share * 100.0
    );
    if let Some(rate) = result.batched_decode_tokens_per_s {
        println!(
            "{}: {} sequences decoded together: {:.1} tok/s in all ({:.1} per sequence)",
            result.model,
            args.concurrency,
            rate,
            rate / args.concurrency as f64
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(result)
}

/// Aggregate decode speed of sequences stepped together, as the engine
/// steps its running requests: sequence `i` runs with `adapters[i]`.
pub fn batched_decode(
    model: &LoadedModel,
    ids: &[u32],
    adapters: &[Option<Arc<UnmergedAdapter>>],
    steps: usize,
) -> anyhow::Result<f64> {
    let mut sequences = Vec::with_capacity(adapters.len());
    let mut tokens = Vec::with_capacity(adapters.len());
    for adapter in adapters {
        let mut sequence = model.new_sequence_with(adapter.as_ref())?;
        tokens.push(argmax(&sequence.forward(ids)?) as u32);
        sequences.push(sequence);
    }
    let started = Instant::now();
    for _ in 0..steps {
        let mut refs: Vec<_> = sequences.iter_mut().collect();
        let logits = model.decode_batch(&mut refs, &tokens)?;
        tokens = logits.iter().map(|l| argmax(l) as u32).collect();
    }
    Ok((adapters.len() * steps) as f64 / started.elapsed().as_secs_f64())
}

#[derive(Debug, Serialize)]
pub struct EmbeddingBenchResult {
    pub model: String,
    pub backend: &'static str,
    pub threads: usize,
    pub texts: usize,
    pub tokens: usize,
    pub batch: usize,
    pub seconds: f64,
    pub texts_per_s: f64,
}

/// `qpai bench-embeddings`: embeddings/s of an embedding model over the
/// given texts (tokenization excluded, as the peer benchmark does), best of
/// `runs` passes. Prints one JSON line.
pub fn embeddings(
    args: crate::config::BenchEmbeddingsArgs,
    global: &GlobalArgs,
) -> anyhow::Result<()> {
    let catalog = Catalog::load(global.catalog.as_deref())?;
    let store = ModelStore::new(global.models_dir());
    let model = crate::catalog::resolve::load_embedding_model(&args.model, &catalog, &store)?;
    let texts: Vec<String> = match &args.input {
        Some(path) => std::fs::read_to_string(path)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => PASSAGE
            .split(". ")
            .cycle()
            .take(512)
            .enumerate()
            .map(|(i, s)| format!("{s} (sample {i})"))
            .collect(),
    };
    anyhow::ensure!(!texts.is_empty(), "no texts to embed");
    let ids = texts
        .iter()
        .map(|t| model.tokenize(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let batch = args.batch.max(1);
    // One warm-up pass, then the best of `runs`.
    model.embed(&ids[..batch.min(ids.len())])?;
    let mut best = f64::INFINITY;
    for _ in 0..args.runs.max(1) {
        let started = Instant::now();
        for group in ids.chunks(batch) {
            model.embed(group)?;
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    let result = EmbeddingBenchResult {
        model: model.id.clone(),
        backend: model.backend(),
        threads: rayon::current_num_threads(),
        texts: texts.len(),
        tokens: ids.iter().map(Vec::len).sum(),
        batch,
        seconds: best,
        texts_per_s: texts.len() as f64 / best,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

fn qpai_kernels() -> String {
    crate::models::quant_matmul::CpuLevel::current()
        .name()
        .to_string()
}

/// Read bandwidth in bytes/s: the best of five parallel passes summing a
/// 1 GiB buffer (far beyond any cache) on the kernel threads.
fn memory_bandwidth() -> f64 {
    use rayon::prelude::*;
    let buffer: Vec<u64> = (0..(1usize << 27)).map(|i| i as u64).collect();
    let bytes = (buffer.len() * 8) as f64;
    let mut best = f64::INFINITY;
    let mut total = 0u64;
    for _ in 0..5 {
        let started = Instant::now();
        total = total.wrapping_add(
            buffer
                .par_chunks(1 << 16)
                .map(|chunk| chunk.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
                .reduce(|| 0, u64::wrapping_add),
        );
        best = best.min(started.elapsed().as_secs_f64());
    }
    std::hint::black_box(total);
    bytes / best
}
