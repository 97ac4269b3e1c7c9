//! Command line and configuration. Every flag has an environment variable;
//! `qpai serve --config FILE` reads a TOML file whose keys are the serve flags
//! (snake_case). Precedence: flag or env > file > default.

use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Parser, Subcommand};
use serde::Deserialize;

use crate::models::kv_cache::{KvCacheConfig, KvDType};
use crate::telemetry::LogFormat;

mod bench;
mod jobs;
mod rag;
mod router;

pub use bench::{
    BenchArgs, BenchEmbeddingsArgs, BenchLoraArgs, BenchServeArgs, BenchStructuredArgs, LogitsArgs,
};

pub use jobs::{
    BatchCommand, BatchRunArgs, BatchTenant, CalibrationMetric, EvalCalibrateArgs, EvalRunArgs,
    PromptsCommand, PromptsDir,
};
pub use rag::{BenchSearchArgs, EmbeddingArgs, FetchArgs, IngestArgs, SearchArgs, SitesCommand};
pub use router::{BenchRouterArgs, BenchUpstreamArgs, KeyCreateArgs, KeysCommand, UsageArgs};

pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";
pub const DEFAULT_EMBEDDING_MODEL: &str = "all-minilm-l6-v2";

#[derive(Debug, Parser)]
#[command(
    name = "qpai",
    version,
    about = "qpai: local LLM inference behind an OpenAI-compatible API"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Directory for everything qpai writes (models cache, databases).
    /// Default: $XDG_DATA_HOME/qpai or ~/.local/share/qpai.
    #[arg(long, env = "QPAI_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Models cache. Default: <data-dir>/models.
    #[arg(long, env = "QPAI_MODELS_DIR", global = true)]
    pub models_dir: Option<PathBuf>,
    /// LanceDB database of the sites (a directory or any LanceDB URI, e.g.
    /// s3://bucket/path). Default: <data-dir>/rag.
    #[arg(long, env = "QPAI_RAG_URI", global = true)]
    pub rag_uri: Option<String>,
    /// The database of keys, tenants and the usage ledger: `postgres://...`
    /// or `sqlite://PATH`. Default: SQLite at <data-dir>/qpai.db.
    #[arg(long, env = "QPAI_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Model catalog (TOML). Default: the catalog built into qpai (models/models.toml).
    #[arg(long, env = "QPAI_CATALOG", global = true)]
    pub catalog: Option<PathBuf>,
    /// Log format.
    #[arg(
        long,
        env = "QPAI_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Where models run: `cpu`, `cuda` or `cuda:N` (a build with the `cuda`
    /// feature). Default: CUDA device 0 when there is one, else the CPU.
    #[arg(long, env = "QPAI_DEVICE", global = true)]
    pub device: Option<String>,
}

impl GlobalArgs {
    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("qpai")
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| crate::ledger::Ledger::default_url(&self.data_dir()))
    }

    pub fn rag_uri(&self) -> String {
        self.rag_uri
            .clone()
            .unwrap_or_else(|| self.data_dir().join("rag").display().to_string())
    }

    pub fn models_dir(&self) -> PathBuf {
        self.models_dir
            .clone()
            .unwrap_or_else(|| self.data_dir().join("models"))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the OpenAI-compatible server.
    Serve(ServeArgs),
    /// Inspect and fetch catalog models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Measure prefill and decode speed of a model.
    Bench(BenchArgs),
    /// Measure embeddings/s of an embedding model.
    BenchEmbeddings(BenchEmbeddingsArgs),
    /// Print a model's next-token logits for token-id prompts run as one
    /// batch, and their greedy continuations (checks a device against
    /// reference logits).
    Logits(LogitsArgs),
    /// Measure decode speed with LoRA adapters: none, merged, unmerged, several at once.
    BenchLora(BenchLoraArgs),
    /// Measure search latency on a site grown to a large table.
    BenchSearch(BenchSearchArgs),
    /// Measure decode speed with a JSON schema enforced against none.
    BenchStructured(BenchStructuredArgs),
    /// Read a site's pages from a source into its search table.
    Ingest(IngestArgs),
    /// Search a site.
    Search(SearchArgs),
    /// Evaluate prompts, models, adapters and search (suites).
    Eval {
        #[command(subcommand)]
        command: EvalCommand,
    },
    /// Manage sites (their search tables).
    Sites {
        #[command(subcommand)]
        command: SitesCommand,
    },
    /// Manage API keys and tenants (budgets, rate limits).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Show usage and cost from the ledger.
    Usage(UsageArgs),
    /// An OpenAI-compatible chat endpoint that answers at once (for router benchmarks).
    BenchUpstream(BenchUpstreamArgs),
    /// Load a chat endpoint with many connections: requests/s and latency percentiles.
    BenchRouter(BenchRouterArgs),
    /// Load an OpenAI-compatible server with streamed completions at several
    /// concurrency levels: TTFT, TPOT, latency percentiles, tokens/s.
    BenchServe(BenchServeArgs),
    /// Versioned prompts: list, show, render, diff.
    Prompts {
        #[command(subcommand)]
        command: PromptsCommand,
    },
    /// Bulk jobs: a prompt over a table of rows, durable and resumable.
    Batch {
        #[command(subcommand)]
        command: BatchCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Runs a suite: its dataset through its variants, every answer
    /// checked by its assertions; writes JSONL, JSON, Markdown and HTML.
    Run(Box<EvalRunArgs>),
    /// Writes the quality that eval runs measured per route into the
    /// routing catalog, for `auto` with `x-qpai-task`.
    Calibrate(EvalCalibrateArgs),
}

/// A base model and a LoRA adapter on it.
#[derive(Debug, Clone, Args)]
pub struct AdapterTarget {
    /// Base model (catalog id or path).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// The adapter: a catalog adapter id or a PEFT directory.
    #[arg(long, default_value = "house-style")]
    pub adapter: String,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List the catalog and what is in the local cache.
    List,
    /// Fetch models into the cache (verifies sha256; safe to run concurrently).
    Pull {
        /// Catalog ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Show one catalog entry and its local state.
    Show { id: String },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML file with serve settings (keys as the flags, in snake_case).
    #[arg(long, env = "QPAI_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "QPAI_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, env = "QPAI_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Models to serve: catalog ids, paths (.gguf file or checkpoint dir) or
    /// hub repos (owner/name). Repeat or separate with commas; "" serves
    /// none (routes only).
    #[arg(long = "model", env = "QPAI_MODEL", value_delimiter = ',', default_value = DEFAULT_MODEL)]
    pub models: Vec<String>,
    /// Embedding model served at /v1/embeddings, loaded (and pulled) on first
    /// use; an empty value serves none.
    #[arg(long, env = "QPAI_EMBEDDING_MODEL", default_value = DEFAULT_EMBEDDING_MODEL)]
    pub embedding_model: String,
    /// Requests decoded together per model; more wait in the queue.
    #[arg(long, env = "QPAI_MAX_RUNNING", default_value_t = 8)]
    pub max_running: usize,
    /// Requests accepted per model at once (queued + running); beyond: 429.
    #[arg(long, env = "QPAI_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,
    /// Prompt tokens prefilled per engine step; longer prompts are fed over
    /// several steps while other requests keep decoding.
    #[arg(long, env = "QPAI_PREFILL_CHUNK", default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Memory for each model's KV cache, in MiB (decoders on the CPU). Requests are admitted only while the blocks they may need
    /// (prompt plus n times max_tokens) are free; the rest wait in the
    /// queue. Default: room for --max-running sequences at the full context.
    #[arg(long, env = "QPAI_KV_CACHE_MB")]
    pub kv_cache_mb: Option<usize>,
    /// How keys and values are stored: f32, f16 (half the memory) or q8_0
    /// (about a quarter), see docs/perf.md for each one's logit error.
    #[arg(long, env = "QPAI_KV_CACHE_DTYPE", default_value = "f32")]
    pub kv_cache_dtype: KvDType,
    /// Don't reuse the KV blocks of earlier prompts (the prefix cache).
    #[arg(long, env = "QPAI_NO_PREFIX_CACHE")]
    pub no_prefix_cache: bool,
    /// Largest request body in bytes; beyond: 413.
    #[arg(long, env = "QPAI_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Where the sitemaps clients name (and their pages) may be fetched from.
    #[command(flatten)]
    pub fetch: FetchArgs,
    /// On SIGTERM, seconds the requests in flight (streams included) get to
    /// finish while new ones are refused with 503; then the server stops.
    #[arg(long, env = "QPAI_SHUTDOWN_GRACE_S", default_value_t = 30.0)]
    pub shutdown_grace_s: f64,
    /// Cap on the context length a model is served with.
    #[arg(long, env = "QPAI_MAX_CONTEXT")]
    pub max_context: Option<usize>,
    /// CPU threads for the model kernels (default: all cores).
    #[arg(long, env = "QPAI_THREADS")]
    pub threads: Option<usize>,
    /// LoRA adapters to serve, as `[BASE:]NAME=PATH` (a PEFT directory; BASE
    /// defaults to the first --model). Served per request as `BASE:NAME` and
    /// `NAME`, or merged into a copy of the base with --merge.
    #[arg(long = "lora", env = "QPAI_LORA", value_delimiter = ',')]
    pub loras: Vec<String>,
    /// Merge the --lora adapters into their base at load (one model per
    /// adapter, no per-token cost) instead of applying them per request.
    #[arg(long, env = "QPAI_MERGE")]
    pub merge: bool,
    /// Directories of PEFT adapters: an adapter there is served by its
    /// directory name on first use, and the admin API loads only from them
    /// (default: <data-dir>/adapters).
    #[arg(long = "adapter-dir", env = "QPAI_ADAPTER_DIR", value_delimiter = ',')]
    pub adapter_dirs: Vec<PathBuf>,
    /// Adapters resident in memory at once; past it the least recently used
    /// idle one is dropped (and reloaded when asked for again).
    #[arg(long, env = "QPAI_MAX_ADAPTERS", default_value_t = 16)]
    pub max_adapters: usize,
    /// Memory for resident adapters, in MiB (same eviction).
    #[arg(long, env = "QPAI_MAX_ADAPTER_MEMORY_MB", default_value_t = 1024)]
    pub max_adapter_memory_mb: usize,
    /// Routing catalog (TOML): remote deployments (OpenAI, Azure OpenAI,
    /// OpenAI-compatible), local ones with their price, logical models.
    #[arg(long, env = "QPAI_ROUTER_CONFIG")]
    pub router_config: Option<PathBuf>,
    /// Upstream connect timeout, milliseconds.
    #[arg(long, env = "QPAI_UPSTREAM_CONNECT_TIMEOUT_MS", default_value_t = 5000)]
    pub upstream_connect_timeout_ms: u64,
    /// Upstream time to first byte (a stream's first chunk), milliseconds.
    #[arg(
        long,
        env = "QPAI_UPSTREAM_FIRST_BYTE_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub upstream_first_byte_timeout_ms: u64,
    /// Upstream time for a whole answer, seconds.
    #[arg(long, env = "QPAI_UPSTREAM_TIMEOUT_S", default_value_t = 600)]
    pub upstream_timeout_s: u64,
    /// Retries on one deployment before falling back to the next.
    #[arg(long, env = "QPAI_ROUTER_RETRIES", default_value_t = 1)]
    pub router_retries: u32,
    /// Failures in a row that open a deployment's circuit.
    #[arg(long, env = "QPAI_BREAKER_THRESHOLD", default_value_t = 5)]
    pub breaker_threshold: u32,
    /// Seconds an open circuit waits before a probe.
    #[arg(long, env = "QPAI_BREAKER_COOLDOWN_S", default_value_t = 30.0)]
    pub breaker_cooldown_s: f64,
    /// Batch lines this process runs at once (0: it runs no batch lines,
    /// but still serves /v1/batches).
    #[arg(long, env = "QPAI_BATCH_CONCURRENCY", default_value_t = 8)]
    pub batch_concurrency: usize,
    /// Seconds a claimed batch line stays claimed without renewal: how long
    /// the lines of a process that died wait before another takes them.
    #[arg(long, env = "QPAI_BATCH_LEASE_S", default_value_t = 60)]
    pub batch_lease_s: u64,
    /// More versioned prompts (`NAME.vN.j2`), beside the built-in ones
    /// (default: <data-dir>/prompts).
    #[arg(long, env = "QPAI_PROMPTS_DIR")]
    pub prompts_dir: Option<PathBuf>,
}

/// `[BASE:]NAME=PATH` of --lora.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraArg {
    pub base: Option<String>,
    pub name: String,
    pub path: PathBuf,
}

impl std::str::FromStr for LoraArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (target, path) = text
            .split_once('=')
            .filter(|(t, p)| !t.is_empty() && !p.is_empty())
            .ok_or_else(|| format!("--lora {text:?}: expected [BASE:]NAME=PATH"))?;
        let (base, name) = match target.rsplit_once(':') {
            Some((base, name)) => (Some(base.to_string()), name.to_string()),
            None => (None, target.to_string()),
        };
        crate::lora::check_name(&name).map_err(|e| format!("--lora {text:?}: {e}"))?;
        Ok(Self {
            base,
            name,
            path: PathBuf::from(path),
        })
    }
}

/// The serve settings a `--config` file may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub models: Option<Vec<String>>,
    pub embedding_model: Option<String>,
    pub max_running: Option<usize>,
    pub max_in_flight: Option<usize>,
    pub prefill_chunk: Option<usize>,
    pub kv_cache_mb: Option<usize>,
    pub kv_cache_dtype: Option<KvDType>,
    pub no_prefix_cache: Option<bool>,
    pub max_body_bytes: Option<usize>,
    pub max_context: Option<usize>,
    pub threads: Option<usize>,
    pub loras: Option<Vec<String>>,
    pub merge: Option<bool>,
    pub adapter_dirs: Option<Vec<PathBuf>>,
    pub max_adapters: Option<usize>,
    pub max_adapter_memory_mb: Option<usize>,
    pub router_config: Option<PathBuf>,
    pub batch_concurrency: Option<usize>,
    pub batch_lease_s: Option<u64>,
    pub prompts_dir: Option<PathBuf>,
}

fn is_default(matches: &ArgMatches, id: &str) -> bool {
    !matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

impl ServeArgs {
    /// The KV cache budget of each served model.
    pub fn kv_cache(&self) -> KvCacheConfig {
        KvCacheConfig {
            megabytes: self.kv_cache_mb,
            dtype: self.kv_cache_dtype,
            sequences: self.max_running.max(1),
            prefix_cache: !self.no_prefix_cache,
        }
    }

    /// Fills in values from the `--config` file where neither a flag nor an
    /// environment variable gave one.
    pub fn apply_file(&mut self, matches: &ArgMatches) -> anyhow::Result<()> {
        let Some(path) = &self.config else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        let file: ServeFile =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        macro_rules! layer {
            ($field:ident, $id:literal) => {
                if let Some(value) = file.$field
                    && is_default(matches, $id)
                {
                    self.$field = value.into();
                }
            };
        }
        layer!(host, "host");
        layer!(port, "port");
        layer!(models, "models");
        layer!(embedding_model, "embedding_model");
        layer!(max_running, "max_running");
        layer!(max_in_flight, "max_in_flight");
        layer!(prefill_chunk, "prefill_chunk");
        layer!(kv_cache_mb, "kv_cache_mb");
        layer!(kv_cache_dtype, "kv_cache_dtype");
        layer!(no_prefix_cache, "no_prefix_cache");
        layer!(max_body_bytes, "max_body_bytes");
        layer!(max_context, "max_context");
        layer!(threads, "threads");
        layer!(loras, "loras");
        layer!(merge, "merge");
        layer!(adapter_dirs, "adapter_dirs");
        layer!(max_adapters, "max_adapters");
        layer!(max_adapter_memory_mb, "max_adapter_memory_mb");
        layer!(batch_concurrency, "batch_concurrency");
        layer!(batch_lease_s, "batch_lease_s");
        if let Some(path) = file.router_config
            && is_default(matches, "router_config")
        {
            self.router_config = Some(path);
        }
        if let Some(path) = file.prompts_dir
            && is_default(matches, "prompts_dir")
        {
            self.prompts_dir = Some(path);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;

    fn parse(args: &[&str]) -> (ServeArgs, ArgMatches) {
        let matches = Cli::command().try_get_matches_from(args).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        let Command::Serve(serve) = cli.command else {
            panic!("not serve")
        };
        let sub = matches.subcommand_matches("serve").unwrap().clone();
        (serve, sub)
    }

    #[test]
    fn defaults_parse_and_work() {
        let (serve, _) = parse(&["qpai", "serve"]);
        assert_eq!(serve.host, "127.0.0.1");
        assert_eq!(serve.port, 8080);
        assert_eq!(serve.models, vec![DEFAULT_MODEL.to_string()]);
        assert!(serve.max_running >= 1 && serve.max_in_flight >= serve.max_running);
        assert!(serve.loras.is_empty() && !serve.merge);
    }

    #[test]
    fn lora_arguments_name_base_adapter_and_path() {
        let arg: LoraArg = "house=/a/b".parse().unwrap();
        assert_eq!((arg.base, arg.name.as_str()), (None, "house"));
        let arg: LoraArg = "smollm2:house=rel/dir".parse().unwrap();
        assert_eq!(arg.base.as_deref(), Some("smollm2"));
        assert_eq!(arg.path, PathBuf::from("rel/dir"));
        for bad in ["house", "=x", "a/b=x", "house="] {
            assert!(bad.parse::<LoraArg>().is_err(), "{bad}");
        }
    }

    #[test]
    fn file_fills_defaults_but_flags_win() {
        let dir = std::env::temp_dir().join(format!("qpai-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serve.toml");
        std::fs::write(
            &path,
            "port = 9999\nhost = \"0.0.0.0\"\nmodels = [\"a\", \"b\"]\n",
        )
        .unwrap();
        let config = path.to_str().unwrap();
        let (mut serve, matches) = parse(&["qpai", "serve", "--config", config, "--port", "7000"]);
        serve.apply_file(&matches).unwrap();
        assert_eq!(serve.port, 7000, "a flag beats the file");
        assert_eq!(serve.host, "0.0.0.0", "the file beats a default");
        assert_eq!(serve.models, vec!["a".to_string(), "b".to_string()]);
        std::fs::write(&path, "prot = 1\n").unwrap();
        let (mut serve, matches) = parse(&["qpai", "serve", "--config", config]);
        let err = serve.apply_file(&matches).unwrap_err().to_string();
        assert!(err.contains("prot"), "{err}");
    }
}
