-- Per-tenant limits (docs/reliability.md, "Limits"): the most completion
-- tokens one request may ask for (and what it gets when it names none),
-- and the most streams the tenant may have open at once in one process.
ALTER TABLE tenants ADD COLUMN max_tokens_cap BIGINT;
ALTER TABLE tenants ADD COLUMN max_streams BIGINT
