//! report.html: one self-contained file (its styles, scripts and data
//! inline; no CDN, for machines that are offline) with the variants'
//! pass rates and intervals, the score-against-cost scatter with the
//! Pareto front, latency histograms, per-assertion bars, and the failing
//! cases, paginated in the page (`#page=N&variant=...` opens one).

use std::path::Path;

use serde::Serialize;

use super::report::{RunSummary, read_results};

const TEMPLATE: &str = include_str!("report.html");
/// Failing cases carried in the page at most.
const MAX_FAILURES: usize = 20_000;
/// Characters of each failing answer carried.
const MAX_ANSWER_CHARS: usize = 1_500;

#[derive(Serialize)]
struct Failure {
    case: String,
    variant: String,
    repeat: usize,
    score: f64,
    text: String,
    error: Option<String>,
    reasons: Vec<String>,
}

#[derive(Serialize)]
struct Failures {
    total: u64,
    cases: Vec<Failure>,
}

/// JSON safe inside a `<script>` element.
fn script_json(value: &impl Serialize) -> anyhow::Result<String> {
    Ok(serde_json::to_string(value)?
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026"))
}

fn escape_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The report of a run whose per-case results are in `results`.
pub fn render(summary: &RunSummary, results: &Path) -> anyhow::Result<String> {
    let mut failures = Failures {
        total: 0,
        cases: Vec::new(),
    };
    read_results(results, |result| {
        if result.pass {
            return;
        }
        failures.total += 1;
        if failures.cases.len() >= MAX_FAILURES {
            return;
        }
        failures.cases.push(Failure {
            case: result.case,
            variant: result.variant,
            repeat: result.repeat,
            score: result.score,
            text: super::assertions::clip(&result.output.text, MAX_ANSWER_CHARS),
            error: result.output.error,
            reasons: result
                .verdicts
                .into_iter()
                .filter(|v| !v.pass)
                .map(|v| match v.reason.is_empty() {
                    true => v.assertion,
                    false => format!("{}: {}", v.assertion, v.reason),
                })
                .collect(),
        });
    })?;
    Ok(TEMPLATE
        .replace("__TITLE__", &escape_text(&summary.suite))
        .replace("__SUMMARY__", &script_json(summary)?)
        .replace("__FAILURES__", &script_json(&failures)?))
}
