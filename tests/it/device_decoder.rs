//! The accelerator path (`models::device_decoder`: llama-family decoders in
//! candle tensor ops, every sequence in one batched pass) run on the CPU
//! with `tensor_ops`, against the same references as the CPU decoder:
//! transformers for the tiny checkpoints, PEFT for the adapters. On a GPU
//! the same code runs; scripts/gpu/check.sh compares it there.

use std::sync::Arc;

use qpai::engine::sampling::argmax;
use qpai::lora::{Adapter, UnmergedAdapter};
use qpai::models::loader::LoadOptions;
use qpai::models::{LoadedModel, ModelSource, Weights, load_model};
use serde_json::Value;

use crate::common::*;

/// f32 arithmetic against transformers' / PEFT's f32: summation order only.
const F32_TOLERANCE: f32 = 2e-3;
/// candle's Q8_0 matmul on the CPU quantizes activations to 8 bits, as
/// qpai's own kernel does (tests/it/lora.rs measures 0.08 there).
const Q8_TOLERANCE: f32 = 0.15;

fn tensor_ops(file: &str, merge: Option<&str>, sequences: usize) -> LoadedModel {
    let path = fixtures_dir().join("tiny").join(file);
    let mut options = LoadOptions::new(file);
    options.device = candle_core::Device::Cpu;
    options.tensor_ops = true;
    options.kv_cache.sequences = sequences;
    options.merge = merge.map(|name| Arc::new(adapter(name)));
    let model = load_model(&ModelSource::from_path(&path).unwrap(), &options)
        .unwrap_or_else(|e| panic!("{file}: {e:#}"));
    assert!(matches!(model.weights, Weights::Device(_)), "{file}");
    model
}

fn adapter(name: &str) -> Adapter {
    Adapter::load(&fixtures_dir().join("lora").join(name)).unwrap()
}

fn max_gap(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn floats(value: &Value) -> Vec<f32> {
    serde_json::from_value(value.clone()).unwrap()
}

/// Every prompt fed in one batched pass (prompt chunks of different
/// lengths), each with its own adapter; the last-position logits.
fn batch_logits(
    model: &LoadedModel,
    prompts: &[Vec<u32>],
    adapters: &[Option<Arc<UnmergedAdapter>>],
) -> (Vec<Box<dyn qpai::models::SequenceModel>>, Vec<Vec<f32>>) {
    let mut sequences: Vec<_> = adapters
        .iter()
        .map(|a| model.new_sequence_with(a.as_ref()).unwrap())
        .collect();
    let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut refs: Vec<_> = sequences.iter_mut().collect();
    let logits = model
        .forward_batch(&mut refs, &inputs)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    (sequences, logits)
}

/// The three tiny checkpoints (Qwen2 with q/k/v biases, Mistral, Llama with
/// tied embeddings) in f32: all prompts in one pass, then their greedy
/// continuations decoded together through the batched decode attention.
#[test]
fn tiny_checkpoints_in_tensor_ops_match_transformers_batched() {
    let fixture = fixture("tiny/logits.json");
    for (name, expected) in fixture["models"].as_object().unwrap() {
        let model = tensor_ops(name, None, 3);
        let cases = expected["cases"].as_array().unwrap();
        let prompts: Vec<Vec<u32>> = cases
            .iter()
            .map(|c| serde_json::from_value(c["ids"].clone()).unwrap())
            .collect();
        let (mut sequences, mut logits) = batch_logits(&model, &prompts, &[None, None, None]);
        for (case, logits) in cases.iter().zip(&logits) {
            let gap = max_gap(logits, &floats(&case["last_logits"]));
            eprintln!("{name} tensor ops, batched prefill: max gap {gap:.2e}");
            assert!(gap < F32_TOLERANCE, "{name}: {gap}");
        }
        let greedy: Vec<Vec<u32>> = cases
            .iter()
            .map(|c| serde_json::from_value(c["greedy_continuation_ids"].clone()).unwrap())
            .collect();
        let mut produced = vec![Vec::new(); 3];
        for _ in 0..greedy[0].len() {
            let next: Vec<u32> = logits.iter().map(|l| argmax(l) as u32).collect();
            produced.iter_mut().zip(&next).for_each(|(p, &t)| p.push(t));
            let mut refs: Vec<_> = sequences.iter_mut().collect();
            logits = model.decode_batch(&mut refs, &next).unwrap();
        }
        assert_eq!(
            produced, greedy,
            "{name}: greedy continuations, decoded together"
        );
    }
}

/// The tiny Llama as GGUF (q/k rows permuted, adjacent-pair rotary) in f32
/// and Q8_0, against transformers and against qpai's CPU decoder.
#[test]
fn tiny_gguf_in_tensor_ops_matches_transformers_and_the_cpu_decoder() {
    let reference = fixture("lora/logits.json");
    let prompts: Vec<Vec<u32>> = serde_json::from_value(reference["prompts"].clone()).unwrap();
    for (file, tolerance) in [
        ("llama-f32.gguf", F32_TOLERANCE),
        ("llama-q8_0.gguf", Q8_TOLERANCE),
    ] {
        let model = tensor_ops(file, None, 3);
        let (_, logits) = batch_logits(&model, &prompts, &[None, None, None]);
        let mut cpu_options = LoadOptions::new(file);
        cpu_options.device = candle_core::Device::Cpu;
        let path = fixtures_dir().join("tiny").join(file);
        let cpu = load_model(&ModelSource::from_path(&path).unwrap(), &cpu_options).unwrap();
        for (index, (ours, expected)) in logits
            .iter()
            .zip(reference["base_logits"].as_array().unwrap())
            .enumerate()
        {
            let gap = max_gap(ours, &floats(&expected["last_logits"]));
            let cpu_logits = cpu
                .new_sequence()
                .unwrap()
                .forward(&prompts[index])
                .unwrap();
            let cpu_gap = max_gap(ours, &cpu_logits);
            eprintln!(
                "{file} prompt {index}: vs transformers {gap:.2e}, vs CPU decoder {cpu_gap:.2e}"
            );
            assert!(gap < tolerance, "{file} prompt {index}: {gap}");
            assert!(
                cpu_gap < tolerance,
                "{file} prompt {index} vs CPU decoder: {cpu_gap}"
            );
        }
    }
}

/// Adapters run unmerged, a different one per sequence in one batch (and a
/// sequence with none), on a GGUF and a safetensors base, against PEFT;
/// merged at load, against PEFT's merged model.
#[test]
fn adapters_unmerged_and_mixed_in_one_batch_and_merged_match_peft() {
    let reference = fixture("lora/logits.json");
    let prompts: Vec<Vec<u32>> = serde_json::from_value(reference["prompts"].clone()).unwrap();
    for file in ["llama-f32.gguf", "llama-bf16"] {
        let model = tensor_ops(file, None, 6);
        let r4 = Some(model.prepare_adapter(&adapter("r4-all")).unwrap());
        let r8 = Some(model.prepare_adapter(&adapter("r8-rslora")).unwrap());
        // Prompt i with r4, prompt i with r8, and prompt 0 with no adapter.
        let batch_prompts = vec![
            prompts[0].clone(),
            prompts[1].clone(),
            prompts[2].clone(),
            prompts[0].clone(),
            prompts[2].clone(),
            prompts[0].clone(),
        ];
        let adapters = vec![
            r4.clone(),
            r4.clone(),
            r8.clone(),
            r8.clone(),
            r4.clone(),
            None,
        ];
        let (_, logits) = batch_logits(&model, &batch_prompts, &adapters);
        let expect = |name: &str, prompt: usize| -> Vec<f32> {
            floats(&reference["adapters"][name]["unmerged"][prompt]["last_logits"])
        };
        let wanted = [
            expect("r4-all", 0),
            expect("r4-all", 1),
            expect("r8-rslora", 2),
            expect("r8-rslora", 0),
            expect("r4-all", 2),
            floats(&reference["base_logits"][0]["last_logits"]),
        ];
        for (index, (ours, want)) in logits.iter().zip(&wanted).enumerate() {
            let gap = max_gap(ours, want);
            eprintln!("{file} mixed batch row {index}: vs PEFT {gap:.2e}");
            assert!(gap < F32_TOLERANCE, "{file} row {index}: {gap}");
        }
        for name in ["r4-all", "r8-rslora"] {
            let merged = tensor_ops(file, Some(name), 3);
            let (_, logits) = batch_logits(&merged, &prompts, &[None, None, None]);
            for (index, ours) in logits.iter().enumerate() {
                let want = floats(&reference["adapters"][name]["merged"][index]["last_logits"]);
                let gap = max_gap(ours, &want);
                eprintln!("{file} + {name} merged, prompt {index}: vs PEFT {gap:.2e}");
                assert!(gap < F32_TOLERANCE, "{file} {name} merged: {gap}");
            }
        }
    }
}

/// The KV slab holds as many sequences as it has slots: one more is
/// refused until one ends; admission counts one slot per choice; a fork
/// gets a slot of its own with the same keys and values.
#[test]
fn kv_slots_bound_the_sequences_and_forks_copy_their_slot() {
    let model = tensor_ops("llama-f32.gguf", None, 2);
    let budget = model.kv_budget().unwrap();
    assert_eq!(budget.total_blocks, 2);
    assert_eq!(budget.blocks_for(5000, 3, 100), 3);
    let prompt = [0u32, 213, 287, 262, 424];
    let mut first = model.new_sequence().unwrap();
    let logits = first.forward(&prompt).unwrap();
    let mut second = first.fork();
    let error = match model.new_sequence() {
        Ok(_) => panic!("a third sequence got a slot"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("KV slots"), "{error}");
    let next = argmax(&logits) as u32;
    assert_eq!(
        first.forward(&[next]).unwrap(),
        second.forward(&[next]).unwrap()
    );
    drop(second);
    let mut third = model.new_sequence().unwrap();
    assert_eq!(third.forward(&prompt).unwrap(), logits);
}

/// `--device`: cpu, cuda, cuda:N; a build without the `cuda` feature says so.
#[test]
fn device_names_parse_and_a_cpu_build_refuses_cuda_by_name() {
    assert!(qpai::models::parse_device("cpu").unwrap().is_cpu());
    let unknown = qpai::models::parse_device("gpu0").unwrap_err().to_string();
    assert!(unknown.contains("cpu, cuda or cuda:N"), "{unknown}");
    let bad_index = qpai::models::parse_device("cuda:x")
        .unwrap_err()
        .to_string();
    assert!(bad_index.contains("unknown device"), "{bad_index}");
    if !cfg!(feature = "cuda") {
        let refused = qpai::models::parse_device("cuda:1")
            .unwrap_err()
            .to_string();
        assert!(refused.contains("`cuda` feature"), "{refused}");
    }
    assert_eq!(qpai::models::device_name(&candle_core::Device::Cpu), "cpu");
}

/// The collected text of each choice, or the engine's error.
async fn run(
    engine: &qpai::engine::Engine,
    request: qpai::engine::GenerationRequest,
) -> Vec<String> {
    let mut stream = engine.submit(request).unwrap();
    let mut texts = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            qpai::engine::GenerationEvent::Token { choice, text, .. } => {
                texts.resize(texts.len().max(choice + 1), String::new());
                texts[choice].push_str(&text);
            }
            qpai::engine::GenerationEvent::Error(message) => panic!("request failed: {message}"),
            qpai::engine::GenerationEvent::End { .. } => {}
        }
    }
    texts
}

/// Served by the engine: with two KV slots, four requests at once all finish
/// (they wait for slots) with the text each gives alone; two greedy choices
/// of one request (a fork) are the same text; three choices can never fit
/// and are refused up front.
#[tokio::test]
async fn the_engine_runs_the_device_decoder_within_its_slots() {
    let model = tensor_ops("llama-f32.gguf", None, 2);
    let engine = qpai::engine::Engine::start(
        model,
        qpai::engine::EngineConfig {
            max_running: 4,
            ..qpai::engine::EngineConfig::default()
        },
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|p| (0..12).map(|i| (i * 37 + p * 11 + 5) % 500).collect())
        .collect();
    let greedy = |ids: &Vec<u32>| {
        let mut request = qpai::engine::GenerationRequest::greedy(ids.clone(), 12);
        request.ignore_eos = true;
        request
    };
    let mut alone = Vec::new();
    for ids in &prompts {
        alone.push(run(&engine, greedy(ids)).await);
    }
    let together =
        futures::future::join_all(prompts.iter().map(|ids| run(&engine, greedy(ids)))).await;
    assert_eq!(together, alone);
    let mut two = greedy(&prompts[0]);
    two.n = 2;
    let choices = run(&engine, two).await;
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0], choices[1]);
    assert_eq!(choices[0], alone[0][0]);
    let mut three = greedy(&prompts[0]);
    three.n = 3;
    assert!(matches!(
        engine.submit(three),
        Err(qpai::engine::SubmitError::KvCacheTooSmall { .. })
    ));
}

/// A pass that mixes decode rows (batched attention) with a prompt chunk
/// (attention per sequence) gives each sequence what it gets alone.
#[test]
fn decode_rows_and_a_prompt_chunk_in_one_pass_equal_separate_passes() {
    let model = tensor_ops("llama-f32.gguf", None, 6);
    let prompt = |seed: u32, len: u32| -> Vec<u32> {
        (0..len).map(|i| (i * 31 + seed * 7 + 3) % 500).collect()
    };
    let (a, b, c) = (prompt(1, 9), prompt(2, 20), prompt(3, 14));
    // Alone: a and c prefilled, then one token each; b prefilled in one go.
    let alone = |ids: &[u32], next: Option<u32>| -> Vec<f32> {
        let mut sequence = model.new_sequence().unwrap();
        let logits = sequence.forward(ids).unwrap();
        match next {
            Some(token) => sequence.forward(&[token]).unwrap(),
            None => logits,
        }
    };
    let expected = [alone(&a, Some(42)), alone(&b, None), alone(&c, Some(7))];
    let mut sequences: Vec<_> = (0..3).map(|_| model.new_sequence().unwrap()).collect();
    sequences[0].forward(&a).unwrap();
    sequences[2].forward(&c).unwrap();
    let mut refs: Vec<_> = sequences.iter_mut().collect();
    let inputs: [&[u32]; 3] = [&[42], &b, &[7]];
    let together: Vec<Vec<f32>> = model
        .forward_batch(&mut refs, &inputs)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (index, (ours, want)) in together.iter().zip(&expected).enumerate() {
        let gap = max_gap(ours, want);
        assert!(gap < 1e-4, "sequence {index}: off by {gap}");
    }
}
