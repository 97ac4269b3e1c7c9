//! `qpai eval run` as people run it: a suite against a routed deployment
//! on a scripted upstream (exact costs, 429s backed off, the ledger
//! tagged, a re-run served from the cache, a baseline, a dry run, the CI
//! gate), the report opened in headless Chromium (charts drawn, failing
//! cases paged), and suites whose mistakes are named before anything runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qpai::ledger::Db;
use serde_json::Value;

use crate::common::{qpai, succeeded};
use crate::fake_upstream::{Behaviour, FakeUpstream};

pub fn failed(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "should have failed:\n{stderr}");
    stderr
}

/// Two remote deployments on the scripted upstream: "steady" at $1/$2
/// per 1M tokens, "cheap" at $0.5/$1.
pub fn write_catalog(dir: &Path, upstream: &FakeUpstream) -> PathBuf {
    let path = dir.join("router.toml");
    let mut text = String::new();
    for (name, input, output) in [("steady", "1", "2"), ("cheap", "0.5", "1")] {
        text.push_str(&format!(
            "[[deployment]]\nname = \"{name}\"\nprovider = \"openai_compatible\"\nmodel = \"m-{name}\"\n\
             base_url = \"{}/{name}/v1\"\ninput_usd_per_1m = {input}\noutput_usd_per_1m = {output}\n\
             context_window = 4096\n\n",
            upstream.base
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// A suite of `rows` product rows over the given models and assertions.
fn write_suite(dir: &Path, rows: usize, models: &[&str], assertions: &str) -> PathBuf {
    let mut data = String::new();
    for i in 0..rows {
        data.push_str(&format!(
            "{{\"id\": \"p{i}\", \"product\": \"Tool {i}\", \"expected\": \"w0\"}}\n"
        ));
    }
    std::fs::write(dir.join("products.jsonl"), data).unwrap();
    let models: Vec<String> = models.iter().map(|m| format!("\"{m}\"")).collect();
    let suite = format!(
        "name = \"products\"\n[dataset]\npath = \"products.jsonl\"\n[defaults]\nmax_tokens = 3\n\
         [variants]\nprompts = [{{ label = \"ask\", messages = [{{ role = \"user\", content = \"Describe {{{{ product }}}}.\" }}] }}]\n\
         models = [{}]\n{assertions}",
        models.join(", ")
    );
    let path = dir.join("suite.toml");
    std::fs::write(&path, suite).unwrap();
    path
}

/// `qpai eval run SUITE` routed by `catalog` for the tenant acme, written to `out`.
pub fn eval_run(dir: &Path, suite: &Path, catalog: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "eval",
        "run",
        suite.to_str().unwrap(),
        "--router-config",
        catalog.to_str().unwrap(),
        "--tenant",
        "acme",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    qpai(dir, &args).output().unwrap()
}

/// `qpai eval run SUITE --out DIR/out` in `dir`, which must succeed; the out folder.
pub fn run_suite(dir: &Path, suite: &Path) -> PathBuf {
    let out = dir.join("out");
    let args = [
        "eval",
        "run",
        suite.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    succeeded(qpai(dir, &args).output().unwrap());
    out
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn result_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (rows, sum of cost in pico-dollars) of the ledger rows of a run.
async fn ledger_rows(dir: &Path, run: &str) -> (i64, i64) {
    let db = Db::open(&format!("sqlite://{}", dir.join("qpai.db").display()))
        .await
        .unwrap();
    let rows = db
        .query(
            "SELECT COUNT(*), COALESCE(SUM(cost_pico), 0) FROM usage_ledger WHERE eval_run = $1 AND tenant = 'acme'",
            vec![run.into()],
        )
        .await
        .unwrap();
    (rows[0][0].int().unwrap(), rows[0][1].int().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_suite_is_billed_exactly_backs_off_and_reruns_from_the_cache() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = write_catalog(dir.path(), &upstream);
    let assertions = "[[assert]]\ntype = \"contains\"\nvalue = \"{{ expected }}\"\n\
                      [[assert]]\ntype = \"icontains-all\"\nvalue = [\"W1\", \"w2\"]\n\
                      [[assert]]\ntype = \"regex\"\nvalue = \"^w0 w1\"\nweight = 2\n\
                      [[assert]]\ntype = \"contains\"\nvalue = \"w7\"\nnot = true\n\
                      [[assert]]\ntype = \"cost\"\nthreshold = 0.0001\n\
                      [[assert]]\ntype = \"finish-reason\"\nvalue = \"stop\"\n";
    let suite = write_suite(dir.path(), 20, &["steady", "cheap"], assertions);
    // Three 429s before the upstream answers, each with a Retry-After
    // longer than the router waits itself: the harness backs off.
    let busy = Behaviour::TooMany { retry_after_s: 3 };
    upstream.queue("steady", &[busy, busy, busy]);
    let out = dir.path().join("run1");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["--concurrency", "4"];
        args.extend_from_slice(extra);
        eval_run(dir.path(), &suite, &catalog, out, &args)
    };
    let (stdout, _) = succeeded(run(&out, &[]));
    assert!(stdout.contains("| variant | pass rate"), "{stdout}");

    let summary = read_json(&out.join("results.json"));
    let run_id = summary["run_id"].as_str().unwrap().to_string();
    let lines = result_lines(&out);
    assert_eq!(lines.len(), 40);
    for line in &lines {
        assert_eq!(line["pass"], true, "{line}");
        assert_eq!(line["cached"], false);
        let text = line["output"]["text"].as_str().unwrap();
        assert_eq!(text, "w0 w1 w2 ");
    }
    // Three refusals, each tried again (calls that met the refusal's
    // circuit breaker open were refused without asking, and retried too).
    let retries: i64 = lines
        .iter()
        .map(|l| l["busy_retries"].as_i64().unwrap())
        .sum();
    assert!(retries >= 3, "{retries}");
    assert_eq!(upstream.requests("steady"), 23);
    assert_eq!(upstream.requests("cheap"), 20);
    // 11 prompt and 3 completion tokens per answer: steady costs
    // 11 × $1/1M + 3 × $2/1M = $0.000017, cheap half of it.
    let variants = summary["variants"].as_array().unwrap();
    let cost = |label: &str| {
        let v = variants
            .iter()
            .find(|v| v["label"].as_str().unwrap().ends_with(label))
            .unwrap();
        v["cost"].as_str().unwrap().to_string()
    };
    assert_eq!(cost("steady"), "0.00034");
    assert_eq!(cost("cheap"), "0.00017");
    assert_eq!(summary["spent"], "0.00051");
    // The ledger: a row per call (the refused ones too, at no cost),
    // tagged with the run, billed to the tenant that ran it.
    assert_eq!(
        ledger_rows(dir.path(), &run_id).await,
        (40 + retries, 510_000_000)
    );
    // The cheaper route with the same score is the Pareto front.
    let front: Vec<&str> = variants
        .iter()
        .filter(|v| v["pareto"] == true)
        .map(|v| v["label"].as_str().unwrap())
        .collect();
    assert_eq!(front, ["ask · cheap"]);
    let markdown = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(markdown.contains("| ask · cheap ◆ | 100.0%"), "{markdown}");

    // Again: every answer from the cache; nothing asked, nothing paid.
    let again = dir.path().join("run2");
    let baseline = out.join("results.json");
    succeeded(run(&again, &["--baseline", baseline.to_str().unwrap()]));
    assert_eq!(upstream.requests("steady") + upstream.requests("cheap"), 43);
    let summary = read_json(&again.join("results.json"));
    assert_eq!(summary["spent"], "0");
    assert!(result_lines(&again).iter().all(|l| l["cached"] == true));
    assert_eq!(summary["variants"][0]["cost"], variants[0]["cost"]);
    let comparison = &summary["baseline"];
    assert_eq!(comparison["regressed_count"], 0);
    assert!(
        comparison["variants"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["verdict"] == "unchanged")
    );
    assert_eq!(
        ledger_rows(dir.path(), summary["run_id"].as_str().unwrap()).await,
        (0, 0)
    );

    // A dry run asks nothing and says what a fresh run would cost at most.
    let (stdout, _) = succeeded(run(&dir.path().join("dry"), &["--dry-run", "--no-cache"]));
    assert!(stdout.contains("total: at least $"), "{stdout}");
    assert!(!dir.path().join("dry").exists());
    assert_eq!(upstream.requests("steady") + upstream.requests("cheap"), 43);

    // The CI gate: a variant under the floor fails the command.
    upstream.set(
        "cheap",
        Behaviour::Answer {
            completion_tokens: 1,
        },
    );
    let stderr = failed(run(
        &dir.path().join("gate"),
        &["--no-cache", "--fail-under", "0.9"],
    ));
    assert!(
        stderr.contains("pass rate under 90.0%: ask · cheap (0.0%)"),
        "{stderr}"
    );
}

/// Renders `url` in headless Chromium after its scripts ran.
fn chromium_dom(url: &str) -> Option<String> {
    let binary = ["chromium", "chromium-browser"].into_iter().find(|b| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(binary) = binary else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI renders the eval report: install chromium"
        );
        eprintln!("skipped: no chromium");
        return None;
    };
    let output = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn attribute<'a>(dom: &'a str, marker: &str) -> &'a str {
    let start = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in the page"))
        + marker.len();
    &dom[start..start + dom[start..].find('"').unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_report_draws_its_charts_and_pages_its_failing_cases() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = write_catalog(dir.path(), &upstream);
    // 120 cases on two routes; every answer fails the second assertion.
    let assertions = "[[assert]]\ntype = \"contains\"\nvalue = \"w0\"\n\
                      [[assert]]\ntype = \"contains\"\nvalue = \"absent\"\n";
    let suite = write_suite(dir.path(), 120, &["steady", "cheap"], assertions);
    let out = dir.path().join("out");
    succeeded(eval_run(
        dir.path(),
        &suite,
        &catalog,
        &out,
        &["--concurrency", "16"],
    ));
    let report = out.join("report.html");
    let html = std::fs::read_to_string(&report).unwrap();
    for outside in ["<script src", "<link", "@import", "url(http"] {
        assert!(
            !html.contains(outside),
            "the report loads nothing from outside: {outside}"
        );
    }
    let url = format!("file://{}", report.display());
    let Some(dom) = chromium_dom(&format!("{url}#page=5")) else {
        return;
    };
    assert_eq!(attribute(&dom, "data-ready=\""), "yes");
    assert_eq!(
        attribute(&dom, "data-points=\""),
        "2",
        "both variants on the scatter"
    );
    let assertions = &dom[dom.find("id=\"assertions\"").unwrap()..];
    assert_eq!(
        attribute(assertions, "data-bars=\""),
        "4",
        "2 assertions × 2 variants"
    );
    assert!(
        dom.matches("class=\"histogram\"").count() == 2,
        "a latency histogram per variant"
    );
    // 240 failing cases, 50 a page: the fifth page holds the last 40.
    assert_eq!(attribute(&dom, "data-page=\""), "5");
    assert_eq!(attribute(&dom, "data-pages=\""), "5");
    assert_eq!(attribute(&dom, "data-rows=\""), "40");
    // A variant's failures alone: 120, three pages.
    let dom = chromium_dom(&format!("{url}#page=3&variant=ask%20%C2%B7%20cheap")).unwrap();
    assert_eq!(attribute(&dom, "data-pages=\""), "3");
    assert_eq!(attribute(&dom, "data-rows=\""), "20");
    assert!(dom.matches("<td>ask · steady</td>").count() == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suite_with_a_mistake_is_refused_by_name_before_anything_runs() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = write_catalog(dir.path(), &upstream);
    let out = dir.path().join("out");
    let attempt = |suite: &Path| eval_run(dir.path(), suite, &catalog, &out, &[]);
    let cases = [
        (
            (
                &["steady"],
                "[[assert]]\ntype = \"containz\"\nvalue = \"x\"\n",
            ),
            vec![
                "assert[0]",
                "unknown assertion type \"containz\"",
                "contains-any",
            ],
        ),
        (
            (
                &["steady"],
                "[[assert]]\ntype = \"equals\"\nvalue = \"{{ answer }}\"\n",
            ),
            vec![
                "line 1 (p0), assert[0]",
                "the dataset has no column 'answer'",
                "nothing was run",
            ],
        ),
        (
            (&["no-such-model"], ""),
            vec!["variants.models: \"no-such-model\" is not routable"],
        ),
        (
            (
                &["steady"],
                "[[assert]]\ntype = \"llm-rubric\"\nvalue = \"Polite?\"\n[judge]\nmodel = \"no-judge\"\n",
            ),
            vec!["[judge]", "\"no-judge\" is not routable"],
        ),
        (
            (
                &["steady"],
                "[[assert]]\ntype = \"llm-rubric\"\nvalue = \"Polite?\"\n",
            ),
            vec!["assert[0]", "llm-rubric needs a judge"],
        ),
        (
            (&["steady"], "[[assert]]\ntype = \"cost\"\n"),
            vec!["assert[0]", "cost needs a threshold"],
        ),
    ];
    for ((models, assertions), expected) in cases {
        let suite = write_suite(dir.path(), 3, models, assertions);
        let stderr = failed(attempt(&suite));
        for part in expected {
            assert!(stderr.contains(part), "expected {part:?} in:\n{stderr}");
        }
    }
    // An unknown prompt version, and a variant setting that is not one.
    let text = std::fs::read_to_string(write_suite(dir.path(), 3, &["steady"], "")).unwrap();
    let registered = text.replace(
        "prompts = [{ label = \"ask\", messages = [{ role = \"user\", content = \"Describe {{ product }}.\" }] }]",
        "prompts = [\"product_description@9\"]",
    );
    std::fs::write(dir.path().join("suite.toml"), &registered).unwrap();
    let stderr = failed(attempt(&dir.path().join("suite.toml")));
    assert!(
        stderr.contains("variants.prompts[0]") && stderr.contains("product_description"),
        "{stderr}"
    );
    let unknown_setting = text.replace("max_tokens = 3", "max_tokens = 3\ntemprature = 0.5");
    std::fs::write(dir.path().join("suite.toml"), &unknown_setting).unwrap();
    let stderr = failed(attempt(&dir.path().join("suite.toml")));
    assert!(
        stderr.contains("defaults: unknown setting \"temprature\""),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing was written");
    assert_eq!(upstream.requests("steady"), 0, "nothing was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_suite_scores_each_mode_by_query_kind() {
    use crate::rag::{ingest_source, rag, write_site};
    let dir = tempfile::tempdir().unwrap();
    let site_dir = dir.path().join("site");
    write_site(&site_dir);
    let store = rag(dir.path()).await;
    ingest_source(&store, "evalsite", &site_dir, Default::default()).await;
    let queries = [
        r#"{"id": "q1", "query": "when do orders ship", "targets": ["shipping/index.html"], "kind": "faq"}"#,
        r#"{"id": "q2", "query": "watering tomato plants", "targets": ["guides/tomatoes"], "kind": "faq"}"#,
        r#"{"id": "q3", "query": "a page that does not exist", "targets": ["nowhere.html"], "kind": "miss"}"#,
    ];
    std::fs::write(dir.path().join("queries.jsonl"), queries.join("\n")).unwrap();
    let suite = dir.path().join("search.toml");
    std::fs::write(
        &suite,
        "name = \"search\"\n[dataset]\npath = \"queries.jsonl\"\ngroup = \"kind\"\n\
         [variants.search]\nsite = \"evalsite\"\nmodes = [\"vector\", \"fulltext\", \"hybrid\"]\nquery = \"{{ query }}\"\n\
         [[assert]]\ntype = \"recall-at-k\"\nk = 10\nvalue = \"{{ targets }}\"\n\
         [[assert]]\ntype = \"mrr\"\nvalue = \"{{ targets }}\"\n",
    )
    .unwrap();
    let out = run_suite(dir.path(), &suite);
    let summary = read_json(&out.join("results.json"));
    let variants = summary["variants"].as_array().unwrap();
    let labels: Vec<&str> = variants
        .iter()
        .map(|v| v["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        ["evalsite/vector", "evalsite/fulltext", "evalsite/hybrid"]
    );
    for variant in variants {
        let recall = variant["assertions"][0]["mean_score"].as_f64().unwrap();
        assert!((recall - 2.0 / 3.0).abs() < 1e-9, "{variant}");
        let groups = variant["groups"].as_array().unwrap();
        let group = |name: &str| groups.iter().find(|g| g["group"] == name).unwrap().clone();
        assert_eq!(group("faq")["cases"], 2);
        assert_eq!(
            group("faq")["assertions"][0]["mean_score"],
            1.0,
            "{variant}"
        );
        assert_eq!(group("miss")["assertions"][0]["mean_score"], 0.0);
        assert_eq!(group("miss")["assertions"][1]["mean_score"], 0.0);
    }
    let markdown = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        markdown.contains("| evalsite/hybrid (faq) | 2 | 1.000 |"),
        "{markdown}"
    );
}
