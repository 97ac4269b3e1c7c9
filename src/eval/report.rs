//! A run's results for people and machines: `results.json` (the summary,
//! and the comparison with a baseline run when one is given) and
//! `summary.md` (a table for a PR comment). A baseline is an earlier
//! run's results.json: each variant's pass rate is compared with a
//! two-proportion z-test, each case's verdict one by one.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::run::CaseResult;
use super::summary::{AssertionSummary, VariantSummary};
use crate::money::Usd;

/// The name of the per-case results beside results.json.
pub const RESULTS_JSONL: &str = "results.jsonl";
/// Cases listed by name in a comparison, per direction.
const LISTED_CASES: usize = 200;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub suite: String,
    #[serde(default)]
    pub description: String,
    pub suite_file: PathBuf,
    pub dataset: PathBuf,
    pub run_id: String,
    pub tenant: String,
    /// RFC 3339.
    pub started_at: String,
    pub seconds: f64,
    pub cases: usize,
    pub repeat: usize,
    pub assertions: Vec<String>,
    pub variants: Vec<VariantSummary>,
    /// What this run paid, all variants and the judge.
    pub spent: Usd,
    /// The per-case results, relative to this file.
    pub results_file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Comparison>,
}

/// How a run compares with a baseline run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub baseline_run: String,
    pub baseline_file: PathBuf,
    pub variants: Vec<VariantChange>,
    /// Cases that passed in the baseline and fail now (the first ones).
    pub regressed: Vec<CaseChange>,
    /// Cases that failed in the baseline and pass now (the first ones).
    pub improved: Vec<CaseChange>,
    pub regressed_count: u64,
    pub improved_count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantChange {
    pub variant: String,
    /// None for a variant the baseline did not have.
    pub baseline_pass_rate: Option<f64>,
    pub pass_rate: f64,
    pub delta: f64,
    /// "regressed", "improved" (significant at 95%), "unchanged", or "new".
    pub verdict: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseChange {
    pub case: String,
    pub variant: String,
    pub repeat: usize,
}

/// Reads `path` line by line, giving each result to `each`.
pub fn read_results(path: &Path, mut each: impl FnMut(CaseResult)) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let result: CaseResult = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), index + 1))?;
        each(result);
    }
    Ok(())
}

/// Reads a results.json.
pub fn read_summary(path: &Path) -> anyhow::Result<RunSummary> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not a results.json: {e}", path.display()))
}

/// Compares the run written in `results` with the baseline at `path`.
pub fn compare(summary: &RunSummary, results: &Path, path: &Path) -> anyhow::Result<Comparison> {
    let baseline = read_summary(path)?;
    let baseline_results = path
        .parent()
        .unwrap_or(Path::new("."))
        .join(&baseline.results_file);
    let mut before: HashMap<(String, String, usize), bool> = HashMap::new();
    read_results(&baseline_results, |r| {
        before.insert((r.case, r.variant, r.repeat), r.pass);
    })?;
    let mut comparison = Comparison {
        baseline_run: baseline.run_id.clone(),
        baseline_file: path.to_path_buf(),
        variants: Vec::new(),
        regressed: Vec::new(),
        improved: Vec::new(),
        regressed_count: 0,
        improved_count: 0,
    };
    read_results(results, |r| {
        let Some(&was) = before.get(&(r.case.clone(), r.variant.clone(), r.repeat)) else {
            return;
        };
        let change = CaseChange {
            case: r.case,
            variant: r.variant,
            repeat: r.repeat,
        };
        if was && !r.pass {
            comparison.regressed_count += 1;
            if comparison.regressed.len() < LISTED_CASES {
                comparison.regressed.push(change);
            }
        } else if !was && r.pass {
            comparison.improved_count += 1;
            if comparison.improved.len() < LISTED_CASES {
                comparison.improved.push(change);
            }
        }
    })?;
    for variant in &summary.variants {
        let old = baseline.variants.iter().find(|v| v.label == variant.label);
        comparison.variants.push(match old {
            None => VariantChange {
                variant: variant.label.clone(),
                baseline_pass_rate: None,
                pass_rate: variant.pass_rate,
                delta: 0.0,
                verdict: "new".into(),
            },
            Some(old) => VariantChange {
                variant: variant.label.clone(),
                baseline_pass_rate: Some(old.pass_rate),
                pass_rate: variant.pass_rate,
                delta: variant.pass_rate - old.pass_rate,
                verdict: significance(old.passes, old.cases, variant.passes, variant.cases).into(),
            },
        });
    }
    Ok(comparison)
}

/// A two-proportion z-test at 95% of `after` against `before`.
pub fn significance(
    before_passes: u64,
    before_n: u64,
    after_passes: u64,
    after_n: u64,
) -> &'static str {
    if before_n == 0 || after_n == 0 {
        return "unchanged";
    }
    let (p1, p2) = (
        before_passes as f64 / before_n as f64,
        after_passes as f64 / after_n as f64,
    );
    let pooled = (before_passes + after_passes) as f64 / (before_n + after_n) as f64;
    let spread = (pooled * (1.0 - pooled) * (1.0 / before_n as f64 + 1.0 / after_n as f64)).sqrt();
    if spread == 0.0 {
        return "unchanged";
    }
    let z = (p2 - p1) / spread;
    if z <= -1.96 {
        "regressed"
    } else if z >= 1.96 {
        "improved"
    } else {
        "unchanged"
    }
}

fn percent(rate: f64) -> String {
    format!("{:.1}%", 100.0 * rate)
}

/// The Markdown summary.
pub fn markdown(summary: &RunSummary) -> String {
    let mut out = format!(
        "## Eval: {} (`{}`)\n\n{} cases × {} variants{}, {:.0} s; this run paid ${}.\n\n",
        summary.suite,
        summary.run_id,
        summary.cases,
        summary.variants.len(),
        if summary.repeat > 1 {
            format!(" × {} repeats", summary.repeat)
        } else {
            String::new()
        },
        summary.seconds,
        summary.spent,
    );
    let baseline = summary.baseline.as_ref();
    out.push_str("| variant | pass rate (95% CI) | score | cost/case | p50 latency | p50 TTFT | tokens out | errors |");
    out.push_str(if baseline.is_some() {
        " vs baseline |\n"
    } else {
        "\n"
    });
    out.push_str("|---|---|---|---|---|---|---|---|");
    out.push_str(if baseline.is_some() { "---|\n" } else { "\n" });
    for v in &summary.variants {
        let ttft = v
            .ttft_ms
            .as_ref()
            .map_or("-".to_string(), |t| format!("{:.0} ms", t.p50));
        out.push_str(&format!(
            "| {}{} | {} ({}–{}) | {:.3} | ${:.6} | {:.0} ms | {ttft} | {} | {} |",
            v.label,
            if v.pareto { " ◆" } else { "" },
            percent(v.pass_rate),
            percent(v.pass_interval[0]),
            percent(v.pass_interval[1]),
            v.mean_score,
            v.cost_per_case,
            v.latency_ms.p50,
            v.completion_tokens,
            v.errors,
        ));
        if let Some(change) =
            baseline.and_then(|b| b.variants.iter().find(|c| c.variant == v.label))
        {
            let delta = if change.verdict == "new" {
                String::new()
            } else {
                format!("{:+.1} pts ", 100.0 * change.delta)
            };
            out.push_str(&format!(" {delta}{} |", change.verdict));
        }
        out.push('\n');
    }
    out.push_str("\n◆ on the quality/cost Pareto front.\n\n");
    if !summary.assertions.is_empty() {
        out.push_str(
            "Mean score per assertion (a pass/fail assertion's mean is its pass rate):\n\n",
        );
        out.push_str(&format!(
            "| variant | cases | {} |\n|---|---|",
            summary.assertions.join(" | ")
        ));
        out.push_str(&"---|".repeat(summary.assertions.len()));
        out.push('\n');
        for v in &summary.variants {
            let mut row = |label: String, cases: u64, assertions: &[AssertionSummary]| {
                let cells: Vec<String> = assertions
                    .iter()
                    .map(|a| format!("{:.3}", a.mean_score))
                    .collect();
                out.push_str(&format!("| {label} | {cases} | {} |\n", cells.join(" | ")));
            };
            row(v.label.clone(), v.cases, &v.assertions);
            for group in &v.groups {
                row(
                    format!("{} ({})", v.label, group.group),
                    group.cases,
                    &group.assertions,
                );
            }
        }
        out.push('\n');
    }
    if let Some(b) = baseline {
        out.push_str(&format!(
            "Against `{}`: {} cases regressed, {} improved.\n",
            b.baseline_run, b.regressed_count, b.improved_count
        ));
        for change in b.regressed.iter().take(20) {
            out.push_str(&format!(
                "- regressed: `{}` on {}\n",
                change.case, change.variant
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significance_needs_a_real_difference() {
        assert_eq!(significance(80, 100, 60, 100), "regressed");
        assert_eq!(significance(60, 100, 80, 100), "improved");
        assert_eq!(significance(8, 10, 7, 10), "unchanged");
        assert_eq!(significance(10, 10, 10, 10), "unchanged");
    }
}
