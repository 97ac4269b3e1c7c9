-- Online experiments (src/experiments/): an experiment per tenant and id
-- (its spec as JSON, and its winner once stopped), each variant's running
-- sums, the variant each unit (user or episode) sticks to, the requests
-- assigned (their ids are the ledger's), and feedback, once per target
-- and metric. Values are kept in millionths.
CREATE TABLE experiments (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    spec TEXT NOT NULL,
    winner TEXT,
    created_ms BIGINT NOT NULL,
    stopped_ms BIGINT,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE experiment_arms (
    tenant TEXT NOT NULL,
    experiment TEXT NOT NULL,
    arm TEXT NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    feedback BIGINT NOT NULL DEFAULT 0,
    sum_micro BIGINT NOT NULL DEFAULT 0,
    sum_sq_micro BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, experiment, arm)
);

CREATE TABLE experiment_units (
    tenant TEXT NOT NULL,
    experiment TEXT NOT NULL,
    unit TEXT NOT NULL,
    arm TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant, experiment, unit)
);
CREATE INDEX experiment_units_by_unit ON experiment_units (tenant, unit);

CREATE TABLE experiment_requests (
    request_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    experiment TEXT NOT NULL,
    arm TEXT NOT NULL,
    unit TEXT,
    created_ms BIGINT NOT NULL
);
CREATE INDEX experiment_requests_by_experiment ON experiment_requests (tenant, experiment);

CREATE TABLE experiment_feedback (
    tenant TEXT NOT NULL,
    experiment TEXT NOT NULL,
    target TEXT NOT NULL,
    metric TEXT NOT NULL,
    arm TEXT NOT NULL,
    value_micro BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant, experiment, target, metric)
);
