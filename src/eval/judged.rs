//! The assertions the gateway helps with: `similar` (the cosine of qpai's
//! own embeddings of the answer and the reference) and `llm-rubric` (a
//! judge model scores the answer against a rubric from 0 to 1, answering
//! in a JSON schema; its cost is counted apart from the case's).

use serde_json::{Value, json};

use super::assertions::{Assertion, Check, Verdict, resolve};
use super::output::Output;
use super::similarity::cosine;
use super::suite::Judge;
use crate::gateway::{AnswerBody, EmbeddingInput, EmbeddingRequest, Gateway, Hints};
use crate::money::Usd;
use crate::tenancy::Principal;

const JUDGE_SYSTEM: &str = "You grade an answer against a rubric. Reply with JSON only: \
{\"reason\": one short sentence, \"score\": a number from 0 to 1}, where 1 means the answer \
fully meets the rubric and 0 means it does not meet it at all.";

/// The judge's request for one answer (also its cache key's body).
pub fn judge_body(judge: &Judge, rubric: &str, answer: &str) -> Value {
    json!({
        "model": judge.model,
        "messages": [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": format!("Rubric:\n{rubric}\n\nAnswer:\n{answer}")},
        ],
        "temperature": 0.0,
        "max_tokens": judge.max_tokens,
        "response_format": {"type": "json_schema", "json_schema": {"name": "grade", "strict": true,
            "schema": {"type": "object", "additionalProperties": false,
                "required": ["reason", "score"],
                "properties": {"reason": {"type": "string", "maxLength": 300},
                    "score": {"type": "number", "minimum": 0, "maximum": 1}}}}},
    })
}

/// Reads the judge's answer: its score and reason.
pub fn read_grade(output: &Output) -> Result<(f64, String), String> {
    if let Some(error) = &output.error {
        return Err(format!("the judge failed: {error}"));
    }
    let grade: Value = serde_json::from_str(output.text.trim())
        .map_err(|e| format!("the judge's answer is not JSON ({e}): {:?}", output.text))?;
    let score = grade
        .get("score")
        .and_then(Value::as_f64)
        .filter(|s| (0.0..=1.0).contains(s))
        .ok_or_else(|| format!("the judge gave no score from 0 to 1: {grade}"))?;
    let reason = grade
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Ok((score, reason.to_string()))
}

/// The verdict of a rubric from the judge's answer.
pub fn rubric_verdict(
    assertion: &Assertion,
    grade: Result<(f64, String), String>,
) -> Result<Verdict, String> {
    let (score, reason) = grade?;
    Ok(assertion.verdict(score, 0.5, reason))
}

/// The rubric of an llm-rubric assertion for this case.
pub fn rubric(
    assertion: &Assertion,
    columns: &serde_json::Map<String, Value>,
) -> Result<String, String> {
    match &assertion.check {
        Check::LlmRubric(value) => Ok(match resolve(value, columns)? {
            Value::String(text) => text,
            other => other.to_string(),
        }),
        _ => Err("not a rubric".into()),
    }
}

/// `similar`: the cosine of the embeddings of the answer and the value.
pub async fn similar(
    gateway: &Gateway,
    principal: &Principal,
    hints: &Hints,
    assertion: &Assertion,
    output: &Output,
    columns: &serde_json::Map<String, Value>,
) -> Result<(Verdict, Usd), String> {
    let Check::Similar(value) = &assertion.check else {
        return Err("not a similarity".into());
    };
    let reference = match resolve(value, columns)? {
        Value::String(text) => text,
        other => other.to_string(),
    };
    let model = gateway
        .models
        .embedding_slot()
        .map(|slot| slot.id.clone())
        .ok_or("similar needs an embedding model and this run loads none")?;
    let request = EmbeddingRequest {
        model,
        input: EmbeddingInput::Texts(vec![output.text.trim().to_string(), reference]),
        encoding_format: None,
        dimensions: None,
        user: None,
        other: Default::default(),
    };
    let answer = gateway
        .embed(principal, request, hints)
        .await
        .map_err(|e| format!("embedding failed: {}", e.message))?;
    let AnswerBody::Whole { body, cost } = answer.body else {
        return Err("embeddings came as a stream".into());
    };
    let body = body.to_json();
    let vector = |i: usize| -> Vec<f32> {
        body.pointer(&format!("/data/{i}/embedding"))
            .and_then(Value::as_array)
            .map(|v| {
                v.iter()
                    .filter_map(Value::as_f64)
                    .map(|x| x as f32)
                    .collect()
            })
            .unwrap_or_default()
    };
    let score = cosine(&vector(0), &vector(1));
    Ok((
        assertion.verdict(score, 0.75, format!("cosine {score:.3}")),
        cost,
    ))
}
