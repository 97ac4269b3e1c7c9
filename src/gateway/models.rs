//! qpai's own models as the gateway serves them: the engines of the loaded
//! models (models still loading are announced, and answered as such), the
//! embedding model loaded on first use, and the LoRA adapters that run on
//! the engines per request. Engines come and go as the server loads them;
//! everything else is fixed when the gateway is built.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::adapters::registry::{AdapterRegistry, RegistryError};
use crate::engine::{Engine, SubmitError};
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::lora::UnmergedAdapter;
use crate::models::embedding::EmbeddingModel;
use crate::router::{Deployment, ProviderKind};
use crate::tenancy::Principal;

/// An embedding model served on first use: loaded (and pulled) by `load`
/// when the first request names it.
pub struct EmbeddingSlot {
    pub id: String,
    pub context_length: usize,
    load: Box<dyn Fn() -> anyhow::Result<EmbeddingModel> + Send + Sync>,
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

/// A local model's engine and the adapter to run with it.
pub type Target = (Engine, Option<Arc<UnmergedAdapter>>);

/// The local models: engines, the embedding model, adapters.
pub struct LocalModels {
    engines: RwLock<Vec<Engine>>,
    /// Models announced at start whose loading is not finished.
    loading: RwLock<Vec<String>>,
    /// Whether any local model was announced (a server that only routes
    /// announces none).
    announced: std::sync::atomic::AtomicBool,
    embedding: Option<Arc<EmbeddingSlot>>,
    pub adapters: Arc<AdapterRegistry>,
}

impl LocalModels {
    pub fn new(embedding: Option<EmbeddingSlot>, adapters: AdapterRegistry) -> Self {
        Self {
            engines: RwLock::new(Vec::new()),
            loading: RwLock::new(Vec::new()),
            announced: Default::default(),
            embedding: embedding.map(Arc::new),
            adapters: Arc::new(adapters),
        }
    }

    /// Announces models that are being loaded (answered with 503 until ready).
    pub fn expect(&self, ids: impl IntoIterator<Item = String>) {
        if let Ok(mut loading) = self.loading.write() {
            let before = loading.len();
            loading.extend(ids);
            if loading.len() > before {
                self.announced
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Serves `engine` (replacing one of the same model).
    pub fn add(&self, engine: Engine) {
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
    pub fn forget(&self, id: &str) {
        if let Ok(mut loading) = self.loading.write() {
            loading.retain(|m| m != id);
        }
    }

    pub fn engines(&self) -> Vec<Engine> {
        self.engines.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// Ready when every announced model is loaded and at least one serves
    /// (or, on a server that only routes, at once).
    pub fn is_ready(&self) -> bool {
        let announced = self.announced.load(std::sync::atomic::Ordering::Relaxed);
        self.loading.read().is_ok_and(|l| l.is_empty())
            && (!self.engines().is_empty() || !announced)
    }

    pub fn embedding_slot(&self) -> Option<&Arc<EmbeddingSlot>> {
        self.embedding.as_ref()
    }

    /// The embedding model named `id`, loading it on first use.
    pub async fn embedding_model(&self, id: &str) -> ApiResult<Arc<EmbeddingModel>> {
        let slot = match &self.embedding {
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

    /// The engine that serves `id` and the adapter to run with: a model
    /// id, a merged adapter's name or `BASE:NAME`, or an adapter as
    /// `BASE:ADAPTER` or by its own name (loaded on first use).
    /// A tenant's adapters are found for that tenant only.
    pub async fn target(&self, principal: &Principal, id: &str) -> ApiResult<Target> {
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

    /// The engine and adapter of each local deployment among `offered`
    /// (whose model may name an adapter as `BASE:ADAPTER`), by name.
    pub async fn local_targets(
        &self,
        principal: &Principal,
        offered: &[&Deployment],
    ) -> HashMap<String, ApiResult<Target>> {
        let mut targets = HashMap::new();
        for deployment in offered {
            if deployment.provider == ProviderKind::Local {
                let target = self.target(principal, &deployment.model).await;
                targets.insert(deployment.name.clone(), target);
            }
        }
        targets
    }

    /// The engine of model `id` (503 while it loads).
    pub fn engine(&self, id: &str) -> ApiResult<Engine> {
        if let Some(engine) = self.engines().into_iter().find(|e| e.model().id == id) {
            return Ok(engine);
        }
        if self.is_loading(id) {
            return Err(ApiError::unavailable(format!(
                "The model '{id}' is still loading."
            )));
        }
        Err(ApiError::model_not_found(id))
    }

    fn is_loading(&self, id: &str) -> bool {
        self.loading.read().is_ok_and(|l| l.iter().any(|m| m == id))
    }
}

/// An adapter registry error as the API answers it; `param` names the
/// request field that chose the adapter.
pub fn adapter_error(error: RegistryError, param: &str) -> ApiError {
    let message = error.to_string();
    match error {
        RegistryError::Exists(_) => ApiError {
            kind: ErrorKind::Conflict,
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

/// Why an engine did not take a request, as the API answers it.
pub fn submit_error(error: SubmitError) -> ApiError {
    match error {
        SubmitError::Overloaded => ApiError::overloaded(),
        SubmitError::Stopped => ApiError::internal("model worker stopped"),
        SubmitError::KvCacheTooSmall { .. } => ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid_param("max_tokens", error.to_string())
        },
    }
}
