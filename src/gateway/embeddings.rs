//! Embeddings through the gateway: texts or token ids in, vectors out
//! (floats, or base64 of little-endian f32 as OpenAI encodes them), from
//! qpai's own embedding model or a remote embedder (priced per input
//! token). A logical model's embedders all give vectors of one length
//! (the catalog checks it), so any of them may answer for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bill::Metered;
use super::drive::{AttemptError, Attempts, Plan, Reply, rank_prepared};
use super::{Answer, Gateway, Hints, Whole, validate};
use crate::error::{ApiError, ApiResult};
use crate::models::embedding::EmbeddingModel;
use crate::router::policy::{self, Candidate, Needs};
use crate::router::tokens::{RemoteCounts, TokenCounter};
use crate::router::{Deployment, Endpoint, ProviderKind};
use crate::tenancy::Principal;

/// Inputs per request, as OpenAI allows.
const MAX_INPUTS: usize = 2048;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<EncodingFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
struct EmbeddingData {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

/// OpenAI's embeddings answer.
#[derive(Debug, Serialize)]
pub struct EmbeddingResponse {
    object: &'static str,
    data: Vec<EmbeddingData>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// What planning prepared for a local embedder: the model and the
/// tokenized inputs.
pub struct PreparedEmbedding {
    model: Arc<EmbeddingModel>,
    inputs: Vec<Vec<u32>>,
}

impl PreparedEmbedding {
    fn new(model: Arc<EmbeddingModel>, request: &EmbeddingRequest) -> ApiResult<Self> {
        validate::reject_unknown_fields(&request.other, "")?;
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
        let inputs = tokenized(&model, &request.input)?;
        Ok(Self { model, inputs })
    }

    fn prompt_tokens(&self) -> u64 {
        self.inputs.iter().map(|i| i.len() as u64).sum()
    }
}

impl Gateway {
    /// Embeddings for `principal`: routed, computed, metered and billed.
    pub async fn embed(
        &self,
        principal: &Principal,
        request: EmbeddingRequest,
        hints: &Hints,
    ) -> ApiResult<Answer> {
        let standing = self.standing(principal).await?;
        let requested = self.requested_model(&request.model, &standing);
        if let Some(user) = &request.user {
            tracing::info!(user, "caller");
        }
        let needs = Needs {
            task: hints.task.clone(),
            min_quality: self.quality_floor(hints, &standing),
            max_tokens: Some(0),
            choices: 1,
            ..Needs::default()
        };
        let mut remote_body = None;
        let candidates = match policy::offered(&self.router.catalog, &requested) {
            None => {
                let model = self.models.embedding_model(&requested).await?;
                let job = PreparedEmbedding::new(model, &request)?;
                let model = &job.model;
                let candidate = self.local_candidate(
                    &requested,
                    &model.id,
                    model.max_tokens,
                    job.prompt_tokens(),
                    &needs,
                );
                vec![(candidate, Some(job))]
            }
            Some((offered, _pinned)) => {
                // The context window is per input, checked by each embedder.
                let offered: Vec<Deployment> = offered
                    .into_iter()
                    .filter(|d| d.is_embedder())
                    .map(|d| Deployment {
                        context_window: usize::MAX,
                        ..d.clone()
                    })
                    .collect();
                if offered.is_empty() {
                    return Err(ApiError::invalid_param(
                        "model",
                        format!("'{requested}' names no embedding deployment."),
                    ));
                }
                let mut models = HashMap::new();
                for deployment in &offered {
                    if deployment.provider == ProviderKind::Local {
                        let model = self.models.embedding_model(&deployment.model).await;
                        models.insert(deployment.model.clone(), model);
                    } else if remote_body.is_none() {
                        remote_body =
                            Some(serde_json::to_value(&request).map_err(ApiError::internal)?);
                    }
                }
                let offered: Vec<&Deployment> = offered.iter().collect();
                let mut counted = RemoteCounts::default();
                rank_prepared(&requested, &offered, &needs, |deployment, local_errors| {
                    if deployment.provider != ProviderKind::Local {
                        let tokens = counted.count(&deployment.model, |counter| {
                            remote_input_tokens(counter, &request.input)
                        });
                        return Ok((tokens, None));
                    }
                    let model = models[&deployment.model].clone().map_err(|e| e.message)?;
                    if Some(model.dimensions) != deployment.dimensions {
                        return Err(format!(
                            "its model gives {} dimensions, not the {} the catalog declares",
                            model.dimensions,
                            deployment.dimensions.unwrap_or(0)
                        ));
                    }
                    let job = PreparedEmbedding::new(model, &request).map_err(|e| {
                        local_errors.push(e.clone());
                        e.message
                    })?;
                    Ok((job.prompt_tokens(), Some(job)))
                })?
            }
        };
        let plan = Plan {
            requested,
            candidates,
            stream: false,
            batch: hints.batch.clone(),
            eval: hints.eval.clone(),
            request_id: None,
            prompt: None,
        };
        let attempts = EmbeddingAttempts {
            gateway: self,
            base64: request.encoding_format == Some(EncodingFormat::Base64),
            remote_body,
        };
        self.drive(principal, Endpoint::Embeddings, standing, plan, &attempts)
            .await
    }
}

/// The inputs' tokens as OpenAI counts them with `counter`.
fn remote_input_tokens(counter: &TokenCounter, input: &EmbeddingInput) -> u64 {
    match input {
        EmbeddingInput::Text(text) => counter.count(text),
        EmbeddingInput::Texts(texts) => texts.iter().map(|t| counter.count(t)).sum(),
        EmbeddingInput::Tokens(ids) => ids.len() as u64,
        EmbeddingInput::TokenLists(lists) => lists.iter().map(|l| l.len() as u64).sum(),
    }
}

struct EmbeddingAttempts<'a> {
    gateway: &'a Gateway,
    base64: bool,
    remote_body: Option<Value>,
}

impl Attempts<PreparedEmbedding> for EmbeddingAttempts<'_> {
    fn attempt<'a>(
        &'a self,
        candidate: &'a Candidate,
        job: Option<&'a PreparedEmbedding>,
    ) -> BoxFuture<'a, Result<Reply, AttemptError>> {
        async move {
            let deployment = &candidate.deployment;
            if deployment.provider == ProviderKind::Local {
                let job = job.ok_or_else(|| ApiError::internal("a local route without inputs"))?;
                return self.local(job).await;
            }
            self.gateway
                .upstream_reply(
                    deployment,
                    Endpoint::Embeddings,
                    self.remote_body.as_ref(),
                    false,
                )
                .await
        }
        .boxed()
    }
}

impl EmbeddingAttempts<'_> {
    async fn local(&self, job: &PreparedEmbedding) -> Result<Reply, AttemptError> {
        let permit = self
            .gateway
            .embedding_permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| AttemptError::local_busy(ApiError::overloaded()))?;
        let vectors = job
            .model
            .embed_queued(job.inputs.clone())
            .await
            .map_err(ApiError::internal)?;
        drop(permit);
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, vector)| EmbeddingData {
                object: "embedding",
                index,
                embedding: if self.base64 {
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
        let prompt_tokens = job.prompt_tokens() as usize;
        let response = EmbeddingResponse {
            object: "list",
            data,
            model: job.model.id.clone(),
            usage: EmbeddingUsage {
                prompt_tokens,
                total_tokens: prompt_tokens,
            },
        };
        Ok(Reply::Whole {
            body: Whole::Embeddings(response),
            usage: Metered::Reported((prompt_tokens as u64, 0)),
        })
    }
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
