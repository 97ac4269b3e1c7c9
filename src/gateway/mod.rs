//! The gateway: the one request path below every transport. It takes a
//! typed request (chat completion, text completion, embeddings) and the
//! calling principal, plans the route (qpai's own models or upstream
//! deployments), runs it with retries, fallbacks and circuit breakers,
//! meters it, writes exactly one ledger row, and returns a typed answer:
//! whole, or a stream of chunks. The HTTP API, batch jobs and the eval
//! harness all call it; it knows nothing of HTTP.

pub mod bill;
mod chat;
pub mod chat_prompt;
pub mod completions;
mod drive;
mod embeddings;
pub mod events;
mod grounding;
mod local_chat;
pub mod models;
mod named_prompt;
pub mod tool_calls;
pub mod usage;
pub mod validate;
pub mod wire;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

pub use embeddings::{EmbeddingInput, EmbeddingRequest, EncodingFormat};
pub use events::{Chunk, ChunkStream, StreamItem};
pub use models::{EmbeddingSlot, LocalModels, adapter_error, submit_error};

use crate::adapters::registry::AdapterRegistry;
use crate::error::{ApiError, ApiResult};
use crate::money::Usd;
use crate::router::{ModelRouter, ProviderKind};
use crate::tenancy::Tenancy;

/// Local embedding requests queued or computing at once; more are refused
/// as overloaded. The model's queue batches them into shared passes.
const EMBEDDING_REQUESTS_AT_ONCE: usize = 256;

/// How a caller steers the route of one request.
#[derive(Debug, Clone, Default)]
pub struct Hints {
    /// The task tag whose quality score counts (`general` when absent).
    pub task: Option<String>,
    /// The lowest quality (0 to 1) a route may have; else the tenant's.
    pub min_quality: Option<f64>,
    /// Set for a batch line: billed at batch prices (its row handed back),
    /// run below live traffic, within each deployment's batch cap.
    pub batch: Option<bill::BatchBilling>,
    /// Set for an eval case: tagged with its run in the ledger.
    pub eval: Option<bill::EvalBilling>,
    /// The experiment the request takes part in (chat only).
    pub experiment: Option<crate::experiments::ExperimentCall>,
}

impl Hints {
    /// How a local engine ranks this request.
    pub fn priority(&self) -> crate::engine::Priority {
        match self.batch {
            Some(_) => crate::engine::Priority::Batch,
            None => crate::engine::Priority::Live,
        }
    }
}

/// The route that answered.
#[derive(Debug, Clone)]
pub struct RouteTaken {
    pub provider: ProviderKind,
    /// The model that answered (the upstream's name, or qpai's).
    pub model: String,
    pub deployment: String,
    /// Tries, the successful one included.
    pub attempts: u32,
    /// The most the request could have cost there (what the budget held).
    pub max_cost: Usd,
    /// The tenant's budget is nearly spent.
    pub budget_warning: Option<String>,
    /// The request's id in the usage ledger.
    pub request_id: String,
    /// The experiment and variant the request got.
    pub experiment: Option<(String, String)>,
}

/// An answer: its route and its body.
pub struct Answer {
    pub route: RouteTaken,
    pub body: AnswerBody,
}

pub enum AnswerBody {
    /// The whole answer in OpenAI's format, billed at `cost`.
    Whole { body: Whole, cost: Usd },
    /// Chunks as they come; billed when the stream ends or is dropped.
    Stream(ChunkStream),
}

/// A whole answer in OpenAI's format: qpai's own (typed, so that floats
/// keep their f32 form) or an upstream's, as it came.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Whole {
    Chat(wire::ChatCompletion),
    Text(wire::Completion),
    Embeddings(embeddings::EmbeddingResponse),
    Upstream(Value),
}

impl Whole {
    /// The answer as JSON.
    pub fn to_json(&self) -> Value {
        match self {
            Whole::Upstream(value) => value.clone(),
            typed => serde_json::to_string(typed)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default(),
        }
    }
}

/// The gateway: qpai's models, the router, the tenancy and the site store.
pub struct Gateway {
    pub models: LocalModels,
    pub router: Arc<ModelRouter>,
    /// Keys, budgets and the ledger; without it every caller is the open
    /// tenant and no usage is recorded.
    pub tenancy: Option<Arc<Tenancy>>,
    rag_store: Option<crate::rag::Store>,
    files: Option<crate::files::Files>,
    /// The versioned prompts requests may name.
    pub prompts: Arc<crate::prompts::Prompts>,
    /// Online experiments (kept in the ledger database).
    pub experiments: Option<crate::experiments::Experiments>,
    embedding_permits: Arc<tokio::sync::Semaphore>,
    pub started_at: Instant,
}

/// What a gateway is built from; each part is optional.
#[derive(Default)]
pub struct GatewayBuilder {
    adapters: Option<AdapterRegistry>,
    embedding: Option<EmbeddingSlot>,
    router: Option<ModelRouter>,
    tenancy: Option<Arc<Tenancy>>,
    rag_store: Option<crate::rag::Store>,
    files: Option<crate::files::Files>,
    prompts: Option<crate::prompts::Prompts>,
}

impl GatewayBuilder {
    /// The versioned prompts (the built-in ones when not given).
    pub fn prompts(mut self, prompts: crate::prompts::Prompts) -> Self {
        self.prompts = Some(prompts);
        self
    }

    /// Files (batch inputs and outputs).
    pub fn files(mut self, files: crate::files::Files) -> Self {
        self.files = Some(files);
        self
    }

    /// LoRA adapters served per request.
    pub fn adapters(mut self, adapters: AdapterRegistry) -> Self {
        self.adapters = Some(adapters);
        self
    }

    /// The embedding model (loaded on first use).
    pub fn embedding(mut self, slot: EmbeddingSlot) -> Self {
        self.embedding = Some(slot);
        self
    }

    /// Routes to remote deployments; without one, local models only.
    pub fn router(mut self, router: ModelRouter) -> Self {
        self.router = Some(router);
        self
    }

    pub fn tenancy(mut self, tenancy: Arc<Tenancy>) -> Self {
        self.tenancy = Some(tenancy);
        self
    }

    /// The sites' LanceDB store (RAG).
    pub fn rag_store(mut self, store: crate::rag::Store) -> Self {
        self.rag_store = Some(store);
        self
    }

    pub fn build(self) -> anyhow::Result<Arc<Gateway>> {
        let router = match self.router {
            Some(router) => router,
            None => ModelRouter::new(
                Default::default(),
                Default::default(),
                Default::default(),
                Default::default(),
            )
            .map_err(anyhow::Error::msg)?,
        };
        let adapters = self
            .adapters
            .unwrap_or_else(|| AdapterRegistry::new(&[], Default::default()));
        Ok(Arc::new(Gateway {
            models: LocalModels::new(self.embedding, adapters),
            router: Arc::new(router),
            experiments: self
                .tenancy
                .as_ref()
                .map(|t| crate::experiments::Experiments::new(&t.ledger)),
            tenancy: self.tenancy,
            rag_store: self.rag_store,
            files: self.files,
            prompts: Arc::new(
                self.prompts
                    .unwrap_or_else(crate::prompts::Prompts::built_in),
            ),
            embedding_permits: Arc::new(tokio::sync::Semaphore::new(EMBEDDING_REQUESTS_AT_ONCE)),
            started_at: Instant::now(),
        }))
    }
}

impl Gateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// The site store, when RAG is on.
    pub fn rag_store(&self) -> ApiResult<&crate::rag::Store> {
        self.rag_store
            .as_ref()
            .ok_or_else(|| ApiError::not_found("This server has no site store (RAG is off)."))
    }

    /// The files, when the server keeps them.
    pub fn files(&self) -> ApiResult<&crate::files::Files> {
        self.files
            .as_ref()
            .ok_or_else(|| ApiError::not_found("This server keeps no files."))
    }

    /// The site store with the served embedding model (loaded on first use).
    pub async fn rag(&self) -> ApiResult<crate::rag::Rag> {
        let store = self.rag_store()?.clone();
        let slot = self.models.embedding_slot().ok_or_else(|| {
            ApiError::unavailable("Sites need an embedding model; this server serves none.")
        })?;
        let model = self.models.embedding_model(&slot.id.clone()).await?;
        Ok(crate::rag::Rag::new(store, model))
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
