//! A site store on object storage: `qpai ingest` and `qpai search` against a
//! real S3-speaking server on loopback (moto's server, from the test venv).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{KillOnDrop, free_port, models_dir};

fn start_moto() -> (KillOnDrop, String) {
    let python = std::env::var("QPAI_TEST_PYTHON")
        .expect("QPAI_TEST_PYTHON is not set: run the tests with scripts/test.sh");
    let port = free_port();
    let child = Command::new(python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting moto's S3 server");
    let moto = KillOnDrop(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while ureq::get(&endpoint).call().is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "moto did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ureq::put(&format!("{endpoint}/qpai-sites"))
        .call()
        .expect("creating the bucket");
    (moto, endpoint)
}

fn qpai(endpoint: &str, args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_qpai"))
        .arg("--models-dir")
        .arg(models_dir())
        .args(["--rag-uri", "s3://qpai-sites/rag"])
        .args(args)
        .env("AWS_ENDPOINT", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "qpai {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
}

#[test]
fn a_site_lives_on_s3() {
    let (_moto, endpoint) = start_moto();
    let tmp = tempfile::tempdir().unwrap();
    crate::rag::write_site(tmp.path());
    let site = tmp.path().display().to_string();
    let report = qpai(&endpoint, &["ingest", "--json", "--site", "shop", &site]);
    assert_eq!(
        (report["pages"].as_u64(), report["added"].as_u64()),
        (Some(6), Some(6)),
        "{report}"
    );
    let again = qpai(&endpoint, &["ingest", "--json", "--site", "shop", &site]);
    assert_eq!(again["unchanged"], 6, "{again}");
    let found = qpai(
        &endpoint,
        &[
            "search",
            "--json",
            "--site",
            "shop",
            "tomato blight watering",
        ],
    );
    assert_eq!(found["results"][0]["url"], "guides/tomatoes", "{found}");
    // The objects are in the bucket.
    let listing = ureq::get(&format!(
        "{endpoint}/qpai-sites?list-type=2&prefix=rag/shop.lance"
    ))
    .call()
    .unwrap()
    .into_string()
    .unwrap();
    assert!(listing.contains("rag/shop.lance/"), "{listing}");
}
