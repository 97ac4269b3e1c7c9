//! The RAG assertions' checks: an answer's `[n]` markers against the
//! sources it was given, and recall@k and MRR of a ranked list of pages
//! against the gold URLs.

use serde_json::{Map, Value};

use super::assertions::{as_text, resolve};
use super::output::Output;

pub fn gold_urls(gold: &Value, columns: &Map<String, Value>) -> Result<Vec<String>, String> {
    match resolve(gold, columns)? {
        Value::Array(items) => Ok(items.iter().map(as_text).collect()),
        Value::String(text) => Ok(vec![text]),
        other => Err(format!("gold URLs must be a list, not {other}")),
    }
}

/// (recall within k, reciprocal rank of the first gold within k) of a
/// ranked list of pages.
pub fn ranking_scores(ranked: &[String], gold: &[String], k: usize) -> (f64, f64) {
    let top = &ranked[..ranked.len().min(k)];
    let found = gold.iter().filter(|g| top.contains(g)).count();
    let recall = found as f64 / gold.len().max(1) as f64;
    let reciprocal = top
        .iter()
        .position(|p| gold.contains(p))
        .map_or(0.0, |r| 1.0 / (r as f64 + 1.0));
    (recall, reciprocal)
}

/// Every `[n]` marker names a source given, and at least one is cited.
pub fn check_citations(output: &Output) -> Result<(), String> {
    if output.citations.is_empty() {
        return Err("the answer was given no sources".into());
    }
    let marker = regex::Regex::new(r"\[(\d+)\]").map_err(|e| e.to_string())?;
    let cited: Vec<usize> = marker
        .captures_iter(&output.text)
        .filter_map(|c| c[1].parse().ok())
        .collect();
    if cited.is_empty() {
        return Err("the answer cites no source".into());
    }
    let unknown: Vec<usize> = cited
        .into_iter()
        .filter(|n| !output.citations.iter().any(|c| c.index == *n))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "cites sources that were not retrieved: {unknown:?}"
        ))
    }
}
