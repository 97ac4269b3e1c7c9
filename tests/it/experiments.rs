//! Experiments on the real ledger database (SQLite, and PostgreSQL when
//! QPAI_TEST_DATABASE_URL names one): simulations of arms with known
//! rates (the best arm takes the traffic, regret flattens), stopping, two
//! connections sharing posteriors as two processes would, tenants kept
//! apart, and mistakes refused with the parameter named.

use qpai::error::ApiError;
use qpai::experiments::{ExperimentCall, ExperimentSpec, Experiments, FeedbackTarget};
use qpai::ledger::Ledger;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// The databases to run on: a SQLite file, and PostgreSQL when given. Each
/// comes with its URL, so that a second connection can open it.
async fn databases() -> Vec<(String, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let mut urls = vec![(sqlite, dir)];
    if let Some(url) = std::env::var("QPAI_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        urls.push((url, tempfile::tempdir().unwrap()));
    }
    urls
}

/// A tenant name of its own per run (PostgreSQL outlives the test).
fn tenant(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

fn spec(body: Value) -> ExperimentSpec {
    ExperimentSpec::parse(body).unwrap()
}

fn arms(kind: &str, count: usize, stop_at: Option<f64>) -> ExperimentSpec {
    let variants: Vec<Value> = (0..count)
        .map(|i| json!({"name": format!("arm{i}"), "model": format!("model-{i}")}))
        .collect();
    spec(json!({
        "id": "sim",
        "metric": {"name": "reward", "type": kind},
        "variants": variants,
        "stop_at": stop_at,
    }))
}

fn arm_index(name: &str) -> usize {
    name.trim_start_matches("arm").parse().unwrap()
}

/// Runs `events` requests with feedback drawn by `reward(arm, rng)`;
/// returns the arm of each request.
async fn simulate(
    experiments: &Experiments,
    tenant: &str,
    events: usize,
    mut reward: impl FnMut(usize, &mut rand::rngs::StdRng) -> Value,
) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let call = ExperimentCall {
        experiment: "sim".into(),
        unit: None,
    };
    let mut chosen = Vec::with_capacity(events);
    for _ in 0..events {
        let assignment = experiments.assign(tenant, &call).await.unwrap();
        experiments.record(tenant, &assignment, None).await.unwrap();
        let arm = arm_index(&assignment.variant.name);
        let value = reward(arm, &mut rng);
        let target = FeedbackTarget::Request(assignment.request_id);
        experiments
            .feedback(tenant, &target, "reward", &value)
            .await
            .unwrap();
        chosen.push(arm);
    }
    chosen
}

/// The best arm's share of the last `tail` requests, and the regret of
/// the first and second halves.
/// Whether the second half's regret shows learning: under half the first
/// half's, or under a tenth of what choosing uniformly at random costs over
/// a half (the first half can be lucky and leave nothing to halve).
fn regret_fell(early: f64, late: f64, means: &[f64], requests: usize) -> bool {
    let best = means.iter().cloned().fold(f64::MIN, f64::max);
    let uniform_gap = means.iter().map(|m| best - m).sum::<f64>() / means.len() as f64;
    late < 0.5 * early || late < 0.1 * uniform_gap * (requests / 2) as f64
}

fn outcome(chosen: &[usize], means: &[f64], tail: usize) -> (f64, f64, f64) {
    let best = means.iter().cloned().fold(f64::MIN, f64::max);
    let best_arm = means.iter().position(|&m| m == best).unwrap();
    let last = &chosen[chosen.len() - tail..];
    let share = last.iter().filter(|&&a| a == best_arm).count() as f64 / tail as f64;
    let regret = |part: &[usize]| part.iter().map(|&a| best - means[a]).sum::<f64>();
    let half = chosen.len() / 2;
    (share, regret(&chosen[..half]), regret(&chosen[half..]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thompson_sampling_finds_the_best_arm_with_sublinear_regret() {
    for (url, _dir) in databases().await {
        let ledger = Ledger::open(&url).await.unwrap();
        let experiments = Experiments::seeded(&ledger, 5);

        // Binary: click rates 0.3, 0.5 and 0.7.
        let rates = [0.3, 0.5, 0.7];
        let acme = tenant("sim-binary");
        experiments
            .create(&acme, &arms("boolean", 3, None))
            .await
            .unwrap();
        let chosen = simulate(&experiments, &acme, 800, |arm, rng| {
            json!(rng.random_bool(rates[arm]))
        })
        .await;
        let (share, early, late) = outcome(&chosen, &rates, 200);
        eprintln!(
            "{url}: binary: best arm {share:.3} of the last 200; regret {early:.1} then {late:.1}"
        );
        assert!(share >= 0.9, "best arm share {share}");
        assert!(
            regret_fell(early, late, &rates, chosen.len()),
            "regret {early} then {late}"
        );

        let shown = experiments.describe(&acme, "sim").await.unwrap();
        let p_best: Vec<f64> = shown["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["p_best"].as_f64().unwrap())
            .collect();
        assert!(p_best[2] > 0.9, "{shown}");
        let requests: u64 = shown["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["requests"].as_u64().unwrap())
            .sum();
        assert_eq!(requests, 800);
        assert_eq!(shown["status"], "running");

        // Float: ratings with means 1.0, 1.5 and 2.0, sd 1.
        let means = [1.0, 1.5, 2.0];
        let other = tenant("sim-float");
        experiments
            .create(&other, &arms("float", 3, None))
            .await
            .unwrap();
        let chosen = simulate(&experiments, &other, 800, |arm, rng| {
            let noise: f64 = rng.sample(rand_distr::StandardNormal);
            json!(means[arm] + noise)
        })
        .await;
        let (share, early, late) = outcome(&chosen, &means, 200);
        eprintln!(
            "{url}: float: best arm {share:.3} of the last 200; regret {early:.1} then {late:.1}"
        );
        assert!(share >= 0.9, "best arm share {share}");
        assert!(
            regret_fell(early, late, &means, chosen.len()),
            "regret {early} then {late}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_won_experiment_stops_and_two_connections_share_it() {
    for (url, _dir) in databases().await {
        // Two connections, as two processes sharing the database.
        let first = Experiments::new(&Ledger::open(&url).await.unwrap());
        let second = Experiments::new(&Ledger::open(&url).await.unwrap());
        let acme = tenant("stop");
        first
            .create(&acme, &arms("boolean", 2, Some(0.95)))
            .await
            .unwrap();
        let rates = [0.2, 0.8];
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut stopped_after = None;
        for i in 0..400 {
            let side = if i % 2 == 0 { &first } else { &second };
            // Sticky: a user keeps the variant drawn first.
            let call = ExperimentCall {
                experiment: "sim".into(),
                unit: Some(format!("user-{}", i / 4)),
            };
            let assignment = side.assign(&acme, &call).await.unwrap();
            if i % 4 != 0 && stopped_after.is_none() {
                let again = first.assign(&acme, &call).await.unwrap();
                assert_eq!(again.variant.name, assignment.variant.name);
            }
            side.record(&acme, &assignment, call.unit.as_deref())
                .await
                .unwrap();
            let arm = arm_index(&assignment.variant.name);
            let target = FeedbackTarget::Request(assignment.request_id.clone());
            side.feedback(
                &acme,
                &target,
                "reward",
                &json!(rng.random_bool(rates[arm])),
            )
            .await
            .unwrap();
            let shown = second.describe(&acme, "sim").await.unwrap();
            if shown["status"] == "stopped" {
                assert_eq!(shown["winner"], "arm1", "{shown}");
                stopped_after = Some(i + 1);
                break;
            }
        }
        let stopped_after = stopped_after.expect("the experiment should stop");
        eprintln!("{url}: stopped after {stopped_after} feedback events");
        // Stopped: everyone gets the winner, even users drawn before.
        for user in ["user-0", "user-1", "someone-new"] {
            let call = ExperimentCall {
                experiment: "sim".into(),
                unit: Some(user.into()),
            };
            let assignment = second.assign(&acme, &call).await.unwrap();
            assert_eq!(assignment.variant.name, "arm1");
        }
        let from_first = first.describe(&acme, "sim").await.unwrap();
        let feedback: u64 = from_first["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["feedback"].as_u64().unwrap())
            .sum();
        assert_eq!(feedback, stopped_after as u64);
    }
}

fn param(error: ApiError) -> (u16, String) {
    (error.kind.status_code(), error.param.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_kept_apart_and_mistakes_are_named() {
    let (url, _dir) = databases().await.remove(0);
    let experiments = Experiments::new(&Ledger::open(&url).await.unwrap());
    let (acme, rival) = (tenant("acme"), tenant("rival"));
    experiments
        .create(&acme, &arms("boolean", 2, None))
        .await
        .unwrap();
    let call = ExperimentCall {
        experiment: "sim".into(),
        unit: Some("episode-1".into()),
    };
    let assignment = experiments.assign(&acme, &call).await.unwrap();
    experiments
        .record(&acme, &assignment, Some("episode-1"))
        .await
        .unwrap();
    let request = FeedbackTarget::Request(assignment.request_id.clone());

    // Another tenant sees neither the experiment nor the request.
    let error = experiments.describe(&rival, "sim").await.unwrap_err();
    assert_eq!(param(error), (404, "id".into()));
    let error = experiments.assign(&rival, &call).await.unwrap_err();
    assert_eq!(param(error), (404, "experiment".into()));
    let error = experiments
        .feedback(&rival, &request, "reward", &json!(true))
        .await
        .unwrap_err();
    assert_eq!(param(error), (404, "request_id".into()));
    // The same id is free for the other tenant's own experiment.
    experiments
        .create(&rival, &arms("float", 2, None))
        .await
        .unwrap();

    let unknown = FeedbackTarget::Request("req_nope".into());
    let error = experiments
        .feedback(&acme, &unknown, "reward", &json!(true))
        .await
        .unwrap_err();
    assert_eq!(param(error), (404, "request_id".into()));
    for wrong in [json!(1), json!("yes"), json!(null)] {
        let error = experiments
            .feedback(&acme, &request, "reward", &wrong)
            .await
            .unwrap_err();
        assert_eq!(param(error), (400, "value".into()), "{wrong}");
    }
    let error = experiments
        .feedback(&acme, &request, "clicks", &json!(true))
        .await
        .unwrap_err();
    assert_eq!(param(error), (400, "metric".into()));
    // Once per request and metric; the episode is a target of its own.
    experiments
        .feedback(&acme, &request, "reward", &json!(true))
        .await
        .unwrap();
    let error = experiments
        .feedback(&acme, &request, "reward", &json!(false))
        .await
        .unwrap_err();
    assert_eq!(param(error), (409, "request_id".into()));
    let episode = FeedbackTarget::Episode("episode-1".into());
    experiments
        .feedback(&acme, &episode, "reward", &json!(true))
        .await
        .unwrap();
    let shown = experiments.describe(&acme, "sim").await.unwrap();
    let arm = &shown["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == assignment.variant.name.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (arm["requests"].as_u64(), arm["feedback"].as_u64()),
        (Some(1), Some(2))
    );

    let error = experiments
        .create(&acme, &arms("boolean", 2, None))
        .await
        .unwrap_err();
    assert_eq!(param(error), (409, "id".into()));
    for (body, expected) in [
        (
            json!({"id": "one", "metric": {"name": "m", "type": "boolean"}, "variants": [{"name": "a", "model": "x"}]}),
            "variants",
        ),
        (
            json!({"id": "two", "metric": {"name": "m", "type": "count"}, "variants": []}),
            "metric",
        ),
        (
            json!({"id": "bad id!", "metric": {"name": "m", "type": "boolean"}, "variants": []}),
            "id",
        ),
        (
            json!({"id": "dup", "metric": {"name": "m", "type": "float"}, "variants": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]}),
            "variants[1].name",
        ),
        (
            json!({"id": "stop", "metric": {"name": "m", "type": "float"}, "variants": [{"name": "a", "model": "x"}, {"name": "b", "model": "y"}], "stop_at": 1.5}),
            "stop_at",
        ),
    ] {
        let error = ExperimentSpec::parse(body.clone()).unwrap_err();
        assert_eq!(param(error), (400, expected.into()), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiments_over_http_for_the_python_client() {
    use crate::common::{free_port, wait_ready};
    use crate::router_serve::{key, serve};
    let upstream = crate::fake_upstream::FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = crate::eval_cli::write_catalog(dir.path(), &upstream);
    let acme = key(dir.path(), &["--tenant", "acme"]);
    let rival = key(dir.path(), &["--tenant", "rival"]);
    let port = free_port();
    let _server = serve(
        dir.path(),
        port,
        &["--router-config", catalog.to_str().unwrap()],
        &[],
    );
    tokio::task::spawn_blocking(move || {
        wait_ready(port);
        crate::common::pytest(
            &["tests/python/test_experiments_client.py"],
            &[
                ("QPAI_BASE_URL", format!("http://127.0.0.1:{port}/v1")),
                ("QPAI_KEY", acme),
                ("QPAI_RIVAL_KEY", rival),
            ],
        )
    })
    .await
    .unwrap();
}
