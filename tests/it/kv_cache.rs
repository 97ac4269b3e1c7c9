//! The paged KV cache: a prefix-cache hit computes the logits of a full
//! prefill, adapters never share blocks, forks copy a shared block before
//! writing it, f16 and q8_0 caches stay within a measured error of f32, and
//! the engine admits requests by the blocks they may need.

use std::sync::Arc;

use axum::http::StatusCode;
use qpai::engine::{EngineConfig, GenerationEvent, GenerationRequest, SubmitError};
use qpai::lora::Adapter;
use qpai::models::kv_cache::{KvCacheConfig, KvDType};
use qpai::models::loader::LoadOptions;
use qpai::models::{LoadedModel, ModelSource, load_model};
use serde_json::json;

use crate::common::*;

const SYSTEM: &str = "You are the help desk of the Main Street bakery. Answer in one short, \
friendly sentence. The bakery opens at seven on weekdays and at eight on Saturdays, is closed \
on Sundays, and bakes sourdough, rye and seeded loaves every morning.";

fn chat_ids(model: &LoadedModel, question: &str) -> Vec<u32> {
    model
        .encode_prompt(&format!("{SYSTEM}\nQuestion: {question}\nAnswer:"))
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(logits: &[f32]) -> usize {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// A request whose prompt starts with an earlier prompt's whole blocks reads
/// them from the cache, and its logits are those of prefilling it all: on
/// the GGUF model and on the f32 checkpoint.
#[test]
fn a_prefix_cache_hit_gives_the_logits_of_a_full_prefill() {
    for model in [
        load_catalog_model_with(CHAT_MODEL, KvCacheConfig::default()),
        f32_checkpoint_with(KvCacheConfig::default()),
    ] {
        prefix_cache_hit_gives_the_full_prefill(&model);
    }
}

fn prefix_cache_hit_gives_the_full_prefill(model: &LoadedModel) {
    let first = chat_ids(model, "When do you open on Saturdays?");
    let second = chat_ids(model, "Do you bake rye bread?");
    model.new_sequence().unwrap().forward(&first).unwrap();
    let before = model.kv_usage().unwrap().prefix;
    let mut hit = model.new_sequence().unwrap();
    let reused = hit.reuse_prefix(&second);
    let shared = first
        .iter()
        .zip(&second)
        .take_while(|(a, b)| a == b)
        .count();
    assert_eq!(reused, shared / 16 * 16, "whole shared blocks are reused");
    assert!(reused >= 32, "{shared} shared tokens, {reused} reused");
    assert_eq!(hit.position(), reused);
    let logits = hit.forward(&second[reused..]).unwrap();
    // The full prefill: a fresh sequence that looks nothing up.
    let expected = model.new_sequence().unwrap().forward(&second).unwrap();
    let diff = max_abs_diff(&logits, &expected);
    eprintln!(
        "prefix hit: {reused} of {} tokens reused, max |diff| {diff}",
        second.len()
    );
    assert_eq!(
        logits, expected,
        "{}: hit and full prefill differ",
        model.id
    );
    assert_eq!(argmax(&logits), argmax(&expected));
    let after = model.kv_usage().unwrap().prefix;
    assert_eq!(after.hit_tokens - before.hit_tokens, reused as u64);
    // Decoding on from the hit goes on like the full prefill.
    let token = argmax(&logits) as u32;
    let mut full = model.new_sequence().unwrap();
    full.forward(&second).unwrap();
    assert_eq!(
        hit.forward(&[token]).unwrap(),
        full.forward(&[token]).unwrap(),
        "{}: the next step differs",
        model.id
    );
}

/// A decode step of one sequence and a prompt chunk of another in one
/// forward pass (the engine's mixed steps) give what each gives alone, on
/// the GGUF model and on the f32 checkpoint.
#[test]
fn decode_rows_and_a_prompt_chunk_in_one_pass_equal_separate_passes() {
    for model in [chat_model(), f32_checkpoint()] {
        mixed_pass_equals_separate_passes(model);
    }
}

fn mixed_pass_equals_separate_passes(model: &LoadedModel) {
    let first = chat_ids(model, "Are you open on Sundays?");
    let second = chat_ids(model, "Which breads do you bake?");
    let mut decoding = model.new_sequence().unwrap();
    let token = argmax(&decoding.forward(&first).unwrap()) as u32;
    let mut prefilling = model.new_sequence().unwrap();
    let mut together = [decoding.fork(), prefilling.fork()];
    let mut refs: Vec<_> = together.iter_mut().collect();
    let inputs: [&[u32]; 2] = [&[token], &second[..40]];
    let batched: Vec<Vec<f32>> = model
        .forward_batch(&mut refs, &inputs)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let alone = [
        decoding.forward(&[token]).unwrap(),
        prefilling.forward(&second[..40]).unwrap(),
    ];
    for (b, a) in batched.iter().zip(&alone) {
        assert_eq!(b, a, "{}: batched and alone differ", model.id);
    }
    assert_eq!(together[1].position(), 40);
}

fn tiny_llama(kv_cache: KvCacheConfig) -> LoadedModel {
    let path = fixtures_dir().join("tiny/llama-f32.gguf");
    let mut options = LoadOptions::new("tiny-llama");
    options.device = candle_core::Device::Cpu;
    options.kv_cache = kv_cache;
    load_model(&ModelSource::from_path(&path).unwrap(), &options).unwrap()
}

/// Blocks are named by the model variant that computed them: the base and
/// each loaded adapter find only their own.
#[test]
fn adapters_never_share_prefix_blocks() {
    let model = tiny_llama(KvCacheConfig::default());
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 500).collect();
    let adapter = Adapter::load(&fixtures_dir().join("lora/r4-all")).unwrap();
    let prepared = model.prepare_adapter(&adapter).unwrap();
    let run = |adapter: Option<&Arc<_>>, reuse: bool| {
        let mut sequence = model.new_sequence_with(adapter).unwrap();
        let reused = if reuse {
            sequence.reuse_prefix(&prompt)
        } else {
            0
        };
        (reused, sequence.forward(&prompt[reused..]).unwrap())
    };
    let (_, base) = run(None, false);
    let (reused, with_adapter) = run(Some(&prepared), true);
    assert_eq!(reused, 0, "the adapter must not read the base's blocks");
    assert!(
        max_abs_diff(&base, &with_adapter) > 1e-3,
        "the adapter changes the logits"
    );
    let (reused, again) = run(Some(&prepared), true);
    assert_eq!(reused, 32);
    assert!(max_abs_diff(&again, &with_adapter) <= 1e-5);
    let (reused, base_again) = run(None, true);
    assert_eq!(reused, 32);
    assert!(max_abs_diff(&base_again, &base) <= 1e-5);
    // The same adapter loaded again is another variant: no sharing either.
    let reloaded = model.prepare_adapter(&adapter).unwrap();
    assert_eq!(run(Some(&reloaded), true).0, 0);
}

/// A fork shares its parent's blocks, partly filled one included; each
/// copies that block before writing into it, so both go on as if alone.
#[test]
fn forks_copy_a_shared_block_before_writing_it() {
    let model = tiny_llama(KvCacheConfig {
        prefix_cache: false,
        ..KvCacheConfig::default()
    });
    let prompt: Vec<u32> = (0..20).map(|i| (i * 13 + 5) % 500).collect();
    let mut parent = model.new_sequence().unwrap();
    parent.forward(&prompt).unwrap();
    let used = model.kv_usage().unwrap().used_blocks;
    assert_eq!(used, 2);
    let mut child = parent.fork();
    assert_eq!(model.kv_usage().unwrap().used_blocks, 2, "a fork shares");
    let parent_logits = parent.forward(&[7, 8]).unwrap();
    let child_logits = child.forward(&[9]).unwrap();
    assert_eq!(
        model.kv_usage().unwrap().used_blocks,
        3,
        "one copy on write"
    );
    for (tail, logits) in [(&[7u32, 8][..], parent_logits), (&[9][..], child_logits)] {
        let mut alone = model.new_sequence().unwrap();
        let ids: Vec<u32> = prompt.iter().chain(tail).copied().collect();
        let expected = alone.forward(&ids).unwrap();
        assert!(max_abs_diff(&logits, &expected) <= 1e-5, "after {tail:?}");
    }
    drop((parent, child));
    assert_eq!(model.kv_usage().unwrap().used_blocks, 0);
}

/// f16 and q8_0 caches: their memory and their logit error against the f32
/// cache over a prompt and 16 greedy steps (figures in docs/perf.md).
#[test]
fn kv_cache_types_trade_memory_for_a_bounded_logit_error() {
    let load = |dtype| {
        load_catalog_model_with(
            CHAT_MODEL,
            KvCacheConfig {
                megabytes: Some(64),
                dtype,
                ..KvCacheConfig::default()
            },
        )
    };
    let run = |model: &LoadedModel, steps: &[u32]| {
        let ids = chat_ids(model, "What do you bake every morning?");
        let mut sequence = model.new_sequence().unwrap();
        let mut all = vec![sequence.forward(&ids).unwrap()];
        for &token in steps {
            all.push(sequence.forward(&[token]).unwrap());
        }
        all
    };
    let reference = load(KvDType::F32);
    // The greedy tokens of the f32 run, fed to every cache type alike.
    let mut steps = Vec::new();
    {
        let ids = chat_ids(&reference, "What do you bake every morning?");
        let mut sequence = reference.new_sequence().unwrap();
        let mut logits = sequence.forward(&ids).unwrap();
        for _ in 0..16 {
            let token = argmax(&logits) as u32;
            steps.push(token);
            logits = sequence.forward(&[token]).unwrap();
        }
    }
    let expected = run(&reference, &steps);
    let blocks_f32 = reference.kv_usage().unwrap().total_blocks;
    // Bounds: the size of one rounding flip in the 8-bit quantized
    // activations of the next matmul (reference.rs, GGUF_TOLERANCE).
    for (dtype, bound) in [(KvDType::F16, 1.5), (KvDType::Q8_0, 3.0)] {
        let model = load(dtype);
        let got = run(&model, &steps);
        let mut worst = 0f32;
        let mut worst_top = 0f32;
        let mut mean = 0f64;
        for (g, e) in got.iter().zip(&expected) {
            worst = worst.max(max_abs_diff(g, e));
            mean += g
                .iter()
                .zip(e)
                .map(|(a, b)| (a - b).abs() as f64)
                .sum::<f64>()
                / e.len() as f64;
            let mut order: Vec<usize> = (0..e.len()).collect();
            order.sort_by(|&a, &b| e[b].total_cmp(&e[a]));
            for &i in &order[..10] {
                worst_top = worst_top.max((g[i] - e[i]).abs());
            }
        }
        mean /= got.len() as f64;
        let same_top = got
            .iter()
            .zip(&expected)
            .filter(|(g, e)| argmax(g) == argmax(e))
            .count();
        let blocks = model.kv_usage().unwrap().total_blocks;
        eprintln!(
            "{dtype}: max |logit diff| {worst:.4} (over the f32 top-10: {worst_top:.4}, mean {mean:.4}) over {} steps, same top-1 in {same_top}, {:.2}x the f32 cache's tokens in the same memory",
            got.len(),
            blocks as f64 / blocks_f32 as f64
        );
        assert!(
            worst_top < bound,
            "{dtype}: max |logit diff| over the top-10 {worst_top}"
        );
        assert!(
            same_top + 2 >= got.len(),
            "{dtype}: top-1 differs in {} steps",
            got.len() - same_top
        );
        assert!(
            blocks >= blocks_f32 * 19 / 10,
            "{dtype}: {blocks} vs {blocks_f32} blocks"
        );
    }
}

fn greedy(ids: Vec<u32>, max_new_tokens: usize) -> GenerationRequest {
    GenerationRequest::greedy(ids, max_new_tokens)
}

/// With room for about two requests' blocks, three at once all finish
/// (without admission by memory they would run together and the third would
/// find the cache full); one that could never fit is refused up front, and
/// over HTTP that is a 400 naming max_tokens.
#[tokio::test]
async fn admission_waits_for_kv_blocks_and_refuses_what_never_fits() {
    // SmolLM2 in f32: 30 layers x 2 x 192 values x 4 bytes = 45 KiB a token,
    // 720 KiB a block of 16: 8 MiB hold 11 blocks.
    let model = load_catalog_model_with(
        CHAT_MODEL,
        KvCacheConfig {
            megabytes: Some(8),
            ..KvCacheConfig::default()
        },
    );
    let total = model.kv_usage().unwrap().total_blocks;
    assert_eq!(total, 11);
    let config = EngineConfig {
        max_running: 4,
        ..EngineConfig::default()
    };
    let (app, engine) = app_for(model, config);
    let prompts: Vec<Vec<u32>> = ["Hours?", "Rye?", "Sundays?"]
        .iter()
        .map(|q| chat_ids(engine.model(), q))
        .collect();
    // Each may need its prompt's blocks (about 4) + 48 new tokens (3) + 1:
    // about 8 of the 11, so they run one at a time.
    let mut streams: Vec<_> = prompts
        .iter()
        .map(|ids| engine.submit(greedy(ids.clone(), 48)).unwrap())
        .collect();
    for stream in &mut streams {
        let mut generated = 0;
        while let Some(event) = stream.next().await {
            match event {
                GenerationEvent::Error(message) => panic!("request failed: {message}"),
                GenerationEvent::End {
                    completion_tokens, ..
                } => generated = completion_tokens,
                _ => {}
            }
        }
        assert!(generated > 0);
    }
    let usage = engine.model().kv_usage().unwrap();
    assert_eq!(usage.used_blocks, 0, "finished requests hold no blocks");
    assert!(
        usage.prefix.hit_tokens > 0,
        "the shared system prompt was reused"
    );
    let too_long = engine.submit(greedy(prompts[0].clone(), 400));
    assert!(
        matches!(too_long, Err(SubmitError::KvCacheTooSmall { capacity_tokens, .. }) if capacity_tokens == total * 16)
    );
    let (status, body) = send_json(
        &app,
        post_json(
            "/v1/chat/completions",
            &json!({"model": CHAT_MODEL, "max_tokens": 1000,
                    "messages": [{"role": "user", "content": "Hi"}]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "max_tokens");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--kv-cache-mb"),
        "{body}"
    );
}
