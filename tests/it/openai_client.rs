//! The official openai Python package drives a real `qpai serve` process
//! (tests/python/test_openai_client.py). The test setup (scripts/test.sh)
//! installs the package into a cached venv and sets QPAI_TEST_PYTHON.

use std::process::{Command, Stdio};

use crate::common::*;

#[test]
fn official_python_client_against_qpai_serve() {
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
                "--database-url",
                &test_database(rag_dir.path()),
            ])
            .env("QPAI_MODELS_DIR", models_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting qpai serve"),
    );
    wait_ready(port);
    pytest(
        &[
            "tests/python/test_openai_client.py",
            "tests/python/test_structured_outputs.py",
        ],
        &[
            ("QPAI_BASE_URL", format!("http://127.0.0.1:{port}/v1")),
            ("QPAI_MODEL", CHAT_MODEL.to_string()),
        ],
    );
    drop(server);
}
