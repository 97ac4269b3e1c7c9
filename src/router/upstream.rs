//! Calling a remote deployment: OpenAI, Azure OpenAI or any OpenAI-compatible
//! server, through one pooled HTTP client. Requests are rewritten for the
//! provider's wire format (URL, auth header, `api-version`, upstream model
//! name); each phase has its own deadline (connect, first byte, total);
//! failures are classified so the policy can tell what may be retried; a
//! stream is handed on chunk by chunk, never buffered whole.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::Value;

use super::Endpoint;
use super::catalog::{Deployment, ProviderKind};

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Until the response head (and, for a stream, its first chunk).
    pub first_byte: Duration,
    /// The whole exchange, body included.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(60),
            total: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UpstreamError {
    #[error("cannot connect to {deployment}: {message}")]
    Connect { deployment: String, message: String },
    #[error("{deployment} sent nothing within {seconds} s")]
    FirstByteTimeout { deployment: String, seconds: f64 },
    #[error("{deployment} did not finish within {seconds} s")]
    TotalTimeout { deployment: String, seconds: f64 },
    #[error("{deployment} answered {status}: {message}")]
    Status {
        deployment: String,
        status: u16,
        /// Seconds from a `Retry-After` header (429 / 503).
        retry_after: Option<f64>,
        message: String,
    },
    #[error("{deployment} broke off: {message}")]
    Broken { deployment: String, message: String },
    #[error("deployment {deployment}: {message}")]
    Config { deployment: String, message: String },
}

impl UpstreamError {
    /// Whether another try (here or on another deployment) may succeed:
    /// connection failures, timeouts, 429 and 5xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::FirstByteTimeout { .. }
            | UpstreamError::TotalTimeout { .. }
            | UpstreamError::Broken { .. } => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Config { .. } => false,
        }
    }
}

/// An upstream's answer: a JSON body, or a stream of raw SSE bytes.
pub enum UpstreamResponse {
    Json(Value),
    Stream(std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>),
}

/// The auth header a provider takes: its name and value.
type AuthHeader = (&'static str, String);

/// The pooled client every remote deployment shares.
#[derive(Clone)]
pub struct Upstreams {
    client: reqwest::Client,
    timeouts: Timeouts,
}

/// `Retry-After` as seconds (the delta-seconds form; dates are ignored).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<f64> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
}

impl Upstreams {
    pub fn new(timeouts: Timeouts) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { client, timeouts })
    }

    /// The URL and auth header of `path` on `deployment`.
    fn endpoint(
        deployment: &Deployment,
        path: &str,
    ) -> Result<(String, Option<AuthHeader>), UpstreamError> {
        let config = |message: &str| UpstreamError::Config {
            deployment: deployment.name.clone(),
            message: message.to_string(),
        };
        let base = deployment
            .base_url
            .as_deref()
            .ok_or_else(|| config("no base_url"))?
            .trim_end_matches('/');
        let key = match &deployment.api_key_env {
            Some(var) => Some(
                std::env::var(var)
                    .map_err(|_| config(&format!("the environment variable {var} is not set")))?,
            ),
            None => None,
        };
        Ok(match deployment.provider {
            ProviderKind::Azure => {
                let name = deployment
                    .azure_deployment
                    .as_deref()
                    .ok_or_else(|| config("no azure_deployment"))?;
                let version = deployment
                    .api_version
                    .as_deref()
                    .ok_or_else(|| config("no api_version"))?;
                (
                    format!("{base}/openai/deployments/{name}/{path}?api-version={version}"),
                    key.map(|k| ("api-key", k)),
                )
            }
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => (
                format!("{base}/{path}"),
                key.map(|k| ("authorization", format!("Bearer {k}"))),
            ),
            ProviderKind::Local => return Err(config("a local deployment has no URL")),
        })
    }

    /// Sends a request body (OpenAI's format) for `endpoint` to
    /// `deployment`, with the upstream's model name, and usage asked for on
    /// streams.
    pub async fn call(
        &self,
        deployment: &Deployment,
        endpoint: Endpoint,
        mut body: Value,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let (url, auth) = Self::endpoint(deployment, endpoint.path())?;
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        if let Some(object) = body.as_object_mut() {
            if deployment.provider == ProviderKind::Azure {
                // The deployment in the URL chooses the model.
                object.remove("model");
            } else {
                object.insert("model".into(), Value::String(deployment.model.clone()));
            }
            if stream {
                object.insert(
                    "stream_options".into(),
                    serde_json::json!({"include_usage": true}),
                );
            }
        }
        let name = deployment.name.clone();
        let mut request = self
            .client
            .post(&url)
            .timeout(self.timeouts.total)
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some((header, value)) = auth {
            request = request.header(header, value);
        }
        let first_byte = self.timeouts.first_byte;
        let response = match tokio::time::timeout(first_byte, request.send()).await {
            Err(_) => {
                return Err(UpstreamError::FirstByteTimeout {
                    deployment: name,
                    seconds: first_byte.as_secs_f64(),
                });
            }
            Ok(Err(error)) => return Err(classify(&name, error, self.timeouts.total)),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.chars().take(200).collect());
            return Err(UpstreamError::Status {
                deployment: name,
                status: status.as_u16(),
                retry_after,
                message,
            });
        }
        if !stream {
            let bytes = response
                .bytes()
                .await
                .map_err(|e| classify(&name, e, self.timeouts.total))?;
            let value = serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Broken {
                deployment: name.clone(),
                message: format!("the body is not JSON: {e}"),
            })?;
            return Ok(UpstreamResponse::Json(value));
        }
        let total = self.timeouts.total;
        let mut chunks = response.bytes_stream();
        // The first chunk is awaited here, so a stream that opens and then
        // says nothing fails before anything is passed on.
        let first = match tokio::time::timeout(first_byte, chunks.next()).await {
            Err(_) => {
                return Err(UpstreamError::FirstByteTimeout {
                    deployment: name,
                    seconds: first_byte.as_secs_f64(),
                });
            }
            Ok(None) => {
                return Err(UpstreamError::Broken {
                    deployment: name,
                    message: "the stream ended before any data".into(),
                });
            }
            Ok(Some(first)) => first.map_err(|e| classify(&name, e, total))?,
        };
        let rest = chunks.map(move |chunk| chunk.map_err(|e| classify(&name, e, total)));
        Ok(UpstreamResponse::Stream(Box::pin(
            futures::stream::once(async move { Ok(first) }).chain(rest),
        )))
    }
}

fn classify(deployment: &str, error: reqwest::Error, total: Duration) -> UpstreamError {
    let deployment = deployment.to_string();
    if error.is_timeout() {
        UpstreamError::TotalTimeout {
            deployment,
            seconds: total.as_secs_f64(),
        }
    } else if error.is_connect() {
        UpstreamError::Connect {
            deployment,
            message: error.to_string(),
        }
    } else {
        UpstreamError::Broken {
            deployment,
            message: error.to_string(),
        }
    }
}
