//! Assertions: what a case's answer must satisfy. Each has a weight, an
//! optional threshold and may be negated (`not = true`); each gives a
//! score from 0 to 1 and a pass. Values may name the case's columns
//! (`"{{ expected }}"`: a whole-value reference keeps the column's type,
//! so a list of gold URLs stays a list).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::output::Output;
use super::rag_checks::{check_citations, gold_urls, ranking_scores};
use super::similarity;
use super::suite::Shared;

/// The value of a fallible step, or the check's error.
macro_rules! or_fail {
    ($result:expr) => {
        match $result {
            Ok(value) => value,
            Err(error) => return Some(Err(error)),
        }
    };
}

/// The assertion types.
pub const TYPES: &[&str] = &[
    "equals",
    "contains",
    "icontains",
    "contains-all",
    "contains-any",
    "icontains-all",
    "icontains-any",
    "starts-with",
    "regex",
    "is-json",
    "json-schema",
    "json-fields",
    "tool-call",
    "levenshtein",
    "rouge-l",
    "bleu",
    "similar",
    "finish-reason",
    "cost",
    "latency",
    "llm-rubric",
    "citations",
    "recall-at-k",
    "mrr",
];

#[derive(Debug, Clone)]
pub enum Check {
    Equals(Value),
    Contains {
        values: Value,
        all: bool,
        ignore_case: bool,
    },
    StartsWith(Value),
    Regex(regex::Regex),
    IsJson,
    /// Against this schema, else the suite's `response_format` schema.
    JsonSchema(Option<Value>),
    /// The share of this object's fields the JSON answer has, equal.
    JsonFields(Value),
    /// A call of this function (any, when None) with valid arguments.
    ToolCall(Option<String>),
    Levenshtein(Value),
    RougeL(Value),
    Bleu(Value),
    /// Cosine of qpai's embeddings of the answer and the value.
    Similar(Value),
    FinishReason(String),
    /// Most dollars (the threshold).
    Cost,
    /// Most milliseconds (the threshold).
    Latency,
    LlmRubric(Value),
    Citations,
    RecallAtK {
        gold: Value,
        k: usize,
    },
    Mrr {
        gold: Value,
        k: usize,
    },
}

#[derive(Debug, Clone)]
pub struct Assertion {
    pub check: Check,
    /// How it is shown: its type, or the suite's label.
    pub label: String,
    pub weight: f64,
    pub threshold: Option<f64>,
    pub negate: bool,
}

/// One assertion's verdict on one answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub assertion: String,
    pub pass: bool,
    pub score: f64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssertionFile {
    #[serde(rename = "type")]
    kind: String,
    value: Option<Value>,
    label: Option<String>,
    #[serde(default = "one")]
    weight: f64,
    threshold: Option<f64>,
    #[serde(default, rename = "not")]
    negate: bool,
    /// json-schema: a schema file relative to the suite.
    schema_file: Option<std::path::PathBuf>,
    /// recall-at-k and mrr: the rank cut-off.
    k: Option<usize>,
}

fn one() -> f64 {
    1.0
}

impl Assertion {
    /// Reads one `[[assert]]` table; files are relative to `base`.
    pub fn parse(value: &Value, base: &Path) -> Result<Assertion, String> {
        let file: AssertionFile =
            serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        let needs_value = || {
            file.value
                .clone()
                .ok_or_else(|| format!("{} needs a value", file.kind))
        };
        let text_value = || match needs_value()? {
            Value::String(text) => Ok(text),
            other => Err(format!("{} takes a string value, not {other}", file.kind)),
        };
        let kind = file.kind.as_str();
        let check = match kind {
            "equals" => Check::Equals(needs_value()?),
            "contains" | "icontains" | "contains-all" | "contains-any" | "icontains-all"
            | "icontains-any" => Check::Contains {
                values: needs_value()?,
                all: !kind.ends_with("-any"),
                ignore_case: kind.starts_with('i'),
            },
            "starts-with" => Check::StartsWith(needs_value()?),
            "regex" => Check::Regex(
                regex::Regex::new(&text_value()?).map_err(|e| format!("the regex: {e}"))?,
            ),
            "is-json" => Check::IsJson,
            "json-schema" => Check::JsonSchema(match (&file.value, &file.schema_file) {
                (Some(schema), _) => Some(schema.clone()),
                (None, Some(relative)) => {
                    let path = base.join(relative);
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("reading {}: {e}", path.display()))?;
                    Some(
                        serde_json::from_str(&text)
                            .map_err(|e| format!("{}: {e}", path.display()))?,
                    )
                }
                (None, None) => None,
            }),
            "json-fields" => Check::JsonFields(needs_value()?),
            "tool-call" => Check::ToolCall(file.value.as_ref().map(|_| text_value()).transpose()?),
            "levenshtein" => Check::Levenshtein(needs_value()?),
            "rouge-l" => Check::RougeL(needs_value()?),
            "bleu" => Check::Bleu(needs_value()?),
            "similar" => Check::Similar(needs_value()?),
            "finish-reason" => Check::FinishReason(text_value()?),
            "cost" | "latency" if file.threshold.is_none() => {
                return Err(format!("{kind} needs a threshold (the most allowed)"));
            }
            "cost" => Check::Cost,
            "latency" => Check::Latency,
            "llm-rubric" => Check::LlmRubric(needs_value()?),
            "citations" => Check::Citations,
            "recall-at-k" => Check::RecallAtK {
                gold: needs_value()?,
                k: file.k.unwrap_or(5),
            },
            "mrr" => Check::Mrr {
                gold: needs_value()?,
                k: file.k.unwrap_or(10),
            },
            unknown => {
                return Err(format!(
                    "unknown assertion type {unknown:?} (known: {})",
                    TYPES.join(", ")
                ));
            }
        };
        if !(file.weight.is_finite() && file.weight >= 0.0) {
            return Err(format!("the weight must be 0 or more, not {}", file.weight));
        }
        let label = file.label.clone().unwrap_or_else(|| match &check {
            Check::RecallAtK { k, .. } => format!("recall@{k}"),
            Check::Mrr { k, .. } => format!("mrr@{k}"),
            _ => file.kind.clone(),
        });
        Ok(Assertion {
            check,
            label: if file.negate {
                format!("not {label}")
            } else {
                label
            },
            weight: file.weight,
            threshold: file.threshold,
            negate: file.negate,
        })
    }

    pub fn needs_judge(&self) -> bool {
        matches!(self.check, Check::LlmRubric(_))
    }

    pub fn needs_embeddings(&self) -> bool {
        matches!(self.check, Check::Similar(_))
    }

    /// The column values this assertion reads, for the dataset check.
    pub fn values(&self) -> Vec<&Value> {
        match &self.check {
            Check::Equals(v)
            | Check::StartsWith(v)
            | Check::Levenshtein(v)
            | Check::RougeL(v)
            | Check::Bleu(v)
            | Check::Similar(v)
            | Check::LlmRubric(v)
            | Check::JsonFields(v)
            | Check::Contains { values: v, .. }
            | Check::RecallAtK { gold: v, .. }
            | Check::Mrr { gold: v, .. } => vec![v],
            _ => Vec::new(),
        }
    }

    /// The verdict from a score: it passes at or above the threshold
    /// (`default` when the suite sets none); `not` turns both around.
    pub fn verdict(&self, score: f64, default: f64, reason: String) -> Verdict {
        let pass = score >= self.threshold.unwrap_or(default);
        self.judged(pass, score, reason)
    }

    /// The verdict from a pass and score, negated when asked.
    pub fn judged(&self, pass: bool, score: f64, reason: String) -> Verdict {
        let (pass, score) = if self.negate {
            (!pass, 1.0 - score)
        } else {
            (pass, score)
        };
        Verdict {
            assertion: self.label.clone(),
            pass,
            score: score.clamp(0.0, 1.0),
            reason,
        }
    }

    fn binary(&self, pass: bool, reason: impl FnOnce() -> String) -> Verdict {
        let reason = if pass == self.negate {
            reason()
        } else {
            String::new()
        };
        self.judged(pass, f64::from(u8::from(pass)), reason)
    }

    /// Checks `output`; None for the assertions the gateway must help
    /// with (`similar`, `llm-rubric`).
    pub fn check(
        &self,
        output: &Output,
        columns: &Map<String, Value>,
        shared: &Shared,
    ) -> Option<Result<Verdict, String>> {
        let text = output.text.trim_end();
        let verdict = match &self.check {
            Check::Equals(value) => {
                let expected = or_fail!(resolve_text(value, columns));
                self.binary(text == expected.trim_end(), || {
                    format!("expected {:?}", clip(&expected, 200))
                })
            }
            Check::Contains {
                values,
                all,
                ignore_case,
            } => {
                let wanted: Vec<String> = match or_fail!(resolve(values, columns)) {
                    Value::Array(items) => items.iter().map(as_text).collect(),
                    other => vec![as_text(&other)],
                };
                let haystack = if *ignore_case {
                    text.to_lowercase()
                } else {
                    text.to_string()
                };
                let found: Vec<bool> = wanted
                    .iter()
                    .map(|w| {
                        let needle = if *ignore_case {
                            w.to_lowercase()
                        } else {
                            w.clone()
                        };
                        haystack.contains(&needle)
                    })
                    .collect();
                let pass = if *all {
                    found.iter().all(|f| *f)
                } else {
                    found.iter().any(|f| *f)
                };
                self.binary(pass, || {
                    let missing: Vec<&String> = wanted
                        .iter()
                        .zip(&found)
                        .filter(|(_, f)| !**f)
                        .map(|(w, _)| w)
                        .collect();
                    format!("missing {missing:?}")
                })
            }
            Check::StartsWith(value) => {
                let prefix = or_fail!(resolve_text(value, columns));
                self.binary(text.trim_start().starts_with(&prefix), || {
                    format!("does not start with {prefix:?}")
                })
            }
            Check::Regex(regex) => self.binary(regex.is_match(text), || {
                format!("does not match /{}/", clip(regex.as_str(), 60))
            }),
            Check::IsJson => {
                let parsed = serde_json::from_str::<Value>(text.trim());
                self.binary(parsed.is_ok(), || {
                    format!(
                        "not JSON: {}",
                        parsed.err().map(|e| e.to_string()).unwrap_or_default()
                    )
                })
            }
            Check::JsonSchema(schema) => {
                let schema = match schema.clone().or_else(|| response_schema(shared)) {
                    Some(schema) => schema,
                    None => {
                        return Some(Err(
                            "json-schema has no schema and the suite no response_format".into(),
                        ));
                    }
                };
                let result = serde_json::from_str::<Value>(text.trim())
                    .map_err(|e| format!("not JSON: {e}"))
                    .and_then(|value| {
                        crate::structured::instance::validate(&schema, &value)
                            .map_err(|m| m.to_string())
                    });
                self.binary(result.is_ok(), || result.err().unwrap_or_default())
            }
            Check::JsonFields(value) => {
                let expected = match or_fail!(resolve(value, columns)) {
                    Value::Object(fields) => fields,
                    other => {
                        return Some(Err(format!("json-fields expects an object, not {other}")));
                    }
                };
                let answer = serde_json::from_str::<Value>(text.trim()).unwrap_or(Value::Null);
                let (score, wrong) = similarity::json_fields(&answer, &expected);
                let reason = if wrong.is_empty() {
                    String::new()
                } else {
                    format!("wrong or missing: {}", wrong.join(", "))
                };
                self.verdict(score, 1.0, reason)
            }
            Check::ToolCall(name) => {
                let result = check_tool_call(output, name.as_deref(), shared);
                self.binary(result.is_ok(), || result.err().unwrap_or_default())
            }
            Check::Levenshtein(value) => {
                let expected = or_fail!(resolve_text(value, columns));
                let distance = similarity::levenshtein(text.trim(), expected.trim());
                let longest = text
                    .trim()
                    .chars()
                    .count()
                    .max(expected.trim().chars().count())
                    .max(1);
                let pass = distance as f64 <= self.threshold.unwrap_or(5.0);
                self.judged(
                    pass,
                    1.0 - distance as f64 / longest as f64,
                    format!("distance {distance}"),
                )
            }
            Check::RougeL(value) => {
                let expected = or_fail!(resolve_text(value, columns));
                let score = similarity::rouge_l(text, &expected);
                self.verdict(score, 0.5, format!("ROUGE-L {score:.3}"))
            }
            Check::Bleu(value) => {
                let expected = or_fail!(resolve_text(value, columns));
                let score = similarity::bleu(text, &expected);
                self.verdict(score, 0.5, format!("BLEU {score:.3}"))
            }
            Check::FinishReason(expected) => {
                let actual = output.finish_reason.clone().unwrap_or_default();
                self.binary(&actual == expected, || format!("finished with {actual:?}"))
            }
            Check::Cost => {
                let dollars = output.cost.as_f64();
                let most = self.threshold.unwrap_or(0.0);
                self.binary(dollars <= most, || format!("cost ${dollars} > ${most}"))
            }
            Check::Latency => {
                let most = self.threshold.unwrap_or(0.0);
                self.binary(output.latency_ms <= most, || {
                    format!("took {:.0} ms > {most} ms", output.latency_ms)
                })
            }
            Check::Citations => {
                let result = check_citations(output);
                self.binary(result.is_ok(), || result.err().unwrap_or_default())
            }
            Check::RecallAtK { gold, k } => {
                let gold = or_fail!(gold_urls(gold, columns));
                let (score, _) = ranking_scores(&output.retrieved, &gold, *k);
                self.verdict(score, 1.0, format!("recall@{k} {score:.3}"))
            }
            Check::Mrr { gold, k } => {
                let gold = or_fail!(gold_urls(gold, columns));
                let (_, reciprocal) = ranking_scores(&output.retrieved, &gold, *k);
                self.verdict(reciprocal, 1.0, format!("reciprocal rank {reciprocal:.3}"))
            }
            Check::Similar(_) | Check::LlmRubric(_) => return None,
        };
        Some(Ok(verdict))
    }
}

/// `text` cut to at most `chars` characters (an ellipsis marks a cut).
pub fn clip(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

pub(super) fn as_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The schema of the suite's `response_format` (json_schema).
fn response_schema(shared: &Shared) -> Option<Value> {
    let format = shared.response_format.as_ref()?;
    format.pointer("/json_schema/schema").cloned().or_else(|| {
        (format.get("type") == Some(&Value::from("json_object")))
            .then(|| serde_json::json!({"type": "object"}))
    })
}

/// A value with the case's columns put in: `"{{ name }}"` whole is the
/// column as it is; other strings are rendered as templates (a missing
/// column is an error); lists are resolved item by item.
pub fn resolve(value: &Value, columns: &Map<String, Value>) -> Result<Value, String> {
    match value {
        Value::String(text) if text.contains("{{") || text.contains("{%") => {
            if let Some(name) = whole_reference(text) {
                return columns
                    .get(name)
                    .cloned()
                    .ok_or_else(|| format!("the dataset has no column '{name}'"));
            }
            render_template(text, columns).map(Value::String)
        }
        Value::Array(items) => items
            .iter()
            .map(|i| resolve(i, columns))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        other => Ok(other.clone()),
    }
}

fn resolve_text(value: &Value, columns: &Map<String, Value>) -> Result<String, String> {
    resolve(value, columns).map(|v| as_text(&v))
}

/// `name` when `text` is exactly `{{ name }}`.
fn whole_reference(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?.trim();
    inner
        .chars()
        .all(|c| c.is_alphanumeric() || c == '_')
        .then_some(inner)
}

/// Renders a template over the columns; an unknown column is an error.
pub fn render_template(text: &str, columns: &Map<String, Value>) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    let context = minijinja::Value::from(minijinja::value::Serde(columns));
    env.render_str(text, context).map_err(|e| match e.kind() {
        minijinja::ErrorKind::UndefinedError => {
            format!("{text:?} names a column the dataset lacks")
        }
        _ => format!("{text:?}: {e}"),
    })
}

fn check_tool_call(output: &Output, name: Option<&str>, shared: &Shared) -> Result<(), String> {
    if output.tool_calls.is_empty() {
        return Err("the answer calls no function".into());
    }
    let tools = shared.tools.as_ref().and_then(Value::as_array);
    let mut problems = Vec::new();
    for call in &output.tool_calls {
        if name.is_some_and(|n| n != call.name) {
            problems.push(format!("calls {} instead", call.name));
            continue;
        }
        let arguments: Value = match serde_json::from_str(&call.arguments) {
            Ok(arguments) => arguments,
            Err(e) => {
                problems.push(format!("{}'s arguments are not JSON: {e}", call.name));
                continue;
            }
        };
        let parameters = tools.into_iter().flatten().find_map(|tool| {
            (tool.pointer("/function/name").and_then(Value::as_str) == Some(call.name.as_str()))
                .then(|| tool.pointer("/function/parameters").cloned())
        });
        match parameters {
            None => problems.push(format!("{} is not one of the suite's tools", call.name)),
            Some(Some(schema)) => {
                match crate::structured::instance::validate(&schema, &arguments) {
                    Ok(()) => return Ok(()),
                    Err(m) => problems.push(format!("{}'s arguments: {m}", call.name)),
                }
            }
            Some(None) => return Ok(()),
        }
    }
    Err(problems.join("; "))
}
