//! Who is calling: API keys resolved to a tenant (cached, re-checked every
//! few seconds so revocation takes effect), per-key rate limits and
//! per-tenant budgets. With no live key in the database the server is
//! open: every caller is the admin of the tenant `default`.

mod auth_failures;
pub mod budget;
pub mod cli;
pub mod limits;
pub mod tenant_limits;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::ApiError;
use crate::ledger::Ledger;
use crate::ledger::keys::hash_key;
pub use budget::{Budgets, OverBudget, Reservation, Standing};
pub use limits::{Limit, RateLimiter, Refused};

/// The tenant of an open server (no keys).
pub const OPEN_TENANT: &str = "default";

/// How long a key lookup (found or not) is trusted.
const KEY_TTL: Duration = Duration::from_secs(5);

/// Key lookups kept at most (unknown keys included); then the cache restarts.
const KEY_CACHE_MAX: usize = 100_000;

/// The caller of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub key_id: String,
    pub tenant: String,
    pub admin: bool,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
}

impl Principal {
    /// Everyone, on a server without keys.
    pub fn open() -> Principal {
        Principal {
            key_id: "-".into(),
            tenant: OPEN_TENANT.into(),
            admin: true,
            rpm: None,
            tpm: None,
        }
    }

    /// Refuses a key that is not an admin's.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden("This endpoint needs an admin key."))
        }
    }

    /// Whether this caller may see `tenant`'s data.
    pub fn may_see(&self, tenant: &str) -> bool {
        self.admin || self.tenant == tenant
    }
}

type CachedKey = (Instant, Option<Arc<Principal>>);

pub struct Tenancy {
    pub ledger: Ledger,
    pub budgets: Arc<Budgets>,
    pub limits: RateLimiter,
    keys: Mutex<HashMap<String, CachedKey>>,
    /// Failed authentications per client address.
    failures: auth_failures::AuthFailures,
    auth_required: AtomicBool,
    /// Streams open per tenant (its `max_streams`).
    streams: Arc<tenant_limits::OpenStreams>,
}

impl Tenancy {
    /// Over `ledger`; checks every few seconds whether keys exist.
    pub async fn new(ledger: Ledger) -> anyhow::Result<Arc<Tenancy>> {
        let tenancy = Arc::new(Tenancy {
            budgets: Budgets::new(ledger.clone()),
            auth_required: AtomicBool::new(ledger.has_keys().await?),
            ledger,
            limits: RateLimiter::default(),
            keys: Mutex::default(),
            failures: Default::default(),
            streams: Default::default(),
        });
        let weak = Arc::downgrade(&tenancy);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let Some(tenancy) = weak.upgrade() else { break };
                tenancy.refresh().await;
            }
        });
        Ok(tenancy)
    }

    /// Re-reads whether keys exist (done every 2 s on its own).
    pub async fn refresh(&self) {
        match self.ledger.has_keys().await {
            Ok(required) => self.auth_required.store(required, Ordering::Relaxed),
            Err(error) => tracing::warn!(%error, "checking for API keys"),
        }
    }

    pub fn auth_required(&self) -> bool {
        self.auth_required.load(Ordering::Relaxed)
    }

    /// The caller presenting `secret` (from `Authorization: Bearer` or
    /// `api-key`), from `address` when known: an address with too many
    /// failed attempts lately gets 429s instead of lookups.
    pub async fn authenticate(
        &self,
        secret: Option<&str>,
        address: Option<std::net::IpAddr>,
    ) -> Result<Arc<Principal>, ApiError> {
        if !self.auth_required() {
            return Ok(Arc::new(Principal::open()));
        }
        let hash = secret.map(hash_key).unwrap_or_default();
        if let Some(address) = address
            && let Some(wait) = self.failures.blocked(address, &hash)
        {
            return Err(ApiError::rate_limited(
                "Too many failed authentications from this address; wait before trying again.",
                wait.as_secs_f64().ceil() as u64,
            ));
        }
        let found = self.principal(secret, hash.clone()).await;
        match (&found, address) {
            (Ok(_), _) => self.failures.succeeded(&hash),
            (Err(error), Some(address)) if error.kind == crate::error::ErrorKind::Unauthorized => {
                self.failures.failed(address)
            }
            _ => {}
        }
        found
    }

    /// The key's principal (cached), or a 401.
    async fn principal(
        &self,
        secret: Option<&str>,
        hash: String,
    ) -> Result<Arc<Principal>, ApiError> {
        let secret = secret.ok_or_else(|| {
            ApiError::unauthorized(
                "This server needs an API key: send 'Authorization: Bearer <key>'.",
            )
        })?;
        let cached = self
            .keys
            .lock()
            .ok()
            .and_then(|keys| keys.get(&hash).cloned())
            .filter(|(at, _)| at.elapsed() < KEY_TTL);
        let principal = match cached {
            Some((_, principal)) => principal,
            None => {
                let record = self
                    .ledger
                    .key_by_secret(secret)
                    .await
                    .map_err(ApiError::internal)?;
                let principal = record.map(|r| {
                    Arc::new(Principal {
                        key_id: r.id,
                        tenant: r.tenant,
                        admin: r.admin,
                        rpm: r.rpm,
                        tpm: r.tpm,
                    })
                });
                if let Ok(mut keys) = self.keys.lock() {
                    if keys.len() >= KEY_CACHE_MAX {
                        keys.clear();
                    }
                    keys.insert(hash, (Instant::now(), principal.clone()));
                }
                principal
            }
        };
        principal
            .ok_or_else(|| ApiError::unauthorized("The API key is not valid (unknown or revoked)."))
    }

    /// Counts a request against the caller's requests per minute.
    pub fn admit_request(&self, principal: &Principal) -> Result<(), ApiError> {
        self.limits
            .request(&principal.key_id, principal.rpm)
            .map_err(rate_limit_error)
    }

    /// Counts a request's tokens (prompt plus the most it may generate)
    /// against the caller's tokens per minute.
    pub fn admit_tokens(&self, principal: &Principal, tokens: u64) -> Result<(), ApiError> {
        self.limits
            .tokens(&principal.key_id, principal.tpm, tokens)
            .map_err(rate_limit_error)
    }
}

fn rate_limit_error(refused: Refused) -> ApiError {
    let what = match refused.limit {
        Limit::Requests => "requests",
        Limit::Tokens => "tokens",
    };
    let message = if refused.never_fits {
        format!(
            "This request needs more {what} than the key's limit of {} {what} per minute allows at once; lower max_tokens or the prompt.",
            refused.per_minute
        )
    } else {
        format!(
            "Rate limit reached: {} {what} per minute for this key.",
            refused.per_minute
        )
    };
    ApiError::rate_limited(message, refused.retry_after.as_secs_f64().ceil() as u64)
}
