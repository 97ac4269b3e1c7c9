-- Batches, as OpenAI's Batch API defines them, and their lines: one row
-- per input line, claimed under a lease by whichever qpai process runs
-- it, with its result kept in the same transaction as its usage row.
CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    -- The key that created it: its lines run as that key.
    key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    -- validating | failed | in_progress | finalizing | completed | expired
    -- | cancelling | cancelled
    status TEXT NOT NULL,
    -- JSON object, at most 16 pairs.
    metadata TEXT,
    -- Seconds after which the output and error files expire (none: kept).
    output_expiry_s BIGINT,
    -- The one model the input file names (set once validated).
    model TEXT,
    -- JSON list of {code, line, message, param}: why validation failed.
    errors TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    in_progress_ms BIGINT,
    finalizing_ms BIGINT,
    completed_ms BIGINT,
    failed_ms BIGINT,
    expired_ms BIGINT,
    cancelling_ms BIGINT,
    cancelled_ms BIGINT,
    -- Who validates or finalizes it now, and until when.
    lease_owner TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX batches_by_tenant ON batches (tenant, created_ms, id);
CREATE INDEX batches_by_status ON batches (status, created_ms);

CREATE TABLE batch_lines (
    batch_id TEXT NOT NULL,
    -- 1-based line number in the input file.
    line BIGINT NOT NULL,
    custom_id TEXT NOT NULL,
    -- The request body, JSON.
    body TEXT NOT NULL,
    -- pending | done (a response, 2xx or not) | failed (no response:
    -- expired, cancelled, or tried too often)
    state TEXT NOT NULL,
    -- The runner that holds (or, once settled, held) the line's claim.
    lease_owner TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0,
    tries BIGINT NOT NULL DEFAULT 0,
    -- The output or error line, JSON, once done or failed.
    result TEXT,
    status_code BIGINT,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, line)
);

CREATE INDEX batch_lines_waiting ON batch_lines (batch_id, state, lease_until_ms);

ALTER TABLE usage_ledger ADD COLUMN batch_id TEXT;
CREATE INDEX usage_ledger_batch ON usage_ledger (batch_id);
