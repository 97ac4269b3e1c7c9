//! `GET /v1/prompts` and `GET /v1/prompts/{name}`: the versioned prompts a
//! request or batch line may name, with their variables.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::AppState;
use crate::error::{ApiError, ApiResult};

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": state.gateway.prompts.list()}))
}

/// Every version of one prompt, oldest first, with its templates.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let versions = state
        .gateway
        .prompts
        .versions(&name)
        .map_err(|e| ApiError {
            param: Some("name".into()),
            ..ApiError::not_found(e.message)
        })?;
    Ok(Json(
        json!({"id": name, "object": "prompt", "versions": versions}),
    ))
}
