//! `GET /v1/models` and `GET /v1/models/{id}`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::{Extension, Json};

use super::AppState;
use crate::engine::Engine;
use crate::error::ApiResult;
use crate::gateway::EmbeddingSlot;
use crate::gateway::wire::{ModelCard, ModelList};
use crate::router::ProviderKind;
use crate::tenancy::Principal;

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
        device: Some(crate::models::device_name(&model.device)),
    }
}

/// Cards of the adapters served per request: `BASE:NAME` on their base
/// (a tenant's own adapters only to that tenant).
fn adapter_cards(state: &AppState, principal: &Principal, created: u64) -> Vec<ModelCard> {
    let engines = state.gateway.models.engines();
    state
        .gateway
        .models
        .adapters
        .list()
        .into_iter()
        .filter(|a| a.spec.owner.as_ref().is_none_or(|o| principal.may_see(o)))
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
        device: None,
    }
}

fn started(state: &AppState) -> u64 {
    crate::gateway::unix_now().saturating_sub(state.gateway.started_at.elapsed().as_secs())
}

/// Cards of the router's names: its deployments and logical models (and
/// `auto`), which chat completions accept like any model.
fn routed_cards(state: &AppState, created: u64) -> Vec<ModelCard> {
    let router = state.gateway.router.clone();
    let catalog = &router.catalog;
    if catalog.deployments.is_empty() {
        return Vec::new();
    }
    let routed = |id: String, context_length: usize, owned_by: &'static str| ModelCard {
        id,
        object: "model",
        created,
        owned_by,
        kind: crate::models::ModelKind::Chat,
        architecture: "routed".to_string(),
        context_length,
        parent: None,
        device: None,
    };
    let widest = |indexes: &mut dyn Iterator<Item = usize>| {
        indexes
            .map(|i| catalog.deployments[i].context_window)
            .max()
            .unwrap_or(0)
    };
    let mut cards: Vec<ModelCard> = catalog
        .deployments
        .iter()
        .filter(|d| d.provider != ProviderKind::Local || d.name != d.model)
        .map(|d| routed(d.name.clone(), d.context_window, d.provider.as_str()))
        .collect();
    cards.extend(catalog.models.iter().map(|(name, indexes)| {
        routed(
            name.clone(),
            widest(&mut indexes.iter().copied()),
            "qpai-router",
        )
    }));
    cards.push(routed(
        crate::router::policy::AUTO.to_string(),
        widest(&mut (0..catalog.deployments.len())),
        "qpai-router",
    ));
    cards
}

pub async fn list_models(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
) -> Json<ModelList> {
    let created = started(&state);
    let mut data: Vec<ModelCard> = state
        .gateway
        .models
        .engines()
        .iter()
        .map(|e| card(e, created))
        .collect();
    data.extend(adapter_cards(&state, &principal, created));
    data.extend(routed_cards(&state, created));
    data.extend(
        state
            .gateway
            .models
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
    Extension(principal): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> ApiResult<Json<ModelCard>> {
    if let Some(slot) = state.gateway.models.embedding_slot().filter(|s| s.id == id) {
        return Ok(Json(embedding_card(slot, started(&state))));
    }
    let created = started(&state);
    if let Some(card) = routed_cards(&state, created)
        .into_iter()
        .find(|c| c.id == id)
    {
        return Ok(Json(card));
    }
    if let Some(card) = adapter_cards(&state, &principal, created)
        .into_iter()
        .find(|c| c.id == id || c.id.rsplit_once(':').is_some_and(|(_, name)| name == id))
    {
        return Ok(Json(card));
    }
    let engine = state.gateway.models.engine(&id)?;
    Ok(Json(card(&engine, created)))
}
