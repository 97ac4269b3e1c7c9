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
        parent: model.parent.clone(),
    }
}

/// Cards of the adapters served per request: `BASE:NAME` on their base.
fn adapter_cards(state: &AppState, created: u64) -> Vec<ModelCard> {
    let engines = state.engines();
    state
        .adapters
        .list()
        .into_iter()
        .filter_map(|adapter| {
            let base = engines.iter().find(|e| e.model().id == adapter.spec.base)?;
            let mut card = card(base, created);
            card.id = format!("{}:{}", adapter.spec.base, adapter.spec.name);
            card.parent = Some(adapter.spec.base);
            Some(card)
        })
        .collect()
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
        parent: None,
    }
}

fn started(state: &AppState) -> u64 {
    super::unix_now().saturating_sub(state.started_at.elapsed().as_secs())
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let created = started(&state);
    let mut data: Vec<ModelCard> = state.engines().iter().map(|e| card(e, created)).collect();
    data.extend(adapter_cards(&state, created));
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
    let created = started(&state);
    if let Some(card) = adapter_cards(&state, created)
        .into_iter()
        .find(|c| c.id == id || c.id.rsplit_once(':').is_some_and(|(_, name)| name == id))
    {
        return Ok(Json(card));
    }
    let engine = state.engine(&id)?;
    Ok(Json(card(&engine, created)))
}
