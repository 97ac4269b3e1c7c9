//! Flags of the site commands: `qpai ingest`, `qpai search`, `qpai sites`,
//! and `qpai bench-search`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::DEFAULT_EMBEDDING_MODEL;

#[derive(Debug, Subcommand)]
pub enum SitesCommand {
    /// List the sites.
    List,
    /// Create an empty site.
    Create {
        site: String,
        /// Create it in this tenant's namespace (its keys see it by this
        /// name; others do not). Without it: a site of the admins.
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        embedding: EmbeddingArgs,
    },
    /// Pages, chunks, indexes and the embedding model of a site.
    Stats { site: String },
    /// Delete a site and everything stored for it.
    Delete { site: String },
}

#[derive(Debug, Clone, Args)]
pub struct EmbeddingArgs {
    /// Embedding model (catalog id or path); a site keeps the model it was created with.
    #[arg(long, env = "QPAI_EMBEDDING_MODEL", default_value = DEFAULT_EMBEDDING_MODEL)]
    pub embedding_model: String,
    /// CPU threads for the model kernels (default: all cores).
    #[arg(long, env = "QPAI_THREADS")]
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Site to ingest into (created when missing): a stored name (`NAME`,
    /// or `NAME.TENANT` for a tenant's site), or with --tenant the tenant's
    /// own name for it.
    #[arg(long)]
    pub site: String,
    /// The tenant whose site --site names (in the tenant's namespace).
    #[arg(long)]
    pub tenant: Option<String>,
    /// A directory of HTML and/or Markdown/MDX pages, a WordPress WXR export
    /// (.xml), a sitemap (.xml file or http(s) URL), a .jsonl file, or one page.
    pub source: String,
    /// URL prefix for pages without an absolute URL of their own.
    #[arg(long)]
    pub base_url: Option<String>,
    /// Keep pages of this source that the source no longer has (default: delete them).
    #[arg(long)]
    pub no_prune: bool,
    /// Pages larger than this are refused (each on its own).
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub max_page_bytes: usize,
    /// Sitemap ingest: pages fetched at most.
    #[arg(long, default_value_t = 10_000)]
    pub max_pages: usize,
    /// Sitemap ingest: pause between two requests to a host, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub fetch_delay_ms: u64,
    /// Chunk size in tokens of the embedding model (default: 200, within the model's limit).
    #[arg(long)]
    pub chunk_tokens: Option<usize>,
    /// Tokens repeated from one chunk into the next.
    #[arg(long, default_value_t = 32)]
    pub chunk_overlap: usize,
    /// Rows from which the site's table gets an ANN (IVF-PQ) index.
    #[arg(long, default_value_t = 20_000)]
    pub ann_min_rows: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub fetch: FetchArgs,
    #[command(flatten)]
    pub embedding: EmbeddingArgs,
}

/// Which addresses fetches of sitemaps and their pages may reach: public
/// ones only, unless these say otherwise.
#[derive(Args, Debug, Clone, Default)]
pub struct FetchArgs {
    /// Fetch from this host whatever its addresses (an intranet docs
    /// server, say); repeatable, or comma-separated in the variable.
    #[arg(
        long = "allow-fetch-host",
        env = "QPAI_ALLOW_FETCH_HOSTS",
        value_delimiter = ','
    )]
    pub allow_fetch_hosts: Vec<String>,
    /// Let fetches reach loopback, private, link-local and other
    /// non-public addresses (cloud metadata endpoints among them).
    #[arg(long, env = "QPAI_ALLOW_PRIVATE_FETCH")]
    pub allow_private_fetch: bool,
}

impl FetchArgs {
    pub fn policy(&self) -> crate::rag::sources::fetch::FetchPolicy {
        crate::rag::sources::fetch::FetchPolicy {
            allow_private: self.allow_private_fetch,
            allowed_hosts: self.allow_fetch_hosts.clone(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SearchArgs {
    #[arg(long)]
    pub site: String,
    pub query: String,
    #[arg(long, value_enum, default_value = "hybrid")]
    pub mode: crate::rag::SearchMode,
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Only pages whose URL starts with this.
    #[arg(long)]
    pub url_prefix: Option<String>,
    /// Only pages in this language.
    #[arg(long)]
    pub lang: Option<String>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub embedding: EmbeddingArgs,
}

#[derive(Debug, Clone, Args)]
pub struct BenchSearchArgs {
    /// An ingested site whose chunks seed the large table.
    #[arg(long)]
    pub site: String,
    /// Rows of the grown table (`<site>-bench`, rebuilt each run).
    #[arg(long, default_value_t = 100_000)]
    pub rows: usize,
    /// Reuse the grown table from an earlier run.
    #[arg(long)]
    pub reuse: bool,
    /// Queries (JSONL with a "query" field, as the retrieval eval's).
    #[arg(long, default_value = "eval/retrieval/postgresql-15.jsonl")]
    pub queries: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    #[command(flatten)]
    pub embedding: EmbeddingArgs,
}
