//! Answers of eval cases kept in the ledger database by a content hash of
//! what was asked (the tenant, the request body as sent — model, prompt,
//! variables, settings — and the repeat number): a re-run of a suite asks
//! nothing it has asked before, and costs nothing.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::output::Output;
use crate::gateway::{Gateway, Hints};
use crate::ledger::Ledger;
use crate::ledger::now_ms;

#[derive(Clone)]
pub struct Cache {
    ledger: Ledger,
}

/// The key of one ask. `routing` is what else picks its route (see
/// [`routing`]).
pub fn key(tenant: &str, body: &Value, repeat: usize, routing: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(tenant.as_bytes());
    hasher.update([0]);
    hasher.update(routing.as_bytes());
    hasher.update([0]);
    hasher.update(body.to_string().as_bytes());
    hasher.update([0]);
    hasher.update(repeat.to_le_bytes());
    hex::encode(hasher.finalize())
}

/// For a model the router knows (a deployment, a logical model, `auto`):
/// the routing catalog as read (its prices, its calibrated quality) and the
/// task and floor the ask carries, so that an answer is reused only while
/// its route and price would be the same. Empty for qpai's own models.
pub fn routing(gateway: &Gateway, body: &Value, hints: &Hints) -> String {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let catalog = &gateway.router.catalog;
    if crate::router::policy::offered(catalog, model).is_none() {
        return String::new();
    }
    format!(
        "{}|{}|{:?}",
        catalog.fingerprint,
        hints.task.as_deref().unwrap_or_default(),
        hints.min_quality
    )
}

impl Cache {
    pub fn new(ledger: &Ledger) -> Self {
        Self {
            ledger: ledger.clone(),
        }
    }

    pub async fn get(&self, key: &str) -> anyhow::Result<Option<Output>> {
        let rows = self
            .ledger
            .db()
            .query(
                "SELECT answer FROM eval_cache WHERE key = $1",
                vec![key.into()],
            )
            .await?;
        match rows.first().and_then(|row| row[0].text()) {
            Some(text) => Ok(serde_json::from_str(text).ok()),
            None => Ok(None),
        }
    }

    /// Keeps a successful answer (failed calls are asked again next time).
    pub async fn put(&self, key: &str, tenant: &str, output: &Output) -> anyhow::Result<()> {
        if output.error.is_some() {
            return Ok(());
        }
        self.ledger
            .db()
            .execute(
                "INSERT INTO eval_cache (key, tenant, answer, created_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key) DO UPDATE SET answer = excluded.answer, created_ms = excluded.created_ms",
                vec![
                    key.into(),
                    tenant.into(),
                    serde_json::to_string(output)?.into(),
                    now_ms().into(),
                ],
            )
            .await?;
        Ok(())
    }
}
