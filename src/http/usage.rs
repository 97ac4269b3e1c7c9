//! `GET /v1/usage` (the ledger, grouped, as `Gateway::usage` reads it) and
//! `GET /v1/router/health` (the deployments' circuit breakers).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use crate::error::ApiResult;
use crate::gateway::usage::UsageAsk;
use crate::money::Usd;
use crate::tenancy::Principal;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// Comma-separated: model, provider, key, day, tenant, deployment.
    pub group_by: Option<String>,
    /// First and last day, `YYYY-MM-DD`, inclusive.
    pub from: Option<String>,
    pub to: Option<String>,
    pub tenant: Option<String>,
    pub key: Option<String>,
}

pub async fn usage(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Query(params): Query<UsageParams>,
) -> ApiResult<Json<serde_json::Value>> {
    let ask = UsageAsk {
        group_by: params.group_by,
        from: params.from,
        to: params.to,
        tenant: params.tenant,
        key: params.key,
    };
    let rows = state.gateway.usage(&principal, ask).await?;
    let total = Usd(rows.iter().map(|r| r.cost.0).sum());
    let data: Vec<_> = rows
        .iter()
        .map(|row| {
            let mut value = serde_json::to_value(row).unwrap_or_default();
            value["object"] = json!("usage.group");
            value
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "total": {
            "requests": rows.iter().map(|r| r.requests).sum::<u64>(),
            "prompt_tokens": rows.iter().map(|r| r.prompt_tokens).sum::<u64>(),
            "completion_tokens": rows.iter().map(|r| r.completion_tokens).sum::<u64>(),
            "cost_usd": total.to_string(),
        },
    })))
}

pub async fn router_health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let router = state.gateway.router.clone();
    let names = router.catalog.deployments.iter().map(|d| d.name.as_str());
    let mut data = Vec::new();
    for (health, deployment) in router
        .breakers
        .snapshot(names)
        .into_iter()
        .zip(&router.catalog.deployments)
    {
        let mut value = serde_json::to_value(&health).unwrap_or_default();
        value["provider"] = json!(deployment.provider.as_str());
        value["model"] = json!(deployment.model);
        data.push(value);
    }
    Json(json!({ "object": "list", "data": data }))
}
