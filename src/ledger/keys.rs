//! Tenants and their API keys. A key is shown once when it is created;
//! only its sha256 is stored (keys are 192 random bits, so a salt adds
//! nothing). A tenant's monthly budget and soft limit live on the tenant.

use rand::RngCore;
use sha2::{Digest, Sha256};

use super::db::{DbError, Row, Value};
use super::{Ledger, now_ms};
use crate::money::Usd;

/// What every key starts with (lets secret scanners find leaked ones).
pub const KEY_PREFIX: &str = "qpai-";

/// The percentage of the budget past which answers carry a warning.
pub const DEFAULT_SOFT_LIMIT_PERCENT: u8 = 80;

#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub tenant: String,
    /// Sets (or changes) the tenant's monthly budget.
    pub monthly_budget: Option<Usd>,
    pub soft_limit_percent: Option<u8>,
    /// What `"model": "auto"` means for the tenant.
    pub default_model: Option<String>,
    /// The tenant's quality floor for routed requests, 0 to 1.
    pub min_quality: Option<f64>,
    /// Sets (or changes) the tenant's cap on a request's completion tokens.
    pub max_tokens_cap: Option<u64>,
    /// Sets (or changes) the tenant's most streams open at once.
    pub max_streams: Option<u32>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    /// May use the admin endpoints and read every tenant's data.
    pub admin: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: String,
    /// The key's first characters, to recognise it by.
    pub prefix: String,
    pub admin: bool,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TenantRecord {
    pub name: String,
    pub monthly_budget: Option<Usd>,
    pub soft_limit_percent: u8,
    pub default_model: Option<String>,
    pub min_quality: Option<f64>,
    pub max_tokens_cap: Option<u64>,
    pub max_streams: Option<u32>,
}

/// The stored form of a key.
pub fn hash_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A tenant name: 1-64 of letters, digits, `-`, `_`, `.`.
pub fn check_tenant_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a tenant name (1-64 letters, digits, '-', '_', '.')"
        ))
    }
}

const KEY_COLUMNS: &str = "id, tenant, prefix, admin, rpm, tpm, created_ms, revoked_ms";

fn key_record(row: &Row) -> Option<KeyRecord> {
    let limit = |v: &Value| v.int().and_then(|n| u32::try_from(n).ok());
    Some(KeyRecord {
        id: row[0].text()?.to_string(),
        tenant: row[1].text()?.to_string(),
        prefix: row[2].text()?.to_string(),
        admin: row[3].int()? != 0,
        rpm: limit(&row[4]),
        tpm: limit(&row[5]),
        created_ms: row[6].int()?,
        revoked_ms: row[7].int(),
    })
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

impl Ledger {
    /// Creates a key (and its tenant, or updates the tenant's budget);
    /// returns the secret, which is not kept, and the record.
    pub async fn create_key(&self, new: &NewKey) -> anyhow::Result<(String, KeyRecord)> {
        check_tenant_name(&new.tenant).map_err(anyhow::Error::msg)?;
        if let Some(percent) = new.soft_limit_percent
            && !(1..=100).contains(&percent)
        {
            anyhow::bail!("the soft limit is a percentage of the budget, 1 to 100");
        }
        if let Some(q) = new.min_quality
            && !(0.0..=1.0).contains(&q)
        {
            anyhow::bail!("the quality floor is between 0 and 1");
        }
        let secret = format!("{KEY_PREFIX}{}", random_hex(24));
        let record = KeyRecord {
            id: format!("key_{}", random_hex(6)),
            tenant: new.tenant.clone(),
            prefix: secret[..KEY_PREFIX.len() + 6].to_string(),
            admin: new.admin,
            rpm: new.rpm,
            tpm: new.tpm,
            created_ms: now_ms(),
            revoked_ms: None,
        };
        let budget = new
            .monthly_budget
            .map(|b| i64::try_from(b.0))
            .transpose()
            .map_err(|_| anyhow::anyhow!("the budget is too large"))?;
        self.db
            .transaction(vec![
                (
                    "INSERT INTO tenants (name, monthly_budget_pico, soft_limit_percent, \
                     default_model, min_quality_permille, created_ms, max_tokens_cap, max_streams) \
                     VALUES ($1, $2, $3, $6, $7, $4, $8, $9) ON CONFLICT (name) DO UPDATE SET \
                     max_tokens_cap = COALESCE(excluded.max_tokens_cap, tenants.max_tokens_cap), \
                     max_streams = COALESCE(excluded.max_streams, tenants.max_streams), \
                     monthly_budget_pico = COALESCE(excluded.monthly_budget_pico, tenants.monthly_budget_pico), \
                     soft_limit_percent = CASE WHEN $5 = 1 THEN excluded.soft_limit_percent \
                     ELSE tenants.soft_limit_percent END, \
                     default_model = COALESCE(excluded.default_model, tenants.default_model), \
                     min_quality_permille = COALESCE(excluded.min_quality_permille, tenants.min_quality_permille)",
                    vec![
                        new.tenant.as_str().into(),
                        budget.into(),
                        i64::from(new.soft_limit_percent.unwrap_or(DEFAULT_SOFT_LIMIT_PERCENT))
                            .into(),
                        record.created_ms.into(),
                        i64::from(new.soft_limit_percent.is_some()).into(),
                        new.default_model.clone().into(),
                        new.min_quality.map(|q| (q * 1000.0).round() as i64).into(),
                        new.max_tokens_cap
                            .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
                            .into(),
                        new.max_streams.map(i64::from).into(),
                    ],
                ),
                (
                    "INSERT INTO api_keys (id, tenant, hash, prefix, admin, rpm, tpm, created_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    vec![
                        record.id.as_str().into(),
                        record.tenant.as_str().into(),
                        hash_key(&secret).into(),
                        record.prefix.as_str().into(),
                        i64::from(record.admin).into(),
                        record.rpm.map(i64::from).into(),
                        record.tpm.map(i64::from).into(),
                        record.created_ms.into(),
                    ],
                ),
            ])
            .await?;
        Ok((secret, record))
    }

    /// The live (not revoked) key whose secret this is.
    pub async fn key_by_secret(&self, secret: &str) -> Result<Option<KeyRecord>, DbError> {
        let rows = self
            .db
            .query_dynamic(
                format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = $1 AND revoked_ms IS NULL"
                ),
                vec![hash_key(secret).into()],
            )
            .await?;
        Ok(rows.first().and_then(key_record))
    }

    /// Keys, all or a tenant's, oldest first.
    pub async fn list_keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, DbError> {
        let rows = match tenant {
            Some(tenant) => {
                self.db
                    .query_dynamic(
                        format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant = $1 ORDER BY created_ms, id"),
                        vec![tenant.into()],
                    )
                    .await?
            }
            None => {
                self.db
                    .query_dynamic(
                        format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_ms, id"),
                        vec![],
                    )
                    .await?
            }
        };
        Ok(rows.iter().filter_map(key_record).collect())
    }

    /// Revokes a key; false when there is no live key with that id.
    pub async fn revoke_key(&self, id: &str) -> Result<bool, DbError> {
        let changed = self
            .db
            .execute(
                "UPDATE api_keys SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL",
                vec![now_ms().into(), id.into()],
            )
            .await?;
        Ok(changed > 0)
    }

    /// Whether any live key exists (then `/v1/*` requires one).
    pub async fn has_keys(&self) -> Result<bool, DbError> {
        let rows = self
            .db
            .query(
                "SELECT COUNT(*) FROM api_keys WHERE revoked_ms IS NULL",
                vec![],
            )
            .await?;
        Ok(rows.first().and_then(|r| r[0].int()).unwrap_or(0) > 0)
    }

    pub async fn tenant(&self, name: &str) -> Result<Option<TenantRecord>, DbError> {
        let rows = self
            .db
            .query(
                "SELECT name, monthly_budget_pico, soft_limit_percent, default_model, \
                 min_quality_permille, max_tokens_cap, max_streams FROM tenants WHERE name = $1",
                vec![name.into()],
            )
            .await?;
        Ok(rows.first().and_then(|row| {
            Some(TenantRecord {
                name: row[0].text()?.to_string(),
                monthly_budget: row[1].int().map(|p| Usd(p.max(0) as u64)),
                soft_limit_percent: row[2]
                    .int()
                    .and_then(|p| u8::try_from(p).ok())
                    .unwrap_or(DEFAULT_SOFT_LIMIT_PERCENT),
                default_model: row[3].text().map(str::to_string),
                min_quality: row[4].int().map(|p| p as f64 / 1000.0),
                max_tokens_cap: row[5].int().map(|n| n.max(0) as u64),
                max_streams: row[6].int().and_then(|n| u32::try_from(n).ok()),
            })
        }))
    }
}
