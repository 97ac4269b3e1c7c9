//! `qpai eval adapter`: does an adapter move its base toward its task? Each
//! held-out prompt is answered greedily by the base and by the base with the
//! adapter (unmerged, through the serving engine, both in the same batches);
//! a reply adheres when it matches the task's format regex whole.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::catalog::fetch::ModelStore;
use crate::catalog::resolve::resolve;
use crate::config::{EvalAdapterArgs, GlobalArgs};
use crate::engine::{Engine, EngineConfig, GenerationEvent, GenerationRequest};
use crate::lora::{Adapter, UnmergedAdapter};
use crate::models::{LoadedModel, TemplateMessage, load_model};

#[derive(Debug, Deserialize)]
struct Record {
    id: String,
    prompt: String,
    completion: String,
}

#[derive(Debug, Serialize)]
pub struct VariantScore {
    pub variant: &'static str,
    pub replies: usize,
    /// Replies matching the format whole.
    pub adherence: f64,
    /// Replies equal to the reference reply (trailing whitespace aside).
    pub exact_match: f64,
    pub mean_tokens: f64,
}

#[derive(Debug, Serialize)]
struct Reply {
    id: String,
    variant: &'static str,
    adheres: bool,
    exact: bool,
    text: String,
}

/// The format a reply must match whole: `format_regex` of a JSON file.
fn format_regex(path: &Path) -> anyhow::Result<regex::Regex> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)?;
    let pattern = value["format_regex"]
        .as_str()
        .with_context(|| format!("{} has no \"format_regex\"", path.display()))?;
    Ok(regex::Regex::new(&format!("^(?:{pattern})$"))?)
}

fn trim_reply(text: &str) -> &str {
    text.trim_end_matches([' ', '\t', '\r', '\n'])
}

fn prompt_ids(model: &LoadedModel, prompt: &str) -> anyhow::Result<Vec<u32>> {
    let template = model
        .chat_template
        .as_ref()
        .context("the base model has no chat template")?;
    let messages = [TemplateMessage {
        role: "user".to_string(),
        content: prompt.to_string(),
        name: None,
    }];
    let text = template
        .render(&messages, true)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(model
        .tokenizer
        .encode_fast(text.as_str(), false)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec())
}

/// Generates one greedy reply; returns its text and token count.
async fn generate(
    engine: &Engine,
    ids: Vec<u32>,
    max_tokens: usize,
    adapter: Option<Arc<UnmergedAdapter>>,
) -> anyhow::Result<(String, usize)> {
    let request = GenerationRequest {
        adapter,
        ..GenerationRequest::greedy(ids, max_tokens)
    };
    let mut events = engine.submit(request)?;
    let mut text = String::new();
    while let Some(event) = events.next().await {
        match event {
            GenerationEvent::Token { text: piece, .. } => text.push_str(&piece),
            GenerationEvent::End {
                completion_tokens, ..
            } => return Ok((text, completion_tokens)),
            GenerationEvent::Error(error) => anyhow::bail!("generation failed: {error}"),
        }
    }
    anyhow::bail!("the engine stopped")
}

pub async fn run(args: EvalAdapterArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let catalog = Catalog::load(global.catalog.as_deref())?;
    let store = ModelStore::new(global.models_dir());
    let adapter_dir = catalog.resolve_adapter(&args.target.adapter);
    let format_path = match &args.format {
        Some(path) => path.clone(),
        None => args.data.with_file_name("manifest.json"),
    };
    let format = format_regex(&format_path)?;
    let records: Vec<Record> = std::fs::read_to_string(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(args.limit)
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a record is not {\"id\", \"prompt\", \"completion\"}")?;
    let model_spec = args.target.model.clone();
    let (model, adapter) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let resolved = resolve(&model_spec, &catalog, &store)?;
        let model = load_model(&resolved.source, &resolved.options)?;
        let adapter = Adapter::load(&adapter_dir).map_err(anyhow::Error::msg)?;
        let prepared = model
            .prepare_adapter(&adapter)
            .map_err(anyhow::Error::msg)?;
        Ok((model, prepared))
    })
    .await??;
    let prompts: Vec<Vec<u32>> = records
        .iter()
        .map(|r| prompt_ids(&model, &r.prompt))
        .collect::<anyhow::Result<_>>()?;
    let engine = Engine::start(
        model,
        EngineConfig {
            max_in_flight: 2 * records.len() + 1,
            ..EngineConfig::default()
        },
    )?;
    let progress = ProgressBar::new(2 * records.len() as u64).with_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} replies, {elapsed} (eta {eta})",
        )?
        .progress_chars("=> "),
    );
    progress.set_message("eval adapter");
    let started = Instant::now();
    let variants: [(&'static str, Option<Arc<UnmergedAdapter>>); 2] =
        [("base", None), ("adapter", Some(adapter))];
    let jobs = prompts.iter().flat_map(|ids| {
        variants.iter().map(|(name, adapter)| {
            let (engine, progress) = (engine.clone(), progress.clone());
            let (ids, adapter) = (ids.clone(), adapter.clone());
            async move {
                let reply = generate(&engine, ids, args.max_tokens, adapter).await;
                progress.inc(1);
                reply.map(|r| (*name, r))
            }
        })
    });
    let outputs = futures::future::try_join_all(jobs).await?;
    progress.finish_and_clear();
    let mut replies = Vec::new();
    for ((name, (text, tokens)), record) in
        outputs.into_iter().zip(records.iter().flat_map(|r| [r, r]))
    {
        let trimmed = trim_reply(&text);
        replies.push((
            tokens,
            Reply {
                id: record.id.clone(),
                variant: name,
                adheres: format.is_match(trimmed),
                exact: trimmed == trim_reply(&record.completion),
                text,
            },
        ));
    }
    let scores: Vec<VariantScore> = variants
        .iter()
        .map(|(name, _)| {
            let mine: Vec<_> = replies.iter().filter(|(_, r)| r.variant == *name).collect();
            let count = mine.len().max(1) as f64;
            VariantScore {
                variant: name,
                replies: mine.len(),
                adherence: mine.iter().filter(|(_, r)| r.adheres).count() as f64 / count,
                exact_match: mine.iter().filter(|(_, r)| r.exact).count() as f64 / count,
                mean_tokens: mine.iter().map(|(t, _)| *t as f64).sum::<f64>() / count,
            }
        })
        .collect();
    println!(
        "{} prompts of {}, format of {}, greedy, {} tokens max, {:.0} s",
        records.len(),
        args.data.display(),
        format_path.display(),
        args.max_tokens,
        started.elapsed().as_secs_f64()
    );
    println!("| variant | format adherence | exact match | mean tokens |");
    println!("|---|---|---|---|");
    for score in &scores {
        println!(
            "| {} | {:.3} | {:.3} | {:.1} |",
            score.variant, score.adherence, score.exact_match, score.mean_tokens
        );
    }
    if let Some(path) = &args.json {
        let replies: Vec<&Reply> = replies.iter().map(|(_, r)| r).collect();
        let report = serde_json::json!({
            "model": args.target.model,
            "adapter": args.target.adapter,
            "data": args.data,
            "scores": scores,
            "replies": replies,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
