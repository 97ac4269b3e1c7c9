//! Monthly budgets per tenant, enforced before money is spent: a request
//! reserves its largest possible cost (prompt plus max_tokens at the
//! route's prices) and settles to its real cost when done. Concurrent
//! requests see each other's reservations, so a budget is never overspent
//! by requests in flight. Every few seconds the tenant's settings and spend
//! are re-read from the ledger, so spend recorded by other qpai processes
//! sharing the database counts too (their requests in flight do not: see
//! docs/router.md).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{Datelike, TimeZone, Utc};

use crate::ledger::{DbError, Ledger, TenantRecord};
use crate::money::Usd;

/// How often a tenant's budget settings are re-read.
const SETTINGS_TTL: Duration = Duration::from_secs(5);

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
}

/// The start of the current UTC month, in ms.
fn month_start_ms() -> i64 {
    let now = Utc::now();
    Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .map_or(0, |t| t.timestamp_millis())
}

impl Budgets {
    pub fn new(ledger: Ledger) -> Arc<Budgets> {
        Arc::new(Budgets {
            ledger,
            accounts: Mutex::default(),
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

    /// Holds `amount` of the tenant's budget (call `standing` first).
    pub fn reserve(self: &Arc<Self>, tenant: &str, amount: Usd) -> Result<Reservation, OverBudget> {
        let mut accounts = self.accounts();
        if let Some(account) = accounts.get_mut(tenant) {
            let standing = account.standing();
            if let (Some(available), Some(budget)) = (standing.available(), standing.budget)
                && amount > available
            {
                return Err(OverBudget {
                    tenant: tenant.to_string(),
                    spent: standing.spent,
                    reserved: standing.reserved,
                    asked: amount,
                    budget,
                });
            }
            account.reserved = account.reserved.saturating_add(amount);
        }
        Ok(Reservation {
            budgets: self.clone(),
            tenant: tenant.to_string(),
            amount,
            settled: false,
        })
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
}

impl Reservation {
    /// Replaces the hold by the request's real cost.
    pub fn settle(mut self, cost: Usd) {
        self.settled = true;
        self.budgets.release(&self.tenant, self.amount, cost);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.budgets.release(&self.tenant, self.amount, Usd::ZERO);
        }
    }
}
