//! The official openai Python package drives a real `qpai serve` process
//! (tests/python/test_openai_client.py). The test setup (scripts/test.sh)
//! installs the package into a cached venv and sets QPAI_TEST_PYTHON.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Kills the server when the test ends, however it ends.
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn official_python_client_against_qpai_serve() {
    let python = std::env::var("QPAI_TEST_PYTHON").expect(
        "QPAI_TEST_PYTHON is not set: run the tests with scripts/test.sh, which installs the openai client",
    );
    chat_model(); // makes sure the model is in the cache before the server starts
    let port = free_port();
    let rag_dir = tempfile::tempdir().unwrap();
    let server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_qpai"))
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--model",
                CHAT_MODEL,
                "--rag-uri",
                &rag_dir.path().display().to_string(),
            ])
            .env("QPAI_MODELS_DIR", models_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting qpai serve"),
    );
    let started = Instant::now();
    while http_get_status(port, "/ready") != Some(200) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "qpai serve not ready in 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/python/test_openai_client.py",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("QPAI_BASE_URL", format!("http://127.0.0.1:{port}/v1"))
        .env("QPAI_MODEL", CHAT_MODEL)
        .output()
        .expect("running pytest");
    drop(server);
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "openai client tests failed:\n{report}"
    );
    assert!(report.contains(" passed"), "pytest ran no test:\n{report}");
}
