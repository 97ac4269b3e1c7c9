//! `qpai batch run|status|list|cancel`: bulk jobs for people. `run` turns
//! a table of rows and a versioned prompt into a batch (one request per
//! row, the row's fields as the prompt's variables), runs it in this
//! process through the gateway with a progress bar, and writes the answers
//! in row order. The job is the batch the HTTP API shows: re-run after a
//! kill, the same command finds its batch and resumes it.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::rows::{Row, read_rows};
use super::{BatchObject, Batches, NewBatch};
use crate::config::{BatchCommand, BatchRunArgs, GlobalArgs};
use crate::files::{Files, LocalBlobs, NewFile, Purpose};
use crate::gateway::wire::ChatCompletionRequest;
use crate::gateway::{Gateway, Hints};
use crate::ledger::Ledger;
use crate::prompts::{PromptTemplate, Prompts};
use crate::tenancy::Principal;

/// The metadata key that names a `qpai batch run` job.
const JOB_KEY: &str = "qpai_job";

pub async fn run(command: BatchCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    match command {
        BatchCommand::Run(args) => run_rows(*args, global).await,
        BatchCommand::Status { id, tenant } => {
            let batch = open(global).await?.get(&tenant.tenant, &id).await?;
            println!("{}", serde_json::to_string_pretty(&batch)?);
            Ok(())
        }
        BatchCommand::List { limit, tenant } => {
            for batch in open(global)
                .await?
                .list(&tenant.tenant, None, limit)
                .await?
                .data
            {
                let counts = batch.request_counts;
                println!(
                    "{}  {:<11} {}/{} done, {} failed  {}",
                    batch.id,
                    batch.status.as_str(),
                    counts.completed + counts.failed,
                    counts.total,
                    counts.failed,
                    batch.model.unwrap_or_default()
                );
            }
            Ok(())
        }
        BatchCommand::Cancel { id, tenant } => {
            let batch = open(global).await?.cancel(&tenant.tenant, &id).await?;
            println!("{} {}", batch.id, batch.status.as_str());
            Ok(())
        }
    }
}

/// The batches in the ledger database, with the data dir's files.
async fn open(global: &GlobalArgs) -> anyhow::Result<Batches> {
    let ledger = Ledger::open(&global.database_url()).await?;
    Ok(Batches::new(&ledger, files(&ledger, global)))
}

fn files(ledger: &Ledger, global: &GlobalArgs) -> Files {
    Files::new(
        ledger,
        Arc::new(LocalBlobs::new(global.data_dir().join("files"))),
    )
}

fn response_format(path: &Path) -> anyhow::Result<Value> {
    let value: Value = serde_json::from_str(&std::fs::read_to_string(path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if value.get("type").and_then(Value::as_str) == Some("json_schema") {
        return Ok(value);
    }
    Ok(json!({"type": "json_schema",
        "json_schema": {"name": "output", "strict": true, "schema": value}}))
}

/// One chat request per row, naming the prompt.
fn request_body(
    args: &BatchRunArgs,
    template: &PromptTemplate,
    row: &Row,
) -> anyhow::Result<Value> {
    let model = match &args.adapter {
        Some(adapter) => format!("{}:{adapter}", args.model),
        None => args.model.clone(),
    };
    let mut body = json!({
        "model": model,
        "prompt": {"id": template.name, "version": template.version.to_string(),
            "variables": Value::Object(row.variables.clone())},
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
    });
    if let Some(path) = &args.response_format {
        body["response_format"] = response_format(path)?;
    }
    Ok(body)
}

async fn run_rows(args: BatchRunArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let prompts_dir = args
        .dir
        .prompts_dir
        .clone()
        .unwrap_or_else(|| global.data_dir().join("prompts"));
    let template = Prompts::load(&prompts_dir)?
        .get_reference(&args.prompt)
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let content = std::fs::read(&args.rows)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", args.rows.display()))?;
    let rows = read_rows(&args.rows, &content, &template)?;
    let mut input = String::new();
    for row in &rows {
        let line = json!({"custom_id": row.id, "method": "POST", "url": "/v1/chat/completions",
            "body": request_body(&args, &template, row)?});
        input.push_str(&line.to_string());
        input.push('\n');
    }
    let job = crate::server::JobSettings {
        models: vec![args.model.clone()],
        embeddings: false,
        router_config: args.router_config.clone(),
        prompts_dir: args.dir.prompts_dir.clone(),
        concurrency: args.concurrency,
    };
    let stack = crate::server::build(job.serve_args()?, global).await?;
    eprintln!("loading models…");
    stack.loading.await??;
    let principal = Principal {
        key_id: "cli".into(),
        tenant: args.tenant.tenant.clone(),
        admin: false,
        rpm: None,
        tpm: None,
    };
    if args.dry_run {
        return dry_run(&stack.gateway, &principal, &input).await;
    }
    let job = hex::encode(&Sha256::digest(input.as_bytes())[..12]);
    let batches = stack.batches.clone();
    let batch = match batches
        .find_by_metadata(&principal.tenant, JOB_KEY, &job)
        .await?
        .filter(|b| !matches!(b.status.as_str(), "failed" | "cancelled" | "expired"))
    {
        Some(batch) => {
            eprintln!("resuming {} ({})", batch.id, batch.status.as_str());
            batch
        }
        None => {
            let file = batches
                .files()
                .create(
                    &principal.tenant,
                    NewFile {
                        filename: format!("{}.jsonl", args.rows.display()),
                        purpose: Purpose::Batch,
                        content: Bytes::from(input),
                        expires_after_s: None,
                    },
                )
                .await?;
            let mut metadata = Map::new();
            metadata.insert(JOB_KEY.into(), job.into());
            metadata.insert("prompt".into(), template.reference().into());
            let new = NewBatch {
                input_file_id: file.id,
                endpoint: "/v1/chat/completions".into(),
                completion_window: super::COMPLETION_WINDOW.into(),
                metadata: Some(metadata),
                output_expires_after: None,
            };
            let batch = batches.create(&principal, new).await?;
            eprintln!("started {} over {} rows", batch.id, rows.len());
            batch
        }
    };
    let runner = super::runner::spawn(batches.clone(), stack.gateway.clone(), stack.runner_config);
    let ended = watch(&stack.ledger, &batches, &principal.tenant, &batch).await;
    runner.stop().await;
    let ended = ended?;
    if ended.status.as_str() == "failed" {
        let errors = serde_json::to_string_pretty(&ended.errors)?;
        anyhow::bail!("the batch failed validation: {errors}");
    }
    let out = args
        .out
        .as_deref()
        .expect("clap requires --out without --dry-run");
    write_answers(&batches, &principal.tenant, &ended, &rows, out).await?;
    let counts = ended.request_counts;
    eprintln!(
        "{}: {} done, {} failed; {} tokens in, {} out; answers in {}",
        ended.id,
        counts.completed,
        counts.failed,
        ended.usage.input_tokens,
        ended.usage.output_tokens,
        out.display()
    );
    Ok(())
}

/// Shows progress until the batch ends.
async fn watch(
    ledger: &Ledger,
    batches: &Batches,
    tenant: &str,
    batch: &BatchObject,
) -> anyhow::Result<BatchObject> {
    let bar = indicatif::ProgressBar::new(batch.request_counts.total.max(1));
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} rows  {msg}  eta {eta}",
    )?);
    let started = Instant::now();
    let first_tokens = batch.usage.output_tokens;
    loop {
        let batch = batches.get(tenant, &batch.id).await?;
        let counts = batch.request_counts;
        bar.set_length(counts.total.max(1));
        bar.set_position(counts.completed + counts.failed);
        let rate = (batch.usage.output_tokens - first_tokens) as f64
            / started.elapsed().as_secs_f64().max(1e-3);
        let cost = batch_cost(ledger, &batch.id).await?;
        bar.set_message(format!(
            "{} failed · {rate:.0} tok/s · ${cost}",
            counts.failed
        ));
        if batch.status.is_final() {
            bar.finish();
            return Ok(batch);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What a batch's lines have cost so far, from the ledger.
async fn batch_cost(ledger: &Ledger, id: &str) -> anyhow::Result<crate::money::Usd> {
    let rows = ledger
        .db()
        .query(
            "SELECT CAST(SUM(cost_pico) AS TEXT) FROM usage_ledger WHERE batch_id = $1",
            vec![id.into()],
        )
        .await?;
    let pico = rows.first().and_then(|r| r[0].wide()).unwrap_or(0);
    Ok(crate::money::Usd(pico.clamp(0, u64::MAX as i128) as u64))
}

/// The answers, a line per row in row order: the batch's output or error
/// line for it.
async fn write_answers(
    batches: &Batches,
    tenant: &str,
    batch: &BatchObject,
    rows: &[Row],
    out: &Path,
) -> anyhow::Result<()> {
    let mut lines: HashMap<String, Value> = HashMap::new();
    for file in [&batch.output_file_id, &batch.error_file_id]
        .into_iter()
        .flatten()
    {
        let content = batches.files().content(tenant, file).await?;
        for line in String::from_utf8_lossy(&content).lines() {
            let line: Value = serde_json::from_str(line)?;
            let id = line["custom_id"].as_str().unwrap_or_default().to_string();
            lines.insert(id, line);
        }
    }
    let partial = out.with_extension("partial");
    let mut writer = std::io::BufWriter::new(std::fs::File::create(&partial)?);
    for row in rows {
        let line = lines.remove(&row.id).unwrap_or_else(|| {
            json!({"custom_id": row.id, "response": null,
                "error": {"code": "missing", "message": "The batch has no line for this row."}})
        });
        writeln!(writer, "{line}")?;
    }
    writer.flush()?;
    drop(writer);
    std::fs::rename(&partial, out)?;
    Ok(())
}

/// Prints each route's rows, tokens and cost estimate; runs nothing.
async fn dry_run(gateway: &Gateway, principal: &Principal, input: &str) -> anyhow::Result<()> {
    #[derive(Default)]
    struct Route {
        first: u64,
        rows: u64,
        prompt_tokens: u64,
        max_completion_tokens: u64,
        prompt_cost: crate::money::Usd,
        max_cost: crate::money::Usd,
    }
    let mut routes: Vec<(String, Route)> = Vec::new();
    let hints = Hints::default();
    for line in input.lines() {
        let line: Value = serde_json::from_str(line)?;
        let request: ChatCompletionRequest = serde_json::from_value(line["body"].clone())?;
        let candidates = gateway
            .estimate_chat(principal, request, &hints)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", line["custom_id"], e.message))?;
        for (rank, candidate) in candidates.iter().enumerate() {
            let name = candidate.deployment.name.clone();
            let index = match routes.iter().position(|(n, _)| *n == name) {
                Some(index) => index,
                None => {
                    routes.push((name, Route::default()));
                    routes.len() - 1
                }
            };
            let route = &mut routes[index].1;
            let prices = candidate.deployment.batch_prices;
            route.first += u64::from(rank == 0);
            route.rows += 1;
            route.prompt_tokens += candidate.prompt_tokens;
            route.max_completion_tokens += candidate.max_completion_tokens;
            route.prompt_cost = route
                .prompt_cost
                .saturating_add(prices.cost(candidate.prompt_tokens, 0));
            route.max_cost = route.max_cost.saturating_add(
                prices.cost(candidate.prompt_tokens, candidate.max_completion_tokens),
            );
        }
    }
    println!(
        "{:<24} {:>6} {:>6} {:>13} {:>15} {:>14} {:>14}",
        "route", "first", "rows", "prompt tok", "max completion", "prompt $", "at most $"
    );
    for (name, route) in routes {
        println!(
            "{name:<24} {:>6} {:>6} {:>13} {:>15} {:>14} {:>14}",
            route.first,
            route.rows,
            route.prompt_tokens,
            route.max_completion_tokens,
            route.prompt_cost.to_string(),
            route.max_cost.to_string()
        );
    }
    println!("(batch prices; `first` counts the rows the router would send there first)");
    Ok(())
}
