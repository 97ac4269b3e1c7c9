//! Liveness (`/health`), readiness (`/ready`: every announced model loaded)
//! and Prometheus metrics (`/metrics`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

/// 200 while every model worker runs; 503 naming the ones that died.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let dead: Vec<String> = state
        .gateway
        .models
        .engines()
        .iter()
        .filter(|e| !e.stats().worker_alive.load(Ordering::SeqCst))
        .map(|e| e.model().id.clone())
        .collect();
    if dead.is_empty() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unhealthy", "dead_workers": dead})),
        )
            .into_response()
    }
}

pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let models: Vec<serde_json::Value> = state
        .gateway
        .models
        .engines()
        .iter()
        .map(|e| {
            let stats = e.stats();
            json!({
                "id": e.model().id,
                "waiting": stats.waiting.load(Ordering::SeqCst),
                "running": stats.running.load(Ordering::SeqCst),
            })
        })
        .collect();
    let ready = state.gateway.models.is_ready() && !state.drain.is_draining();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready, "models": models}))).into_response()
}

pub async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::render_metrics(),
    )
        .into_response()
}
