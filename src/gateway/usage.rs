//! The ledger read back, grouped: what `GET /v1/usage` and `qpai usage`
//! answer. A tenant's key reads its own tenant's usage only; an admin's may
//! read any tenant's, or all.

use crate::error::{ApiError, ApiResult};
use crate::ledger::{GroupKey, UsageQuery, UsageRow};
use crate::tenancy::Principal;

use super::Gateway;

/// What a caller asks of the ledger, as given (checked by `Gateway::usage`).
#[derive(Debug, Default)]
pub struct UsageAsk {
    /// Comma-separated: model, provider, key, day, tenant, deployment, ...
    pub group_by: Option<String>,
    /// First and last day, `YYYY-MM-DD`, inclusive.
    pub from: Option<String>,
    pub to: Option<String>,
    pub tenant: Option<String>,
    pub key: Option<String>,
}

/// Parses `group_by`.
pub fn group_keys(text: Option<&str>) -> Result<Vec<GroupKey>, String> {
    text.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            GroupKey::parse(name).ok_or_else(|| {
                format!(
                    "cannot group by {name:?}: use model, provider, key, day, tenant, deployment, batch, prompt or eval"
                )
            })
        })
        .collect()
}

fn day(param: &str, value: Option<String>) -> ApiResult<Option<String>> {
    match value {
        Some(text) if chrono::NaiveDate::parse_from_str(&text, "%Y-%m-%d").is_err() => {
            Err(ApiError::invalid_param(
                param,
                format!("'{param}' must be a day as YYYY-MM-DD, not {text:?}."),
            ))
        }
        other => Ok(other),
    }
}

impl Gateway {
    /// The ledger's rows for `ask`, grouped, once what is queued is written.
    pub async fn usage(&self, principal: &Principal, ask: UsageAsk) -> ApiResult<Vec<UsageRow>> {
        let tenancy = self
            .tenancy
            .as_ref()
            .ok_or_else(|| ApiError::not_found("This server keeps no usage ledger."))?;
        let group_by = group_keys(ask.group_by.as_deref())
            .map_err(|e| ApiError::invalid_param("group_by", e))?;
        let tenant = match ask.tenant {
            Some(tenant) if !principal.may_see(&tenant) => {
                return Err(ApiError::forbidden(
                    "A tenant's key reads its own usage only.",
                ));
            }
            Some(tenant) => Some(tenant),
            None if principal.admin => None,
            None => Some(principal.tenant.clone()),
        };
        let query = UsageQuery {
            tenant,
            key_id: ask.key,
            from_day: day("from", ask.from)?,
            to_day: day("to", ask.to)?,
            group_by,
        };
        tenancy.ledger.flush().await;
        tenancy
            .ledger
            .usage(&query)
            .await
            .map_err(ApiError::internal)
    }
}
