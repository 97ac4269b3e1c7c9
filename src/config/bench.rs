//! Flags of the benchmarks.

use std::path::PathBuf;

use clap::Args;

use super::{AdapterTarget, DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL};

#[derive(Debug, Clone, Args)]
pub struct BenchServeArgs {
    /// The API base URL (`http://HOST:PORT/v1`).
    #[arg(long)]
    pub url: String,
    /// The model to ask for.
    #[arg(long, default_value = super::DEFAULT_MODEL)]
    pub model: String,
    /// Bearer key to send.
    #[arg(long, env = "QPAI_BENCH_KEY")]
    pub key: Option<String>,
    /// Concurrency levels, each run in turn: streams kept in flight.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub concurrency: Vec<usize>,
    /// Requests per level (default: four per stream, at least 16).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Requests sent first, all at once, and not measured.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Mean prompt length in tokens (after the shared prefix).
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Prompt lengths are drawn uniformly from mean * (1 ± spread).
    #[arg(long, default_value_t = 0.25)]
    pub prompt_spread: f64,
    /// Mean output length in tokens (forced with `ignore_eos`).
    #[arg(long, default_value_t = 128)]
    pub output_tokens: usize,
    /// Output lengths are drawn uniformly from mean * (1 ± spread).
    #[arg(long, default_value_t = 0.25)]
    pub output_spread: f64,
    /// Tokens every prompt starts with (the same random ids for all): a
    /// shared system prompt or template, for the prefix cache.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_tokens: usize,
    /// Prompt token ids are drawn from [min, max) (below the special tokens
    /// at the start of most vocabularies, within the smallest vocabulary used).
    #[arg(long, default_value_t = 1000)]
    pub min_token_id: u32,
    #[arg(long, default_value_t = 20000)]
    pub max_token_id: u32,
    /// Once per level, a request with a prompt this long (and one output
    /// token) arrives mid-run and is not counted: how much it stalls the
    /// streams shows in their inter-token latency (0: none).
    #[arg(long, default_value_t = 0)]
    pub interrupt_prompt_tokens: usize,
    /// Seconds into each level when that long prompt arrives.
    #[arg(long, default_value_t = 2.0)]
    pub interrupt_after_s: f64,
    /// Seed of the prompt and length draws: same seed, same workload.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds a request may take.
    #[arg(long, default_value_t = 1800)]
    pub timeout_s: u64,
    /// Name of the server in the report (default: the URL).
    #[arg(long)]
    pub label: Option<String>,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Flags of `qpai logits`.
#[derive(Debug, Clone, Args)]
pub struct LogitsArgs {
    /// Model (catalog id, .gguf file or checkpoint directory).
    #[arg(long)]
    pub model: String,
    /// A JSON file: a list of `{"ids": [token ids], "adapter": "DIR"}`
    /// (`adapter` optional: a PEFT adapter run unmerged for that prompt).
    #[arg(long)]
    pub prompts: PathBuf,
    /// A PEFT adapter merged into the weights at load.
    #[arg(long)]
    pub merge: Option<PathBuf>,
    /// Weight type of safetensors checkpoints (f32, bf16, f16; default: the
    /// checkpoint's on accelerators, f32 on the CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Run llama-family models in candle tensor ops (the accelerator path)
    /// even on the CPU.
    #[arg(long)]
    pub tensor_ops: bool,
    /// Greedy tokens to generate after each prompt, all prompts decoded together.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Caps the context the model is loaded with (the KV slots' length).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Write the JSON here instead of standard output.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Model to measure (catalog id or path).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// CPU threads.
    #[arg(long, env = "QPAI_THREADS")]
    pub threads: Option<usize>,
    /// Also measure this many sequences decoded together (aggregate tokens/s).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchLoraArgs {
    #[command(flatten)]
    pub target: AdapterTarget,
    /// Different adapters decoded together in the last measurement (copies
    /// of --adapter with other scales: the same work as distinct adapters).
    #[arg(long, default_value_t = 4)]
    pub adapters_in_flight: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Tokens decoded per measurement.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Repetitions, interleaved across the modes (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// CPU threads.
    #[arg(long, env = "QPAI_THREADS")]
    pub threads: Option<usize>,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchStructuredArgs {
    /// Chat model (catalog id or path).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// A folder of {"name", "prompt", "strict", "schema"} JSON files.
    #[arg(long, default_value = "tests/fixtures/schemas")]
    pub schemas: PathBuf,
    /// Schemas used (the first ones by file name).
    #[arg(long, default_value_t = 8)]
    pub limit: usize,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 400)]
    pub max_tokens: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// CPU threads.
    #[arg(long, env = "QPAI_THREADS")]
    pub threads: Option<usize>,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchEmbeddingsArgs {
    /// Embedding model (catalog id or path).
    #[arg(long, default_value = DEFAULT_EMBEDDING_MODEL)]
    pub model: String,
    /// Texts to embed, one per line (default: built-in sample sentences).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Texts per call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Passes over the input (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// CPU threads.
    #[arg(long, env = "QPAI_THREADS")]
    pub threads: Option<usize>,
}
