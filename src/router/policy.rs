//! Which deployments may answer a request, cheapest first. A deployment's
//! name pins the route; a logical model offers its deployments; `auto`
//! offers every deployment. A candidate must have the capabilities the
//! request uses, fit the counted prompt plus max_tokens in its context, and
//! meet the quality floor for the task; candidates are ordered by the cost
//! of the prompt and max_tokens at their prices, better quality first on a
//! tie. What does not qualify is named, so a refusal can say why.

use std::collections::BTreeSet;

use super::catalog::{Capability, Deployment, RouterCatalog};
use crate::money::Usd;

/// The model name that lets the router choose.
pub const AUTO: &str = "auto";

/// Completion tokens assumed for ordering when a request sets no max_tokens.
const EXPECTED_COMPLETION: u64 = 256;

/// What a request needs from a route.
#[derive(Debug, Clone, Default)]
pub struct Needs {
    pub capabilities: BTreeSet<Capability>,
    /// The task tag whose quality score counts (`general` when absent).
    pub task: Option<String>,
    pub min_quality: Option<f64>,
    /// The request's max_tokens / max_completion_tokens.
    pub max_tokens: Option<u64>,
    /// Completions per request (`n`).
    pub choices: u64,
}

/// A deployment that may answer, with what the request would cost there.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub deployment: Deployment,
    pub prompt_tokens: u64,
    /// The most completion tokens the request may produce here.
    pub max_completion_tokens: u64,
    /// The most the request can cost here: what a budget must hold.
    pub max_cost: Usd,
    /// The cost used for ordering.
    pub expected_cost: Usd,
}

/// Why a deployment was passed over.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub deployment: String,
    pub reason: String,
}

/// The deployments `model` may go to and whether the name pinned one;
/// None when the router does not know the name.
pub fn offered<'a>(catalog: &'a RouterCatalog, model: &str) -> Option<(Vec<&'a Deployment>, bool)> {
    if let Some(deployment) = catalog.deployment(model) {
        return Some((vec![deployment], true));
    }
    if let Some(indexes) = catalog.models.get(model) {
        return Some((
            indexes.iter().map(|&i| &catalog.deployments[i]).collect(),
            false,
        ));
    }
    (model == AUTO && !catalog.deployments.is_empty())
        .then(|| (catalog.deployments.iter().collect(), false))
}

/// Candidates in the order to try them, and the deployments passed over.
/// `prompt_tokens` counts the prompt as a deployment's tokenizer does.
pub fn rank(
    offered: &[&Deployment],
    needs: &Needs,
    mut prompt_tokens: impl FnMut(&Deployment) -> Result<u64, String>,
) -> (Vec<Candidate>, Vec<Rejection>) {
    let mut candidates = Vec::new();
    let mut rejected = Vec::new();
    for deployment in offered {
        let reject = |reason: String| Rejection {
            deployment: deployment.name.clone(),
            reason,
        };
        if let Some(missing) = needs
            .capabilities
            .iter()
            .find(|c| !deployment.capabilities.contains(c))
        {
            rejected.push(reject(
                format!("does not support {missing:?}").to_lowercase(),
            ));
            continue;
        }
        let quality = deployment.quality_for(needs.task.as_deref());
        if let Some(floor) = needs.min_quality
            && quality < floor
        {
            rejected.push(reject(format!(
                "quality {quality} for {} is below {floor}",
                needs.task.as_deref().unwrap_or("general")
            )));
            continue;
        }
        let prompt = match prompt_tokens(deployment) {
            Ok(n) => n,
            Err(reason) => {
                rejected.push(reject(reason));
                continue;
            }
        };
        let window = deployment.context_window as u64;
        let room = window.saturating_sub(prompt);
        let choices = needs.choices.max(1);
        let max_completion = match needs.max_tokens {
            Some(asked) if asked > room || room == 0 => {
                rejected.push(reject(format!(
                    "{prompt} prompt tokens + {asked} max_tokens exceed its context of {window}"
                )));
                continue;
            }
            Some(asked) => asked,
            None if room == 0 => {
                rejected.push(reject(format!(
                    "{prompt} prompt tokens fill its context of {window}"
                )));
                continue;
            }
            None => room,
        };
        let prices = deployment.prices;
        candidates.push(Candidate {
            deployment: (*deployment).clone(),
            prompt_tokens: prompt,
            max_completion_tokens: max_completion,
            max_cost: prices.cost(prompt, max_completion.saturating_mul(choices)),
            expected_cost: prices.cost(
                prompt,
                max_completion
                    .min(EXPECTED_COMPLETION)
                    .saturating_mul(choices),
            ),
        });
    }
    candidates.sort_by(|a, b| {
        a.expected_cost.cmp(&b.expected_cost).then_with(|| {
            let task = needs.task.as_deref();
            b.deployment
                .quality_for(task)
                .total_cmp(&a.deployment.quality_for(task))
        })
    });
    (candidates, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str = r#"
        [[deployment]]
        name = "local"
        provider = "local"
        model = "small"
        host_usd_per_hour = 0.36
        tokens_per_s = 100
        context_window = 2048
        capabilities = ["streaming"]
        quality = { general = 0.3, product_copy = 0.7 }

        [[deployment]]
        name = "mini"
        provider = "openai"
        model = "gpt-4o-mini"
        base_url = "http://127.0.0.1:1/v1"
        input_usd_per_1m = 0.15
        output_usd_per_1m = 0.60
        context_window = 128000
        capabilities = ["streaming", "json", "tools"]
        quality = { general = 0.8 }

        [[deployment]]
        name = "big"
        provider = "openai"
        model = "gpt-4o"
        base_url = "http://127.0.0.1:1/v1"
        input_usd_per_1m = 2.5
        output_usd_per_1m = 10
        context_window = 128000
        capabilities = ["streaming", "json", "tools"]
        quality = { general = 0.95 }

        [[model]]
        name = "writer"
        deployments = ["big", "local", "mini"]
    "#;

    fn names(candidates: &[Candidate]) -> Vec<&str> {
        candidates
            .iter()
            .map(|c| c.deployment.name.as_str())
            .collect()
    }

    #[test]
    fn the_cheapest_qualified_deployment_comes_first() {
        let catalog = RouterCatalog::parse(CATALOG).unwrap();
        let (offered, pinned) = offered(&catalog, "writer").unwrap();
        assert!(!pinned);
        let needs = Needs {
            max_tokens: Some(100),
            ..Needs::default()
        };
        let (ranked, rejected) = rank(&offered, &needs, |_| Ok(500));
        // local: 0.36 $/h at 100 tok/s is $1 per 1M out and $0.25 in, so
        // 500 in + 100 out cost 225 µ$ there, 135 on mini, 2250 on big.
        assert_eq!(names(&ranked), ["mini", "local", "big"]);
        assert!(rejected.is_empty());
        let cost = |name: &str| {
            ranked
                .iter()
                .find(|c| c.deployment.name == name)
                .unwrap()
                .max_cost
        };
        assert_eq!(cost("big"), Usd(500 * 2_500_000 + 100 * 10_000_000));
        assert!(
            ranked
                .windows(2)
                .all(|w| w[0].expected_cost <= w[1].expected_cost)
        );
    }

    #[test]
    fn capabilities_context_and_quality_filter_with_reasons() {
        let catalog = RouterCatalog::parse(CATALOG).unwrap();
        let (offered, _) = offered(&catalog, AUTO).unwrap();
        let needs = Needs {
            capabilities: [Capability::Tools].into(),
            min_quality: Some(0.9),
            max_tokens: Some(10),
            ..Needs::default()
        };
        let (ranked, rejected) = rank(&offered, &needs, |_| Ok(100));
        assert_eq!(names(&ranked), ["big"]);
        assert_eq!(rejected.len(), 2);
        assert!(rejected[0].reason.contains("tools"), "{rejected:?}");
        assert!(rejected[1].reason.contains("quality 0.8"), "{rejected:?}");

        let needs = Needs {
            task: Some("product_copy".into()),
            min_quality: Some(0.6),
            max_tokens: Some(100),
            ..Needs::default()
        };
        let (ranked, rejected) = rank(&offered, &needs, |d| {
            Ok(if d.name == "local" { 2000 } else { 1900 })
        });
        assert!(!names(&ranked).contains(&"local"));
        assert!(
            rejected
                .iter()
                .any(|r| r.deployment == "local" && r.reason.contains("context of 2048"))
        );
    }

    #[test]
    fn a_deployment_name_pins_and_unknown_names_are_not_routed() {
        let catalog = RouterCatalog::parse(CATALOG).unwrap();
        let (offered_big, pinned) = offered(&catalog, "big").unwrap();
        assert!(pinned && offered_big.len() == 1);
        assert!(offered(&catalog, "smollm2").is_none());
        let (ranked, _) = rank(&offered_big, &Needs::default(), |_| Ok(1000));
        assert_eq!(
            ranked[0].max_completion_tokens, 127_000,
            "no max_tokens: the rest of the context"
        );
    }
}
