//! `adapter_config.json`: the PEFT LoRA settings qpai supports, and a clear
//! refusal of the ones it does not (never a half-applied adapter).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::projection::Projection;

/// Target modules as PEFT names them: a list of names, or one regex.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Pattern(String),
}

#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Everything else, checked for settings qpai cannot honour.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Settings whose non-empty / true value changes what the adapter computes.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("use_dora", "DoRA adapters"),
    (
        "modules_to_save",
        "adapters that replace whole modules (modules_to_save)",
    ),
    ("rank_pattern", "per-module ranks (rank_pattern)"),
    ("alpha_pattern", "per-module alphas (alpha_pattern)"),
    (
        "layers_to_transform",
        "adapters on a subset of layers (layers_to_transform)",
    ),
    ("trainable_token_indices", "trainable token embeddings"),
    ("lora_bias", "LoRA biases (lora_bias)"),
    ("layer_replication", "layer replication"),
    (
        "target_parameters",
        "adapters on raw parameters (target_parameters)",
    ),
    (
        "alora_invocation_tokens",
        "activated LoRA (alora_invocation_tokens)",
    ),
];

fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::String(s) => !s.is_empty(),
        Value::Number(_) => true,
    }
}

impl AdapterConfig {
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self =
            serde_json::from_str(text).map_err(|e| format!("adapter_config.json: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(kind) = &self.peft_type
            && kind != "LORA"
        {
            return Err(format!("peft_type {kind} is not supported; only LORA is"));
        }
        if self.r == 0 {
            return Err("r must be at least 1".to_string());
        }
        if !self.lora_alpha.is_finite() {
            return Err("lora_alpha must be a finite number".to_string());
        }
        for (key, what) in UNSUPPORTED {
            if self.other.get(*key).is_some_and(is_set) {
                return Err(format!("{what} are not supported (`{key}` is set)"));
            }
        }
        if let Some(bias) = self.other.get("bias").and_then(Value::as_str)
            && bias != "none"
        {
            return Err(format!(
                "bias = {bias:?} is not supported; only \"none\" is"
            ));
        }
        self.targets().map(|_| ())
    }

    /// The scale of the low-rank update: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// The projections the adapter targets; anything else (embeddings, the
    /// LM head, a regex) is refused by name.
    pub fn targets(&self) -> Result<Vec<Projection>, String> {
        let names = match &self.target_modules {
            TargetModules::Names(names) => names,
            TargetModules::Pattern(pattern) if pattern == "all-linear" => {
                return Ok(Projection::ALL.to_vec());
            }
            TargetModules::Pattern(pattern) => {
                return Err(format!(
                    "target_modules as a pattern ({pattern:?}) is not supported; list the modules"
                ));
            }
        };
        if names.is_empty() {
            return Err("target_modules is empty".to_string());
        }
        names
            .iter()
            .map(|name| {
                Projection::from_name(name).ok_or_else(|| {
                    format!(
                        "target module {name:?} is not supported; qpai applies LoRA to q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj"
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<AdapterConfig, String> {
        AdapterConfig::parse(&format!(
            r#"{{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"]{extra}}}"#
        ))
    }

    #[test]
    fn scale_and_targets() {
        let plain = config("").unwrap();
        assert_eq!(plain.scale(), 2.0);
        assert_eq!(
            plain.targets().unwrap(),
            vec![Projection::Q, Projection::Down]
        );
        let rs = config(r#", "use_rslora": true"#).unwrap();
        assert!((rs.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
        let all =
            AdapterConfig::parse(r#"{"r": 4, "lora_alpha": 4, "target_modules": "all-linear"}"#)
                .unwrap();
        assert_eq!(all.targets().unwrap().len(), 7);
        // Settings left at their PEFT defaults are fine.
        config(
            r#", "use_dora": false, "modules_to_save": null, "rank_pattern": {}, "bias": "none""#,
        )
        .unwrap();
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        for (extra, words) in [
            (r#", "use_dora": true"#, "DoRA"),
            (r#", "modules_to_save": ["lm_head"]"#, "modules_to_save"),
            (r#", "rank_pattern": {"q_proj": 4}"#, "rank_pattern"),
            (r#", "bias": "all""#, "bias"),
            (r#", "layers_to_transform": [0]"#, "layers_to_transform"),
        ] {
            let error = config(extra).unwrap_err();
            assert!(error.contains(words), "{extra}: {error}");
        }
        let error = AdapterConfig::parse(
            r#"{"r": 4, "lora_alpha": 4, "target_modules": ["embed_tokens"]}"#,
        )
        .unwrap_err();
        assert!(error.contains("embed_tokens"), "{error}");
        let error =
            AdapterConfig::parse(r#"{"r": 4, "lora_alpha": 4, "target_modules": ".*proj"}"#)
                .unwrap_err();
        assert!(error.contains("pattern"), "{error}");
        let error = AdapterConfig::parse(
            r#"{"peft_type": "IA3", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
        )
        .unwrap_err();
        assert!(error.contains("IA3"), "{error}");
        assert!(
            AdapterConfig::parse(r#"{"r": 0, "lora_alpha": 4, "target_modules": ["q_proj"]}"#)
                .is_err()
        );
        assert!(AdapterConfig::parse("{").is_err());
    }
}
