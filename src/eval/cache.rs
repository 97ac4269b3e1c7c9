//! Answers of eval cases kept in the ledger database by a content hash of
//! what was asked (the tenant, the request body as sent — model, prompt,
//! variables, settings — and the repeat number): a re-run of a suite asks
//! nothing it has asked before, and costs nothing.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::output::Output;
use crate::ledger::Ledger;
use crate::ledger::now_ms;

#[derive(Clone)]
pub struct Cache {
    ledger: Ledger,
}

/// The key of one ask.
pub fn key(tenant: &str, body: &Value, repeat: usize) -> String {
    let mut hasher = Sha256::new();
    hasher.update(tenant.as_bytes());
    hasher.update([0]);
    hasher.update(body.to_string().as_bytes());
    hasher.update([0]);
    hasher.update(repeat.to_le_bytes());
    hex::encode(hasher.finalize())
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
