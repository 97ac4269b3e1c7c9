//! `qpai logits`: a model's next-token logits for token-id prompts, all fed
//! as one batch, then their greedy continuations decoded together. What the
//! GPU check compares with the CPU and with transformers.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::catalog::fetch::ModelStore;
use crate::catalog::resolve::resolve;
use crate::config::{GlobalArgs, LogitsArgs};
use crate::engine::sampling::argmax;
use crate::lora::{Adapter, UnmergedAdapter};
use crate::models::{device_name, load_model};

#[derive(Deserialize)]
struct Prompt {
    ids: Vec<u32>,
    adapter: Option<PathBuf>,
}

#[derive(Serialize)]
struct Case {
    ids: Vec<u32>,
    adapter: Option<PathBuf>,
    last_logits: Vec<f32>,
    top_ids: Vec<usize>,
    greedy: Vec<u32>,
}

#[derive(Serialize)]
struct Output {
    model: String,
    device: String,
    engine: &'static str,
    cases: Vec<Case>,
}

fn top_ids(logits: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(k);
    order
}

pub fn run(args: LogitsArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let prompts: Vec<Prompt> = serde_json::from_str(&std::fs::read_to_string(&args.prompts)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.prompts.display()))?;
    anyhow::ensure!(
        !prompts.is_empty() && prompts.iter().all(|p| !p.ids.is_empty()),
        "{}: every prompt needs token ids",
        args.prompts.display()
    );
    let catalog = Catalog::load(global.catalog.as_deref())?;
    let store = ModelStore::new(global.models_dir());
    let mut resolved = resolve(&args.model, &catalog, &store)?;
    let options = &mut resolved.options;
    options.tensor_ops = args.tensor_ops;
    options.kv_cache.sequences = prompts.len();
    if let Some(max) = args.max_context {
        options.max_context = Some(options.max_context.map_or(max, |m| m.min(max)));
    }
    options.dtype = match args.dtype.as_deref() {
        None => None,
        Some("f32") => Some(candle_core::DType::F32),
        Some("bf16") => Some(candle_core::DType::BF16),
        Some("f16") => Some(candle_core::DType::F16),
        Some(other) => anyhow::bail!("--dtype {other}: expected f32, bf16 or f16"),
    };
    if let Some(dir) = &args.merge {
        options.merge = Some(Arc::new(Adapter::load(dir).map_err(anyhow::Error::msg)?));
    }
    let model = load_model(&resolved.source, &resolved.options)?;
    let mut prepared: Vec<(PathBuf, Arc<UnmergedAdapter>)> = Vec::new();
    let mut sequences = Vec::with_capacity(prompts.len());
    for prompt in &prompts {
        let adapter = match &prompt.adapter {
            None => None,
            Some(dir) => match prepared.iter().find(|(d, _)| d == dir) {
                Some((_, adapter)) => Some(adapter.clone()),
                None => {
                    let adapter = Adapter::load(dir).map_err(anyhow::Error::msg)?;
                    let adapter = model
                        .prepare_adapter(&adapter)
                        .map_err(anyhow::Error::msg)?;
                    prepared.push((dir.clone(), adapter.clone()));
                    Some(adapter)
                }
            },
        };
        sequences.push(model.new_sequence_with(adapter.as_ref())?);
    }
    let inputs: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    let mut refs: Vec<_> = sequences.iter_mut().collect();
    let first = model
        .forward_batch(&mut refs, &inputs)
        .into_iter()
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut tokens: Vec<u32> = first.iter().map(|l| argmax(l) as u32).collect();
    let mut greedy: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
    for _ in 1..args.steps {
        let logits = model.decode_batch(&mut refs, &tokens)?;
        tokens = logits.iter().map(|l| argmax(l) as u32).collect();
        greedy.iter_mut().zip(&tokens).for_each(|(g, &t)| g.push(t));
    }
    let engine = match &model.weights {
        crate::models::Weights::CpuDecoder(_) => "cpu_decoder",
        crate::models::Weights::Device(_) => "device_decoder",
        crate::models::Weights::Gemma3(_) => "gemma3",
    };
    let cases = prompts
        .into_iter()
        .zip(first)
        .zip(greedy)
        .map(|((prompt, logits), greedy)| Case {
            ids: prompt.ids,
            adapter: prompt.adapter,
            top_ids: top_ids(&logits, 10),
            last_logits: logits,
            greedy: if args.steps == 0 { Vec::new() } else { greedy },
        })
        .collect();
    let output = Output {
        model: model.id.clone(),
        device: device_name(&model.device),
        engine,
        cases,
    };
    let text = serde_json::to_string(&output)?;
    match &args.json {
        Some(path) => std::fs::write(path, text)?,
        None => println!("{text}"),
    }
    Ok(())
}
