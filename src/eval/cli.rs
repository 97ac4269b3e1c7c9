//! `qpai eval run SUITE.toml`: loads the suite, builds the serving stack
//! its variants need (their local models, the routing catalog, the
//! embedding model when an assertion or a search needs it), checks it,
//! runs it (or estimates it, with `--dry-run`), and writes the results:
//! results.jsonl (a line per case as it comes), results.json, summary.md
//! and report.html.

use std::path::Path;
use std::time::Instant;

use serde_json::json;

use super::cache::Cache;
use super::report::{self, RESULTS_JSONL, RunSummary};
use super::run::{Harness, RunOptions};
use super::suite::{PromptChoice, Suite, Variant, VariantKind, mode_name};
use super::summary::mark_pareto;
use crate::config::{EvalRunArgs, GlobalArgs};
use crate::prompts::Prompts;
use crate::tenancy::Principal;

/// Cases run at once when neither the suite nor the command says.
const DEFAULT_CONCURRENCY: usize = 4;

pub async fn run(args: EvalRunArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let prompts_dir = args
        .dir
        .prompts_dir
        .clone()
        .unwrap_or_else(|| global.data_dir().join("prompts"));
    let mut suite = Suite::load(&args.suite, &Prompts::load(&prompts_dir)?)?;
    narrow(&mut suite, &args)?;
    let concurrency = args
        .concurrency
        .or(suite.concurrency)
        .unwrap_or(DEFAULT_CONCURRENCY);
    let job = crate::server::JobSettings {
        models: suite.models(),
        embeddings: suite.needs_embeddings(),
        router_config: args.router_config.clone(),
        prompts_dir: args.dir.prompts_dir.clone(),
        concurrency,
    };
    let stack = crate::server::build(job.serve_args()?, global).await?;
    eprintln!("loading models…");
    if let Err(error) = stack.loading.await? {
        let text = format!("{error:#}");
        let judge = suite.judge.as_ref().map(|j| (j.model.clone(), "[judge]"));
        let models = suite.models().into_iter().map(|m| (m, "variants.models"));
        let place = judge
            .into_iter()
            .chain(models)
            .find(|(model, _)| text.contains(&format!("`{model}`")));
        return Err(match place {
            Some((model, place)) => anyhow::anyhow!(
                "{}: {place}: {model:?} is not routable: {text}",
                suite.path.display()
            ),
            None => error,
        });
    }
    // The open tenant is the machine's operator, as on a server without
    // keys; a named tenant sees only its own sites.
    let principal = Principal {
        key_id: "cli".into(),
        tenant: args.tenant.tenant.clone(),
        admin: args.tenant.tenant == crate::tenancy::OPEN_TENANT,
        rpm: None,
        tpm: None,
    };
    super::check::check(&mut suite, &stack.gateway, &principal).await?;
    let cache = (!args.no_cache).then(|| Cache::new(&stack.ledger));
    let repeat = args.repeat.max(1);
    if args.dry_run {
        return super::check::dry_run(&suite, &stack.gateway, &principal, cache.as_ref(), repeat)
            .await;
    }
    std::fs::create_dir_all(&args.out)?;
    let harness = Harness {
        gateway: stack.gateway.clone(),
        principal,
        cache,
        run_id: format!("eval_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
    };
    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let started = Instant::now();
    let results = args.out.join(RESULTS_JSONL);
    let options = RunOptions {
        concurrency,
        repeat,
        progress: true,
    };
    eprintln!(
        "{}: {} cases × {} variants, {concurrency} at a time, run {}",
        suite.name,
        suite.cases.len(),
        suite.variants.len(),
        harness.run_id
    );
    let tallies = harness.run(&suite, &options, &results).await?;
    stack.ledger.flush().await;
    let mut variants: Vec<_> = tallies
        .into_iter()
        .zip(&suite.variants)
        .map(|(tally, variant)| {
            let mut summary = tally.finish();
            summary.details = details(variant);
            summary
        })
        .collect();
    mark_pareto(&mut variants);
    let spent = variants.iter().map(|v| v.spent).sum();
    let mut summary = RunSummary {
        suite: suite.name.clone(),
        description: suite.description.clone(),
        suite_file: suite.path.clone(),
        dataset: suite.dataset.clone(),
        run_id: harness.run_id.clone(),
        tenant: harness.principal.tenant.clone(),
        started_at,
        seconds: started.elapsed().as_secs_f64(),
        cases: suite.cases.len(),
        repeat,
        assertions: suite.assertions.iter().map(|a| a.label.clone()).collect(),
        variants,
        spent,
        results_file: RESULTS_JSONL.into(),
        baseline: None,
    };
    if let Some(baseline) = &args.baseline {
        summary.baseline = Some(report::compare(&summary, &results, baseline)?);
    }
    write_reports(&summary, &args.out, &results)?;
    let markdown = report::markdown(&summary);
    println!("{markdown}");
    eprintln!("results in {}", args.out.display());
    if let Some(floor) = args.fail_under {
        let below: Vec<String> = summary
            .variants
            .iter()
            .filter(|v| v.pass_rate < floor)
            .map(|v| format!("{} ({:.1}%)", v.label, 100.0 * v.pass_rate))
            .collect();
        if !below.is_empty() {
            anyhow::bail!(
                "pass rate under {:.1}%: {}",
                100.0 * floor,
                below.join(", ")
            );
        }
    }
    Ok(())
}

fn write_reports(summary: &RunSummary, out: &Path, results: &Path) -> anyhow::Result<()> {
    let write = |name: &str, content: String| -> anyhow::Result<()> {
        let path = out.join(name);
        let partial = path.with_extension("partial");
        std::fs::write(&partial, content)?;
        std::fs::rename(&partial, &path)?;
        Ok(())
    };
    write("results.json", serde_json::to_string_pretty(summary)?)?;
    write("summary.md", report::markdown(summary))?;
    write("report.html", super::html::render(summary, results)?)?;
    Ok(())
}

/// What a variant runs, for the reports.
fn details(variant: &Variant) -> serde_json::Value {
    match &variant.kind {
        VariantKind::Chat(chat) => json!({
            "kind": "chat",
            "prompt": match &chat.prompt {
                PromptChoice::Registered(template) => template.reference(),
                PromptChoice::Inline { label, .. } => format!("inline:{label}"),
            },
            "model": chat.model,
            "adapter": chat.adapter,
            "settings": chat.settings,
        }),
        VariantKind::Search(search) => json!({
            "kind": "search",
            "site": search.site,
            "mode": mode_name(search.mode),
            "top_k": search.top_k,
        }),
    }
}

/// Keeps the cases of `--group` and the variants of `--model`, and the
/// first `--limit` cases.
fn narrow(suite: &mut Suite, args: &EvalRunArgs) -> anyhow::Result<()> {
    if !args.groups.is_empty() {
        suite
            .cases
            .retain(|c| c.group.as_ref().is_some_and(|g| args.groups.contains(g)));
        if suite.cases.is_empty() {
            anyhow::bail!(
                "--group: no case of {} is in group {}",
                suite.dataset.display(),
                args.groups.join(", ")
            );
        }
    }
    if let Some(model) = args.models.iter().find(|m| {
        !suite
            .variants
            .iter()
            .any(|v| matches!(&v.kind, VariantKind::Chat(c) if &c.model == *m))
    }) {
        anyhow::bail!(
            "--model: no variant of {} runs on {model:?}",
            suite.path.display()
        );
    }
    if !args.models.is_empty() {
        suite
            .variants
            .retain(|v| matches!(&v.kind, VariantKind::Chat(c) if args.models.contains(&c.model)));
    }
    if let Some(limit) = args.limit {
        suite.cases.truncate(limit.max(1));
    }
    Ok(())
}
