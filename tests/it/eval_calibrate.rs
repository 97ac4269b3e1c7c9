//! `qpai eval calibrate`: what eval runs measured per route goes into the
//! routing catalog, and `auto` with the task tag then takes the cheapest
//! route that clears the task's floor. Two routes on the scripted
//! upstream: "cheap" answers short (and fails), "steady" costs twice as
//! much and answers whole.

use std::path::Path;

use crate::common::{qpai, succeeded};
use crate::eval_cli::{eval_run, failed, result_lines, write_catalog};
use crate::fake_upstream::{Behaviour, FakeUpstream};

/// 20 rows, alternately in the calibrate and heldout splits, and a suite
/// over `steady`, `cheap` and `auto` for the task `copy`.
fn write_suite(dir: &Path) -> std::path::PathBuf {
    let mut data = String::new();
    for i in 0..20 {
        let split = if i % 2 == 0 { "calibrate" } else { "heldout" };
        data.push_str(&format!(
            "{{\"id\": \"p{i}\", \"split\": \"{split}\", \"product\": \"Tool {i}\"}}\n"
        ));
    }
    std::fs::write(dir.join("rows.jsonl"), data).unwrap();
    let suite = "name = \"copy\"\n[dataset]\npath = \"rows.jsonl\"\ngroup = \"split\"\n\
                 [defaults]\nmax_tokens = 3\n[variants]\n\
                 prompts = [{ label = \"ask\", messages = [{ role = \"user\", content = \"Describe {{ product }}.\" }] }]\n\
                 models = [\"steady\", \"cheap\", \"auto\"]\ntask = \"copy\"\n\
                 [[assert]]\ntype = \"contains\"\nvalue = \"w2\"\n";
    let path = dir.join("suite.toml");
    std::fs::write(&path, suite).unwrap();
    path
}

fn routes_taken(out: &Path) -> Vec<String> {
    let mut routes: Vec<String> = result_lines(out)
        .iter()
        .map(|l| l["output"]["route"].as_str().unwrap_or("none").to_string())
        .collect();
    routes.dedup();
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrated_quality_sends_auto_to_the_cheapest_route_that_clears_the_floor() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = write_catalog(dir.path(), &upstream);
    let suite = write_suite(dir.path());
    let short = Behaviour::Answer {
        completion_tokens: 1,
    };
    upstream.queue("cheap", &[short; 40]);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        succeeded(eval_run(dir.path(), &suite, &catalog, &out, extra));
        out
    };

    // Before calibration auto takes the cheapest route, which fails.
    let before = run("before", &["--model", "auto", "--group", "heldout"]);
    assert_eq!(routes_taken(&before), ["cheap"]);
    assert!(result_lines(&before).iter().all(|l| l["pass"] == false));

    let routes = run("routes", &["--model", "steady", "--model", "cheap"]);
    assert_eq!(result_lines(&routes).len(), 40);
    let results = routes.join("results.json");
    let calibrate = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "calibrate",
            results.to_str().unwrap(),
            "--router-config",
            catalog.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        qpai(dir.path(), &args).output().unwrap()
    };
    let (table, _) = succeeded(calibrate(&[
        "--task",
        "copy",
        "--group",
        "calibrate",
        "--floor-of-best",
        "0.95",
    ]));
    assert!(table.contains("| steady | 10 | 1.000 |"), "{table}");
    assert!(table.contains("| cheap | 10 | 0.000 |"), "{table}");
    let text = std::fs::read_to_string(&catalog).unwrap();
    let parsed = qpai::router::RouterCatalog::parse(&text).unwrap();
    let steady = parsed.deployment("steady").unwrap();
    let measured = &steady.measured["copy"];
    assert_eq!((measured.score, measured.cases), (1.0, 10));
    assert!(measured.low > 0.6 && measured.high == 1.0, "{measured:?}");
    assert_eq!(
        parsed
            .deployment("cheap")
            .unwrap()
            .quality_for(Some("copy")),
        0.0
    );
    assert_eq!(parsed.floor("copy"), Some(0.95));

    // After: the held-out split goes to steady and passes.
    let after = run("after", &["--model", "auto", "--group", "heldout"]);
    assert_eq!(routes_taken(&after), ["steady"]);
    assert!(result_lines(&after).iter().all(|l| l["pass"] == true));

    // Mistakes are named, and the catalog is left as it was.
    let error = failed(calibrate(&["--task", "copy", "--floor", "1.5"]));
    assert!(error.contains("--floor: 1.5 is outside 0..1"), "{error}");
    // A route the catalog does not have.
    let other = dir.path().join("other.toml");
    let (hand, _) = qpai::router::calibration::split(&text);
    let renamed = hand.replace("name = \"cheap\"", "name = \"thrifty\"");
    std::fs::write(&other, &renamed).unwrap();
    let args = [
        "eval",
        "calibrate",
        results.to_str().unwrap(),
        "--task",
        "copy",
        "--router-config",
        other.to_str().unwrap(),
    ];
    let error = failed(qpai(dir.path(), &args).output().unwrap());
    assert!(
        error.contains("variant \"ask · cheap\": no deployment of the catalog serves \"cheap\""),
        "{error}"
    );
    assert_eq!(std::fs::read_to_string(&other).unwrap(), renamed);
    assert_eq!(std::fs::read_to_string(&catalog).unwrap(), text);
}
