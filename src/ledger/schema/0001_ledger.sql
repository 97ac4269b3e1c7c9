-- Tenants, their API keys, the usage ledger and site ownership.
-- Written once for SQLite and PostgreSQL: BIGINT and TEXT columns only.
-- Money is in pico-dollars (1e-12 USD), so sums are exact integers.
CREATE TABLE tenants (
    name TEXT PRIMARY KEY,
    monthly_budget_pico BIGINT,
    soft_limit_percent BIGINT NOT NULL,
    -- What "auto" means for this tenant: a model to use, a quality floor.
    default_model TEXT,
    min_quality_permille BIGINT,
    created_ms BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants (name),
    -- sha256 of the whole key, hex; the key itself is never stored.
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    admin BIGINT NOT NULL,
    rpm BIGINT,
    tpm BIGINT,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);

-- One row per request, whatever its outcome.
CREATE TABLE usage_ledger (
    request_id TEXT PRIMARY KEY,
    ts_ms BIGINT NOT NULL,
    day TEXT NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    requested_model TEXT NOT NULL,
    deployment TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost_pico BIGINT NOT NULL,
    -- ok | error | cut (a stream that ended early, billed for what it produced)
    outcome TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    stream BIGINT NOT NULL,
    -- upstream (the provider's own usage) | counted (qpai's count)
    usage_source TEXT NOT NULL
);

CREATE INDEX usage_ledger_tenant_ts ON usage_ledger (tenant, ts_ms);

CREATE TABLE site_owners (
    site TEXT PRIMARY KEY,
    tenant TEXT NOT NULL
);
