//! `GET /v1/models` and `GET /v1/models/{id}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};

use super::AppState;
use super::wire::{ModelCard, ModelList};
use crate::engine::Engine;
use crate::error::ApiResult;

fn card(engine: &Engine, created: u64) -> ModelCard {
    let model = engine.model();
    ModelCard {
        id: model.id.clone(),
        object: "model",
        created,
        owned_by: "qpai",
        kind: model.kind,
        architecture: model.architecture.clone(),
        context_length: model.context_length,
    }
}

fn started(state: &AppState) -> u64 {
    super::unix_now().saturating_sub(state.started_at.elapsed().as_secs())
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let created = started(&state);
    Json(ModelList {
        object: "list",
        data: state.engines().iter().map(|e| card(e, created)).collect(),
    })
}

pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<ModelCard>> {
    let engine = state.engine(&id)?;
    Ok(Json(card(&engine, started(&state))))
}
