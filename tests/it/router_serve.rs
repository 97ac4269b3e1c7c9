//! Two real `qpai serve` processes: one is an OpenAI-compatible upstream
//! with its own API key, the other routes the logical model "writer" to it.
//! Keys are made with `qpai keys create`; the official openai Python client
//! drives the router (tests/python/test_router_client.py); `qpai usage`
//! reads the same ledger afterwards.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::*;

pub fn qpai(data_dir: &Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_qpai"))
        .args(args)
        .env("QPAI_DATA_DIR", data_dir)
        .env("QPAI_MODELS_DIR", models_dir())
        .env_remove("QPAI_DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "qpai {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

pub fn key(data_dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["keys", "create"];
    all.extend_from_slice(args);
    qpai(data_dir, &all).trim().to_string()
}

pub fn serve(data_dir: &Path, port: u16, extra: &[&str], env: &[(&str, &str)]) -> KillOnDrop {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qpai"));
    command
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--model",
            CHAT_MODEL,
        ])
        .args(extra)
        .env("QPAI_DATA_DIR", data_dir)
        .env("QPAI_MODELS_DIR", models_dir())
        .env_remove("QPAI_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (name, value) in env {
        command.env(name, value);
    }
    KillOnDrop(command.spawn().expect("starting qpai serve"))
}

#[test]
fn the_router_fronts_another_qpai_for_the_python_client() {
    chat_model();
    let upstream_dir = tempfile::tempdir().unwrap();
    let router_dir = tempfile::tempdir().unwrap();
    let upstream_key = key(upstream_dir.path(), &["--tenant", "platform"]);
    let acme = key(
        router_dir.path(),
        &["--tenant", "acme", "--monthly-budget-usd", "5"],
    );
    let admin = key(router_dir.path(), &["--tenant", "ops", "--admin"]);
    let poor = key(
        router_dir.path(),
        &["--tenant", "poor", "--monthly-budget-usd", "0.00001"],
    );
    let limited = key(router_dir.path(), &["--tenant", "acme", "--rpm", "1"]);
    let listed = qpai(router_dir.path(), &["keys", "list"]);
    assert_eq!(listed.lines().count(), 5, "{listed}");
    assert!(!listed.contains(&acme), "keys are never shown again");

    let upstream_port = free_port();
    let _upstream = serve(upstream_dir.path(), upstream_port, &[], &[]);
    let catalog = router_dir.path().join("router.toml");
    std::fs::write(
        &catalog,
        format!(
            r#"
[[deployment]]
name = "edge"
provider = "openai_compatible"
model = "{CHAT_MODEL}"
base_url = "http://127.0.0.1:{upstream_port}/v1"
api_key_env = "QPAI_TEST_EDGE_KEY"
input_usd_per_1m = 1
output_usd_per_1m = 2
context_window = 8192
capabilities = ["streaming"]
batch_discount = 0.5

[[model]]
name = "writer"
deployments = ["edge"]
"#
        ),
    )
    .unwrap();
    let router_port = free_port();
    let router = serve(
        router_dir.path(),
        router_port,
        &["--router-config", catalog.to_str().unwrap()],
        &[("QPAI_TEST_EDGE_KEY", &upstream_key)],
    );
    wait_ready(upstream_port);
    wait_ready(router_port);
    pytest(
        &["tests/python/test_router_client.py"],
        &[
            (
                "QPAI_BASE_URL",
                format!("http://127.0.0.1:{router_port}/v1"),
            ),
            (
                "QPAI_UPSTREAM_URL",
                format!("http://127.0.0.1:{upstream_port}/v1"),
            ),
            ("QPAI_UPSTREAM_KEY", upstream_key.clone()),
            ("QPAI_KEY", acme.clone()),
            ("QPAI_ADMIN_KEY", admin),
            ("QPAI_POOR_KEY", poor),
            ("QPAI_LIMITED_KEY", limited),
            ("QPAI_MODEL", CHAT_MODEL.to_string()),
        ],
    );
    // The router writes rows as requests end; the CLI reads the same database.
    drop(router);
    let usage = qpai(
        router_dir.path(),
        &[
            "usage",
            "--tenant",
            "acme",
            "--group-by",
            "deployment",
            "--json",
        ],
    );
    let rows: serde_json::Value = serde_json::from_str(&usage).unwrap();
    let edge = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["deployment"] == "edge")
        .expect("edge row")
        .clone();
    // 1 + 3 + 3 answered requests of acme in the Python tests, and a
    // batch of 3 lines.
    assert_eq!(edge["requests"], 10, "{usage}");
    // The upstream billed its own tenant for the same requests.
    let upstream_usage = qpai(
        upstream_dir.path(),
        &["usage", "--tenant", "platform", "--json"],
    );
    assert!(upstream_usage.contains("\"requests\""), "{upstream_usage}");
}
