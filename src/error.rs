//! The error of qpai's API: every failure a caller sees (an HTTP client, a
//! batch line, an eval case) is OpenAI's envelope `{"error": {"message",
//! "type", "param", "code"}}` of a kind of failure. Internal details are
//! logged, never sent. No transport is known here: the HTTP edge maps a
//! kind to its status once (`ErrorKind::status_code`, which batch output
//! lines record too).

use serde::Serialize;

/// What went wrong, as OpenAI's API tells it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong (a parameter, the body).
    InvalidRequest,
    /// No key, or not a live key.
    Unauthorized,
    /// The tenant's budget cannot pay for the request.
    BudgetExceeded,
    /// The key may not do this.
    Forbidden,
    NotFound,
    MethodNotAllowed,
    /// It exists already.
    Conflict,
    PayloadTooLarge,
    /// A limit (the key's, or the server's queue): retry later.
    RateLimited,
    Internal,
    /// Not available now (loading, no route, an upstream broke off).
    Unavailable,
    /// An upstream refused the request with this 4xx status.
    Upstream(u16),
}

impl ErrorKind {
    /// The HTTP status OpenAI answers this kind with.
    pub fn status_code(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::BudgetExceeded => 402,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Conflict => 409,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::RateLimited => 429,
            ErrorKind::Internal => 500,
            ErrorKind::Unavailable => 503,
            ErrorKind::Upstream(status) => status,
        }
    }

    /// The caller's to fix (as opposed to the server's or an upstream's state).
    pub fn is_client_error(self) -> bool {
        (400..500).contains(&self.status_code())
    }
}

/// An error answered to an API caller.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: EnvelopeBody<'a>,
}

#[derive(Serialize)]
struct EnvelopeBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl ApiError {
    /// 400 naming the offending request parameter.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::InvalidRequest,
            message: message.into(),
            param: Some(param.into()),
            code: Some("invalid_value"),
            retry_after: None,
        }
    }

    /// 400 for a parameter the server does not implement: rejected, never ignored.
    pub fn unsupported_param(param: &str) -> Self {
        Self {
            kind: ErrorKind::InvalidRequest,
            message: format!("The parameter '{param}' is not supported by this server."),
            param: Some(param.to_string()),
            code: Some("unsupported_parameter"),
            retry_after: None,
        }
    }

    /// 400 for a body that is not valid JSON or does not match the schema.
    pub fn bad_body(message: impl Into<String>, param: Option<String>) -> Self {
        Self {
            kind: ErrorKind::InvalidRequest,
            message: message.into(),
            param,
            code: Some("invalid_request_body"),
            retry_after: None,
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            kind: ErrorKind::NotFound,
            message: format!("The model '{model}' does not exist or is not served here."),
            param: Some("model".to_string()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::NotFound,
            message: message.into(),
            param: None,
            code: Some("not_found"),
            retry_after: None,
        }
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self {
            kind: ErrorKind::PayloadTooLarge,
            message: format!("The request body exceeds the limit of {limit} bytes."),
            param: None,
            code: Some("payload_too_large"),
            retry_after: None,
        }
    }

    pub fn overloaded() -> Self {
        Self {
            kind: ErrorKind::RateLimited,
            message: "The server is overloaded: too many requests in flight. Retry later."
                .to_string(),
            param: None,
            code: Some("overloaded"),
            retry_after: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Unavailable,
            message: message.into(),
            param: None,
            code: Some("unavailable"),
            retry_after: None,
        }
    }

    /// 500: the cause is logged here and replaced by a generic message.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self {
            kind: ErrorKind::Internal,
            message: "The server had an internal error while processing the request.".to_string(),
            param: None,
            code: Some("internal_error"),
            retry_after: None,
        }
    }

    /// 401: no key, or not a live key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Unauthorized,
            message: message.into(),
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    /// 403: a key that may not do this (an admin endpoint, another tenant's data).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Forbidden,
            message: message.into(),
            param: None,
            code: Some("permission_denied"),
            retry_after: None,
        }
    }

    /// 429 with `Retry-After`: a key's requests or tokens per minute.
    pub fn rate_limited(message: impl Into<String>, retry_after_s: u64) -> Self {
        Self {
            kind: ErrorKind::RateLimited,
            message: message.into(),
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after_s.max(1)),
        }
    }

    /// 402: the tenant's monthly budget cannot pay for this request.
    pub fn budget_exceeded(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::BudgetExceeded,
            message: message.into(),
            param: None,
            code: Some("budget_exceeded"),
            retry_after: None,
        }
    }

    /// The envelope's `type`.
    fn error_type(&self) -> &'static str {
        match self.kind.status_code() {
            401 => "authentication_error",
            402 => "insufficient_quota",
            403 => "permission_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The envelope as JSON, also used inside SSE streams.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(Envelope {
            error: EnvelopeBody {
                message: &self.message,
                kind: self.error_type(),
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_default()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.status_code())
    }
}

impl std::error::Error for ApiError {}

pub type ApiResult<T> = Result<T, ApiError>;
