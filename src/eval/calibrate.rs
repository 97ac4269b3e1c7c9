//! `qpai eval calibrate RESULTS.json... --task TAG`: the measured quality
//! of each route that eval runs asked, written into the routing catalog
//! (src/router/calibration.rs), so that `auto` with `x-qpai-task: TAG`
//! picks the cheapest route whose measured quality clears the task's floor.
//!
//! A variant is measured as the deployment that answered it: a variant
//! naming a deployment is that deployment; one naming a local model (or
//! `BASE:ADAPTER`) is the catalog's local deployment of that model. A
//! variant sent to `auto` or to a logical model is skipped: its cases went
//! to several routes. A case's score is its weighted assertion score (or,
//! with `--metric pass`, 1 when it passed); errors score 0.

use std::collections::BTreeMap;
use std::path::Path;

use super::report::{read_results, read_summary};
use super::summary::wilson;
use crate::config::{CalibrationMetric, EvalCalibrateArgs};
use crate::router::calibration::{self, Measured};
use crate::router::{ModelRouter, ProviderKind, RouterCatalog, policy};

/// One route's cases, pooled over the runs.
#[derive(Debug, Default)]
struct Pool {
    scores: Vec<f64>,
    runs: Vec<String>,
    measured_at: String,
    variants: Vec<String>,
}

pub fn run(args: EvalCalibrateArgs) -> anyhow::Result<()> {
    let Some(catalog_path) = args.router_config.clone() else {
        anyhow::bail!("--router-config: calibration writes into a routing catalog; name one");
    };
    if args.task.trim().is_empty() {
        anyhow::bail!("--task: name the task tag (x-qpai-task) the runs measured");
    }
    let catalog = ModelRouter::load_catalog(&catalog_path)?;
    let mut pools: BTreeMap<String, Pool> = BTreeMap::new();
    for path in &args.results {
        pool_run(path, &catalog, &args, &mut pools)?;
    }
    if pools.is_empty() {
        anyhow::bail!(
            "no case of {} measured one route{}",
            args.results
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            match &args.group {
                Some(group) => format!(" in group {group:?}"),
                None => String::new(),
            }
        );
    }
    let measured: Vec<Measured> = pools
        .into_iter()
        .map(|(deployment, pool)| measure(&args.task, deployment, pool))
        .collect();
    let best = measured.iter().map(|m| m.score).fold(0.0_f64, f64::max);
    let floor = match (args.floor, args.floor_of_best) {
        (Some(floor), None) => Some(floor),
        (None, Some(fraction)) => Some(round(best * fraction)),
        _ => None,
    };
    if let Some(floor) = floor
        && !(0.0..=1.0).contains(&floor)
    {
        anyhow::bail!("--floor: {floor} is outside 0..1");
    }
    print_table(&args.task, &measured, &catalog, floor);
    if args.dry_run {
        eprintln!("dry run: {} is unchanged", catalog_path.display());
        return Ok(());
    }
    calibration::update(&catalog_path, |calibration| {
        for entry in &measured {
            calibration.record(entry.clone());
        }
        if let Some(floor) = floor {
            calibration.set_floor(&args.task, floor);
        }
        Ok(())
    })?;
    eprintln!(
        "{}: {} routes measured on {:?}",
        catalog_path.display(),
        measured.len(),
        args.task
    );
    Ok(())
}

/// Adds the cases of the run at `path` to the pools of their routes.
fn pool_run(
    path: &Path,
    catalog: &RouterCatalog,
    args: &EvalCalibrateArgs,
    pools: &mut BTreeMap<String, Pool>,
) -> anyhow::Result<()> {
    let summary = read_summary(path)?;
    let mut routes: BTreeMap<String, String> = BTreeMap::new();
    for variant in &summary.variants {
        let details = &variant.details;
        if details["kind"] != "chat" {
            continue;
        }
        let model = details["model"].as_str().unwrap_or_default();
        let requested = match details["adapter"].as_str() {
            Some(adapter) if !adapter.is_empty() => format!("{model}:{adapter}"),
            _ => model.to_string(),
        };
        match route_of(catalog, &requested) {
            Ok(deployment) => {
                routes.insert(variant.label.clone(), deployment);
            }
            Err(Skip::Several) => eprintln!(
                "{}: variant {:?} is skipped: {requested:?} routes to several deployments",
                path.display(),
                variant.label
            ),
            Err(Skip::Unknown(message)) => {
                anyhow::bail!("{}: variant {:?}: {message}", path.display(), variant.label)
            }
        }
    }
    let results = path
        .parent()
        .unwrap_or(Path::new("."))
        .join(&summary.results_file);
    read_results(&results, |case| {
        if args.group.is_some() && case.group != args.group {
            return;
        }
        let Some(deployment) = routes.get(&case.variant) else {
            return;
        };
        let score = match (&case.output.error, args.metric) {
            (Some(_), _) => 0.0,
            (None, CalibrationMetric::Score) => case.score,
            (None, CalibrationMetric::Pass) => f64::from(u8::from(case.pass)),
        };
        let pool = pools.entry(deployment.clone()).or_default();
        pool.scores.push(score.clamp(0.0, 1.0));
        if !pool.variants.contains(&case.variant) {
            pool.variants.push(case.variant.clone());
        }
    })?;
    for (label, deployment) in &routes {
        let Some(pool) = pools.get_mut(deployment) else {
            continue;
        };
        if pool.variants.contains(label) && !pool.runs.contains(&summary.run_id) {
            pool.runs.push(summary.run_id.clone());
            pool.measured_at = pool.measured_at.clone().max(summary.started_at.clone());
        }
    }
    Ok(())
}

enum Skip {
    /// `auto` or a logical model: its cases went to several routes.
    Several,
    Unknown(String),
}

/// The deployment that answers `requested`.
fn route_of(catalog: &RouterCatalog, requested: &str) -> Result<String, Skip> {
    if let Some(deployment) = catalog.deployment(requested) {
        return Ok(deployment.name.clone());
    }
    if policy::offered(catalog, requested).is_some() {
        return Err(Skip::Several);
    }
    let local: Vec<&str> = catalog
        .deployments
        .iter()
        .filter(|d| d.provider == ProviderKind::Local && d.model == requested)
        .map(|d| d.name.as_str())
        .collect();
    match local[..] {
        [name] => Ok(name.to_string()),
        [] => Err(Skip::Unknown(format!(
            "no deployment of the catalog serves {requested:?}: add a local deployment with model = {requested:?}"
        ))),
        _ => Err(Skip::Unknown(format!(
            "several local deployments serve {requested:?} ({}): name the deployment in the suite",
            local.join(", ")
        ))),
    }
}

/// A pool's mean score and 95% interval: Wilson's when every score is 0
/// or 1, else the normal approximation of the mean.
fn measure(task: &str, deployment: String, pool: Pool) -> Measured {
    let n = pool.scores.len() as f64;
    let mean = pool.scores.iter().sum::<f64>() / n;
    let binary = pool.scores.iter().all(|&s| s == 0.0 || s == 1.0);
    let [low, high] = if binary {
        let passes = pool.scores.iter().filter(|&&s| s == 1.0).count() as u64;
        wilson(passes, pool.scores.len() as u64)
    } else {
        let variance =
            pool.scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        let half = 1.959_963_984_540_054 * (variance / n).sqrt();
        [(mean - half).max(0.0), (mean + half).min(1.0)]
    };
    let score = round(mean);
    Measured {
        deployment,
        task: task.to_string(),
        score,
        cases: pool.scores.len() as u64,
        low: round(low).min(score),
        high: round(high).max(score),
        runs: pool.runs,
        measured_at: pool.measured_at,
    }
}

/// Four decimals: what the catalog keeps.
fn round(value: f64) -> f64 {
    (value * 10_000.0).round() / 10_000.0
}

fn print_table(task: &str, measured: &[Measured], catalog: &RouterCatalog, floor: Option<f64>) {
    println!("| route | cases | score | 95% interval | before | clears the floor |");
    println!("|---|---:|---:|---|---:|---|");
    for entry in measured {
        let before = catalog
            .deployment(&entry.deployment)
            .and_then(|d| d.measured.get(task).map(|m| format!("{:.3}", m.score)))
            .unwrap_or_else(|| "–".into());
        let clears = match floor {
            Some(floor) if entry.score >= floor => "yes",
            Some(_) => "no",
            None => "–",
        };
        println!(
            "| {} | {} | {:.3} | {:.3}–{:.3} | {before} | {clears} |",
            entry.deployment, entry.cases, entry.score, entry.low, entry.high
        );
    }
    if let Some(floor) = floor {
        println!("\nfloor for {task:?}: {floor}");
    }
}
