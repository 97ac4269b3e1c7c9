//! Cost-aware routing between qpai's own models and OpenAI, Azure OpenAI and
//! OpenAI-compatible servers: the routing catalog (deployments, prices,
//! capabilities, quality per task), exact money, the upstream client, the
//! choice of route (policy), circuit breakers (health), token counting and
//! usage metering. The gateway (src/gateway/) drives it.

pub mod bench;
pub mod calibration;
pub mod catalog;
pub mod cost;
pub mod health;
pub mod metering;
pub mod policy;
pub mod tokens;
pub mod upstream;

use std::time::Duration;

pub use catalog::{Capability, Deployment, ProviderKind, RouterCatalog};
pub use cost::Prices;
pub use health::{Admission, BreakerConfig, Breakers};
pub use upstream::{Timeouts, UpstreamError, UpstreamResponse, Upstreams};

/// The OpenAI endpoints a request can be routed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// The name the usage ledger records.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }

    /// The path under a provider's `/v1`.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat/completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// How failed attempts are retried on the same deployment.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries on one deployment before falling back to the next.
    pub retries: u32,
    /// The first backoff; doubled each retry, with full jitter.
    pub backoff: Duration,
    /// A Retry-After longer than this moves on to the next deployment
    /// instead of waiting.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 1,
            backoff: Duration::from_millis(100),
            max_wait: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0-based): uniform in
    /// [0, backoff * 2^retry] ("full jitter").
    pub fn backoff_for(&self, retry: u32) -> Duration {
        let ceiling = self.backoff.saturating_mul(1 << retry.min(10));
        ceiling.mul_f64(rand::random::<f64>())
    }
}

/// The router: its catalog, the upstream client and the breakers.
pub struct ModelRouter {
    pub catalog: RouterCatalog,
    pub upstreams: Upstreams,
    pub breakers: Breakers,
    pub retry: RetryPolicy,
    /// Caps batch requests in flight per upstream deployment.
    pub batch_slots: BatchSlots,
}

/// Batch requests in flight per upstream deployment, capped at each
/// deployment's `batch_concurrency`, so that a batch never takes the rate
/// limit live traffic needs. Local models need none: their engines admit
/// batch work below live requests.
#[derive(Default)]
pub struct BatchSlots {
    slots:
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>>,
}

impl BatchSlots {
    /// Waits for a batch slot on `deployment` (none needed for a local one).
    pub async fn acquire(
        &self,
        deployment: &Deployment,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if deployment.provider == ProviderKind::Local {
            return None;
        }
        let semaphore = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .entry(deployment.name.clone())
                .or_insert_with(|| {
                    std::sync::Arc::new(tokio::sync::Semaphore::new(deployment.batch_concurrency))
                })
                .clone()
        };
        semaphore.acquire_owned().await.ok()
    }
}

impl ModelRouter {
    pub fn new(
        catalog: RouterCatalog,
        timeouts: Timeouts,
        breaker: BreakerConfig,
        retry: RetryPolicy,
    ) -> Result<ModelRouter, String> {
        Ok(ModelRouter {
            catalog,
            upstreams: Upstreams::new(timeouts)?,
            breakers: Breakers::new(breaker),
            retry,
            batch_slots: BatchSlots::default(),
        })
    }

    /// Reads a routing catalog file.
    pub fn load_catalog(path: &std::path::Path) -> anyhow::Result<RouterCatalog> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        RouterCatalog::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The catalog's `local` deployment serving local model `id` (its
    /// prices), if it has one.
    pub fn local_deployment(&self, id: &str) -> Option<&Deployment> {
        self.catalog
            .deployments
            .iter()
            .find(|d| d.provider == ProviderKind::Local && d.model == id)
    }
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Openai => "openai",
            ProviderKind::Azure => "azure",
            ProviderKind::OpenaiCompatible => "openai_compatible",
        }
    }
}
