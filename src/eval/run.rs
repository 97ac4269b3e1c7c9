//! Running a suite: every case of every variant (times `--repeat`),
//! `concurrency` at a time, each through the gateway as its own tenant's
//! eval traffic. A busy answer (429, 503) is tried again after a backoff;
//! an answer asked before comes from the cache. Each result is written to
//! `results.jsonl` as it comes and folded into the tallies, so a suite of
//! any size runs in bounded memory.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::assertions::Verdict;
use super::cache::{self, Cache};
use super::call;
use super::judged;
use super::output::Output;
use super::suite::{Case, Suite, Variant, VariantKind};
use super::summary::Tally;
use crate::batches::runner::busy;
use crate::error::ApiResult;
use crate::gateway::{Gateway, Hints};
use crate::money::Usd;
use crate::tenancy::Principal;

/// Tries of a call refused as busy before its error is kept.
const MAX_TRIES: u32 = 8;
/// The longest wait before a busy call is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// One line of `results.jsonl`: a case's answer from a variant, and the
/// verdicts on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    pub case: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub line: usize,
    pub variant: String,
    pub repeat: usize,
    pub pass: bool,
    /// The weighted mean of the assertions' scores.
    pub score: f64,
    pub cached: bool,
    pub output: Output,
    pub verdicts: Vec<Verdict>,
    /// What the judge's grading of this answer cost.
    pub judge_cost: Usd,
    /// What this run paid for the case (0 when every part was cached).
    pub spent: Usd,
    /// Calls refused as busy and tried again.
    pub busy_retries: u32,
}

/// What one run needs: the gateway, the caller, the cache.
pub struct Harness {
    pub gateway: Arc<Gateway>,
    pub principal: Principal,
    pub cache: Option<Cache>,
    pub run_id: String,
}

pub struct RunOptions {
    pub concurrency: usize,
    pub repeat: usize,
    pub progress: bool,
}

impl Harness {
    /// Runs the suite, writing each result to `results` as it comes.
    pub async fn run(
        &self,
        suite: &Suite,
        options: &RunOptions,
        results: &Path,
    ) -> anyhow::Result<Vec<Tally>> {
        let mut tallies: Vec<Tally> = suite
            .variants
            .iter()
            .map(|v| Tally::new(&v.label, &suite.assertions))
            .collect();
        let total = suite.cases.len() * suite.variants.len() * options.repeat.max(1);
        let bar = progress_bar(total as u64, options.progress)?;
        let mut writer = std::io::BufWriter::new(std::fs::File::create(results)?);
        let jobs = (0..options.repeat.max(1)).flat_map(|repeat| {
            suite.cases.iter().flat_map(move |case| {
                suite
                    .variants
                    .iter()
                    .enumerate()
                    .map(move |(index, variant)| (index, variant, case, repeat))
            })
        });
        let mut done = futures::stream::iter(jobs)
            .map(|(index, variant, case, repeat)| async move {
                (index, self.run_case(suite, variant, case, repeat).await)
            })
            .buffer_unordered(options.concurrency.max(1));
        let (mut passes, mut finished) = (0u64, 0u64);
        let mut spent = Usd::ZERO;
        while let Some((index, result)) = done.next().await {
            let result = result?;
            serde_json::to_writer(&mut writer, &result)?;
            writer.write_all(b"\n")?;
            finished += 1;
            passes += u64::from(result.pass);
            spent = spent.saturating_add(result.spent);
            tallies[index].add(&result);
            bar.set_message(format!(
                "pass {:.1}% · spent ${spent}",
                100.0 * passes as f64 / finished as f64
            ));
            bar.inc(1);
        }
        writer.flush()?;
        bar.finish();
        Ok(tallies)
    }

    async fn run_case(
        &self,
        suite: &Suite,
        variant: &Variant,
        case: &Case,
        repeat: usize,
    ) -> anyhow::Result<CaseResult> {
        let hints = call::hints(&suite.shared, &self.run_id);
        let (output, cached, busy_retries) = match &variant.kind {
            VariantKind::Chat(chat) => match call::chat_body(&suite.shared, chat, case) {
                Ok(body) => self.ask_cached(&hints, &body, repeat, chat.stream).await?,
                Err(error) => (failed(error), false, 0),
            },
            VariantKind::Search(search) => {
                let output = call::search(&self.gateway, &self.principal, search, case)
                    .await
                    .unwrap_or_else(|e| failed(e.message));
                (output, false, 0)
            }
        };
        let mut spent = if cached { Usd::ZERO } else { output.cost };
        let mut judge_cost = Usd::ZERO;
        let mut verdicts = Vec::with_capacity(suite.assertions.len());
        for assertion in &suite.assertions {
            if let Some(error) = &output.error {
                verdicts.push(Verdict {
                    assertion: assertion.label.clone(),
                    pass: false,
                    score: 0.0,
                    reason: format!("the call failed: {error}"),
                });
                continue;
            }
            let verdict = match assertion.check(&output, &case.columns, &suite.shared) {
                Some(verdict) => verdict,
                None if assertion.needs_judge() => {
                    let judge = suite.judge.as_ref().expect("checked at load");
                    match judged::rubric(assertion, &case.columns) {
                        Ok(rubric) => {
                            let body = judged::judge_body(judge, &rubric, &output.text);
                            let (grade, was_cached, _) =
                                self.ask_cached(&hints, &body, 0, false).await?;
                            judge_cost = judge_cost.saturating_add(grade.cost);
                            if !was_cached {
                                spent = spent.saturating_add(grade.cost);
                            }
                            judged::rubric_verdict(assertion, judged::read_grade(&grade))
                        }
                        Err(error) => Err(error),
                    }
                }
                None => judged::similar(
                    &self.gateway,
                    &self.principal,
                    &hints,
                    assertion,
                    &output,
                    &case.columns,
                )
                .await
                .map(|(verdict, cost)| {
                    spent = spent.saturating_add(cost);
                    verdict
                }),
            };
            verdicts.push(verdict.unwrap_or_else(|error| assertion.judged(false, 0.0, error)));
        }
        let weight: f64 = suite.assertions.iter().map(|a| a.weight).sum();
        let score = if weight > 0.0 {
            suite
                .assertions
                .iter()
                .zip(&verdicts)
                .map(|(a, v)| a.weight * v.score)
                .sum::<f64>()
                / weight
        } else {
            f64::from(u8::from(output.error.is_none()))
        };
        Ok(CaseResult {
            case: case.id.clone(),
            group: case.group.clone(),
            line: case.line,
            variant: variant.label.clone(),
            repeat,
            pass: output.error.is_none() && verdicts.iter().all(|v| v.pass),
            score,
            cached,
            output,
            verdicts,
            judge_cost,
            spent,
            busy_retries,
        })
    }

    /// The answer to `body`: from the cache, else asked (and kept).
    async fn ask_cached(
        &self,
        hints: &Hints,
        body: &Value,
        repeat: usize,
        stream: bool,
    ) -> anyhow::Result<(Output, bool, u32)> {
        let routing = cache::routing(&self.gateway, body, hints);
        let key = cache::key(&self.principal.tenant, body, repeat, &routing);
        if let Some(cache) = &self.cache
            && let Some(output) = cache.get(&key).await?
        {
            return Ok((output, true, 0));
        }
        let fresh = Hints {
            eval: Some(crate::gateway::bill::EvalBilling::new(&self.run_id)),
            ..hints.clone()
        };
        let (result, retries) = self.ask_with_backoff(&fresh, body, stream).await;
        let output = result.unwrap_or_else(|e| failed(e.message));
        if let Some(cache) = &self.cache {
            cache.put(&key, &self.principal.tenant, &output).await?;
        }
        Ok((output, false, retries))
    }

    async fn ask_with_backoff(
        &self,
        hints: &Hints,
        body: &Value,
        stream: bool,
    ) -> (ApiResult<Output>, u32) {
        let mut tries = 0;
        loop {
            tries += 1;
            match call::ask(&self.gateway, &self.principal, hints, body, stream).await {
                Err(error) if busy(&error) && tries < MAX_TRIES => {
                    let wait = error.retry_after.map_or_else(
                        || Duration::from_millis(250 << tries.min(6)),
                        Duration::from_secs,
                    );
                    tracing::debug!(%error, tries, "busy; trying again");
                    tokio::time::sleep(wait.min(MAX_BACKOFF)).await;
                }
                result => return (result, tries - 1),
            }
        }
    }
}

/// The output of a call that failed.
pub fn failed(error: String) -> Output {
    Output {
        error: Some(error),
        ..Output::default()
    }
}

fn progress_bar(total: u64, visible: bool) -> anyhow::Result<indicatif::ProgressBar> {
    if !visible {
        return Ok(indicatif::ProgressBar::hidden());
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} cases  {msg}  {elapsed} (eta {eta})",
    )?);
    Ok(bar)
}
