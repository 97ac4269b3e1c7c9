//! Tokenizers and chat templates built from GGUF metadata, against the
//! reference (transformers' tokenizer for the same GGUF file, fixtures from
//! scripts/reference/make_fixtures.py).

use qpai::models::{LoadedModel, TemplateMessage};
use serde_json::Value;

use crate::common::*;

fn check_tokenizer(model: &LoadedModel, fixture_name: &str) {
    let fixture = fixture(fixture_name);
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 30, "fixture has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let ids = model
            .tokenizer
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        if ids != expected {
            failures.push(format!(
                "encode {text:?}: got {ids:?}, reference {expected:?}"
            ));
            continue;
        }
        let decoded = model.tokenizer.decode(&ids, false).unwrap();
        let reference = case["decoded"].as_str().unwrap();
        if decoded != reference {
            failures.push(format!(
                "decode {text:?}: got {decoded:?}, reference {reference:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_gguf_tokenizer_matches_the_reference() {
    check_tokenizer(chat_model(), "tokenizer_smollm2.json");
}

#[test]
fn gemma3_gguf_tokenizer_matches_the_reference() {
    check_tokenizer(base_model(), "tokenizer_gemma3.json");
}

fn messages(value: &Value) -> Vec<TemplateMessage> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|m| TemplateMessage {
            role: m["role"].as_str().unwrap().to_string(),
            content: m["content"].as_str().unwrap().to_string(),
            name: None,
        })
        .collect()
}

#[test]
fn smollm2_chat_template_renders_like_the_reference() {
    let fixture = fixture("chat_template_smollm2.json");
    let template = chat_model()
        .chat_template
        .as_ref()
        .expect("SmolLM2 has a chat template");
    for case in fixture["cases"].as_array().unwrap() {
        let msgs = messages(&case["messages"]);
        assert_eq!(
            template.render(&msgs, true).unwrap(),
            case["rendered"].as_str().unwrap(),
            "{}",
            case["name"]
        );
        assert_eq!(
            template.render(&msgs, false).unwrap(),
            case["rendered_without_generation_prompt"].as_str().unwrap(),
            "{}",
            case["name"]
        );
    }
}
