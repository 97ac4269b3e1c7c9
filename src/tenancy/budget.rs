//! Monthly budgets per tenant, enforced before money is spent: a request
//! reserves its largest possible cost (prompt plus max_tokens at the
//! route's prices) and settles to its real cost when done. Concurrent
//! requests see each other's reservations, so a budget is never overspent
//! by requests in flight. Every few seconds the tenant's settings and spend
//! are re-read from the ledger, so spend recorded by other qpai processes
//! sharing the database counts too.
//!
//! On PostgreSQL, where several processes share one ledger, the hold is
//! also taken in the database (schema/0007_budget_holds.sql): one
//! conditional UPDATE of the tenant's month row adds the hold only when the
//! month's spend, every process's live holds and the new hold fit the
//! budget, so holds of one tenant are taken one at a time whichever process
//! takes them. The transaction that writes the request's usage row moves
//! its hold to spend, so the money is counted once, as a hold or as spend,
//! never neither. A hold is the most a request may cost: together the
//! processes never pass the budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{Datelike, TimeZone, Utc};

use crate::ledger::{DbError, Ledger, TenantRecord, now_ms};
use crate::money::Usd;

/// How often a tenant's budget settings are re-read.
const SETTINGS_TTL: Duration = Duration::from_secs(5);

/// How long a hold in the database lives when its process dies before the
/// request's row is written (longer than the upstream's whole-answer
/// timeout, ten minutes by default).
const HOLD_TTL_MS: i64 = 15 * 60 * 1000;

/// How often a process gives back a tenant's expired holds.
const RECLAIM_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Account {
    month_start_ms: i64,
    spent: Usd,
    /// Spend settled here since the last read began (its rows may not be
    /// in the database yet).
    settled_since_read: Usd,
    reserved: Usd,
    budget: Option<Usd>,
    soft_limit_percent: u8,
    /// The tenant's row as last read (routing defaults too).
    settings: Option<TenantRecord>,
    read_at: Instant,
}

/// A tenant's standing this month.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    pub spent: Usd,
    pub reserved: Usd,
    pub budget: Option<Usd>,
    pub soft_limit_percent: u8,
}

impl Standing {
    /// What is left to reserve; None without a budget.
    pub fn available(&self) -> Option<Usd> {
        self.budget.map(|b| {
            Usd(b
                .0
                .saturating_sub(self.spent.0.saturating_add(self.reserved.0)))
        })
    }

    /// The warning to send once spend passes the soft limit.
    pub fn warning(&self) -> Option<String> {
        let budget = self.budget?;
        let soft = budget.0 as u128 * u128::from(self.soft_limit_percent) / 100;
        (u128::from(self.spent.0) >= soft).then(|| {
            format!(
                "{}% of the monthly budget is spent (${} of ${})",
                (u128::from(self.spent.0) * 100 / u128::from(budget.0.max(1))),
                self.spent,
                budget
            )
        })
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the monthly budget of tenant '{tenant}' cannot pay for this request: ${spent} spent, \
     ${reserved} held by requests in flight, up to ${asked} needed, budget ${budget}"
)]
pub struct OverBudget {
    pub tenant: String,
    pub spent: Usd,
    pub reserved: Usd,
    pub asked: Usd,
    pub budget: Usd,
}

pub struct Budgets {
    ledger: Ledger,
    accounts: Mutex<HashMap<String, Account>>,
    /// (tenant, month) whose row in budget_months this process has begun
    /// (or found), and when it last gave back expired holds.
    months_begun: Mutex<HashMap<(String, i64), Instant>>,
}

/// The start of the current UTC month, in ms.
fn month_start_ms() -> i64 {
    month_start_of(crate::ledger::now_ms())
}

/// The start of the UTC month of `ts_ms`, in ms.
pub fn month_start_of(ts_ms: i64) -> i64 {
    let at = chrono::DateTime::from_timestamp_millis(ts_ms).unwrap_or_default();
    Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
        .single()
        .map_or(0, |t| t.timestamp_millis())
}

impl Budgets {
    pub fn new(ledger: Ledger) -> Arc<Budgets> {
        Arc::new(Budgets {
            ledger,
            accounts: Mutex::default(),
            months_begun: Mutex::default(),
        })
    }

    fn accounts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Account>> {
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tenant's standing, re-read from the database when it is older
    /// than a few seconds (or the month changed).
    pub async fn standing(&self, tenant: &str) -> Result<Standing, DbError> {
        let month = month_start_ms();
        let fresh = self.accounts().get(tenant).and_then(|a| {
            (a.month_start_ms == month && a.read_at.elapsed() < SETTINGS_TTL).then(|| a.standing())
        });
        if let Some(standing) = fresh {
            return Ok(standing);
        }
        // Spend settled before this mark is written by the flush and read
        // back below; spend settled after it is added on top (counted
        // twice at worst until the next read: never under).
        if let Some(account) = self.accounts().get_mut(tenant) {
            account.settled_since_read = Usd::ZERO;
        }
        self.ledger.flush().await;
        let settings = self.ledger.tenant(tenant).await?;
        let recorded = self.ledger.spent_since(tenant, month).await?;
        let mut accounts = self.accounts();
        let account = accounts.entry(tenant.to_string()).or_insert(Account {
            month_start_ms: month,
            spent: Usd::ZERO,
            settled_since_read: Usd::ZERO,
            reserved: Usd::ZERO,
            budget: None,
            soft_limit_percent: crate::ledger::keys::DEFAULT_SOFT_LIMIT_PERCENT,
            settings: None,
            read_at: Instant::now(),
        });
        account.month_start_ms = month;
        account.spent = recorded.saturating_add(account.settled_since_read);
        account.budget = settings.as_ref().and_then(|s| s.monthly_budget);
        if let Some(settings) = &settings {
            account.soft_limit_percent = settings.soft_limit_percent;
        }
        account.settings = settings;
        account.read_at = Instant::now();
        Ok(account.standing())
    }

    /// Holds `amount` of the tenant's budget (call `standing` first): in
    /// this process, and on PostgreSQL in the database too.
    pub async fn reserve(
        self: &Arc<Self>,
        tenant: &str,
        amount: Usd,
    ) -> Result<Result<Reservation, OverBudget>, DbError> {
        let budgeted = {
            let mut accounts = self.accounts();
            match accounts.get_mut(tenant) {
                Some(account) => {
                    let standing = account.standing();
                    if let (Some(available), Some(budget)) = (standing.available(), standing.budget)
                        && amount > available
                    {
                        return Ok(Err(over_budget(tenant, standing, amount, budget)));
                    }
                    account.reserved = account.reserved.saturating_add(amount);
                    standing.budget.map(|budget| (standing, budget))
                }
                None => None,
            }
        };
        let mut reservation = Reservation {
            budgets: self.clone(),
            tenant: tenant.to_string(),
            amount,
            settled: false,
            hold: None,
        };
        if let Some((standing, budget)) = budgeted
            && self.ledger.db().backend() == "postgres"
        {
            match self.hold_in_database(tenant, amount, budget).await? {
                Some(hold) => reservation.hold = Some(hold),
                // Dropping the reservation gives back the local hold.
                None => return Ok(Err(over_budget(tenant, standing, amount, budget))),
            }
        }
        Ok(Ok(reservation))
    }

    /// Takes a hold of `amount` in the database if it fits the tenant's
    /// budget beside the month's spend and every live hold; its id, or
    /// None.
    async fn hold_in_database(
        &self,
        tenant: &str,
        amount: Usd,
        budget: Usd,
    ) -> Result<Option<String>, DbError> {
        let id = format!("hold_{}", uuid::Uuid::new_v4().simple());
        let now = now_ms();
        let month = month_start_ms();
        let amount = i64::try_from(amount.0).unwrap_or(i64::MAX);
        let budget = i64::try_from(budget.0).unwrap_or(i64::MAX);
        let db = self.ledger.db();
        let key = (tenant.to_string(), month);
        let begun = self
            .months_begun()
            .get(&key)
            .is_some_and(|at| at.elapsed() < RECLAIM_EVERY);
        if !begun {
            db.transaction(vec![
                // The month's spend, from the ledger, the first time.
                (
                    "INSERT INTO budget_months (tenant, month_start_ms, spent_pico, held_pico) \
                     SELECT $1, CAST($2 AS BIGINT), (SELECT COALESCE(SUM(cost_pico), 0) \
                         FROM usage_ledger WHERE tenant = $1 AND ts_ms >= $2), 0 \
                     WHERE NOT EXISTS (SELECT 1 FROM budget_months \
                         WHERE tenant = $1 AND month_start_ms = $2) \
                     ON CONFLICT (tenant, month_start_ms) DO NOTHING",
                    vec![tenant.into(), month.into()],
                ),
                // Holds of processes that died, given back.
                (
                    "WITH gone AS (DELETE FROM budget_holds \
                         WHERE tenant = $1 AND month_start_ms = $2 AND expires_ms < $3 \
                         RETURNING amount_pico) \
                     UPDATE budget_months \
                     SET held_pico = held_pico - (SELECT COALESCE(SUM(amount_pico), 0) FROM gone) \
                     WHERE tenant = $1 AND month_start_ms = $2",
                    vec![tenant.into(), month.into(), now.into()],
                ),
            ])
            .await?;
            self.months_begun().insert(key, Instant::now());
        }
        // One statement: the month's row is locked, and the condition
        // re-checked on its latest version when another process's hold
        // changed it meanwhile; the hold's own row goes in only when it
        // fit. A hold is not the bill (the usage row is): its commit does
        // not wait for the disk.
        let held = db
            .execute_unsynced(
                "WITH held AS (UPDATE budget_months SET held_pico = held_pico + $3 \
                     WHERE tenant = $1 AND month_start_ms = $2 \
                     AND spent_pico + held_pico + $3 <= $4 RETURNING tenant) \
                 INSERT INTO budget_holds (id, tenant, month_start_ms, amount_pico, expires_ms) \
                 SELECT $5, $1, $2, $3, $6 FROM held",
                vec![
                    tenant.into(),
                    month.into(),
                    amount.into(),
                    budget.into(),
                    id.as_str().into(),
                    (now + HOLD_TTL_MS).into(),
                ],
            )
            .await?;
        Ok((held == 1).then_some(id))
    }

    fn months_begun(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i64), Instant>> {
        self.months_begun.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deletes a database hold whose request wrote no row.
    fn drop_hold(&self, hold: String) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // it expires
        };
        let db = self.ledger.db().clone();
        runtime.spawn(async move {
            let deleted = db
                .execute(
                    "WITH gone AS (DELETE FROM budget_holds WHERE id = $1 \
                         RETURNING tenant, month_start_ms, amount_pico) \
                     UPDATE budget_months SET held_pico = budget_months.held_pico - gone.amount_pico \
                     FROM gone WHERE budget_months.tenant = gone.tenant \
                     AND budget_months.month_start_ms = gone.month_start_ms",
                    vec![hold.into()],
                )
                .await;
            if let Err(error) = deleted {
                tracing::warn!(%error, "a budget hold stays until it expires");
            }
        });
    }

    fn release(&self, tenant: &str, held: Usd, spent: Usd) {
        if let Some(account) = self.accounts().get_mut(tenant) {
            account.reserved = Usd(account.reserved.0.saturating_sub(held.0));
            account.spent = account.spent.saturating_add(spent);
            account.settled_since_read = account.settled_since_read.saturating_add(spent);
        }
    }

    /// The tenant's settings as last read by `standing` (at most a few
    /// seconds old).
    pub fn settings(&self, tenant: &str) -> Option<TenantRecord> {
        self.accounts().get(tenant).and_then(|a| a.settings.clone())
    }
}

fn over_budget(tenant: &str, standing: Standing, asked: Usd, budget: Usd) -> OverBudget {
    OverBudget {
        tenant: tenant.to_string(),
        spent: standing.spent,
        reserved: standing.reserved,
        asked,
        budget,
    }
}

impl Account {
    fn standing(&self) -> Standing {
        Standing {
            spent: self.spent,
            reserved: self.reserved,
            budget: self.budget,
            soft_limit_percent: self.soft_limit_percent,
        }
    }
}

/// Money held for a request in flight; released when dropped unsettled.
pub struct Reservation {
    budgets: Arc<Budgets>,
    tenant: String,
    amount: Usd,
    settled: bool,
    /// The hold's id in the database (PostgreSQL).
    hold: Option<String>,
}

impl Reservation {
    /// Replaces the hold by the request's real cost. Returns the database
    /// hold, which the request's usage row must delete as it is written.
    pub fn settle(mut self, cost: Usd) -> Option<String> {
        self.settled = true;
        self.budgets.release(&self.tenant, self.amount, cost);
        self.hold.take()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.budgets.release(&self.tenant, self.amount, Usd::ZERO);
            if let Some(hold) = self.hold.take() {
                self.budgets.drop_hold(hold);
            }
        }
    }
}
