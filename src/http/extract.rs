//! The JSON body extractor: every way a body can be wrong (too large, not
//! UTF-8, not JSON, wrong types, unknown variants) becomes the OpenAI error
//! envelope naming the offending parameter when there is one.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

pub use crate::gateway::wire::parse_json;

use crate::error::{ApiError, ApiResult};
use crate::tenancy::Principal;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ApiBody(bytes) = ApiBody::from_request(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// The raw body, with the same errors as `ApiJson` for one that is too
/// large or cannot be read (for handlers that parse it more than one way).
pub struct ApiBody(pub Bytes);

impl<S> FromRequest<S> for ApiBody
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(usize::MAX, |l| l.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(limit)
            } else {
                ApiError::bad_body(
                    format!("Could not read the request body: {rejection}"),
                    None,
                )
            }
        })?;
        Ok(ApiBody(bytes))
    }
}

/// The configured body limit, put in request extensions so that the 413
/// message can state it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// `?tenant=NAME` on the endpoints of a tenant's own resources (files,
/// batches, experiments).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForTenant {
    pub tenant: Option<String>,
}

/// The tenant whose resources a request reads or changes: the caller's own,
/// or with `?tenant=` any tenant's for an admin's key. A tenant's key naming
/// another tenant gets the same 403 whether that tenant exists or not.
pub fn acting_tenant(principal: &Principal, asked: Option<String>) -> ApiResult<String> {
    match asked {
        None => Ok(principal.tenant.clone()),
        Some(tenant) if principal.may_see(&tenant) => Ok(tenant),
        Some(_) => Err(ApiError::forbidden(
            "A tenant's key acts on its own tenant's resources only; `tenant` needs an admin key.",
        )),
    }
}
