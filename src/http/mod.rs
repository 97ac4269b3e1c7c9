//! The OpenAI-compatible HTTP API: a thin skin over the gateway. Handlers
//! read requests, turn headers into hints and write answers; one file per
//! endpoint family.

mod adapters;
mod batches;
pub mod drain;
mod experiments;
pub mod extract;
mod files;
mod health;
mod inference;
mod models;
mod prompts;
mod sites;
mod usage;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};

use crate::error::{ApiError, ErrorKind};
use crate::gateway::Gateway;
use crate::tenancy::Principal;
use extract::BodyLimit;

/// Room for a multipart form's own bytes around an uploaded file.
const FORM_OVERHEAD: usize = 64 * 1024;

/// Limits of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub max_body_bytes: usize,
    /// Which addresses the sitemaps clients name may be fetched from.
    pub fetch: crate::rag::sources::fetch::FetchPolicy,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            fetch: Default::default(),
        }
    }
}

/// What the handlers share: the gateway, the batches (when the server
/// runs them) and the HTTP limits.
pub struct AppState {
    pub gateway: Arc<Gateway>,
    pub batches: Option<crate::batches::Batches>,
    pub config: HttpConfig,
    /// Set on SIGTERM: new API requests get 503.
    pub drain: drain::Drain,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.kind.status_code())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.to_json())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// The whole HTTP application; tests drive it in-process.
pub fn router(state: AppState) -> Router {
    let state = Arc::new(state);
    let request_id = HeaderName::from_static("x-request-id");
    let limit = state.config.max_body_bytes;
    let api = Router::new()
        .route("/v1/chat/completions", post(inference::chat_completions))
        .route("/v1/completions", post(inference::completions))
        .route("/v1/embeddings", post(inference::embeddings))
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
        .route(
            "/v1/files",
            get(files::list)
                .post(files::upload)
                .layer(DefaultBodyLimit::max(
                    crate::files::MAX_FILE_BYTES + FORM_OVERHEAD,
                )),
        )
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", get(batches::list).post(batches::create))
        .route("/v1/batches/{id}", get(batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route(
            "/v1/experiments",
            get(experiments::list).post(experiments::create),
        )
        .route("/v1/experiments/{id}", get(experiments::get))
        .route("/v1/feedback", post(experiments::feedback))
        .route("/v1/prompts", get(prompts::list))
        .route("/v1/prompts/{name}", get(prompts::get))
        .route("/v1/router/health", get(usage::router_health))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route_layer(middleware::from_fn_with_state(state.clone(), drain::gate));
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
    let principal = match state.gateway.tenancy.clone() {
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
            // The peer's address, where the server knows it.
            let address = req
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.ip());
            let checked = match tenancy.authenticate(secret, address).await {
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
        kind: ErrorKind::MethodNotAllowed,
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
