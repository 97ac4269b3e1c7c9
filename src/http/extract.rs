//! The JSON body extractor: every way a body can be wrong (too large, not
//! UTF-8, not JSON, wrong types, unknown variants) becomes the OpenAI error
//! envelope naming the offending parameter when there is one.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

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

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(ApiError::bad_body(
            format!(
                "The request body is not valid UTF-8 (at byte {}).",
                e.valid_up_to()
            ),
            None,
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let param = if inner.is_syntax() || inner.is_eof() {
            None
        } else if path != "." {
            Some(path)
        } else {
            missing_field(&inner.to_string())
        };
        let message = match &param {
            Some(param) => format!("Invalid value for '{param}': {inner}"),
            None => format!("The request body is not valid JSON: {inner}"),
        };
        ApiError::bad_body(message, param)
    })?;
    deserializer.end().map_err(|e| {
        ApiError::bad_body(format!("The request body is not valid JSON: {e}"), None)
    })?;
    Ok(value)
}

/// serde reports a missing field as "missing field `name` at ...".
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_string())
}
