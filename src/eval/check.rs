//! Before a suite runs: every case must make a request for every variant
//! and every assertion must find its columns (each problem named by line
//! and variant), every variant's model, adapter and prompt must be
//! routable, and so must the judge. Nothing is asked of a model until all
//! of that holds. `--dry-run` stops after it, with the cost estimate.

use serde_json::Value;

use super::call;
use super::judged;
use super::suite::{Suite, VariantKind};
use crate::gateway::wire::ChatCompletionRequest;
use crate::gateway::{Gateway, Hints};
use crate::money::Usd;
use crate::tenancy::Principal;

/// Problems listed at most.
const MAX_PROBLEMS: usize = 20;

/// Checks what can be checked without asking a model; notes which chat
/// variants cannot stream on their routes (they are asked whole).
pub async fn check(
    suite: &mut Suite,
    gateway: &Gateway,
    principal: &Principal,
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    'cases: for case in &suite.cases {
        for variant in &suite.variants {
            if let VariantKind::Chat(chat) = &variant.kind
                && let Err(error) = call::chat_body(&suite.shared, chat, case)
            {
                problems.push(format!(
                    "line {} ({}), variant {}: {error}",
                    case.line, case.id, variant.label
                ));
            }
            if problems.len() >= MAX_PROBLEMS {
                break 'cases;
            }
        }
        for (index, assertion) in suite.assertions.iter().enumerate() {
            for value in assertion.values() {
                if let Err(error) = super::assertions::resolve(value, &case.columns) {
                    problems.push(format!(
                        "line {} ({}), assert[{index}]: {error}",
                        case.line, case.id
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "{} does not fit suite {}; nothing was run:\n  {}",
            suite.dataset.display(),
            suite.path.display(),
            problems.join("\n  ")
        );
    }
    let first = &suite.cases[0];
    let hints = call::hints(&suite.shared, "check");
    for variant in &mut suite.variants {
        match &mut variant.kind {
            VariantKind::Chat(chat) => {
                let body =
                    call::chat_body(&suite.shared, chat, first).map_err(anyhow::Error::msg)?;
                estimate(gateway, principal, &hints, &body)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("{}: variant {}: {e}", suite.path.display(), variant.label)
                    })?;
                let mut streamed = body;
                streamed["stream"] = Value::Bool(true);
                chat.stream = estimate(gateway, principal, &hints, &streamed)
                    .await
                    .is_ok();
            }
            VariantKind::Search(search) => {
                call::search(gateway, principal, search, first)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "{}: variant {}: {}",
                            suite.path.display(),
                            variant.label,
                            e.message
                        )
                    })?;
            }
        }
    }
    if let Some(judge) = &suite.judge {
        let body = judged::judge_body(judge, "A rubric.", "An answer.");
        estimate(gateway, principal, &hints, &body)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: [judge]: the judge model {:?} is not routable: {e}",
                    suite.path.display(),
                    judge.model
                )
            })?;
    }
    Ok(())
}

/// What the first route of `body` would be, and its prompt tokens, most
/// completion tokens and prices.
async fn estimate(
    gateway: &Gateway,
    principal: &Principal,
    hints: &Hints,
    body: &Value,
) -> Result<Estimate, String> {
    let request: ChatCompletionRequest =
        serde_json::from_value(body.clone()).map_err(|e| e.to_string())?;
    let candidates = gateway
        .estimate_chat(principal, request, hints)
        .await
        .map_err(|e| e.message)?;
    let first = candidates.first().ok_or("no route")?;
    let prices = first.deployment.prices;
    Ok(Estimate {
        route: first.deployment.name.clone(),
        prompt_tokens: first.prompt_tokens,
        max_completion_tokens: first.max_completion_tokens,
        prompt_cost: prices.cost(first.prompt_tokens, 0),
        max_cost: prices.cost(first.prompt_tokens, first.max_completion_tokens),
    })
}

#[derive(Debug, Default)]
struct Estimate {
    route: String,
    prompt_tokens: u64,
    max_completion_tokens: u64,
    prompt_cost: Usd,
    max_cost: Usd,
}

/// Prints what each variant would cost at most (and at least: its prompts
/// alone); asks nothing. Cached answers cost nothing and are counted apart.
pub async fn dry_run(
    suite: &Suite,
    gateway: &Gateway,
    principal: &Principal,
    cache: Option<&super::cache::Cache>,
    repeat: usize,
) -> anyhow::Result<()> {
    let hints = call::hints(&suite.shared, "dry-run");
    println!(
        "{:<48} {:>6} {:>7} {:>12} {:>14} {:>12} {:>12}",
        "variant", "cases", "cached", "prompt tok", "max completion", "at least $", "at most $"
    );
    let (mut least, mut most) = (Usd::ZERO, Usd::ZERO);
    for variant in &suite.variants {
        let VariantKind::Chat(chat) = &variant.kind else {
            println!(
                "{:<48} {:>6} (a site search: free)",
                variant.label,
                suite.cases.len() * repeat
            );
            continue;
        };
        let mut sum = Estimate::default();
        let (mut cases, mut cached) = (0, 0);
        let mut routes: Vec<String> = Vec::new();
        for case in &suite.cases {
            let body = call::chat_body(&suite.shared, chat, case).map_err(anyhow::Error::msg)?;
            let one = estimate(gateway, principal, &hints, &body)
                .await
                .map_err(|e| anyhow::anyhow!("line {}: {e}", case.line))?;
            for index in 0..repeat {
                cases += 1;
                let routing = super::cache::routing(gateway, &body, &hints);
                let key = super::cache::key(&principal.tenant, &body, index, &routing);
                if let Some(cache) = cache
                    && cache.get(&key).await?.is_some()
                {
                    cached += 1;
                    continue;
                }
                sum.prompt_tokens += one.prompt_tokens;
                sum.max_completion_tokens += one.max_completion_tokens;
                sum.prompt_cost = sum.prompt_cost.saturating_add(one.prompt_cost);
                sum.max_cost = sum.max_cost.saturating_add(one.max_cost);
            }
            if !routes.contains(&one.route) {
                routes.push(one.route);
            }
        }
        least = least.saturating_add(sum.prompt_cost);
        most = most.saturating_add(sum.max_cost);
        println!(
            "{:<48} {cases:>6} {cached:>7} {:>12} {:>14} {:>12} {:>12}  via {}",
            variant.label,
            sum.prompt_tokens,
            sum.max_completion_tokens,
            sum.prompt_cost.to_string(),
            sum.max_cost.to_string(),
            routes.join(", ")
        );
    }
    println!(
        "total: at least ${least}, at most ${most} (live prices; the judge's grading comes on top)"
    );
    Ok(())
}
