//! The ledger database: tenants, API keys (stored hashed), one usage row per
//! request, and which tenant owns which site. SQLite by default, PostgreSQL
//! with `--database-url`; the same schema and SQL on both (db.rs).

pub mod db;
pub mod keys;
pub mod usage;

use std::time::{SystemTime, UNIX_EPOCH};

pub use db::{Db, DbError, Value};
pub use keys::{KeyRecord, NewKey, TenantRecord};
pub use usage::{GroupKey, Outcome, Recorded, UsageQuery, UsageRecord, UsageRow, UsageSource};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The ledger: the database and the writer that records usage in batches.
#[derive(Clone)]
pub struct Ledger {
    db: Db,
    writer: usage::Writer,
}

impl Ledger {
    /// Opens (creating and migrating) the database at `url`.
    pub async fn open(url: &str) -> anyhow::Result<Ledger> {
        let db = Db::open(url).await?;
        let writer = usage::Writer::start(db.clone());
        Ok(Ledger { db, writer })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The default database: `qpai.db` in the data dir.
    pub fn default_url(data_dir: &std::path::Path) -> String {
        format!("sqlite://{}", data_dir.join("qpai.db").display())
    }

    /// The tenant that owns `site`, if any.
    pub async fn site_owner(&self, site: &str) -> Result<Option<String>, DbError> {
        let rows = self
            .db
            .query(
                "SELECT tenant FROM site_owners WHERE site = $1",
                vec![site.into()],
            )
            .await?;
        Ok(rows.first().and_then(|r| r[0].text().map(str::to_string)))
    }

    /// Records that `tenant` owns `site`, unless the site has an owner
    /// already; true when this call made the claim.
    pub async fn claim_site(&self, site: &str, tenant: &str) -> Result<bool, DbError> {
        self.db
            .execute(
                "INSERT INTO site_owners (site, tenant) VALUES ($1, $2) \
                 ON CONFLICT (site) DO NOTHING",
                vec![site.into(), tenant.into()],
            )
            .await
            .map(|inserted| inserted == 1)
    }

    pub async fn release_site(&self, site: &str) -> Result<(), DbError> {
        self.db
            .execute("DELETE FROM site_owners WHERE site = $1", vec![site.into()])
            .await
            .map(|_| ())
    }

    /// Every site with an owner, and the owner.
    pub async fn site_owners(&self) -> Result<Vec<(String, String)>, DbError> {
        let rows = self
            .db
            .query("SELECT site, tenant FROM site_owners", vec![])
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| Some((r[0].text()?.to_string(), r[1].text()?.to_string())))
            .collect())
    }
}
