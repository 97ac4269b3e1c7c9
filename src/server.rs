//! `qpai serve`: binds first (so /health answers at once), loads the models
//! in the background (`/ready` turns 200 when all are loaded), then serves
//! until SIGINT/SIGTERM.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::adapters::registry::{AdapterLimits, AdapterRegistry, AdapterSpec, Origin};
use crate::catalog::Catalog;
use crate::catalog::fetch::ModelStore;
use crate::catalog::resolve::{load_embedding_model, resolve};
use crate::config::{GlobalArgs, LoraArg, ServeArgs};
use crate::engine::{Engine, EngineConfig};
use crate::gateway::{EmbeddingSlot, Gateway, LocalModels};
use crate::http::HttpConfig;
use crate::lora::Adapter;
use crate::models::load_model;
use crate::router::{
    BreakerConfig, ModelRouter, ProviderKind, RetryPolicy, RouterCatalog, Timeouts,
};

/// What `qpai serve` and `qpai batch` run on: the gateway (its models
/// loading in the background), the ledger and the batches.
pub struct Stack {
    pub gateway: Arc<Gateway>,
    pub ledger: crate::ledger::Ledger,
    pub batches: crate::batches::Batches,
    pub runner_config: crate::batches::runner::RunnerConfig,
    /// Ends when every model has loaded (or one failed).
    pub loading: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// What a command-line job (`qpai batch run`, `qpai eval run`) needs of
/// the serving stack.
pub struct JobSettings {
    /// The models the job names: loaded when no route names them, else the
    /// routing catalog's local deployments are.
    pub models: Vec<String>,
    /// Whether the embedding model is loaded.
    pub embeddings: bool,
    pub router_config: Option<std::path::PathBuf>,
    pub prompts_dir: Option<std::path::PathBuf>,
    /// Batch lines run at once.
    pub concurrency: usize,
}

/// `serve`'s settings, parsed as its flags are.
#[derive(clap::Parser)]
struct ServeSettings {
    #[command(flatten)]
    serve: ServeArgs,
}

impl JobSettings {
    /// The serving settings of the job.
    pub fn serve_args(&self) -> anyhow::Result<ServeArgs> {
        use clap::Parser;
        let mut argv: Vec<String> = vec!["serve".into()];
        if !self.embeddings {
            argv.extend(["--embedding-model".into(), String::new()]);
        }
        let models = self.local_models()?;
        if models.is_empty() {
            // Routes only: no local model (not even the default one).
            argv.extend(["--model".into(), String::new()]);
        }
        for model in models {
            argv.extend(["--model".into(), model]);
        }
        let concurrency = self.concurrency.max(1).to_string();
        argv.extend(["--batch-concurrency".into(), concurrency]);
        if let Some(path) = &self.router_config {
            argv.extend(["--router-config".into(), path.display().to_string()]);
        }
        if let Some(path) = &self.prompts_dir {
            argv.extend(["--prompts-dir".into(), path.display().to_string()]);
        }
        Ok(ServeSettings::try_parse_from(argv)?.serve)
    }

    /// The local models to load: each named model no route names, and the
    /// catalog's local deployments when a route is named.
    fn local_models(&self) -> anyhow::Result<Vec<String>> {
        let catalog = match &self.router_config {
            Some(path) => Some(crate::router::ModelRouter::load_catalog(path)?),
            None => None,
        };
        let mut models = Vec::new();
        for name in &self.models {
            let routed = catalog
                .as_ref()
                .filter(|c| crate::router::policy::offered(c, name).is_some());
            match routed {
                None => models.push(name.clone()),
                Some(catalog) => models.extend(
                    catalog
                        .deployments
                        .iter()
                        .filter(|d| d.provider == crate::router::ProviderKind::Local)
                        .map(|d| d.base_model().to_string()),
                ),
            }
        }
        models.sort();
        models.dedup();
        Ok(models)
    }
}

/// Opens the databases and stores, builds the gateway, and starts loading
/// the models of `args`.
pub async fn build(args: ServeArgs, global: &GlobalArgs) -> anyhow::Result<Stack> {
    let catalog = Catalog::load(global.catalog.as_deref())?;
    let store = ModelStore::new(global.models_dir());
    let loras: Vec<LoraArg> = args
        .loras
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let adapter_dirs = if args.adapter_dirs.is_empty() {
        vec![global.data_dir().join("adapters")]
    } else {
        args.adapter_dirs.clone()
    };
    let limits = AdapterLimits {
        max_resident: args.max_adapters.max(1),
        max_bytes: args.max_adapter_memory_mb.saturating_mul(1 << 20),
    };
    let mut builder = Gateway::builder().adapters(AdapterRegistry::new(&adapter_dirs, limits));
    if !args.embedding_model.is_empty() {
        builder = builder.embedding(embedding_slot(&args.embedding_model, &catalog, &store));
    }
    let rag_uri = global.rag_uri();
    if cfg!(feature = "lance") {
        let store = crate::rag::Store::open(&rag_uri)
            .await
            .with_context(|| format!("opening the site store {rag_uri}"))?;
        builder = builder.rag_store(store);
    } else {
        tracing::warn!("built without the `lance` feature: no site store, RAG is off");
    }
    let database = global.database_url();
    let ledger = crate::ledger::Ledger::open(&database)
        .await
        .with_context(|| format!("opening the ledger database {}", redact(&database)))?;
    let tenancy = crate::tenancy::Tenancy::new(ledger.clone()).await?;
    tracing::info!(
        database = ledger.db().backend(),
        keys_required = tenancy.auth_required(),
        "ledger open"
    );
    let files = crate::files::Files::new(
        &ledger,
        Arc::new(crate::files::LocalBlobs::new(
            global.data_dir().join("files"),
        )),
    );
    let batches = crate::batches::Batches::new(&ledger, files.clone());
    let runner_config = crate::batches::runner::RunnerConfig {
        concurrency: args.batch_concurrency,
        lease: Duration::from_secs(args.batch_lease_s.max(3)),
        ..Default::default()
    };
    let prompts_dir = args
        .prompts_dir
        .clone()
        .unwrap_or_else(|| global.data_dir().join("prompts"));
    let prompts = crate::prompts::Prompts::load(&prompts_dir)?;
    let gateway = builder
        .prompts(prompts)
        .files(files)
        .tenancy(tenancy)
        .router(model_router(&args)?)
        .build()?;
    gateway.models.expect(
        args.models
            .iter()
            .filter_map(|m| catalog.get(m).map(|e| e.id.clone())),
    );
    if args.merge {
        gateway.models.expect(loras.iter().map(|l| l.name.clone()));
    }
    let loading = tokio::task::spawn_blocking({
        let gateway = gateway.clone();
        let engine_config = EngineConfig {
            max_running: args.max_running,
            max_in_flight: args.max_in_flight,
            prefill_chunk: args.prefill_chunk,
        };
        move || {
            load_all(
                &args,
                &loras,
                &catalog,
                &store,
                &gateway.models,
                engine_config,
            )
        }
    });
    let loading = tokio::spawn(async move {
        loading
            .await
            .unwrap_or_else(|join| Err(anyhow::anyhow!("model loading task: {join}")))
    });
    Ok(Stack {
        gateway,
        ledger,
        batches,
        runner_config,
        loading,
    })
}

pub async fn serve(args: ServeArgs, global: GlobalArgs) -> anyhow::Result<()> {
    let config = HttpConfig {
        max_body_bytes: args.max_body_bytes,
        fetch: args.fetch.policy(),
    };
    let (host, port) = (args.host.clone(), args.port);
    let grace = Duration::from_secs_f64(args.shutdown_grace_s.max(0.0));
    let stack = build(args, &global).await?;
    let listener = TcpListener::bind((host.as_str(), port))
        .await
        .with_context(|| format!("binding {host}:{port}"))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, data_dir = %global.data_dir().display(), "listening");
    // A model that fails to load stops the server with that error.
    let failure: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
    let failed = Arc::new(Notify::new());
    tokio::spawn({
        let (failure, failed) = (failure.clone(), failed.clone());
        let loading = stack.loading;
        async move {
            let outcome = match loading.await {
                Ok(result) => result,
                Err(join) => Err(anyhow::anyhow!("model loading task: {join}")),
            };
            match outcome {
                Ok(()) => tracing::info!("all models loaded; ready"),
                Err(error) => {
                    if let Ok(mut slot) = failure.lock() {
                        *slot = Some(error);
                    }
                    failed.notify_one();
                }
            }
        }
    });
    let (gateway, batches) = (stack.gateway, stack.batches);
    let runner = (stack.runner_config.concurrency > 0).then(|| {
        crate::batches::runner::spawn(batches.clone(), gateway.clone(), stack.runner_config)
    });
    let drain = crate::http::drain::Drain::default();
    let app = crate::app_draining(gateway, Some(batches), config, drain.clone());
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let serving = axum::serve(listener, app).with_graceful_shutdown({
        let drain = drain.clone();
        async move {
            tokio::select! {
                _ = shutdown_signal() => {},
                _ = failed.notified() => {},
            }
            // New requests get 503 while those in flight finish; what is
            // still open when the grace period ends is cut (and billed).
            drain.begin();
            tracing::info!(
                in_flight = drain.in_flight(),
                grace_s = grace.as_secs_f64(),
                "draining"
            );
            drain.settled(grace).await;
            if drain.in_flight() > 0 {
                tracing::warn!(
                    in_flight = drain.in_flight(),
                    "the grace period ended with requests in flight; cutting them"
                );
            }
            drain.cut();
        }
    });
    // A connection that still does not close is left behind.
    let backstop = async {
        while !drain.is_draining() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep_until(drain.deadline(grace) + Duration::from_secs(5)).await;
    };
    tokio::select! {
        served = serving => served.context("serving")?,
        _ = backstop => tracing::warn!("connections still open after the grace period; leaving them"),
    }
    if let Some(runner) = runner {
        runner.stop().await;
    }
    stack.ledger.flush().await;
    match failure.lock().ok().and_then(|mut slot| slot.take()) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// A database URL without its password, for logs and errors.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// The router from `--router-config` (or one that routes to local models only).
fn model_router(args: &ServeArgs) -> anyhow::Result<ModelRouter> {
    let catalog = match &args.router_config {
        Some(path) => ModelRouter::load_catalog(path)?,
        None => RouterCatalog::default(),
    };
    if catalog
        .deployments
        .iter()
        .any(|d| d.provider != ProviderKind::Local)
    {
        // OpenAI's BPE tables load once, here rather than in a request.
        tokio::task::spawn_blocking(crate::router::tokens::warm_up);
    }
    tracing::info!(
        deployments = catalog.deployments.len(),
        models = catalog.models.len(),
        "routing catalog"
    );
    let timeouts = Timeouts {
        connect: Duration::from_millis(args.upstream_connect_timeout_ms),
        first_byte: Duration::from_millis(args.upstream_first_byte_timeout_ms),
        total: Duration::from_secs(args.upstream_timeout_s),
    };
    let breaker = BreakerConfig {
        threshold: args.breaker_threshold.max(1),
        cooldown: Duration::from_secs_f64(args.breaker_cooldown_s.max(0.0)),
    };
    let retry = RetryPolicy {
        retries: args.router_retries,
        ..RetryPolicy::default()
    };
    ModelRouter::new(catalog, timeouts, breaker, retry).map_err(anyhow::Error::msg)
}

/// The embedding model, resolved (pulled if needed) and loaded on first use.
fn embedding_slot(spec: &str, catalog: &Catalog, store: &ModelStore) -> EmbeddingSlot {
    let context_length = catalog.get(spec).map_or(512, |e| e.context_length);
    let (spec, catalog, store) = (spec.to_string(), catalog.clone(), store.clone());
    EmbeddingSlot::new(spec.clone(), context_length, move || {
        load_embedding_model(&spec, &catalog, &store)
    })
}

fn load_all(
    args: &ServeArgs,
    loras: &[LoraArg],
    catalog: &Catalog,
    store: &ModelStore,
    models: &LocalModels,
    engine_config: EngineConfig,
) -> anyhow::Result<()> {
    let mut bases = Vec::new();
    // An empty name loads nothing (a server of routes only).
    for spec in args.models.iter().filter(|m| !m.is_empty()) {
        let loaded = resolve(spec, catalog, store).and_then(|mut resolved| {
            if let Some(cap) = args.max_context {
                resolved.options.max_context =
                    Some(resolved.options.max_context.map_or(cap, |c| c.min(cap)));
            }
            resolved.options.kv_cache = args.kv_cache();
            let model = load_model(&resolved.source, &resolved.options)?;
            Ok((model, resolved))
        });
        let (model, resolved) = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                models.forget(spec);
                return Err(error.context(format!("loading model `{spec}`")));
            }
        };
        bases.push((model.id.clone(), resolved));
        models.add(Engine::start(model, engine_config)?);
    }
    for entry in catalog.adapters() {
        if bases.iter().any(|(id, _)| *id == entry.base) {
            models.adapters.register(AdapterSpec {
                name: entry.id.clone(),
                base: entry.base.clone(),
                path: catalog.adapter_path(entry),
                origin: Origin::Catalog,
                owner: None,
            })?;
        }
    }
    for lora in loras {
        let base = lora
            .base
            .as_deref()
            .or(bases.first().map(|(id, _)| id.as_str()));
        let Some((base, resolved)) = bases.iter().find(|(id, _)| Some(id.as_str()) == base) else {
            anyhow::bail!(
                "--lora {}: no served model {:?}",
                lora.name,
                base.unwrap_or_default()
            );
        };
        if args.merge {
            let adapter = Adapter::load(&lora.path)
                .map_err(|e| anyhow::anyhow!("--lora {}: {e}", lora.name))?;
            let mut options = resolved.options.clone();
            options.id = lora.name.clone();
            options.merge = Some(Arc::new(adapter));
            let mut model = load_model(&resolved.source, &options)
                .map_err(|e| e.context(format!("merging --lora {} into {base}", lora.name)))?;
            model.parent = Some(base.clone());
            models.add(Engine::start(model, engine_config)?);
            tracing::info!(adapter = %lora.name, %base, "adapter merged");
        } else {
            let spec = AdapterSpec {
                name: lora.name.clone(),
                base: base.clone(),
                path: lora.path.clone(),
                origin: Origin::CommandLine,
                owner: None,
            };
            let engine = models
                .engine(base)
                .map_err(|e| anyhow::anyhow!(e.message))?;
            models.adapters.register_and_load(spec, engine.model())?;
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
