//! `/v1/files`: upload (multipart: `file`, `purpose`, `expires_after`),
//! list, retrieve, content and delete, as OpenAI's Files API. A tenant sees
//! only its own files; an admin's key names any tenant with `?tenant=`.

use std::sync::Arc;

use axum::extract::{Multipart, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::extract::{ForTenant, acting_tenant};
use crate::error::{ApiError, ApiResult};
use crate::files::{FileList, FileObject, NewFile, Order, Purpose};
use crate::tenancy::Principal;

/// Purposes a client may upload with (`batch_output` is qpai's to write).
const UPLOADABLE: [Purpose; 3] = [Purpose::Batch, Purpose::Evals, Purpose::UserData];

pub async fn upload(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    mut form: Multipart,
) -> ApiResult<Json<FileObject>> {
    let files = state.gateway.files()?;
    let bad = |param: &str, e: axum::extract::multipart::MultipartError| {
        ApiError::invalid_param(
            param,
            format!("The form could not be read: {}", e.body_text()),
        )
    };
    let mut content = None;
    let mut filename = None;
    let mut purpose = None;
    let mut expires_after_s = None;
    let mut anchor = None;
    while let Some(field) = form.next_field().await.map_err(|e| bad("file", e))? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "file" => {
                filename = Some(field.file_name().unwrap_or("upload").to_string());
                content = Some(field.bytes().await.map_err(|e| bad("file", e))?);
            }
            "purpose" | "expires_after[seconds]" | "expires_after[anchor]" => {
                let text = field.text().await.map_err(|e| bad(&name, e))?;
                match name.as_str() {
                    "purpose" => purpose = Some(text),
                    "expires_after[anchor]" => anchor = Some(text),
                    _ => {
                        expires_after_s = Some(text.trim().parse::<u64>().map_err(|_| {
                            ApiError::invalid_param(
                                "expires_after.seconds",
                                format!("'expires_after[seconds]' must be a number, not {text:?}."),
                            )
                        })?)
                    }
                }
            }
            _ => return Err(ApiError::unsupported_param(&name)),
        }
    }
    let content =
        content.ok_or_else(|| ApiError::invalid_param("file", "The form has no 'file' part."))?;
    let purpose = purpose
        .ok_or_else(|| ApiError::invalid_param("purpose", "The form has no 'purpose' part."))?;
    let purpose = Purpose::parse(&purpose)
        .filter(|p| UPLOADABLE.contains(p))
        .ok_or_else(|| {
            ApiError::invalid_param(
                "purpose",
                format!("'purpose' must be one of batch, evals, user_data; not {purpose:?}."),
            )
        })?;
    if let Some(anchor) = anchor.filter(|a| a != "created_at") {
        return Err(ApiError::invalid_param(
            "expires_after.anchor",
            format!("'expires_after[anchor]' must be created_at, not {anchor:?}."),
        ));
    }
    let file = NewFile {
        filename: filename.unwrap_or_default(),
        purpose,
        content,
        expires_after_s,
    };
    Ok(Json(files.create(&principal.tenant, file).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    purpose: Option<String>,
    tenant: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
    order: Option<Order>,
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Query(params): Query<ListParams>,
) -> ApiResult<Json<FileList>> {
    let purpose =
        match params.purpose.as_deref() {
            Some(text) => Some(Purpose::parse(text).ok_or_else(|| {
                ApiError::invalid_param("purpose", format!("No purpose {text:?}."))
            })?),
            None => None,
        };
    let tenant = acting_tenant(&principal, params.tenant)?;
    let page = state
        .gateway
        .files()?
        .list(
            &tenant,
            purpose,
            params.after.as_deref(),
            params.limit.unwrap_or(10_000),
            params.order.unwrap_or_default(),
        )
        .await?;
    Ok(Json(page))
}

pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(asked): Query<ForTenant>,
) -> ApiResult<Json<FileObject>> {
    Ok(Json(
        state
            .gateway
            .files()?
            .get(&acting_tenant(&principal, asked.tenant)?, &id)
            .await?,
    ))
}

pub async fn content(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(asked): Query<ForTenant>,
) -> ApiResult<Response> {
    let bytes = state
        .gateway
        .files()?
        .content(&acting_tenant(&principal, asked.tenant)?, &id)
        .await?;
    Ok(([("content-type", "application/octet-stream")], bytes).into_response())
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(asked): Query<ForTenant>,
) -> ApiResult<Json<serde_json::Value>> {
    state
        .gateway
        .files()?
        .delete(&acting_tenant(&principal, asked.tenant)?, &id)
        .await?;
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}
