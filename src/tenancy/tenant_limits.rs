//! Limits set per tenant (`qpai keys create --max-tokens-cap N
//! --max-streams N`), read with the tenant's budget settings: the most
//! completion tokens one request may ask for (a request that names none
//! gets the cap), and the most streams the tenant may have open at once in
//! this process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Principal, Tenancy};
use crate::error::{ApiError, ApiResult};

/// Streams open per tenant.
#[derive(Default)]
pub struct OpenStreams(Mutex<HashMap<String, u32>>);

impl OpenStreams {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One open stream of a tenant; the slot is free again when it is dropped
/// (the stream ended, or its client left).
pub struct StreamSlot {
    streams: Arc<OpenStreams>,
    tenant: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut counts = self.streams.counts();
        if let Some(open) = counts.get_mut(&self.tenant) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}

impl Tenancy {
    /// The completion tokens a request of `principal` may ask for: `asked`
    /// (named by `param`) when within the tenant's cap, the cap when it
    /// asked none; a 400 naming `param` when over it. Call after the
    /// tenant's standing was read.
    pub fn cap_max_tokens(
        &self,
        principal: &Principal,
        asked: Option<i64>,
        param: &str,
    ) -> ApiResult<Option<i64>> {
        let cap = self
            .budgets
            .settings(&principal.tenant)
            .and_then(|s| s.max_tokens_cap)
            .map(|cap| i64::try_from(cap).unwrap_or(i64::MAX));
        match (asked, cap) {
            (Some(asked), Some(cap)) if asked > cap => Err(ApiError {
                code: Some("max_tokens_over_cap"),
                ..ApiError::invalid_param(
                    param,
                    format!(
                        "'{param}' is {asked}, over this tenant's cap of {cap} completion tokens per request."
                    ),
                )
            }),
            (None, Some(cap)) => Ok(Some(cap)),
            (asked, _) => Ok(asked),
        }
    }

    /// A slot for one more stream of `principal`'s tenant, or a 429 when
    /// the tenant has its most open. None when the tenant has no limit.
    pub fn open_stream(&self, principal: &Principal) -> ApiResult<Option<StreamSlot>> {
        let Some(limit) = self
            .budgets
            .settings(&principal.tenant)
            .and_then(|s| s.max_streams)
        else {
            return Ok(None);
        };
        let mut counts = self.streams.counts();
        let open = counts.entry(principal.tenant.clone()).or_insert(0);
        if *open >= limit {
            return Err(ApiError {
                code: Some("too_many_streams"),
                param: Some("stream".into()),
                ..ApiError::rate_limited(
                    format!(
                        "This tenant has {limit} streams open, its most at once; wait for one to end."
                    ),
                    1,
                )
            });
        }
        *open += 1;
        Ok(Some(StreamSlot {
            streams: self.streams.clone(),
            tenant: principal.tenant.clone(),
        }))
    }
}
