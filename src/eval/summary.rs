//! Tallies of a run, a variant each, folded in as results come (a
//! latency list aside, nothing grows with the suite but the counts), and
//! what they sum to: pass rates with their Wilson intervals, mean scores,
//! exact costs, token counts, latency and time-to-first-token percentiles
//! and histograms, per-assertion rates, and the quality/cost Pareto front.

use serde::{Deserialize, Serialize};

use super::assertions::Assertion;
use super::run::CaseResult;
use crate::money::Usd;

/// Bins of the latency histograms.
const HISTOGRAM_BINS: usize = 24;

#[derive(Debug, Clone)]
struct AssertionTally {
    label: String,
    passes: u64,
    score_sum: f64,
}

/// A group's results so far (the suite's group column).
#[derive(Debug, Clone, Default)]
struct GroupTally {
    cases: u64,
    passes: u64,
    score_sum: f64,
    assertion_passes: Vec<u64>,
    assertion_scores: Vec<f64>,
}

/// What a group's results sum to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupSummary {
    pub group: String,
    pub cases: u64,
    pub pass_rate: f64,
    pub mean_score: f64,
    pub assertions: Vec<AssertionSummary>,
}

/// A variant's results so far.
#[derive(Debug, Clone)]
pub struct Tally {
    label: String,
    cases: u64,
    passes: u64,
    errors: u64,
    cached: u64,
    busy_retries: u64,
    score_sum: f64,
    cost: Usd,
    judge_cost: Usd,
    spent: Usd,
    prompt_tokens: u64,
    completion_tokens: u64,
    latencies: Vec<f32>,
    ttfts: Vec<f32>,
    assertions: Vec<AssertionTally>,
    groups: std::collections::BTreeMap<String, GroupTally>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Histogram {
    /// Bin edges (ms), one more than the counts.
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssertionSummary {
    pub assertion: String,
    pub pass_rate: f64,
    pub mean_score: f64,
}

/// What a variant's results sum to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantSummary {
    pub label: String,
    /// What the variant runs (model, adapter, prompt, settings; or search).
    #[serde(default)]
    pub details: serde_json::Value,
    pub cases: u64,
    pub passes: u64,
    pub pass_rate: f64,
    /// The 95% Wilson score interval of the pass rate.
    pub pass_interval: [f64; 2],
    pub mean_score: f64,
    pub errors: u64,
    pub cached: u64,
    pub busy_retries: u64,
    /// What the answers cost (cached ones at what they cost when asked).
    pub cost: Usd,
    pub cost_per_case: f64,
    /// What the judge's grading cost.
    pub judge_cost: Usd,
    /// What this run paid.
    pub spent: Usd,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: Percentiles,
    pub ttft_ms: Option<Percentiles>,
    pub latency_histogram: Histogram,
    pub assertions: Vec<AssertionSummary>,
    /// The same, per group of the suite's group column.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupSummary>,
    /// No other variant scores higher at a lower or equal cost per case.
    #[serde(default)]
    pub pareto: bool,
}

impl Tally {
    pub fn new(label: &str, assertions: &[Assertion]) -> Self {
        Tally {
            label: label.to_string(),
            cases: 0,
            passes: 0,
            errors: 0,
            cached: 0,
            busy_retries: 0,
            score_sum: 0.0,
            cost: Usd::ZERO,
            judge_cost: Usd::ZERO,
            spent: Usd::ZERO,
            prompt_tokens: 0,
            completion_tokens: 0,
            latencies: Vec::new(),
            ttfts: Vec::new(),
            assertions: assertions
                .iter()
                .map(|a| AssertionTally {
                    label: a.label.clone(),
                    passes: 0,
                    score_sum: 0.0,
                })
                .collect(),
            groups: Default::default(),
        }
    }

    pub fn add(&mut self, result: &CaseResult) {
        self.cases += 1;
        self.passes += u64::from(result.pass);
        self.errors += u64::from(result.output.error.is_some());
        self.cached += u64::from(result.cached);
        self.busy_retries += u64::from(result.busy_retries);
        self.score_sum += result.score;
        self.cost = self.cost.saturating_add(result.output.cost);
        self.judge_cost = self.judge_cost.saturating_add(result.judge_cost);
        self.spent = self.spent.saturating_add(result.spent);
        self.prompt_tokens += result.output.prompt_tokens;
        self.completion_tokens += result.output.completion_tokens;
        if result.output.error.is_none() {
            self.latencies.push(result.output.latency_ms as f32);
            if let Some(ttft) = result.output.ttft_ms {
                self.ttfts.push(ttft as f32);
            }
        }
        for (tally, verdict) in self.assertions.iter_mut().zip(&result.verdicts) {
            tally.passes += u64::from(verdict.pass);
            tally.score_sum += verdict.score;
        }
        if let Some(group) = &result.group {
            let count = self.assertions.len();
            let tally = self
                .groups
                .entry(group.clone())
                .or_insert_with(|| GroupTally {
                    assertion_passes: vec![0; count],
                    assertion_scores: vec![0.0; count],
                    ..GroupTally::default()
                });
            tally.cases += 1;
            tally.passes += u64::from(result.pass);
            tally.score_sum += result.score;
            for (index, verdict) in result.verdicts.iter().enumerate().take(count) {
                tally.assertion_passes[index] += u64::from(verdict.pass);
                tally.assertion_scores[index] += verdict.score;
            }
        }
    }

    pub fn finish(mut self) -> VariantSummary {
        let n = self.cases.max(1) as f64;
        let labels: Vec<String> = self.assertions.iter().map(|a| a.label.clone()).collect();
        let groups = std::mem::take(&mut self.groups)
            .into_iter()
            .map(|(group, tally)| {
                let cases = tally.cases.max(1) as f64;
                GroupSummary {
                    group,
                    cases: tally.cases,
                    pass_rate: tally.passes as f64 / cases,
                    mean_score: tally.score_sum / cases,
                    assertions: labels
                        .iter()
                        .enumerate()
                        .map(|(i, label)| AssertionSummary {
                            assertion: label.clone(),
                            pass_rate: tally.assertion_passes[i] as f64 / cases,
                            mean_score: tally.assertion_scores[i] / cases,
                        })
                        .collect(),
                }
            })
            .collect();
        self.latencies.sort_by(f32::total_cmp);
        self.ttfts.sort_by(f32::total_cmp);
        VariantSummary {
            label: self.label,
            details: serde_json::Value::Null,
            cases: self.cases,
            passes: self.passes,
            pass_rate: self.passes as f64 / n,
            pass_interval: wilson(self.passes, self.cases),
            mean_score: self.score_sum / n,
            errors: self.errors,
            cached: self.cached,
            busy_retries: self.busy_retries,
            cost: self.cost,
            cost_per_case: self.cost.as_f64() / n,
            judge_cost: self.judge_cost,
            spent: self.spent,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            latency_ms: percentiles(&self.latencies),
            ttft_ms: (!self.ttfts.is_empty()).then(|| percentiles(&self.ttfts)),
            latency_histogram: histogram(&self.latencies),
            assertions: self
                .assertions
                .into_iter()
                .map(|a| AssertionSummary {
                    assertion: a.label,
                    pass_rate: a.passes as f64 / n,
                    mean_score: a.score_sum / n,
                })
                .collect(),
            groups,
            pareto: false,
        }
    }
}

/// The 95% Wilson score interval of `passes` out of `n`.
pub fn wilson(passes: u64, n: u64) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let z = 1.959_963_984_540_054_f64;
    let (n, p) = (n as f64, passes as f64 / n as f64);
    let denominator = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denominator;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denominator;
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

fn percentiles(sorted: &[f32]) -> Percentiles {
    if sorted.is_empty() {
        return Percentiles::default();
    }
    let at = |q: f64| f64::from(sorted[((sorted.len() - 1) as f64 * q).round() as usize]);
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        mean: sorted.iter().map(|x| f64::from(*x)).sum::<f64>() / sorted.len() as f64,
    }
}

/// Equal-width bins from the fastest to the slowest.
fn histogram(sorted: &[f32]) -> Histogram {
    let (Some(first), Some(last)) = (sorted.first(), sorted.last()) else {
        return Histogram::default();
    };
    let (low, high) = (
        f64::from(*first),
        f64::from(*last).max(f64::from(*first) + 1e-3),
    );
    let width = (high - low) / HISTOGRAM_BINS as f64;
    let mut counts = vec![0u64; HISTOGRAM_BINS];
    for x in sorted {
        let bin = ((f64::from(*x) - low) / width) as usize;
        counts[bin.min(HISTOGRAM_BINS - 1)] += 1;
    }
    Histogram {
        edges: (0..=HISTOGRAM_BINS)
            .map(|i| low + width * i as f64)
            .collect(),
        counts,
    }
}

/// Marks the variants no other beats on both mean score and cost per case.
pub fn mark_pareto(variants: &mut [VariantSummary]) {
    let points: Vec<(f64, f64)> = variants
        .iter()
        .map(|v| (v.mean_score, v.cost_per_case))
        .collect();
    for (index, variant) in variants.iter_mut().enumerate() {
        let (score, cost) = points[index];
        variant.pareto = !points.iter().enumerate().any(|(other, &(s, c))| {
            other != index && s >= score && c <= cost && (s > score || c < cost)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval_matches_the_formula() {
        // 8 of 10 at 95%: the textbook interval is [0.490, 0.943].
        let [low, high] = wilson(8, 10);
        assert!(
            (low - 0.4902).abs() < 1e-3 && (high - 0.9433).abs() < 1e-3,
            "{low} {high}"
        );
        assert_eq!(wilson(0, 0), [0.0, 1.0]);
        let [low, high] = wilson(0, 50);
        assert!(low.abs() < 1e-12);
        assert!((high - 0.0713).abs() < 1e-3, "{high}");
    }

    #[test]
    fn percentiles_and_histogram() {
        let sorted: Vec<f32> = (1..=100).map(|x| x as f32).collect();
        let p = percentiles(&sorted);
        assert_eq!((p.p50, p.p90, p.p99), (51.0, 90.0, 99.0));
        let h = histogram(&sorted);
        assert_eq!(h.counts.iter().sum::<u64>(), 100);
        assert_eq!(h.edges.len(), h.counts.len() + 1);
    }

    #[test]
    fn the_pareto_front_keeps_undominated_variants() {
        let mut variants: Vec<VariantSummary> = [(0.9, 1.0), (0.8, 0.1), (0.7, 0.5), (0.9, 2.0)]
            .iter()
            .map(|&(score, cost)| {
                let mut v = Tally::new("v", &[]).finish();
                v.mean_score = score;
                v.cost_per_case = cost;
                v
            })
            .collect();
        mark_pareto(&mut variants);
        let front: Vec<bool> = variants.iter().map(|v| v.pareto).collect();
        assert_eq!(front, [true, true, false, false]);
    }
}
