//! `qpai bench-lora`: decode speed of one base with no adapter, with the
//! adapter merged, with it unmerged, and with several different unmerged
//! adapters decoded together (beside as many base sequences decoded
//! together). Modes are interleaved run by run, so drift in the machine's
//! speed hits them alike.

use std::sync::Arc;

use serde::Serialize;

use crate::bench::{batched_decode, prompt_ids};
use crate::catalog::Catalog;
use crate::catalog::fetch::ModelStore;
use crate::catalog::resolve::resolve;
use crate::config::{BenchLoraArgs, GlobalArgs};
use crate::lora::{Adapter, UnmergedAdapter};
use crate::models::{LoadedModel, load_model};

#[derive(Debug, Serialize)]
pub struct ModeResult {
    pub mode: String,
    pub sequences: usize,
    /// Decode tokens/s summed over the sequences (median of the runs).
    pub tokens_per_s: f64,
    /// Against the base decoding the same number of sequences.
    pub vs_base: f64,
}

#[derive(Debug, Serialize)]
pub struct LoraBenchResult {
    pub model: String,
    pub adapter: String,
    pub rank: usize,
    pub adapter_bytes: usize,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub runs: usize,
    pub modes: Vec<ModeResult>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn run(args: BenchLoraArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let catalog = Catalog::load(global.catalog.as_deref())?;
    let store = ModelStore::new(global.models_dir());
    let adapter_dir = catalog.resolve_adapter(&args.target.adapter);
    let adapter = Arc::new(Adapter::load(&adapter_dir).map_err(anyhow::Error::msg)?);
    let resolved = resolve(&args.target.model, &catalog, &store)?;
    let base = load_model(&resolved.source, &resolved.options)?;
    let mut options = resolved.options.clone();
    options.merge = Some(adapter.clone());
    let merged = load_model(&resolved.source, &options)?;
    let unmerged = base.prepare_adapter(&adapter).map_err(anyhow::Error::msg)?;
    // Distinct adapters of the same shape: the factors scaled differently.
    let n = args.adapters_in_flight.max(1);
    let mut several = Vec::with_capacity(n);
    for i in 0..n {
        let mut variant = (*adapter).clone();
        variant.scale *= 1.0 - 0.25 * i as f64;
        several.push(Some(
            base.prepare_adapter(&variant).map_err(anyhow::Error::msg)?,
        ));
    }
    let ids = prompt_ids(&base, args.prompt_tokens)?;
    let steps = args.decode_tokens;
    type Mode<'a> = (&'a str, &'a LoadedModel, Vec<Option<Arc<UnmergedAdapter>>>);
    let modes: Vec<Mode> = vec![
        ("base", &base, vec![None]),
        ("merged", &merged, vec![None]),
        ("unmerged", &base, vec![Some(unmerged.clone())]),
        ("base, batched", &base, vec![None; n]),
        ("different unmerged adapters, batched", &base, several),
    ];
    let mut rates = vec![Vec::new(); modes.len()];
    // One warm-up round, then the measured ones.
    for run in 0..=args.runs.max(1) {
        for (index, (name, model, adapters)) in modes.iter().enumerate() {
            let rate = batched_decode(model, &ids, adapters, steps)?;
            if run > 0 {
                tracing::info!(mode = name, run, tokens_per_s = rate, "measured");
                rates[index].push(rate);
            }
        }
    }
    let rates: Vec<f64> = rates.into_iter().map(median).collect();
    let results: Vec<ModeResult> = modes
        .iter()
        .zip(&rates)
        .map(|((name, _, adapters), &rate)| {
            let baseline = if adapters.len() > 1 {
                rates[3]
            } else {
                rates[0]
            };
            ModeResult {
                mode: name.to_string(),
                sequences: adapters.len(),
                tokens_per_s: rate,
                vs_base: rate / baseline,
            }
        })
        .collect();
    let result = LoraBenchResult {
        model: base.id.clone(),
        adapter: adapter_dir.display().to_string(),
        rank: adapter.config.r,
        adapter_bytes: unmerged.bytes(),
        threads: rayon::current_num_threads(),
        prompt_tokens: ids.len(),
        decode_tokens: steps,
        runs: args.runs.max(1),
        modes: results,
    };
    println!(
        "{} + {} (r = {}, {} bytes unmerged), {} threads, {}-token prompt, {} decode steps, median of {} runs",
        result.model,
        result.adapter,
        result.rank,
        result.adapter_bytes,
        result.threads,
        result.prompt_tokens,
        steps,
        result.runs
    );
    println!("| mode | sequences | decode tok/s | vs base |");
    println!("|---|---|---|---|");
    for mode in &result.modes {
        println!(
            "| {} | {} | {:.1} | {:.2}x |",
            mode.mode, mode.sequences, mode.tokens_per_s, mode.vs_base
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(())
}
