//! Online experiments over HTTP: `POST /v1/experiments` creates one,
//! `GET /v1/experiments[/{id}]` shows each variant's posterior, traffic
//! share and probability of being best, and `POST /v1/feedback` scores a
//! request (`request_id`, from the `x-qpai-request-id` response header) or
//! an episode (`episode_id`). A caller sees its own tenant's only; an
//! admin's key names any tenant with `?tenant=`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde_json::{Value, json};

use super::AppState;
use super::extract::{ApiBody, ForTenant, acting_tenant, parse_json};
use crate::error::{ApiError, ApiResult};
use crate::experiments::{ExperimentSpec, Experiments, FeedbackTarget};
use crate::tenancy::Principal;

fn experiments(state: &AppState) -> ApiResult<&Experiments> {
    state.gateway.experiments.as_ref().ok_or_else(|| {
        ApiError::unavailable(
            "Experiments need the ledger database, which this server runs without.",
        )
    })
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    ApiBody(body): ApiBody,
) -> ApiResult<impl IntoResponse> {
    let spec = ExperimentSpec::parse(parse_json(&body)?)?;
    let experiments = experiments(&state)?;
    for (index, variant) in spec.variants.iter().enumerate() {
        state
            .gateway
            .check_variant(&principal, variant, &format!("variants[{index}]"))
            .await?;
    }
    experiments.create(&principal.tenant, &spec).await?;
    let shown = experiments.describe(&principal.tenant, &spec.id).await?;
    Ok((StatusCode::CREATED, Json(shown)))
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Query(asked): Query<ForTenant>,
) -> ApiResult<Json<Value>> {
    let tenant = acting_tenant(&principal, asked.tenant)?;
    let experiments = experiments(&state)?;
    let mut data = Vec::new();
    for id in experiments.list(&tenant).await? {
        data.push(experiments.describe(&tenant, &id).await?);
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(asked): Query<ForTenant>,
) -> ApiResult<Json<Value>> {
    let tenant = acting_tenant(&principal, asked.tenant)?;
    let shown = experiments(&state)?.describe(&tenant, &id).await?;
    Ok(Json(shown))
}

/// `{request_id | episode_id, metric, value}`.
pub async fn feedback(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    ApiBody(body): ApiBody,
) -> ApiResult<Json<Value>> {
    let body: Value = parse_json(&body)?;
    let text = |name: &str| -> ApiResult<Option<String>> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::invalid_param(
                name,
                format!("'{name}' must be a non-empty string."),
            )),
        }
    };
    let target = match (text("request_id")?, text("episode_id")?) {
        (Some(id), None) => FeedbackTarget::Request(id),
        (None, Some(id)) => FeedbackTarget::Episode(id),
        _ => {
            return Err(ApiError::invalid_param(
                "request_id",
                "Give exactly one of 'request_id' and 'episode_id'.",
            ));
        }
    };
    let metric = text("metric")?
        .ok_or_else(|| ApiError::invalid_param("metric", "'metric' is required."))?;
    let value = body
        .get("value")
        .filter(|v| !v.is_null())
        .ok_or_else(|| ApiError::invalid_param("value", "'value' is required."))?;
    if let Some(unknown) = body.as_object().and_then(|o| {
        o.keys()
            .find(|k| !["request_id", "episode_id", "metric", "value"].contains(&k.as_str()))
    }) {
        return Err(ApiError::unsupported_param(unknown));
    }
    let counted = experiments(&state)?
        .feedback(&principal.tenant, &target, &metric, value)
        .await?;
    Ok(Json(
        json!({"object": "feedback", "metric": metric, "experiments": counted}),
    ))
}
