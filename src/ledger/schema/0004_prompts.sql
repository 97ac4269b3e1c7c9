-- The versioned prompt (NAME@VERSION) a request named, if any.
ALTER TABLE usage_ledger ADD COLUMN prompt TEXT;

-- How long a batch line took to run, in milliseconds (its claim to its
-- answer), for the batch benchmarks.
ALTER TABLE batch_lines ADD COLUMN run_ms BIGINT;
