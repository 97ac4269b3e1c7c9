//! `POST /v1/embeddings`: texts or token ids in, normalised vectors out
//! (floats or base64 of little-endian f32, as OpenAI encodes them).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::extract::ApiJson;
use super::wire::Usage;
use super::{AppState, validate};
use crate::error::{ApiError, ApiResult};
use crate::models::embedding::EmbeddingModel;

/// Inputs per request, as OpenAI allows.
const MAX_INPUTS: usize = 2048;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: Option<EncodingFormat>,
    pub dimensions: Option<i64>,
    pub user: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingData {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
pub struct EmbeddingResponse {
    object: &'static str,
    data: Vec<EmbeddingData>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Tokenized inputs, checked against the model's limits.
fn tokenized(model: &EmbeddingModel, input: &EmbeddingInput) -> ApiResult<Vec<Vec<u32>>> {
    let texts = |texts: &[String]| -> ApiResult<Vec<Vec<u32>>> {
        if texts.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param(
                "input",
                "Inputs must not be empty strings.",
            ));
        }
        texts
            .iter()
            .map(|t| model.tokenize(t).map_err(ApiError::internal))
            .collect()
    };
    let ids = |lists: &[Vec<u32>]| -> ApiResult<Vec<Vec<u32>>> {
        let vocab = model.vocab_size() as u32;
        lists
            .iter()
            .map(|ids| {
                if ids.is_empty() || ids.len() + 2 > model.max_tokens {
                    return Err(ApiError::invalid_param(
                        "input",
                        format!(
                            "Token inputs must have 1 to {} tokens.",
                            model.max_tokens - 2
                        ),
                    ));
                }
                if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
                    return Err(ApiError::invalid_param(
                        "input",
                        format!("Token id {bad} is outside the vocabulary."),
                    ));
                }
                Ok(model.wrap_ids(ids))
            })
            .collect()
    };
    let all = match input {
        EmbeddingInput::Text(text) => texts(std::slice::from_ref(text))?,
        EmbeddingInput::Texts(list) => texts(list)?,
        EmbeddingInput::Tokens(list) => ids(std::slice::from_ref(list))?,
        EmbeddingInput::TokenLists(lists) => ids(lists)?,
    };
    if all.is_empty() || all.len() > MAX_INPUTS {
        return Err(ApiError::invalid_param(
            "input",
            format!("Send 1 to {MAX_INPUTS} inputs."),
        ));
    }
    Ok(all)
}

#[tracing::instrument(skip_all, fields(model = %request.model))]
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    axum::Extension(principal): axum::Extension<Arc<crate::tenancy::Principal>>,
    ApiJson(request): ApiJson<EmbeddingRequest>,
) -> ApiResult<Json<EmbeddingResponse>> {
    validate::reject_unknown_fields(&request.other, "")?;
    let model = state.embedding_model(&request.model).await?;
    if let Some(dimensions) = request.dimensions
        && dimensions != model.dimensions as i64
    {
        return Err(ApiError::invalid_param(
            "dimensions",
            format!(
                "The model '{}' produces {} dimensions and cannot shorten them.",
                model.id, model.dimensions
            ),
        ));
    }
    if let Some(user) = &request.user {
        tracing::info!(user, "caller");
    }
    let inputs = tokenized(&model, &request.input)?;
    let prompt_tokens = inputs.iter().map(Vec::len).sum();
    let bill = super::billing::Bill::local(
        &state,
        &principal,
        "embeddings",
        &model.id,
        prompt_tokens as u64,
        0,
        None,
    )
    .await?;
    let permit = state
        .embedding_permits
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::overloaded())?;
    let computing = model.clone();
    let vectors = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        computing.embed(&inputs)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    let base64_format = request.encoding_format == Some(EncodingFormat::Base64);
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| EmbeddingData {
            object: "embedding",
            index,
            embedding: if base64_format {
                Vector::Base64(base64(
                    &vector
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>(),
                ))
            } else {
                Vector::Float(vector)
            },
        })
        .collect();
    let usage = Usage::new(prompt_tokens, 0);
    if let Some(bill) = bill {
        bill.settle_usage(prompt_tokens as u64, 0);
    }
    Ok(Json(EmbeddingResponse {
        object: "list",
        data,
        model: model.id.clone(),
        usage: EmbeddingUsage {
            prompt_tokens: usage.prompt_tokens,
            total_tokens: usage.total_tokens,
        },
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(super::base64(b"Man"), "TWFu");
        assert_eq!(super::base64(b"Ma"), "TWE=");
        assert_eq!(super::base64(b"M"), "TQ==");
        assert_eq!(super::base64(&[0xFF, 0xFE, 0x00, 0x01]), "//4AAQ==");
    }
}
