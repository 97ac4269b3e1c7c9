//! Flags of the router's commands: `qpai keys`, `qpai usage`, and the
//! router benchmarks (`qpai bench-upstream`, `qpai bench-router`).

use clap::{Args, Subcommand};

#[derive(Debug, Clone, Args)]
pub struct BenchUpstreamArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 9100)]
    pub port: u16,
    /// Share of requests (0 to 1) that meet a fault, chosen at random: a
    /// 500, a connection closed without an answer, a stream cut before its
    /// end, or a first byte 300 ms late. (No 429s: a Retry-After rests the
    /// deployment, and the soak would measure the rest.)
    #[arg(long, default_value_t = 0.0)]
    pub fault_rate: f64,
}

#[derive(Debug, Clone, Args)]
pub struct BenchRouterArgs {
    /// The API base URL (`http://HOST:PORT/v1`).
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value = "bench")]
    pub model: String,
    /// Bearer key to send.
    #[arg(long, env = "QPAI_BENCH_KEY")]
    pub key: Option<String>,
    /// Concurrent connections.
    #[arg(long, default_value_t = 200)]
    pub connections: usize,
    /// Measured requests.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Requests sent first and not measured.
    #[arg(long, default_value_t = 2_000)]
    pub warmup: usize,
    /// Offered load in requests/s (open loop: latency counts from each
    /// request's scheduled time, so waiting for a free connection counts).
    /// Default: as fast as the connections go (closed loop).
    #[arg(long)]
    pub rate: Option<f64>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key (and its tenant). The key is printed once.
    Create(KeyCreateArgs),
    /// List keys (never the keys themselves).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key by its id.
    Revoke { id: String },
}

#[derive(Debug, Clone, Args)]
pub struct KeyCreateArgs {
    #[arg(long)]
    pub tenant: String,
    /// The tenant's monthly budget in dollars (set or changed for the tenant).
    #[arg(long)]
    pub monthly_budget_usd: Option<String>,
    /// Percentage of the budget after which answers carry x-qpai-budget-warning.
    #[arg(long)]
    pub soft_limit_percent: Option<u8>,
    /// Requests per minute for this key.
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens per minute for this key (prompt plus max_tokens).
    #[arg(long)]
    pub tpm: Option<u32>,
    /// An admin key: admin endpoints, every tenant's data.
    #[arg(long)]
    pub admin: bool,
    /// What `"model": "auto"` means for the tenant.
    #[arg(long)]
    pub default_model: Option<String>,
    /// The tenant's quality floor for routed requests (0 to 1).
    #[arg(long)]
    pub min_quality: Option<f64>,
    /// Sets (or changes) the most completion tokens one of the tenant's
    /// requests may ask for; a request that names none gets this many.
    #[arg(long)]
    pub max_tokens_cap: Option<u64>,
    /// Sets (or changes) the most streams the tenant may have open at once
    /// (per server process); one more gets 429.
    #[arg(long)]
    pub max_streams: Option<u32>,
}

#[derive(Debug, Clone, Args)]
pub struct UsageArgs {
    #[arg(long)]
    pub tenant: Option<String>,
    /// Comma-separated: model, provider, key, day, tenant, deployment, batch,
    /// prompt, eval.
    #[arg(long, default_value = "tenant,model")]
    pub group_by: String,
    /// First day, YYYY-MM-DD.
    #[arg(long)]
    pub from: Option<String>,
    /// Last day, YYYY-MM-DD.
    #[arg(long)]
    pub to: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
