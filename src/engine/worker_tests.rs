//! The scheduler with a fake model: a byte-level vocabulary (one token per
//! byte, plus an end token) and logits that always prefer one byte. What the
//! worker does around the model (grammar masks, forced tokens, batching
//! constrained and free choices, logit_bias, limits) is then exact and fast
//! to check.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::constraint::{Constraint, GrammarCompiler, GrammarSpec};
use super::step_model::StepModel;
use super::worker::{Job, Worker};
use super::{
    EngineConfig, EngineStats, FinishReason, GenerationEvent, GenerationRequest, Priority,
    SamplingParams,
};
use crate::lora::UnmergedAdapter;
use crate::models::SequenceModel;

const EOS: u32 = 256;
const VOCAB: usize = 257;
const FAVOURITE: u32 = b'z' as u32;

/// GPT-2's byte-to-character map: token `b` is byte `b`.
fn byte_chars() -> Vec<char> {
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            let c = char::from_u32(b).unwrap();
            if matches!(c, '!'..='~' | '\u{a1}'..='\u{ac}' | '\u{ae}'..='\u{ff}') {
                c
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap()
            }
        })
        .collect()
}

fn byte_tokenizer() -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    for (id, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(id));
    }
    vocab.insert("<eos>".into(), json!(EOS));
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": false});
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": EOS, "content": "<eos>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []},
    });
    Tokenizer::from_str(&spec.to_string()).unwrap()
}

struct FakeModel {
    tokenizer: Tokenizer,
    /// The most tokens fed to one sequence in one forward pass.
    widest_feed: Arc<AtomicUsize>,
    /// Each prompt's first token, in the order prompts were first fed.
    prompts_fed: Arc<Mutex<Vec<u32>>>,
}

struct FakeSequence {
    position: usize,
    widest_feed: Arc<AtomicUsize>,
    prompts_fed: Arc<Mutex<Vec<u32>>>,
}

impl SequenceModel for FakeSequence {
    fn forward(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        if self.position == 0 {
            self.prompts_fed.lock().unwrap().extend(tokens.first());
        }
        self.position += tokens.len();
        self.widest_feed.fetch_max(tokens.len(), Ordering::SeqCst);
        // Lower ids slightly preferred, so masked draws are deterministic.
        let mut logits: Vec<f32> = (0..VOCAB).map(|i| -(i as f32) * 1e-3).collect();
        logits[FAVOURITE as usize] = 5.0;
        Ok(logits)
    }

    fn position(&self) -> usize {
        self.position
    }

    fn fork(&self) -> Box<dyn SequenceModel> {
        Box::new(FakeSequence {
            position: self.position,
            widest_feed: self.widest_feed.clone(),
            prompts_fed: self.prompts_fed.clone(),
        })
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl StepModel for FakeModel {
    fn id(&self) -> &str {
        "fake"
    }

    fn new_sequence(
        &self,
        _adapter: Option<&Arc<UnmergedAdapter>>,
    ) -> candle_core::Result<Box<dyn SequenceModel>> {
        Ok(Box::new(FakeSequence {
            position: 0,
            widest_feed: self.widest_feed.clone(),
            prompts_fed: self.prompts_fed.clone(),
        }))
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn eos_token_ids(&self) -> &[u32] {
        &[EOS]
    }

    fn context_length(&self) -> usize {
        512
    }
}

fn request(max_new_tokens: usize, constraint: Option<Constraint>) -> GenerationRequest {
    GenerationRequest {
        constraint,
        ..GenerationRequest::greedy(vec![b'?' as u32], max_new_tokens)
    }
}

fn schema_constraint(schema: Value) -> Constraint {
    GrammarCompiler::new(Arc::new(byte_tokenizer()), vec![EOS])
        .compile(GrammarSpec::JsonSchema {
            schema,
            lenient: false,
        })
        .unwrap()
}

/// Each choice's text and finish reason.
type Outcome = Vec<(String, FinishReason)>;

/// Runs the requests in one worker (all admitted in its first loop, so they
/// share every batch) and returns each one's choices; also the widest feed.
fn run(requests: Vec<GenerationRequest>) -> (Vec<Outcome>, usize) {
    let (outcomes, widest_feed, _) = run_with(requests, EngineConfig::default());
    (outcomes, widest_feed)
}

/// `run` with this config; also returns each prompt's first token in the
/// order the worker admitted them.
fn run_with(
    requests: Vec<GenerationRequest>,
    config: EngineConfig,
) -> (Vec<Outcome>, usize, Vec<u32>) {
    let widest_feed = Arc::new(AtomicUsize::new(0));
    let prompts_fed = Arc::new(Mutex::new(Vec::new()));
    let model = FakeModel {
        tokenizer: byte_tokenizer(),
        widest_feed: widest_feed.clone(),
        prompts_fed: prompts_fed.clone(),
    };
    let stats = Arc::new(EngineStats::new("fake"));
    let worker = Worker::new(Arc::new(model), config, stats.clone());
    let (jobs, queue) = mpsc::sync_channel(requests.len());
    let mut receivers = Vec::new();
    for request in requests {
        let n = request.n;
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        stats.waiting.fetch_add(1, Ordering::SeqCst);
        jobs.send(Job {
            request,
            events,
            span: tracing::Span::none(),
            enqueued_at: Instant::now(),
        })
        .unwrap();
        receivers.push((n, receiver));
    }
    drop(jobs);
    worker.run(queue);
    let outcomes = receivers
        .into_iter()
        .map(|(n, mut receiver)| {
            let mut texts = vec![String::new(); n];
            let mut finishes = vec![None; n];
            while let Ok(event) = receiver.try_recv() {
                match event {
                    GenerationEvent::Token { choice, text, .. } => texts[choice].push_str(&text),
                    GenerationEvent::End {
                        choice,
                        finish_reason,
                        ..
                    } => finishes[choice] = Some(finish_reason),
                    GenerationEvent::Error(message) => panic!("{message}"),
                }
            }
            texts
                .into_iter()
                .zip(finishes)
                .map(|(text, finish)| (text, finish.expect("every choice ends")))
                .collect()
        })
        .collect();
    let admitted = prompts_fed.lock().unwrap().clone();
    (outcomes, widest_feed.load(Ordering::SeqCst), admitted)
}

fn object_schema() -> Value {
    json!({"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 6},
        "count": {"type": "integer"}},
        "required": ["title", "count"], "additionalProperties": false})
}

#[test]
fn without_a_grammar_the_model_has_its_way() {
    let (outcomes, _) = run(vec![request(5, None)]);
    assert_eq!(outcomes[0], [("zzzzz".to_string(), FinishReason::Length)]);
}

#[test]
fn a_grammar_overrides_the_model_and_ends_the_answer() {
    let (outcomes, widest_feed) = run(vec![request(100, Some(schema_constraint(object_schema())))]);
    let (text, finish) = &outcomes[0][0];
    assert_eq!(*finish, FinishReason::Stop, "{text}");
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(
        value["title"].as_str().is_some_and(|t| t.len() <= 6),
        "{text}"
    );
    // An integer (serde_json reads "-0" as a float).
    assert!(
        value["count"].as_f64().is_some_and(|n| n.fract() == 0.0),
        "{text}"
    );
    assert!(!text.contains('.'), "{text}");
    assert!(
        text.starts_with("{\"title\": \""),
        "the fixed layout: {text}"
    );
    // The keys and separators were forced, and fed to the model together.
    assert!(widest_feed > 1, "widest feed {widest_feed}");
}

#[test]
fn constrained_and_free_choices_share_a_batch_unchanged() {
    let alone = (
        run(vec![request(40, Some(schema_constraint(object_schema())))]).0,
        run(vec![request(7, None)]).0,
    );
    let (together, _) = run(vec![
        request(40, Some(schema_constraint(object_schema()))),
        request(7, None),
    ]);
    assert_eq!(together[0], alone.0[0]);
    assert_eq!(together[1], alone.1[0]);
}

#[test]
fn each_of_n_sampled_choices_keeps_its_own_grammar() {
    let mut sampled = request(60, Some(schema_constraint(object_schema())));
    sampled.n = 3;
    sampled.sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(5),
        ..SamplingParams::default()
    };
    let (outcomes, _) = run(vec![sampled]);
    assert_eq!(outcomes[0].len(), 3);
    for (text, finish) in &outcomes[0] {
        assert_eq!(*finish, FinishReason::Stop, "{text}");
        serde_json::from_str::<Value>(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    }
}

#[test]
fn max_tokens_cuts_a_constrained_answer_with_length() {
    let (outcomes, _) = run(vec![request(3, Some(schema_constraint(object_schema())))]);
    let (text, finish) = &outcomes[0][0];
    assert_eq!(*finish, FinishReason::Length);
    assert!(text.starts_with("{\""), "{text}");
    assert!(serde_json::from_str::<Value>(text).is_err());
}

#[test]
fn logit_bias_moves_the_choice_in_the_worker() {
    let mut banned = request(3, None);
    banned.logit_bias = vec![(FAVOURITE, -100.0)];
    let (outcomes, _) = run(vec![banned]);
    // Without its favourite the model takes the lowest id: byte 0.
    assert_eq!(outcomes[0][0].0, "\0\0\0");
}

#[test]
fn forced_tokens_save_draws_but_change_nothing() {
    let forced = run(vec![request(100, Some(schema_constraint(object_schema())))]);
    let drawn = run(vec![request(
        100,
        Some(schema_constraint(object_schema()).without_forced_tokens()),
    )]);
    assert_eq!(forced.0, drawn.0);
    assert!(forced.1 > 1);
    assert_eq!(drawn.1, 1, "every token fed on its own");
}

#[test]
fn live_requests_are_admitted_before_batch_work_and_keep_a_slot() {
    let prompt = |byte: u8, priority| GenerationRequest {
        priority,
        ..GenerationRequest::greedy(vec![u32::from(byte)], 3)
    };
    let config = EngineConfig {
        max_running: 2,
        ..EngineConfig::default()
    };
    // Queued in this order; all waiting when the worker starts.
    let requests = vec![
        prompt(b'a', Priority::Batch),
        prompt(b'b', Priority::Batch),
        prompt(b'L', Priority::Live),
        prompt(b'M', Priority::Live),
    ];
    let (outcomes, _, admitted) = run_with(requests, config);
    assert_eq!(outcomes.len(), 4);
    assert!(outcomes.iter().all(|o| o[0].0 == "zzz"), "{outcomes:?}");
    // Both live requests first; batch work never held both slots, so one
    // batch line waited for the other.
    assert_eq!(admitted, [b'L', b'M', b'a', b'b'].map(u32::from));
    assert_eq!(super::worker::batch_slots(2), 1);
    assert_eq!(super::worker::batch_slots(8), 6);
    assert_eq!(super::worker::batch_slots(1), 1);
}
