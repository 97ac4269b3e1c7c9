//! Retrieval evaluation: a query set (JSONL of `{"id", "query", "targets",
//! "kind"}`, targets being page URLs) run against a site in each search mode;
//! recall@5, recall@10 and MRR@10 over pages (chunk hits are folded into
//! their page, best rank first).

use std::collections::BTreeMap;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::search::{MAX_TOP_K, search};
use super::{Rag, SearchFilter, SearchMode, SearchRequest, SiteName};

#[derive(Debug, Clone, Deserialize)]
pub struct EvalQuery {
    pub id: String,
    pub query: String,
    pub targets: Vec<String>,
    #[serde(default)]
    pub kind: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Scores {
    pub queries: usize,
    pub recall_at_5: f64,
    pub recall_at_10: f64,
    pub mrr_at_10: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: SearchMode,
    pub all: Scores,
    /// Scores per query kind.
    pub by_kind: BTreeMap<String, Scores>,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
}

pub fn load_queries(path: &Path) -> anyhow::Result<Vec<EvalQuery>> {
    std::fs::read_to_string(path)?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Distinct pages in the order of their best chunk.
fn ranked_pages(urls: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut pages: Vec<String> = Vec::new();
    for url in urls {
        if !pages.contains(&url) {
            pages.push(url);
        }
    }
    pages
}

/// (recall@5, recall@10, reciprocal rank within 10) of one query.
pub fn score(pages: &[String], targets: &[String]) -> (f64, f64, f64) {
    let recall = |k: usize| {
        let found = targets
            .iter()
            .filter(|t| pages.iter().take(k).any(|p| p == *t))
            .count();
        found as f64 / targets.len().max(1) as f64
    };
    let rank = pages.iter().take(10).position(|p| targets.contains(p));
    (
        recall(5),
        recall(10),
        rank.map_or(0.0, |r| 1.0 / (r as f64 + 1.0)),
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub async fn evaluate(
    rag: &Rag,
    site: &SiteName,
    queries: &[EvalQuery],
    modes: &[SearchMode],
) -> anyhow::Result<Vec<ModeResult>> {
    let mut results = Vec::new();
    for &mode in modes {
        let bar = ProgressBar::new(queries.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(format!("{mode:?}"));
        let mut sums: BTreeMap<String, (usize, f64, f64, f64)> = BTreeMap::new();
        let mut latencies = Vec::new();
        for query in queries {
            let request = SearchRequest {
                query: query.query.clone(),
                top_k: MAX_TOP_K.min(50),
                mode,
                filter: SearchFilter::default(),
            };
            let started = std::time::Instant::now();
            let hits = search(rag, site, &request).await?;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            let pages = ranked_pages(hits.into_iter().map(|h| h.url));
            let (r5, r10, rr) = score(&pages, &query.targets);
            for key in ["all".to_string(), query.kind.clone()] {
                let entry = sums.entry(key).or_default();
                entry.0 += 1;
                entry.1 += r5;
                entry.2 += r10;
                entry.3 += rr;
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        latencies.sort_by(f64::total_cmp);
        let scores = |(n, r5, r10, rr): (usize, f64, f64, f64)| Scores {
            queries: n,
            recall_at_5: r5 / n.max(1) as f64,
            recall_at_10: r10 / n.max(1) as f64,
            mrr_at_10: rr / n.max(1) as f64,
        };
        let all = sums.remove("all").map(scores).unwrap_or_default();
        results.push(ModeResult {
            mode,
            all,
            by_kind: sums
                .into_iter()
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k, scores(v)))
                .collect(),
            latency_ms_p50: percentile(&latencies, 0.5),
            latency_ms_p99: percentile(&latencies, 0.99),
        });
    }
    Ok(results)
}

/// The results as a Markdown table.
pub fn table(results: &[ModeResult]) -> String {
    let mut out = String::from(
        "| mode | queries | recall@5 | recall@10 | MRR@10 | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|\n",
    );
    for result in results {
        let mut row = |label: String, s: &Scores, latency: Option<(f64, f64)>| {
            let (p50, p99) = latency.map_or((String::new(), String::new()), |(a, b)| {
                (format!("{a:.1}"), format!("{b:.1}"))
            });
            out.push_str(&format!(
                "| {label} | {} | {:.3} | {:.3} | {:.3} | {p50} | {p99} |\n",
                s.queries, s.recall_at_5, s.recall_at_10, s.mrr_at_10
            ));
        };
        let mode = format!("{:?}", result.mode).to_lowercase();
        row(
            mode.clone(),
            &result.all,
            Some((result.latency_ms_p50, result.latency_ms_p99)),
        );
        for (kind, scores) in &result.by_kind {
            row(format!("{mode} ({kind})"), scores, None);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_and_reciprocal_rank() {
        let pages: Vec<String> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (r5, r10, rr) = score(&pages, &["c".to_string(), "f".to_string()]);
        assert_eq!((r5, r10), (0.5, 1.0));
        assert!((rr - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(score(&pages, &["z".to_string()]), (0.0, 0.0, 0.0));
        let ranked = ranked_pages(["x", "y", "x", "z"].iter().map(|s| s.to_string()));
        assert_eq!(ranked, vec!["x", "y", "z"]);
    }
}
