//! The adapter admin API: `GET /v1/adapters` (list), `POST /v1/adapters`
//! (load from an adapter directory), `GET` and `DELETE /v1/adapters/{name}`.
//! A loaded adapter serves as `BASE:NAME` and as `NAME`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::extract::ApiJson;
use super::{AppState, adapter_error};
use crate::error::{ApiError, ApiResult};
use crate::lora::registry::{AdapterSpec, AdapterStatus, Origin, check_name};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadAdapter {
    pub name: String,
    /// A PEFT adapter directory inside one of the server's adapter
    /// directories (absolute, or relative to one of them).
    pub path: PathBuf,
    /// The served model it runs on (default: the first served model).
    pub base: Option<String>,
}

fn unknown(name: &str) -> ApiError {
    ApiError {
        code: Some("adapter_not_found"),
        param: Some("name".to_string()),
        ..ApiError::not_found(format!("No adapter named '{name}'."))
    }
}

pub async fn list_adapters(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": state.adapters.list()}))
}

pub async fn get_adapter(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<AdapterStatus>> {
    state
        .adapters
        .status(&name)
        .map(Json)
        .ok_or_else(|| unknown(&name))
}

/// Declares and loads an adapter: nothing is kept when any check fails.
pub async fn load_adapter(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<LoadAdapter>,
) -> ApiResult<(StatusCode, Json<AdapterStatus>)> {
    check_name(&body.name).map_err(|e| adapter_error(e, "name"))?;
    let engines = state.engines();
    let engine = match &body.base {
        Some(base) => engines
            .into_iter()
            .find(|e| e.model().id == *base)
            .ok_or_else(|| {
                ApiError::invalid_param("base", format!("The model '{base}' is not served here."))
            })?,
        None => engines
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::unavailable("No model is loaded yet."))?,
    };
    if engines_named(&state, &body.name) {
        return Err(ApiError::invalid_param(
            "name",
            format!("'{}' is the name of a served model.", body.name),
        ));
    }
    let path = state
        .adapters
        .inside_roots(&body.path)
        .map_err(|e| adapter_error(e, "path"))?;
    let spec = AdapterSpec {
        name: body.name.clone(),
        base: engine.model().id.clone(),
        path,
        origin: Origin::AdminApi,
    };
    let registry = state.adapters.clone();
    tokio::task::spawn_blocking(move || registry.register_and_load(spec, engine.model()))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| adapter_error(e, "path"))?;
    let status = state
        .adapters
        .status(&body.name)
        .ok_or_else(|| unknown(&body.name))?;
    Ok((StatusCode::CREATED, Json(status)))
}

fn engines_named(state: &AppState, name: &str) -> bool {
    state.engines().iter().any(|e| e.model().id == name)
}

/// Forgets the adapter; requests running with it finish with it, and its
/// memory is returned when the last one ends.
pub async fn unload_adapter(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let status = state.adapters.unload(&name).ok_or_else(|| unknown(&name))?;
    Ok(Json(json!({
        "name": name,
        "object": "adapter",
        "deleted": true,
        "bytes": status.bytes,
        "in_use": status.in_use,
    })))
}
