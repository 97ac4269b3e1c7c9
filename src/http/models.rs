//! `GET /v1/models` and `GET /v1/models/{id}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};

use super::wire::{ModelCard, ModelList};
use super::{AppState, EmbeddingSlot};
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

fn embedding_card(slot: &EmbeddingSlot, created: u64) -> ModelCard {
    ModelCard {
        id: slot.id.clone(),
        object: "model",
        created,
        owned_by: "qpai",
        kind: crate::models::ModelKind::Embedding,
        architecture: "BertModel".to_string(),
        context_length: slot.context_length,
    }
}

fn started(state: &AppState) -> u64 {
    super::unix_now().saturating_sub(state.started_at.elapsed().as_secs())
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let created = started(&state);
    let mut data: Vec<ModelCard> = state.engines().iter().map(|e| card(e, created)).collect();
    data.extend(
        state
            .embedding_slot()
            .map(|slot| embedding_card(slot, created)),
    );
    Json(ModelList {
        object: "list",
        data,
    })
}

pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<ModelCard>> {
    if let Some(slot) = state.embedding_slot().filter(|s| s.id == id) {
        return Ok(Json(embedding_card(slot, started(&state))));
    }
    let engine = state.engine(&id)?;
    Ok(Json(card(&engine, started(&state))))
}
