//! `/v1/batches`: create, retrieve, list and cancel, as OpenAI's Batch API.
//! The batch runner (batches/runner.rs) does the work; a tenant sees only
//! its own batches; an admin's key names any tenant with `?tenant=`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::Deserialize;

use super::AppState;
use super::extract::{ApiJson, ForTenant, acting_tenant};
use crate::batches::{BatchList, BatchObject, Batches, NewBatch};
use crate::error::{ApiError, ApiResult};
use crate::tenancy::Principal;

/// Batches listed per page when the client names no limit (OpenAI's).
const DEFAULT_LIST_LIMIT: usize = 20;

fn batches(state: &AppState) -> ApiResult<&Batches> {
    state
        .batches
        .as_ref()
        .ok_or_else(|| ApiError::not_found("This server runs no batches."))
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    ApiJson(new): ApiJson<NewBatch>,
) -> ApiResult<Json<BatchObject>> {
    Ok(Json(batches(&state)?.create(&principal, new).await?))
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(asked): Query<ForTenant>,
) -> ApiResult<Json<BatchObject>> {
    let tenant = acting_tenant(&principal, asked.tenant)?;
    Ok(Json(batches(&state)?.get(&tenant, &id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    after: Option<String>,
    limit: Option<usize>,
    tenant: Option<String>,
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Query(params): Query<ListParams>,
) -> ApiResult<Json<BatchList>> {
    let tenant = acting_tenant(&principal, params.tenant)?;
    let page = batches(&state)?
        .list(
            &tenant,
            params.after.as_deref(),
            params.limit.unwrap_or(DEFAULT_LIST_LIMIT),
        )
        .await?;
    Ok(Json(page))
}

pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(asked): Query<ForTenant>,
) -> ApiResult<Json<BatchObject>> {
    let tenant = acting_tenant(&principal, asked.tenant)?;
    Ok(Json(batches(&state)?.cancel(&tenant, &id).await?))
}
