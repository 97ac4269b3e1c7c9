//! The eval harness on qpai's own models: a JSON-extraction suite on
//! SmolLM2 with structured output, graded by a judge model (SmolLM2 again,
//! answering in a schema) and by embedding similarity, every call in the
//! ledger under the run; and the harness's JSON Schema checks compared
//! with Python's `jsonschema`, an independent validator.

use std::process::Command;

use qpai::ledger::Db;
use serde_json::{Value, json};

use crate::common::{CHAT_MODEL, chat_model};
use crate::eval_cli::{read_json, result_lines};

fn python() -> String {
    std::env::var("QPAI_TEST_PYTHON")
        .expect("QPAI_TEST_PYTHON is not set: run the tests with scripts/test.sh")
}

/// Python's verdict (Draft 2020-12) on each (schema, instance).
fn python_verdicts(pairs: &[(Value, Value)]) -> Vec<bool> {
    let script = "import json, sys\nfrom jsonschema import Draft202012Validator\n\
                  pairs = json.load(sys.stdin)\n\
                  print(json.dumps([Draft202012Validator(s).is_valid(i) for s, i in pairs]))\n";
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input: Vec<Value> = pairs.iter().map(|(s, i)| json!([s, i])).collect();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        Value::from(input).to_string().as_bytes(),
    )
    .unwrap();
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn the_schema_checks_agree_with_python_jsonschema() {
    let product = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "price": {"type": "number", "exclusiveMinimum": 0, "multipleOf": 0.01},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "uniqueItems": true, "maxItems": 3},
            "size": {"enum": ["S", "M", "L"]},
            "stock": {"type": "integer", "minimum": 0},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "kind": {"oneOf": [{"const": "bulb"}, {"const": "tool"}]},
            "dims": {"type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}], "items": false}
        },
        "required": ["name", "price"],
        "additionalProperties": false,
        "$defs": {"tag": {"type": "string", "pattern": "^[a-z-]+$"}}
    });
    let instances = [
        json!({"name": "Tulip", "price": 3.5}),
        json!({"name": "Tulip", "price": 3.555}),
        json!({"name": "", "price": 1}),
        json!({"name": "A very long product name", "price": 1}),
        json!({"name": "Tulip", "price": 0}),
        json!({"name": "Tulip"}),
        json!({"name": "Tulip", "price": 2, "colour": "red"}),
        json!({"name": "Tulip", "price": 2, "tags": ["red", "spring-bulb"]}),
        json!({"name": "Tulip", "price": 2, "tags": ["red", "red"]}),
        json!({"name": "Tulip", "price": 2, "tags": ["Red"]}),
        json!({"name": "Tulip", "price": 2, "tags": ["a", "b", "c", "d"]}),
        json!({"name": "Tulip", "price": 2, "size": "XL"}),
        json!({"name": "Tulip", "price": 2, "stock": 3.0}),
        json!({"name": "Tulip", "price": 2, "stock": 2.5}),
        json!({"name": "Tulip", "price": 2, "stock": -1}),
        json!({"name": "Tulip", "price": 2, "note": null}),
        json!({"name": "Tulip", "price": 2, "note": 4}),
        json!({"name": "Tulip", "price": 2, "kind": "tool"}),
        json!({"name": "Tulip", "price": 2, "kind": "seed"}),
        json!({"name": "Tulip", "price": 2, "dims": [1, 2]}),
        json!({"name": "Tulip", "price": 2, "dims": [1, 2, 3]}),
        json!({"name": "Tulip", "price": 2, "dims": [1, "2"]}),
        json!({"name": 7, "price": 2}),
        json!([1, 2]),
        json!("text"),
        json!(null),
    ];
    let pairs: Vec<(Value, Value)> = instances
        .iter()
        .map(|i| (product.clone(), i.clone()))
        .collect();
    let python = python_verdicts(&pairs);
    for ((_, instance), expected) in pairs.iter().zip(python) {
        let ours = qpai::structured::instance::validate(&product, instance);
        assert_eq!(ours.is_ok(), expected, "{instance}: {ours:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_suite_is_graded_by_a_judge_and_by_embeddings() {
    chat_model();
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        json!({"id": "tulip", "text": "Tulip bulbs, red, in stock now.", "topic": "tulip bulbs"}),
        json!({"id": "can", "text": "A steel watering can, sold out until May.", "topic": "a watering can"}),
    ];
    let data: Vec<String> = rows.iter().map(Value::to_string).collect();
    std::fs::write(dir.path().join("items.jsonl"), data.join("\n")).unwrap();
    let suite = format!(
        r#"name = "extract"
[dataset]
path = "items.jsonl"
[defaults]
max_tokens = 48
temperature = 0.0
[variants]
prompts = [{{ label = "extract", messages = [{{ role = "user", content = "Extract the product name and whether it is in stock: {{{{ text }}}}" }}] }}]
models = ["{CHAT_MODEL}"]
response_format = {{ type = "json_schema", json_schema = {{ name = "item", strict = true, schema = {{ type = "object", additionalProperties = false, required = ["name", "in_stock"], properties = {{ name = {{ type = "string", maxLength = 24 }}, in_stock = {{ type = "boolean" }} }} }} }} }}
[judge]
model = "{CHAT_MODEL}"
max_tokens = 60
[[assert]]
type = "is-json"
[[assert]]
type = "json-schema"
[[assert]]
type = "llm-rubric"
value = "The answer names the product in {{{{ text }}}}."
threshold = 0.0
[[assert]]
type = "similar"
value = "{{{{ topic }}}}"
threshold = -1.0
"#
    );
    let suite_path = dir.path().join("suite.toml");
    std::fs::write(&suite_path, suite).unwrap();
    let out = crate::eval_cli::run_suite(dir.path(), &suite_path);
    let lines = result_lines(&out);
    assert_eq!(lines.len(), 2);
    let schema = json!({"type": "object", "additionalProperties": false, "required": ["name", "in_stock"],
        "properties": {"name": {"type": "string", "maxLength": 24}, "in_stock": {"type": "boolean"}}});
    for line in &lines {
        let verdicts = line["verdicts"].as_array().unwrap();
        assert_eq!(verdicts.len(), 4, "{line}");
        let text = line["output"]["text"].as_str().unwrap();
        assert!(line["output"]["ttft_ms"].as_f64().unwrap() > 0.0);
        // The schema verdict is Python's.
        let parsed: Option<Value> = serde_json::from_str(text).ok();
        let valid = parsed.is_some_and(|value| python_verdicts(&[(schema.clone(), value)])[0]);
        assert_eq!(verdicts[1]["pass"], valid, "{text}");
        // The judge answered in its schema: a score from 0 to 1.
        let rubric = &verdicts[2];
        let score = rubric["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{rubric}");
        assert_eq!(
            rubric["pass"], true,
            "a threshold of 0 passes any grade: {rubric}"
        );
        // The cosine of two all-MiniLM embeddings.
        let similar = &verdicts[3];
        assert!(
            similar["reason"].as_str().unwrap().starts_with("cosine "),
            "{similar}"
        );
    }
    let summary = read_json(&out.join("results.json"));
    let run = summary["run_id"].as_str().unwrap();
    let db = Db::open(&format!(
        "sqlite://{}",
        dir.path().join("qpai.db").display()
    ))
    .await
    .unwrap();
    let rows = db
        .query(
            "SELECT endpoint, COUNT(*) FROM usage_ledger WHERE eval_run = $1 GROUP BY endpoint ORDER BY endpoint",
            vec![run.into()],
        )
        .await
        .unwrap();
    let counts: Vec<(String, i64)> = rows
        .iter()
        .map(|r| (r[0].text().unwrap().to_string(), r[1].int().unwrap()))
        .collect();
    // Two answers and two gradings; two similarity embeddings.
    assert_eq!(
        counts,
        [
            ("chat.completions".to_string(), 4),
            ("embeddings".to_string(), 2)
        ]
    );
}
