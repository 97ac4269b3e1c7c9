//! Model outputs against the reference implementation: Hugging Face
//! transformers running the same weights dequantized to float32
//! (tests/fixtures/logits_*.json, made by scripts/reference/make_fixtures.py).
//!
//! Tolerances (absolute, on logits of magnitude ~10-20):
//! - quantized GGUF models: candle's Q4/Q8 kernels quantize activations to
//!   8 bits, and a rounding flip there moves logits by up to about one unit
//!   (measured max over the reference top-10: 0.84 for SmolLM2 Q4_1 with
//!   qpai's llama loop and kernels, 0.71 with candle's quantized_llama, 0.44
//!   to 1.06 for variants that only round differently; 0.73 for Gemma 3
//!   Q4_K_M): `GGUF_TOLERANCE`;
//! - the float32 safetensors copy is the same arithmetic up to summation
//!   order (measured max 3e-5): `F32_TOLERANCE`.

use qpai::catalog::Catalog;
use qpai::models::loader::LoadOptions;
use qpai::models::{LoadedModel, ModelSource, Weights, load_model};
use serde_json::Value;

use crate::common::*;

const GGUF_TOLERANCE: f32 = 1.25;
const F32_TOLERANCE: f32 = 2e-3;
/// How many of the reference's best tokens are compared.
const TOP_K: usize = 10;

struct Comparison {
    max_abs_diff: f32,
    failures: Vec<String>,
}

fn last_logits(model: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let mut sequence = model.new_sequence().unwrap();
    sequence.forward(ids).unwrap()
}

/// Compares the reference's top tokens with ours: their logits within
/// `tolerance`, and our ranking consistent with the reference's up to ties
/// closer than `tolerance`.
fn compare(model: &LoadedModel, fixture: &Value, tolerance: f32) -> Comparison {
    let mut max_abs_diff = 0f32;
    let mut failures = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let top_ids: Vec<usize> = serde_json::from_value(case["top_ids"].clone()).unwrap();
        let top_logits: Vec<f32> = serde_json::from_value(case["top_logits"].clone()).unwrap();
        let logits = last_logits(model, &ids);
        for (&id, &reference) in top_ids.iter().zip(&top_logits).take(TOP_K) {
            let diff = (logits[id] - reference).abs();
            max_abs_diff = max_abs_diff.max(diff);
            if diff > tolerance {
                failures.push(format!(
                    "{name}: token {id} logit {} vs reference {reference}",
                    logits[id]
                ));
            }
        }
        let ours = qpai::engine::sampling::top_k_indices(&logits, TOP_K);
        for (rank, &id) in ours.iter().enumerate().take(5) {
            // Our rank-th token must be one the reference also ranks near there.
            let reference_rank = top_ids.iter().position(|&r| r == id);
            let within = match reference_rank {
                Some(r) => (top_logits[r] - top_logits[rank]).abs() <= tolerance,
                None => false,
            };
            if !within {
                failures.push(format!(
                    "{name}: our rank {rank} token {id} is at reference rank {reference_rank:?} (reference top: {:?})",
                    &top_ids[..TOP_K]
                ));
            }
        }
    }
    Comparison {
        max_abs_diff,
        failures,
    }
}

fn assert_matches(model: &LoadedModel, fixture_name: &str, tolerance: f32) -> f32 {
    let fixture = fixture(fixture_name);
    let comparison = compare(model, &fixture, tolerance);
    eprintln!(
        "{fixture_name}: max |logit - reference| over the top-{TOP_K} = {:.5}",
        comparison.max_abs_diff
    );
    assert!(
        comparison.failures.is_empty(),
        "{fixture_name} differs from the reference (tolerance {tolerance}):\n{}",
        comparison.failures.join("\n")
    );
    comparison.max_abs_diff
}

#[test]
fn smollm2_gguf_matches_transformers() {
    assert_matches(chat_model(), "logits_smollm2.json", GGUF_TOLERANCE);
}

#[test]
fn gemma3_gguf_matches_transformers() {
    assert_matches(base_model(), "logits_gemma3.json", GGUF_TOLERANCE);
}

/// The float32 safetensors copy (made by scripts/reference/export_safetensors.py
/// from the GGUF) loads through the safetensors path and matches tightly,
/// including the greedy continuation with the KV cache.
#[test]
fn smollm2_f32_safetensors_copy_matches_transformers() {
    let model = f32_checkpoint();
    assert_eq!(model.architecture, "LlamaForCausalLM");
    let fixture = fixture("logits_smollm2.json");
    assert_matches(model, "logits_smollm2.json", F32_TOLERANCE);
    for case in fixture["cases"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let expected: Vec<u32> =
            serde_json::from_value(case["greedy_continuation_ids"].clone()).unwrap();
        let mut sequence = model.new_sequence().unwrap();
        let mut logits = sequence.forward(&ids).unwrap();
        let mut produced = Vec::new();
        for _ in 0..expected.len() {
            let next = qpai::engine::sampling::argmax(&logits) as u32;
            produced.push(next);
            logits = sequence.forward(&[next]).unwrap();
        }
        assert_eq!(
            produced, expected,
            "greedy continuation of {}",
            case["name"]
        );
    }
    // The chat template and special tokens come through tokenizer_config.json.
    assert!(model.chat_template.is_some());
    assert!(model.eos_token_ids.contains(&2));
}

#[test]
fn catalog_default_model_is_the_one_under_test() {
    let catalog = Catalog::load(None).unwrap();
    assert!(catalog.get(CHAT_MODEL).is_some() && catalog.get(BASE_MODEL).is_some());
}

/// Decoding token by token with the KV cache gives exactly the logits of
/// one forward pass over the whole sequence, on GGUF models and on an f32
/// checkpoint: a prompt's rows run on the prefill kernels (quantized panels,
/// or f32 tiles of twelve rows) and a decode step's on single-row ones, and
/// every kernel adds each output's products in the same order.
#[test]
fn incremental_decode_equals_full_prefill() {
    for model in [chat_model(), base_model(), f32_checkpoint()] {
        assert!(
            matches!(model.weights, Weights::CpuDecoder(_)),
            "{}",
            model.id
        );
        let ids = model
            .encode_prompt("The bakery on Main Street opens at seven and sells")
            .unwrap();
        let (logits, expected, max_diff) = stepwise_and_full(model, &ids, 3);
        eprintln!("{}: max |stepwise - full| = {max_diff}", model.id);
        assert_eq!(logits, expected, "{}: stepwise and full differ", model.id);
    }
}

/// Small random checkpoints (tests/fixtures/tiny/, made with transformers by
/// scripts/reference/make_tiny_checkpoints.py) cover the safetensors
/// architectures and dtypes no real offline model does: Qwen2 in bf16,
/// Mistral in f16, Llama in bf16 with tied embeddings. Loaded as f32 on the
/// CPU, like the reference computes them, so they agree to float rounding,
/// the whole vocabulary and the greedy continuation with the KV cache too.
#[test]
fn tiny_safetensors_checkpoints_match_transformers() {
    let root = fixtures_dir().join("tiny");
    let fixture = fixture("tiny/logits.json");
    let models = fixture["models"].as_object().unwrap();
    assert_eq!(models.len(), 3);
    for (name, expected) in models {
        let model = load_model(
            &ModelSource::SafetensorsDir(root.join(name)),
            &LoadOptions::new(name.as_str()),
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(
            model.architecture,
            expected["architecture"].as_str().unwrap()
        );
        assert!(matches!(model.weights, Weights::CpuDecoder(_)), "{name}");
        for case in expected["cases"].as_array().unwrap() {
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let reference: Vec<f32> = serde_json::from_value(case["last_logits"].clone()).unwrap();
            let mut sequence = model.new_sequence().unwrap();
            let mut logits = sequence.forward(&ids).unwrap();
            let max_diff = logits
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!(
                "{name} ({} tokens): max |logit - reference| = {max_diff:.6}",
                ids.len()
            );
            assert!(
                max_diff < F32_TOLERANCE,
                "{name}: max |logit - reference| = {max_diff}"
            );
            let greedy: Vec<u32> =
                serde_json::from_value(case["greedy_continuation_ids"].clone()).unwrap();
            let mut produced = Vec::new();
            for _ in 0..greedy.len() {
                let next = qpai::engine::sampling::argmax(&logits) as u32;
                produced.push(next);
                logits = sequence.forward(&[next]).unwrap();
            }
            assert_eq!(produced, greedy, "{name}: greedy continuation");
        }
    }
}

/// Gemma 3's local layers see only the last 512 positions. Prompts longer
/// than the window (tests/fixtures/logits_gemma3_long.json) check the
/// windowed prefill against transformers; decoding on past the window with
/// the trimmed KV cache must agree with a full prefill of the same tokens.
#[test]
fn gemma3_sliding_window_matches_transformers_and_full_prefill() {
    let model = base_model();
    assert_matches(model, "logits_gemma3_long.json", GGUF_TOLERANCE);
    let fixture = fixture("logits_gemma3_long.json");
    let ids: Vec<u32> = serde_json::from_value(fixture["cases"][0]["ids"].clone()).unwrap();
    assert!(ids.len() > 600, "the long case spans the window");
    let (logits, expected, max_diff) = stepwise_and_full(model, &ids[..600], 500);
    eprintln!("gemma3 past the window: max |stepwise - full| = {max_diff}");
    assert!(
        max_diff < GGUF_TOLERANCE,
        "max |stepwise - full| = {max_diff}"
    );
    assert_near_best(&logits, &expected, "gemma3 past the window");
}

/// Logits after `ids` fed as one prefill, and as a prefill of `split` tokens
/// followed by single-token decode steps; and their max difference.
fn stepwise_and_full(model: &LoadedModel, ids: &[u32], split: usize) -> (Vec<f32>, Vec<f32>, f32) {
    let expected = model.new_sequence().unwrap().forward(ids).unwrap();
    let mut stepwise = model.new_sequence().unwrap();
    let mut logits = stepwise.forward(&ids[..split]).unwrap();
    for &id in &ids[split..] {
        logits = stepwise.forward(&[id]).unwrap();
    }
    let max_diff = logits
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    (logits, expected, max_diff)
}

/// Our best token is the full pass's best, or within `GGUF_TOLERANCE` of it
/// (near-ties may swap under quantization noise).
fn assert_near_best(ours: &[f32], expected: &[f32], what: &str) {
    let best = qpai::engine::sampling::argmax(expected);
    let chosen = qpai::engine::sampling::argmax(ours);
    assert!(
        expected[best] - expected[chosen] <= GGUF_TOLERANCE,
        "{what}: picked {chosen} ({}) where the full pass has {best} ({})",
        expected[chosen],
        expected[best]
    );
}
