//! `GET /v1/usage` (the ledger, grouped) and `GET /v1/router/health` (the
//! deployments' circuit breakers). A tenant's key reads its own tenant's
//! usage only; an admin's may read any tenant's, or all.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::ledger::{GroupKey, UsageQuery};
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

fn day(param: &str, value: Option<String>) -> ApiResult<Option<String>> {
    match value {
        Some(text) if chrono::NaiveDate::parse_from_str(&text, "%Y-%m-%d").is_err() => {
            Err(ApiError::invalid_param(
                param,
                format!("'{param}' must be a day as YYYY-MM-DD, not {text:?}."),
            ))
        }
        other => Ok(other),
    }
}

/// Parses `group_by`.
pub fn group_keys(text: Option<&str>) -> Result<Vec<GroupKey>, String> {
    text.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            GroupKey::parse(name).ok_or_else(|| {
                format!(
                    "cannot group by {name:?}: use model, provider, key, day, tenant, deployment, batch, prompt or eval"
                )
            })
        })
        .collect()
}

pub async fn usage(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Query(params): Query<UsageParams>,
) -> ApiResult<Json<serde_json::Value>> {
    let tenancy = state
        .gateway
        .tenancy
        .clone()
        .ok_or_else(|| ApiError::not_found("This server keeps no usage ledger."))?;
    let group_by = group_keys(params.group_by.as_deref())
        .map_err(|e| ApiError::invalid_param("group_by", e))?;
    let tenant = match params.tenant {
        Some(tenant) if !principal.may_see(&tenant) => {
            return Err(ApiError::forbidden(
                "A tenant's key reads its own usage only.",
            ));
        }
        Some(tenant) => Some(tenant),
        None if principal.admin => None,
        None => Some(principal.tenant.clone()),
    };
    let query = UsageQuery {
        tenant,
        key_id: params.key,
        from_day: day("from", params.from)?,
        to_day: day("to", params.to)?,
        group_by,
    };
    tenancy.ledger.flush().await;
    let rows = tenancy
        .ledger
        .usage(&query)
        .await
        .map_err(ApiError::internal)?;
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
