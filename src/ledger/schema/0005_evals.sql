-- The eval run a request belonged to, if any (`qpai eval run`).
ALTER TABLE usage_ledger ADD COLUMN eval_run TEXT;

-- Answers of eval cases by the content hash of what was asked (model,
-- prompt, variables, settings): a re-run of a suite costs nothing.
CREATE TABLE eval_cache (
    key TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    answer TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
