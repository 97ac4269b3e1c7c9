//! The CI-sized soak (benches/soak.py at 40 clients for 10 s, 30% of them
//! leaving mid-stream) against a real `qpai serve` with an API key: the
//! in-flight gauges return to 0, RSS stays within 10% of its level after
//! the warm-up, the log has no panic, and the SQLite ledger holds exactly
//! one row per accepted request, with an `ok` row for every finished stream.
//! The same against a routed remote deployment whose upstream fails a
//! fifth of its answers at random (`--routed`): every request then has
//! one row, whatever its outcome, and broken streams end with an error.

use serde_json::Value;

use crate::common::models_dir;

#[test]
fn a_short_soak_with_disconnects_leaves_nothing_behind() {
    let summary = soak(&[]);
    assert!(summary["soak"]["disconnected"].as_u64().unwrap() > 0);
}

#[test]
fn a_short_routed_soak_with_upstream_faults_leaves_nothing_behind() {
    let summary = soak(&["--routed", "--fault-rate", "0.2"]);
    assert!(summary["soak"]["broken_by_upstream"].as_u64().unwrap() > 0);
}

/// Runs benches/soak.py at CI size with `extra`, asserts every check
/// passed, and returns its summary.
fn soak(extra: &[&str]) -> Value {
    let python = std::env::var("QPAI_TEST_PYTHON")
        .expect("QPAI_TEST_PYTHON is not set: run the tests with scripts/test.sh");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/soak.py");
    let output = std::process::Command::new(python)
        .arg(script)
        .args(["--qpai", env!("CARGO_BIN_EXE_qpai")])
        .args([
            "--clients",
            "40",
            "--duration-s",
            "10",
            "--warmup-s",
            "4",
            "--json",
        ])
        .args(extra)
        .env("QPAI_MODELS_DIR", models_dir())
        .env_remove("QPAI_DATABASE_URL")
        .env_remove("QPAI_ROUTER_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("soak printed no summary ({e}):\n{stdout}\n{stderr}"));
    let checks = summary["checks"].as_object().unwrap();
    assert!(checks.len() >= 8, "{summary:#}");
    for (check, passed) in checks {
        assert_eq!(passed, &Value::Bool(true), "{check}: {summary:#}\n{stderr}");
    }
    assert!(output.status.success(), "{summary:#}\n{stderr}");
    summary
}
