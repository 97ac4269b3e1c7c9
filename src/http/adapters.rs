//! The adapter API: `GET /v1/adapters` (list), `POST /v1/adapters` (load
//! from an adapter directory), `GET` and `DELETE /v1/adapters/{name}`.
//! A loaded adapter serves as `BASE:NAME` and as `NAME`. An admin's
//! adapters are shared; a tenant's are seen and used by that tenant only,
//! and load from `<adapter dir>/<tenant>/` only.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::extract::ApiJson;
use crate::adapters::registry::{AdapterSpec, AdapterStatus, Origin, check_name};
use crate::error::{ApiError, ApiResult};
use crate::gateway::adapter_error;
use crate::tenancy::Principal;

type Caller = Extension<Arc<Principal>>;

fn visible(principal: &Principal, status: &AdapterStatus) -> bool {
    status
        .spec
        .owner
        .as_ref()
        .is_none_or(|o| principal.may_see(o))
}

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

pub async fn list_adapters(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
) -> Json<serde_json::Value> {
    let data: Vec<_> = state
        .gateway
        .models
        .adapters
        .list()
        .into_iter()
        .filter(|a| visible(&principal, a))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn get_adapter(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<AdapterStatus>> {
    state
        .gateway
        .models
        .adapters
        .status(&name)
        .filter(|a| visible(&principal, a))
        .map(Json)
        .ok_or_else(|| unknown(&name))
}

/// Declares and loads an adapter: nothing is kept when any check fails.
pub async fn load_adapter(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
    ApiJson(body): ApiJson<LoadAdapter>,
) -> ApiResult<(StatusCode, Json<AdapterStatus>)> {
    check_name(&body.name).map_err(|e| adapter_error(e.into(), "name"))?;
    let engines = state.gateway.models.engines();
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
        .gateway
        .models
        .adapters
        .inside_roots(&body.path)
        .map_err(|e| adapter_error(e, "path"))?;
    let owner = (!principal.admin).then(|| principal.tenant.clone());
    if let Some(tenant) = &owner
        && !state
            .gateway
            .models
            .adapters
            .inside_tenant_dir(&path, tenant)
    {
        return Err(ApiError::invalid_param(
            "path",
            format!("A tenant's adapters load from the '{tenant}' folder of an adapter directory."),
        ));
    }
    let spec = AdapterSpec {
        name: body.name.clone(),
        base: engine.model().id.clone(),
        path,
        origin: Origin::AdminApi,
        owner,
    };
    let registry = state.gateway.models.adapters.clone();
    tokio::task::spawn_blocking(move || registry.register_and_load(spec, engine.model()))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| adapter_error(e, "path"))?;
    let status = state
        .gateway
        .models
        .adapters
        .status(&body.name)
        .ok_or_else(|| unknown(&body.name))?;
    Ok((StatusCode::CREATED, Json(status)))
}

fn engines_named(state: &AppState, name: &str) -> bool {
    state
        .gateway
        .models
        .engines()
        .iter()
        .any(|e| e.model().id == name)
}

/// Forgets the adapter; requests running with it finish with it, and its
/// memory is returned when the last one ends.
pub async fn unload_adapter(
    State(state): State<Arc<AppState>>,
    Extension(principal): Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    match state.gateway.models.adapters.status(&name) {
        Some(status) if status.spec.owner.is_some() && visible(&principal, &status) => {}
        Some(status) if visible(&principal, &status) => principal.require_admin()?,
        _ => return Err(unknown(&name)),
    }
    let status = state
        .gateway
        .models
        .adapters
        .unload(&name)
        .ok_or_else(|| unknown(&name))?;
    Ok(Json(json!({
        "name": name,
        "object": "adapter",
        "deleted": true,
        "bytes": status.bytes,
        "in_use": status.in_use,
    })))
}
