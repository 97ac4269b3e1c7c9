//! `qpai bench-structured`: decode speed with a JSON schema enforced
//! against the same prompts without one, through the engine (worker,
//! sampler, grammar) as a request runs. Each schema of a corpus is answered
//! greedily with its schema; the same prompt is then decoded as far without
//! it. Modes alternate schema by schema, so drift in the machine's speed
//! hits both alike; runs are repeated and the medians reported.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use crate::catalog::Catalog;
use crate::catalog::fetch::ModelStore;
use crate::catalog::resolve::resolve;
use crate::config::{BenchStructuredArgs, GlobalArgs};
use crate::engine::constraint::{Constraint, GrammarSpec};
use crate::engine::{Engine, EngineConfig, GenerationEvent, GenerationRequest};
use crate::models::{TemplateMessage, load_model};
use crate::structured::OutputFormat;

#[derive(Debug, Serialize)]
pub struct StructuredBenchResult {
    pub model: String,
    pub threads: usize,
    pub schemas: usize,
    pub runs: usize,
    /// Decode tokens/s over the corpus (median of the runs).
    pub constrained_tokens_per_s: f64,
    pub unconstrained_tokens_per_s: f64,
    /// constrained / unconstrained (median of the per-run ratios).
    pub ratio: f64,
    /// The same with forced tokens drawn one by one like the others: the
    /// cost of the grammar alone.
    pub drawn_tokens_per_s: f64,
    pub drawn_ratio: f64,
    /// First compile of each schema (median over the corpus).
    pub compile_ms_median: f64,
    /// Tokens decoded per run in each mode.
    pub tokens_per_run: usize,
}

/// A schema of the corpus: `{"name", "prompt", "strict", "schema"}`.
struct Case {
    prompt_ids: Vec<u32>,
    spec: GrammarSpec,
}

fn load_cases(dir: &Path, engine: &Engine, limit: usize) -> anyhow::Result<Vec<Case>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files.truncate(limit);
    let model = engine.model();
    let template = model
        .chat_template
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{} has no chat template", model.id))?;
    files
        .iter()
        .map(|path| -> anyhow::Result<Case> {
            let case: Value = serde_json::from_slice(&std::fs::read(path)?)?;
            let prompt = case["prompt"].as_str().unwrap_or_default().to_string();
            let text = template.render(
                &[TemplateMessage {
                    role: "user".into(),
                    content: prompt,
                    name: None,
                }],
                true,
            )?;
            let prompt_ids = model
                .tokenizer
                .encode_fast(text.as_str(), false)
                .map_err(anyhow::Error::msg)?
                .get_ids()
                .to_vec();
            // The grammar a request with this schema gets.
            let format = serde_json::json!({"type": "json_schema", "json_schema": {
                "name": case["name"], "strict": case["strict"], "schema": case["schema"]}});
            let spec = OutputFormat::parse(Some(&format))
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message))?
                .grammar()
                .ok_or_else(|| anyhow::anyhow!("{}: no schema", path.display()))?;
            Ok(Case { prompt_ids, spec })
        })
        .collect()
}

/// Generates greedily; returns the tokens decoded after the first one and
/// the seconds they took.
async fn decode(
    engine: &Engine,
    prompt_ids: &[u32],
    max_new_tokens: usize,
    constraint: Option<Constraint>,
) -> anyhow::Result<(usize, f64)> {
    let mut events = engine.submit(GenerationRequest {
        constraint,
        ..GenerationRequest::greedy(prompt_ids.to_vec(), max_new_tokens)
    })?;
    let mut first_token: Option<Instant> = None;
    loop {
        match events.next().await {
            Some(GenerationEvent::Token { .. }) => {
                first_token.get_or_insert_with(Instant::now);
            }
            Some(GenerationEvent::End {
                completion_tokens, ..
            }) => {
                let seconds = first_token.map_or(0.0, |t| t.elapsed().as_secs_f64());
                return Ok((completion_tokens.saturating_sub(1), seconds));
            }
            Some(GenerationEvent::Error(message)) => anyhow::bail!(message),
            None => anyhow::bail!("generation ended without a result"),
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

pub async fn run(args: BenchStructuredArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let catalog = Catalog::load(global.catalog.as_deref())?;
    let store = ModelStore::new(global.models_dir());
    let resolved = resolve(&args.model, &catalog, &store)?;
    let model = load_model(&resolved.source, &resolved.options)?;
    let engine = Engine::start(model, EngineConfig::default())?;
    let cases = load_cases(&args.schemas, &engine, args.limit)?;
    anyhow::ensure!(!cases.is_empty(), "no schema in {}", args.schemas.display());
    let mut compile_ms = Vec::new();
    for case in &cases {
        let started = Instant::now();
        engine.grammars().compile(case.spec.clone())?;
        compile_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (mut constrained, mut free, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut drawn, mut drawn_ratios) = (Vec::new(), Vec::new());
    let mut tokens_per_run = 0;
    // One warm-up run, then the measured ones.
    for run in 0..=args.runs.max(1) {
        let (mut tokens, mut with_s, mut without_s, mut free_tokens) = (0, 0.0, 0.0, 0);
        let (mut drawn_tokens, mut drawn_s) = (0, 0.0);
        for case in &cases {
            let constraint = engine.grammars().compile(case.spec.clone())?;
            let (n, seconds) =
                decode(&engine, &case.prompt_ids, args.max_tokens, Some(constraint)).await?;
            tokens += n;
            with_s += seconds;
            let constraint = engine.grammars().compile(case.spec.clone())?;
            let (k, seconds) = decode(
                &engine,
                &case.prompt_ids,
                args.max_tokens,
                Some(constraint.without_forced_tokens()),
            )
            .await?;
            drawn_tokens += k;
            drawn_s += seconds;
            let (m, seconds) = decode(&engine, &case.prompt_ids, n + 1, None).await?;
            free_tokens += m;
            without_s += seconds;
        }
        if run > 0 {
            let with_rate = tokens as f64 / with_s;
            let drawn_rate = drawn_tokens as f64 / drawn_s;
            let without_rate = free_tokens as f64 / without_s;
            constrained.push(with_rate);
            drawn.push(drawn_rate);
            free.push(without_rate);
            ratios.push(with_rate / without_rate);
            drawn_ratios.push(drawn_rate / without_rate);
            tokens_per_run = tokens;
        }
    }
    let result = StructuredBenchResult {
        model: engine.model().id.clone(),
        threads: rayon::current_num_threads(),
        schemas: cases.len(),
        runs: args.runs.max(1),
        constrained_tokens_per_s: median(constrained),
        unconstrained_tokens_per_s: median(free),
        ratio: median(ratios),
        drawn_tokens_per_s: median(drawn),
        drawn_ratio: median(drawn_ratios),
        compile_ms_median: median(compile_ms),
        tokens_per_run,
    };
    println!(
        "{}: {} schemas, {} threads, {} tokens a run, median of {} runs\n| mode | decode tok/s | vs none |\n|---|---|---|\n| json_schema (forced tokens fed together) | {:.1} | {:.3} |\n| json_schema (every token drawn) | {:.1} | {:.3} |\n| none | {:.1} | 1 |\ngrammar compile {:.1} ms (median, first compile)",
        result.model,
        result.schemas,
        result.threads,
        result.tokens_per_run,
        result.runs,
        result.constrained_tokens_per_s,
        result.ratio,
        result.drawn_tokens_per_s,
        result.drawn_ratio,
        result.unconstrained_tokens_per_s,
        result.compile_ms_median
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(())
}
