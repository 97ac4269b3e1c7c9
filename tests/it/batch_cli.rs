//! `qpai batch` and `qpai prompts` as people run them: a CSV of products
//! through a versioned prompt on qpai's own model, killed with SIGKILL
//! mid-run and run again (it resumes the same job, every row answered
//! once, every line billed once), a dry run's estimate, and a CSV that
//! lacks a column the prompt needs.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use qpai::ledger::Db;
use serde_json::Value;

use crate::common::{CHAT_MODEL, chat_model, qpai, succeeded};

fn products(rows: usize) -> String {
    let mut csv = String::from("id,product,features,words\n");
    for i in 0..rows {
        csv.push_str(&format!("sku-{i},Garden tool {i},\"[\"\"steel\"\"]\",30\n"));
    }
    csv
}

async fn lines_done(database: &str) -> i64 {
    let Ok(db) = Db::open(database).await else {
        return 0;
    };
    db.query(
        "SELECT COUNT(*) FROM batch_lines WHERE state = 'done'",
        vec![],
    )
    .await
    .ok()
    .and_then(|rows| rows.first().and_then(|r| r[0].int()))
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_batch_run_resumes_and_answers_every_row_once() {
    chat_model();
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("products.csv");
    std::fs::write(&rows, products(16)).unwrap();
    let out = dir.path().join("answers.jsonl");
    let args = [
        "batch",
        "run",
        rows.to_str().unwrap(),
        "--prompt",
        "product_description@2",
        "--model",
        CHAT_MODEL,
        "--max-tokens",
        "16",
        "--out",
        out.to_str().unwrap(),
    ];
    let database = format!("sqlite://{}", dir.path().join("qpai.db").display());
    let mut first = qpai(dir.path(), &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while lines_done(&database).await < 4 {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        assert!(
            first.try_wait().unwrap().is_none(),
            "the run ended before the kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!out.exists(), "no answers are written before the job ends");

    let command_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let data_dir = dir.path().to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = command_args.iter().map(String::as_str).collect();
        qpai(&data_dir, &args).output().unwrap()
    })
    .await
    .unwrap();
    let (_, stderr) = succeeded(output);
    assert!(stderr.contains("resuming batch_"), "{stderr}");
    let answers: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = answers
        .iter()
        .map(|a| a["custom_id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..16).map(|i| format!("sku-{i}")).collect();
    assert_eq!(ids, expected, "a line per row, in row order");
    assert!(answers.iter().all(|a| a["response"]["status_code"] == 200));

    let db = Db::open(&database).await.unwrap();
    let billed = db
        .query(
            "SELECT COUNT(*), COUNT(DISTINCT request_id), MIN(prompt), MAX(prompt) \
             FROM usage_ledger WHERE batch_id IS NOT NULL",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(billed[0][0].int(), Some(16), "one usage row per row");
    assert_eq!(billed[0][1].int(), Some(16));
    assert_eq!(billed[0][2].text(), Some("product_description@2"));
    assert_eq!(billed[0][3].text(), Some("product_description@2"));
    let list = succeeded(qpai(dir.path(), &["batch", "list"]).output().unwrap()).0;
    assert!(
        list.contains("completed") && list.contains("16/16 done"),
        "{list}"
    );
}

#[test]
fn a_dry_run_estimates_and_a_bad_table_runs_nothing() {
    chat_model();
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("products.csv");
    std::fs::write(&rows, products(5)).unwrap();
    let rows = rows.to_str().unwrap();
    let base = [
        "batch",
        "run",
        rows,
        "--prompt",
        "product_description",
        "--model",
        CHAT_MODEL,
    ];
    let mut dry: Vec<&str> = base.to_vec();
    dry.push("--dry-run");
    let (table, _) = succeeded(qpai(dir.path(), &dry).output().unwrap());
    let route = table
        .lines()
        .find(|l| l.starts_with(CHAT_MODEL))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = route.split_whitespace().collect();
    assert_eq!(cells[1..3], ["5", "5"], "{table}");
    assert!(
        cells[3].parse::<u64>().unwrap() > 5 * 20,
        "prompt tokens: {table}"
    );
    assert_eq!(cells[4], "1280", "5 rows × 256 max tokens: {table}");

    let lacking = Path::new(rows).with_file_name("lacking.csv");
    std::fs::write(&lacking, "id,words\na,3\n").unwrap();
    let mut bad: Vec<&str> = base.to_vec();
    bad[2] = lacking.to_str().unwrap();
    bad.extend(["--out", "never.jsonl"]);
    let output = qpai(dir.path(), &bad).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no column for 'product'"), "{stderr}");

    let (diff, _) = succeeded(
        qpai(
            dir.path(),
            &[
                "prompts",
                "diff",
                "product_description@1",
                "product_description@2",
            ],
        )
        .output()
        .unwrap(),
    );
    assert!(
        diff.contains("- version = 1") && diff.contains("+ version = 2"),
        "{diff}"
    );
    let (rendered, _) = succeeded(
        qpai(
            dir.path(),
            &[
                "prompts",
                "render",
                "seo_meta",
                "--var",
                "page=Tulips",
                "--var",
                "summary=Bulbs.",
            ],
        )
        .output()
        .unwrap(),
    );
    assert!(
        rendered
            .contains("[user]\nWrite the SEO title and meta description of the page \"Tulips\"."),
        "{rendered}"
    );
}
