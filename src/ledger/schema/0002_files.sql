-- Files a tenant uploaded (or qpai wrote for it), as OpenAI's Files API
-- lists them; their content is in a blob store (files/blobs.rs).
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    -- sha256 of the content, hex: checked when the content is read back.
    sha256 TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT
);

CREATE INDEX files_by_tenant ON files (tenant, created_ms, id);
