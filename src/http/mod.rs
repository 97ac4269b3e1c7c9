//! The OpenAI-compatible HTTP API: one file per endpoint family.

mod adapters;
mod billing;
mod chat;
mod chat_messages;
mod completions;
mod embeddings;
pub mod extract;
mod health;
mod models;
mod routing;
mod sites;
mod usage;

pub use usage::group_keys as usage_group_keys;
mod streaming;
mod tool_calls;
pub mod validate;
pub mod wire;

use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};

use crate::engine::{Engine, SubmitError};
use crate::error::{ApiError, ApiResult};
use crate::lora::UnmergedAdapter;
use crate::lora::registry::{AdapterRegistry, RegistryError};
use crate::models::embedding::EmbeddingModel;
use crate::router::ModelRouter;
use crate::tenancy::{Principal, Tenancy};
use extract::BodyLimit;

/// Embedding requests computed at once; more get 429 (each already batches
/// its inputs, and the kernels use every core).
const EMBEDDING_REQUESTS_AT_ONCE: usize = 4;

/// Limits of the HTTP layer.
#[derive(Debug, Clone, Copy)]
pub struct HttpConfig {
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

/// An embedding model served on first use: loaded (and pulled) by `load`
/// when the first request names it.
pub struct EmbeddingSlot {
    pub id: String,
    pub context_length: usize,
    pub load: Box<dyn Fn() -> anyhow::Result<EmbeddingModel> + Send + Sync>,
    model: tokio::sync::OnceCell<Arc<EmbeddingModel>>,
}

impl EmbeddingSlot {
    pub fn new(
        id: impl Into<String>,
        context_length: usize,
        load: impl Fn() -> anyhow::Result<EmbeddingModel> + Send + Sync + 'static,
    ) -> Self {
        Self {
            id: id.into(),
            context_length,
            load: Box::new(load),
            model: tokio::sync::OnceCell::new(),
        }
    }
}

/// Shared state of the server: the engines of the served models.
pub struct AppState {
    engines: RwLock<Vec<Engine>>,
    embedding: std::sync::OnceLock<Arc<EmbeddingSlot>>,
    /// Embedding requests computed at once; beyond: 429.
    pub embedding_permits: Arc<tokio::sync::Semaphore>,
    /// Models announced at start whose loading is not finished.
    loading: RwLock<Vec<String>>,
    /// The sites' LanceDB store (RAG), when configured.
    rag_store: std::sync::OnceLock<crate::rag::Store>,
    /// LoRA adapters served per request on top of the engines' models.
    pub adapters: Arc<AdapterRegistry>,
    /// Routes to remote deployments; without a catalog, only local models.
    router: std::sync::OnceLock<Arc<ModelRouter>>,
    /// Keys, budgets and the usage ledger; without it the server is open
    /// and records no usage.
    tenancy: std::sync::OnceLock<Arc<Tenancy>>,
    pub config: HttpConfig,
    pub started_at: Instant,
}

impl AppState {
    pub fn new(config: HttpConfig) -> Arc<Self> {
        Self::with_adapters(config, AdapterRegistry::new(&[], Default::default()))
    }

    pub fn with_adapters(config: HttpConfig, adapters: AdapterRegistry) -> Arc<Self> {
        Arc::new(Self {
            adapters: Arc::new(adapters),
            engines: RwLock::new(Vec::new()),
            embedding: std::sync::OnceLock::new(),
            embedding_permits: Arc::new(tokio::sync::Semaphore::new(EMBEDDING_REQUESTS_AT_ONCE)),
            loading: RwLock::new(Vec::new()),
            rag_store: std::sync::OnceLock::new(),
            router: std::sync::OnceLock::new(),
            tenancy: std::sync::OnceLock::new(),
            config,
            started_at: Instant::now(),
        })
    }

    /// Announces models that are being loaded (answered with 503 until ready).
    pub fn expect_models(&self, ids: impl IntoIterator<Item = String>) {
        if let Ok(mut loading) = self.loading.write() {
            loading.extend(ids);
        }
    }

    pub fn add_engine(&self, engine: Engine) {
        let id = engine.model().id.clone();
        if let Ok(mut loading) = self.loading.write() {
            loading.retain(|m| *m != id);
        }
        if let Ok(mut engines) = self.engines.write() {
            engines.retain(|e| e.model().id != id);
            engines.push(engine);
        }
    }

    /// A model that failed to load is no longer announced.
    pub fn forget_model(&self, id: &str) {
        if let Ok(mut loading) = self.loading.write() {
            loading.retain(|m| m != id);
        }
    }

    pub fn engines(&self) -> Vec<Engine> {
        self.engines.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// Ready when every announced model is loaded and at least one serves.
    pub fn is_ready(&self) -> bool {
        self.loading.read().is_ok_and(|l| l.is_empty()) && !self.engines().is_empty()
    }

    /// Serves `slot`'s embedding model (loaded on first use).
    pub fn set_embedding_model(&self, slot: EmbeddingSlot) {
        let _ = self.embedding.set(Arc::new(slot));
    }

    pub fn embedding_slot(&self) -> Option<&Arc<EmbeddingSlot>> {
        self.embedding.get()
    }

    /// The embedding model named `id`, loading it on first use.
    pub async fn embedding_model(&self, id: &str) -> ApiResult<Arc<EmbeddingModel>> {
        let slot = match self.embedding.get() {
            Some(slot) if slot.id == id => slot.clone(),
            _ => {
                return Err(if self.engines().iter().any(|e| e.model().id == id) {
                    ApiError::invalid_param(
                        "model",
                        format!("The model '{id}' is not an embedding model."),
                    )
                } else {
                    ApiError::model_not_found(id)
                });
            }
        };
        let model = slot
            .model
            .get_or_try_init(|| async {
                let loader = slot.clone();
                tokio::task::spawn_blocking(move || (loader.load)())
                    .await
                    .map_err(ApiError::internal)?
                    .map(Arc::new)
                    .map_err(|e| ApiError::internal(format!("loading embedding model: {e:#}")))
            })
            .await?;
        Ok(model.clone())
    }

    /// Routes with this router (its catalog, upstreams and breakers).
    pub fn set_model_router(&self, router: ModelRouter) {
        let _ = self.router.set(Arc::new(router));
    }

    /// The router: the configured one, or one with an empty catalog.
    pub fn model_router(&self) -> Arc<ModelRouter> {
        self.router
            .get_or_init(|| {
                Arc::new(
                    ModelRouter::new(
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        Default::default(),
                    )
                    .expect("an HTTP client with default settings"),
                )
            })
            .clone()
    }

    /// Authenticates, limits and bills with `tenancy`.
    pub fn set_tenancy(&self, tenancy: Arc<Tenancy>) {
        let _ = self.tenancy.set(tenancy);
    }

    pub fn tenancy(&self) -> Option<Arc<Tenancy>> {
        self.tenancy.get().cloned()
    }

    /// Refuses `site` to a caller who does not own it: as "not found", so
    /// other tenants' site names do not leak. Sites with no owner belong to
    /// the admins.
    pub async fn check_site_access(&self, principal: &Principal, site: &str) -> ApiResult<()> {
        if principal.admin {
            return Ok(());
        }
        let owner = match self.tenancy() {
            Some(tenancy) => tenancy
                .ledger
                .site_owner(site)
                .await
                .map_err(ApiError::internal)?,
            None => return Ok(()),
        };
        if owner.as_deref() == Some(principal.tenant.as_str()) {
            Ok(())
        } else {
            Err(ApiError {
                code: Some("site_not_found"),
                param: Some("site".into()),
                ..ApiError::not_found(format!("No site named '{site}'."))
            })
        }
    }

    /// Serves sites (search, grounded answers) from this store.
    pub fn set_rag_store(&self, store: crate::rag::Store) {
        let _ = self.rag_store.set(store);
    }

    pub fn rag_store(&self) -> ApiResult<&crate::rag::Store> {
        self.rag_store
            .get()
            .ok_or_else(|| ApiError::not_found("This server has no site store (RAG is off)."))
    }

    /// The store with the served embedding model (loaded on first use).
    pub async fn rag(&self) -> ApiResult<crate::rag::Rag> {
        let store = self.rag_store()?.clone();
        let slot = self.embedding_slot().ok_or_else(|| {
            ApiError::unavailable("Sites need an embedding model; this server serves none.")
        })?;
        let model = self.embedding_model(&slot.id.clone()).await?;
        Ok(crate::rag::Rag::new(store, model))
    }

    /// The engine that serves `id` and the adapter to run with: a model
    /// id, a merged adapter's name or `BASE:NAME`, or an adapter as
    /// `BASE:ADAPTER` or by its own name (loaded on first use).
    /// A tenant's adapters are found for that tenant only.
    pub async fn target(
        &self,
        principal: &Principal,
        id: &str,
    ) -> ApiResult<(Engine, Option<Arc<UnmergedAdapter>>)> {
        let engines = self.engines();
        if let Some(engine) = engines.iter().find(|e| e.model().id == id) {
            return Ok((engine.clone(), None));
        }
        let (base, name) = match id.rsplit_once(':') {
            Some((base, name)) => (Some(base), name),
            None => (None, id),
        };
        let merged = engines.iter().find(|e| {
            let model = e.model();
            base.is_some() && model.id == name && model.parent.as_deref() == base
        });
        if let Some(engine) = merged {
            return Ok((engine.clone(), None));
        }
        // A bare adapter name found in an adapter directory runs on the
        // first served model.
        let served_base = match base {
            Some(base) => engines.iter().find(|e| e.model().id == base),
            None => engines.first(),
        }
        .map(|e| e.model().id.clone());
        let served_base = served_base.as_deref();
        let spec = self
            .adapters
            .find(name, served_base)
            .filter(|spec| spec.owner.as_ref().is_none_or(|o| principal.may_see(o)));
        let Some(spec) = spec else {
            return Err(match base {
                Some(base) if served_base.is_some() => ApiError::invalid_param(
                    "model",
                    format!("The model '{base}' has no adapter '{name}'."),
                ),
                _ => self
                    .engine(id)
                    .err()
                    .unwrap_or_else(|| ApiError::model_not_found(id)),
            });
        };
        if let Some(base) = base
            && base != spec.base
        {
            return Err(ApiError::invalid_param(
                "model",
                format!(
                    "The adapter '{name}' runs on the model '{}', not '{base}'.",
                    spec.base
                ),
            ));
        }
        let engine = self.engine(&spec.base)?;
        let (registry, model) = (self.adapters.clone(), engine.clone());
        let weights = tokio::task::spawn_blocking(move || registry.acquire(&spec, model.model()))
            .await
            .map_err(ApiError::internal)?
            .map_err(|e| adapter_error(e, "model"))?;
        Ok((engine, Some(weights)))
    }

    pub fn engine(&self, id: &str) -> ApiResult<Engine> {
        if let Some(engine) = self.engines().into_iter().find(|e| e.model().id == id) {
            return Ok(engine);
        }
        if self.loading.read().is_ok_and(|l| l.iter().any(|m| m == id)) {
            return Err(ApiError::unavailable(format!(
                "The model '{id}' is still loading."
            )));
        }
        Err(ApiError::model_not_found(id))
    }
}

/// An adapter registry error as the API answers it; `param` names the
/// request field that chose the adapter.
pub fn adapter_error(error: RegistryError, param: &str) -> ApiError {
    let message = error.to_string();
    match error {
        RegistryError::Exists(_) => ApiError {
            status: StatusCode::CONFLICT,
            code: Some("adapter_exists"),
            ..ApiError::invalid_param("name", message)
        },
        RegistryError::InvalidName(_) => ApiError::invalid_param(param, message),
        RegistryError::OutsideRoots(_) => ApiError::invalid_param("path", message),
        RegistryError::Invalid { .. } => ApiError::invalid_param(param, message),
        RegistryError::Full { .. } | RegistryError::TooLarge { .. } => {
            ApiError::unavailable(message)
        }
    }
}

pub fn submit_error(error: SubmitError) -> ApiError {
    match error {
        SubmitError::Overloaded => ApiError::overloaded(),
        SubmitError::Stopped => ApiError::internal("model worker stopped"),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The whole HTTP application; tests drive it in-process.
pub fn router(state: Arc<AppState>) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let limit = state.config.max_body_bytes;
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(models::list_models))
        .route("/v1/sites", get(sites::list_sites).post(sites::create_site))
        .route(
            "/v1/sites/{site}",
            get(sites::site_stats).delete(sites::delete_site),
        )
        .route("/v1/sites/{site}/search", post(sites::search_site))
        .route("/v1/sites/{site}/documents", post(sites::ingest_documents))
        .route("/v1/models/{*id}", get(models::get_model))
        .route(
            "/v1/adapters",
            get(adapters::list_adapters).post(adapters::load_adapter),
        )
        .route(
            "/v1/adapters/{name}",
            get(adapters::get_adapter).delete(adapters::unload_adapter),
        )
        .route("/v1/usage", get(usage::usage))
        .route("/v1/router/health", get(usage::router_health))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(api)
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(DefaultBodyLimit::max(limit))
        .layer(Extension(BodyLimit(limit)))
        .layer(middleware::from_fn(track_requests))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path())
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO))
                // Server errors are logged with their cause where they happen.
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// Resolves the caller (an API key, or everyone on an open server) and
/// counts the request against the key's requests per minute.
async fn authenticate(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let principal = match state.tenancy() {
        None => Arc::new(Principal::open()),
        Some(tenancy) => {
            let headers = req.headers();
            let secret = headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()))
                .map(str::trim);
            let checked = match tenancy.authenticate(secret).await {
                Ok(principal) => tenancy.admit_request(&principal).map(|()| principal),
                Err(error) => Err(error),
            };
            match checked {
                Ok(principal) => principal,
                Err(error) => return error.into_response(),
            }
        }
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

async fn not_found() -> ApiError {
    ApiError::not_found("No such endpoint.")
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::not_found("Method not allowed on this endpoint.")
    }
}

/// Counts requests by endpoint and status, and times them (to the response head).
async fn track_requests(req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(req).await.into_response();
    let status = response.status().as_u16().to_string();
    metrics::counter!("qpai_http_requests_total", "path" => path.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("qpai_http_request_duration_seconds", "path" => path)
        .record(started.elapsed().as_secs_f64());
    response
}
