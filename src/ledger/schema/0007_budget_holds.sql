-- Budgets across processes (src/tenancy/budget.rs), used on PostgreSQL
-- where several processes share one ledger. budget_months keeps a tenant's
-- spend this month (begun from the ledger's rows the first time it is
-- needed) and what requests in flight hold; budget_holds has one row per
-- hold. A hold is taken by one conditional UPDATE of the month's row
-- (spend + held + the hold must fit the budget), so holds of one tenant
-- are taken one at a time whichever process takes them. The transaction
-- that writes the request's usage row moves its hold to spend (while the
-- hold exists: once) and deletes it. Holds of a process that died are
-- given back when they expire.
CREATE TABLE budget_holds (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    month_start_ms BIGINT NOT NULL,
    amount_pico BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX budget_holds_tenant ON budget_holds (tenant, expires_ms);

CREATE TABLE budget_months (
    tenant TEXT NOT NULL,
    month_start_ms BIGINT NOT NULL,
    spent_pico BIGINT NOT NULL,
    held_pico BIGINT NOT NULL,
    PRIMARY KEY (tenant, month_start_ms)
)
