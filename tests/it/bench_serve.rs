//! `qpai bench-serve` against a real `qpai serve`: every request completes
//! with exactly its drawn output length (`ignore_eos`), the report holds the
//! latency figures, and prompts that share a prefix show up as prefix-cache
//! hits in `/metrics`.

use std::process::Stdio;

use serde_json::Value;

use crate::common::*;

#[test]
fn bench_serve_measures_a_server_and_its_prefix_cache() {
    chat_model(); // makes sure the model is in the cache before the server starts
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = KillOnDrop(
        qpai(
            dir.path(),
            &[
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--model",
                CHAT_MODEL,
                "--embedding-model",
                "",
                "--kv-cache-mb",
                "64",
                "--kv-cache-dtype",
                "f16",
                "--database-url",
                &test_database(dir.path()),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting qpai serve"),
    );
    wait_ready(port);
    let report = dir.path().join("bench.json");
    let output = qpai(
        dir.path(),
        &[
            "bench-serve",
            "--url",
            &format!("http://127.0.0.1:{port}/v1"),
            "--model",
            CHAT_MODEL,
            "--concurrency",
            "1,3",
            "--requests",
            "3",
            "--warmup",
            "0",
            "--prompt-tokens",
            "24",
            "--output-tokens",
            "6",
            "--output-spread",
            "0.5",
            "--shared-prefix-tokens",
            "48",
            "--json",
            &report.display().to_string(),
        ],
    )
    .output()
    .unwrap();
    let (stdout, _) = succeeded(output);
    assert!(stdout.contains("Serving Benchmark Result"), "{stdout}");
    assert!(stdout.contains("P99 TTFT (ms):"), "{stdout}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    let levels = report["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for level in levels {
        assert_eq!(level["completed"], 3, "{level}");
        assert_eq!(level["failed"], 0, "{level}");
        // 3 drawn lengths in 3..=9 tokens each, all generated in full.
        let generated = level["total_output_tokens"].as_u64().unwrap();
        assert!((9..=27).contains(&generated), "{level}");
        assert!(level["ttft"]["median_ms"].as_f64().unwrap() > 0.0);
        assert!(
            level["e2el"]["p99_ms"].as_f64().unwrap() >= level["ttft"]["p99_ms"].as_f64().unwrap()
        );
        // 48 shared + 18..=30 own tokens a prompt.
        let input = level["total_input_tokens"].as_u64().unwrap();
        assert!((3 * 66..=3 * 78).contains(&input), "{level}");
    }
    let metrics = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let hit_tokens: f64 = metrics
        .lines()
        .find(|l| l.starts_with("qpai_prefix_cache_hit_tokens_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no prefix-cache counter in /metrics:\n{metrics}"));
    // Every request after the first finds the 48 shared tokens (3 blocks).
    assert!(hit_tokens >= 48.0 * 4.0, "{hit_tokens} prefix tokens hit");
    assert!(metrics.contains("qpai_kv_cache_blocks{"), "{metrics}");
    drop(server);
}
