//! qpai: the AI engine of Quantum-Page AI. Local inference with candle behind
//! an OpenAI-compatible HTTP API; every request goes through the gateway.

pub mod adapters;
pub mod batches;
pub mod bench;
pub mod catalog;
pub mod commands;
pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod experiments;
pub mod files;
pub mod fuzzing;
pub mod gateway;
pub mod http;
pub mod ledger;
pub mod lora;
pub mod models;
pub mod money;
pub mod prompts;
pub mod rag;
pub mod router;
pub mod server;
pub mod structured;
pub mod telemetry;
pub mod tenancy;

use std::sync::Arc;

pub use gateway::{EmbeddingSlot, Gateway};
pub use http::HttpConfig;

/// The HTTP application over `gateway` (tests drive it in-process).
pub fn app(gateway: Arc<Gateway>, config: HttpConfig) -> axum::Router {
    app_with_batches(gateway, None, config)
}

/// The HTTP application, with `/v1/batches` over `batches`.
pub fn app_with_batches(
    gateway: Arc<Gateway>,
    batches: Option<batches::Batches>,
    config: HttpConfig,
) -> axum::Router {
    app_draining(gateway, batches, config, http::drain::Drain::default())
}

/// `app_with_batches` whose API refuses new requests once `drain` begins.
pub fn app_draining(
    gateway: Arc<Gateway>,
    batches: Option<batches::Batches>,
    config: HttpConfig,
    drain: http::drain::Drain,
) -> axum::Router {
    telemetry::metrics_handle();
    http::router(http::AppState {
        gateway,
        batches,
        config,
        drain,
    })
}
