//! Online experiments: a tenant names the variants of a task (models,
//! adapters as `BASE:ADAPTER`, prompt versions), requests that name the
//! experiment get a variant by Thompson sampling (bandit.rs), sticky per
//! `user` or episode, and feedback on a request or an episode updates the
//! variant's posterior. Everything lives in the ledger database (store.rs),
//! so it survives restarts and several processes share it. An experiment
//! stops when one variant's probability of being best passes its threshold;
//! from then on every request gets the winner.

pub mod bandit;
pub mod store;

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};

pub use store::{Assignment, Experiments, FeedbackTarget};

/// Feedback an experiment needs, all variants together, before it may stop.
const DEFAULT_MIN_FEEDBACK: u64 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// true / false (a click, a pass): Beta posteriors.
    Boolean,
    /// A number (a rating, a score): Normal-Gamma posteriors.
    Float,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metric {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: MetricKind,
}

/// What a variant changes in a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    /// The model (or deployment, `BASE:ADAPTER`, `auto`) it answers with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A registry prompt, `NAME@VERSION` (the request's variables fill it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
}

/// An experiment as created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub metric: Metric,
    pub variants: Vec<Variant>,
    /// Reward units a US dollar per request is worth: a variant's utility
    /// is its reward less this times its mean price (0: price ignored).
    #[serde(default)]
    pub cost_weight: f64,
    /// The probability of being best at which the experiment stops and
    /// sends all traffic to the winner (none: it never stops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_at: Option<f64>,
    /// Feedback (all variants together) before the experiment may stop.
    #[serde(default = "default_min_feedback")]
    pub min_feedback: u64,
}

fn default_min_feedback() -> u64 {
    DEFAULT_MIN_FEEDBACK
}

impl ExperimentSpec {
    /// Reads a create request; each mistake names its parameter.
    pub fn parse(body: serde_json::Value) -> ApiResult<ExperimentSpec> {
        let invalid = |param: &str, error: serde_json::Error| {
            ApiError::invalid_param(param, format!("'{param}' is not valid: {error}."))
        };
        // The nested parts first, so that their mistakes name them.
        if let Some(metric) = body.get("metric") {
            serde_json::from_value::<Metric>(metric.clone()).map_err(|e| invalid("metric", e))?;
        }
        if let Some(variants) = body.get("variants") {
            serde_json::from_value::<Vec<Variant>>(variants.clone())
                .map_err(|e| invalid("variants", e))?;
        }
        let spec: ExperimentSpec = serde_json::from_value(body).map_err(|e| {
            let text = e.to_string();
            let param = ["id", "metric", "variants", "cost_weight", "stop_at", "task"]
                .into_iter()
                .find(|p| text.contains(&format!("`{p}`")))
                .unwrap_or("body");
            ApiError::invalid_param(param, format!("The experiment is not valid: {text}."))
        })?;
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> ApiResult<()> {
        let valid_id = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid_id {
            return Err(ApiError::invalid_param(
                "id",
                "'id' must be 1 to 64 letters, digits, '-', '_' or '.'.",
            ));
        }
        if self.metric.name.trim().is_empty() {
            return Err(ApiError::invalid_param(
                "metric.name",
                "'metric.name' must not be empty.",
            ));
        }
        if self.variants.len() < 2 {
            return Err(ApiError::invalid_param(
                "variants",
                format!(
                    "An experiment needs at least two variants to compare; this one has {}.",
                    self.variants.len()
                ),
            ));
        }
        for (index, variant) in self.variants.iter().enumerate() {
            let place = format!("variants[{index}]");
            if variant.name.trim().is_empty() {
                return Err(ApiError::invalid_param(
                    format!("{place}.name"),
                    "Each variant needs a name.",
                ));
            }
            if self.variants[..index]
                .iter()
                .any(|v| v.name == variant.name)
            {
                return Err(ApiError::invalid_param(
                    format!("{place}.name"),
                    format!("Two variants are named '{}'.", variant.name),
                ));
            }
            if variant.model.is_none() && variant.prompt.is_none() {
                return Err(ApiError::invalid_param(
                    place,
                    "A variant names a model, a prompt, or both.",
                ));
            }
        }
        if !(self.cost_weight.is_finite() && self.cost_weight >= 0.0) {
            return Err(ApiError::invalid_param(
                "cost_weight",
                "'cost_weight' must be a number of 0 or more.",
            ));
        }
        if let Some(p) = self.stop_at
            && !(0.5..1.0).contains(&p)
        {
            return Err(ApiError::invalid_param(
                "stop_at",
                "'stop_at' must be a probability from 0.5 up to (not including) 1.",
            ));
        }
        Ok(())
    }

    pub fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.name == name)
    }
}

/// A request's part in an experiment: which one, and the unit (a `user`
/// or an episode) its variant sticks to.
#[derive(Debug, Clone)]
pub struct ExperimentCall {
    pub experiment: String,
    pub unit: Option<String>,
}

/// A feedback value as given: checked against the metric's type.
pub fn feedback_value(kind: MetricKind, value: &serde_json::Value) -> ApiResult<f64> {
    match (kind, value) {
        (MetricKind::Boolean, serde_json::Value::Bool(b)) => Ok(f64::from(u8::from(*b))),
        (MetricKind::Float, serde_json::Value::Number(n)) => match n.as_f64() {
            Some(v) if v.abs() <= 1e6 => Ok(v),
            _ => Err(ApiError::invalid_param(
                "value",
                "A float metric takes values from -1e6 to 1e6.",
            )),
        },
        (MetricKind::Boolean, other) => Err(ApiError::invalid_param(
            "value",
            format!("This metric is boolean: 'value' must be true or false, not {other}."),
        )),
        (MetricKind::Float, other) => Err(ApiError::invalid_param(
            "value",
            format!("This metric is a float: 'value' must be a number, not {other}."),
        )),
    }
}
