//! Flags of the bulk-content commands: `qpai prompts`, `qpai batch` and
//! `qpai eval run`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum PromptsCommand {
    /// Every prompt: name, versions, description.
    List(PromptsDir),
    /// A prompt's file (NAME@VERSION, or NAME: the newest).
    Show {
        prompt: String,
        #[command(flatten)]
        dir: PromptsDir,
    },
    /// A prompt's turns with these variables.
    Render {
        prompt: String,
        /// A variable, NAME=VALUE (read as the variable's type); repeat.
        #[arg(long = "var")]
        vars: Vec<String>,
        /// A JSON object of variables.
        #[arg(long)]
        vars_file: Option<PathBuf>,
        #[command(flatten)]
        dir: PromptsDir,
    },
    /// What changed between two versions: NAME@A NAME@B.
    Diff {
        old: String,
        new: String,
        #[command(flatten)]
        dir: PromptsDir,
    },
}

#[derive(Debug, Clone, Args)]
pub struct PromptsDir {
    /// More prompts beside the built-in ones (default: <data-dir>/prompts).
    #[arg(long, env = "QPAI_PROMPTS_DIR")]
    pub prompts_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Runs a prompt over every row of a table (one request per row),
    /// durably: re-run after a kill, it resumes the same job.
    Run(Box<BatchRunArgs>),
    /// A batch's state, counts and files.
    Status {
        id: String,
        #[command(flatten)]
        tenant: BatchTenant,
    },
    /// The newest batches.
    List {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        tenant: BatchTenant,
    },
    /// Stops a batch: no new lines start; what ran is kept.
    Cancel {
        id: String,
        #[command(flatten)]
        tenant: BatchTenant,
    },
}

#[derive(Debug, Clone, Args)]
pub struct BatchTenant {
    /// The tenant whose batches these are (the open server's by default).
    #[arg(long, default_value = crate::tenancy::OPEN_TENANT)]
    pub tenant: String,
}

#[derive(Debug, Clone, Args)]
pub struct BatchRunArgs {
    /// The rows: JSONL (an object per line) or CSV with a header line.
    /// Each row's fields are the prompt's variables; an `id` field names
    /// the row in the output.
    pub rows: PathBuf,
    /// The prompt: NAME@VERSION, or NAME for the newest.
    #[arg(long)]
    pub prompt: String,
    /// The model: one of qpai's own, a deployment, a logical model, or auto.
    #[arg(long)]
    pub model: String,
    /// A LoRA adapter of the model, applied per request.
    #[arg(long)]
    pub adapter: Option<String>,
    /// A JSON Schema file the answers must match (strict structured output).
    #[arg(long)]
    pub response_format: Option<PathBuf>,
    /// Where the answers go: a JSON line per row, in row order.
    #[arg(long, required_unless_present = "dry_run")]
    pub out: Option<PathBuf>,
    /// Prints each route's token counts and cost estimate; runs nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Completion tokens per row at most.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Rows run at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Routing catalog (remote deployments, logical models).
    #[arg(long, env = "QPAI_ROUTER_CONFIG")]
    pub router_config: Option<PathBuf>,
    /// CPU threads for the model kernels.
    #[arg(long, env = "QPAI_THREADS")]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub dir: PromptsDir,
    #[command(flatten)]
    pub tenant: BatchTenant,
}

#[derive(Debug, Clone, Args)]
pub struct EvalRunArgs {
    /// The suite: a TOML file naming its dataset, variants and assertions
    /// (see eval/suites/).
    pub suite: PathBuf,
    /// Where results.jsonl, results.json, summary.md and report.html go.
    #[arg(long, default_value = "eval-results")]
    pub out: PathBuf,
    /// Cases run at once (default: the suite's, else 4).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Runs each case this many times (sampled variants vary).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Asks again what was asked before (answers are cached by content).
    #[arg(long)]
    pub no_cache: bool,
    /// Prints each variant's cost estimate; asks nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The first cases of the dataset only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only the cases of this group (the dataset's group column); repeatable.
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// Only the variants on this model; repeatable.
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// An earlier run's results.json: regressions and improvements marked
    /// per variant and per case.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Fails (exit 1) when a variant's pass rate is below this (0 to 1).
    #[arg(long)]
    pub fail_under: Option<f64>,
    /// Routing catalog (remote deployments, logical models, auto).
    #[arg(long, env = "QPAI_ROUTER_CONFIG")]
    pub router_config: Option<PathBuf>,
    /// CPU threads for the model kernels.
    #[arg(long, env = "QPAI_THREADS")]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub dir: PromptsDir,
    #[command(flatten)]
    pub tenant: BatchTenant,
}

#[derive(Debug, Clone, Args)]
pub struct EvalCalibrateArgs {
    /// results.json files of `qpai eval run`; cases of one route pool.
    #[arg(required = true)]
    pub results: Vec<PathBuf>,
    /// The task tag (`x-qpai-task`) the runs measured.
    #[arg(long)]
    pub task: String,
    /// The routing catalog to write the measured quality into.
    #[arg(long, env = "QPAI_ROUTER_CONFIG")]
    pub router_config: Option<PathBuf>,
    /// Only the cases of this group (e.g. the calibration split).
    #[arg(long)]
    pub group: Option<String>,
    /// A case counts its assertion score, or 1 when it passed.
    #[arg(long, value_enum, default_value = "score")]
    pub metric: CalibrationMetric,
    /// Sets the task's quality floor.
    #[arg(long, conflicts_with = "floor_of_best")]
    pub floor: Option<f64>,
    /// Sets the task's floor to this fraction of the best measured score.
    #[arg(long)]
    pub floor_of_best: Option<f64>,
    /// Prints what would be written; writes nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CalibrationMetric {
    Score,
    Pass,
}
