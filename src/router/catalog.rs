//! The routing catalog (TOML): deployments (a provider, its model, price,
//! context window, capabilities and quality per task tag) and logical
//! model names that list candidate deployments. Checked whole when read.
//!
//! ```toml
//! [[deployment]]
//! name = "gpt-4o-mini"
//! provider = "openai"                    # local | openai | azure | openai_compatible
//! model = "gpt-4o-mini"                  # the upstream's model (priced name)
//! base_url = "https://api.openai.com/v1"
//! api_key_env = "OPENAI_API_KEY"
//! input_usd_per_1m = 0.15
//! output_usd_per_1m = 0.60
//! context_window = 128000
//! capabilities = ["streaming", "json", "tools"]
//! quality = { general = 0.80, product_copy = 0.85 }
//! batch_discount = 0.5                   # batch lines pay half (or batch_*_usd_per_1m)
//! batch_concurrency = 4                  # batch requests in flight here at most
//!
//! [[deployment]]
//! name = "smollm2-local"
//! provider = "local"
//! model = "smollm2-135m-instruct"        # or BASE:ADAPTER, a LoRA adapter of it
//! host_usd_per_hour = 0.05               # priced from the host and its measured speed
//! tokens_per_s = 100
//! context_window = 8192
//! capabilities = ["streaming"]
//! quality = { general = 0.30, product_copy = 0.60 }
//!
//! [[model]]
//! name = "writer"
//! deployments = ["smollm2-local", "gpt-4o-mini"]
//!
//! [[deployment]]
//! name = "embed-small"
//! provider = "openai"
//! model = "text-embedding-3-small"
//! base_url = "https://api.openai.com/v1"
//! input_usd_per_1m = 0.02
//! output_usd_per_1m = 0
//! context_window = 8191
//! capabilities = ["embeddings"]          # an embedder: answers /v1/embeddings only
//! dimensions = 1536
//! ```
//!
//! A logical model lists chat deployments or embedders, not both; its
//! embedders (local or remote) must produce the same dimensions, so that
//! any of them can answer for it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::calibration::{Measured, TaskFloor, calibrated};
use super::cost::Prices;
use crate::money::Usd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// qpai's own engine.
    Local,
    Openai,
    /// Azure OpenAI: deployment URLs, `api-version`, `api-key` header.
    Azure,
    /// Any server speaking OpenAI's wire format (TGI, vLLM, Ollama, qpai).
    OpenaiCompatible,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Streaming,
    Json,
    Tools,
    /// Legacy text completions (`/v1/completions`).
    Completions,
    /// An embedder: answers `/v1/embeddings` (and nothing else).
    Embeddings,
}

/// A deployment as the file writes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeploymentFile {
    name: String,
    provider: ProviderKind,
    model: String,
    base_url: Option<String>,
    api_key_env: Option<String>,
    /// Azure: the deployment name in the URL and the `api-version` query.
    azure_deployment: Option<String>,
    api_version: Option<String>,
    input_usd_per_1m: Option<Usd>,
    output_usd_per_1m: Option<Usd>,
    host_usd_per_hour: Option<Usd>,
    tokens_per_s: Option<f64>,
    /// How much faster prefill is than decode on the host (local pricing).
    #[serde(default = "default_prefill_speedup")]
    prefill_speedup: f64,
    context_window: usize,
    #[serde(default)]
    capabilities: BTreeSet<Capability>,
    #[serde(default)]
    quality: BTreeMap<String, f64>,
    /// An embedder's vector length.
    dimensions: Option<usize>,
    /// Batch prices: given outright, or as the fraction of the prices
    /// that batch lines pay (OpenAI and Azure: 0.5).
    batch_input_usd_per_1m: Option<Usd>,
    batch_output_usd_per_1m: Option<Usd>,
    batch_discount: Option<f64>,
    /// Batch requests in flight on this deployment at most.
    batch_concurrency: Option<usize>,
}

/// Batch requests in flight on one upstream deployment when the catalog
/// sets no cap: enough to keep a batch moving, far below the rate limits
/// live traffic needs.
pub const DEFAULT_BATCH_CONCURRENCY: usize = 4;

fn default_prefill_speedup() -> f64 {
    4.0
}

/// A checked deployment.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub name: String,
    pub provider: ProviderKind,
    pub model: String,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub azure_deployment: Option<String>,
    pub api_version: Option<String>,
    pub prices: Prices,
    pub context_window: usize,
    pub capabilities: BTreeSet<Capability>,
    /// Quality per task tag, 0 to 1; `general` applies to untagged requests.
    pub quality: BTreeMap<String, f64>,
    /// Quality per task tag as the evals measured it (over `quality`).
    pub measured: BTreeMap<String, Measured>,
    /// An embedder's vector length (None for chat deployments).
    pub dimensions: Option<usize>,
    /// What batch lines pay here (the prices unless the catalog sets them).
    pub batch_prices: Prices,
    /// Batch requests in flight here at most.
    pub batch_concurrency: usize,
}

impl Deployment {
    /// One of qpai's own models under its own name, outside the catalog.
    pub fn local(name: &str, prices: Prices, context_window: usize) -> Deployment {
        Deployment {
            name: name.to_string(),
            provider: ProviderKind::Local,
            model: name.to_string(),
            base_url: None,
            api_key_env: None,
            azure_deployment: None,
            api_version: None,
            prices,
            context_window,
            capabilities: Default::default(),
            quality: Default::default(),
            measured: Default::default(),
            dimensions: None,
            batch_prices: prices,
            batch_concurrency: DEFAULT_BATCH_CONCURRENCY,
        }
    }

    /// The model a local deployment loads: its model, without an adapter.
    pub fn base_model(&self) -> &str {
        self.model
            .split_once(':')
            .map_or(self.model.as_str(), |(base, _)| base)
    }

    /// Whether this deployment answers embeddings (and only embeddings).
    pub fn is_embedder(&self) -> bool {
        self.capabilities.contains(&Capability::Embeddings)
    }

    /// Quality for `task` (its own score, else `general`, else 0); a
    /// measured score counts over a typed-in one.
    pub fn quality_for(&self, task: Option<&str>) -> f64 {
        let scored = |tag: &str| {
            self.measured
                .get(tag)
                .map(|m| m.score)
                .or_else(|| self.quality.get(tag).copied())
        };
        task.and_then(scored)
            .or_else(|| scored("general"))
            .unwrap_or(0.0)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogicalModelFile {
    name: String,
    deployments: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouterFile {
    #[serde(default)]
    deployment: Vec<DeploymentFile>,
    #[serde(default)]
    model: Vec<LogicalModelFile>,
    /// What the evals measured (written by `qpai eval calibrate`).
    #[serde(default)]
    measured: Vec<Measured>,
    /// Quality floors per task.
    #[serde(default)]
    task: Vec<TaskFloor>,
}

#[derive(Debug, Clone, Default)]
pub struct RouterCatalog {
    pub deployments: Vec<Deployment>,
    /// Logical name -> candidate deployments (indexes into `deployments`).
    pub models: BTreeMap<String, Vec<usize>>,
    /// Task tag -> the quality its requests need when they set none.
    pub floors: BTreeMap<String, f64>,
    /// A hash of the catalog's text: what answers cached under it assume.
    pub fingerprint: String,
}

fn check_deployment(file: DeploymentFile) -> Result<Deployment, String> {
    let name = &file.name;
    let needs = |field: &str, value: &Option<String>| match value {
        Some(v) if !v.is_empty() => Ok(()),
        _ => Err(format!(
            "deployment {name:?}: {field} is required for this provider"
        )),
    };
    match file.provider {
        ProviderKind::Local => {}
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => needs("base_url", &file.base_url)?,
        ProviderKind::Azure => {
            needs("base_url", &file.base_url)?;
            needs("azure_deployment", &file.azure_deployment)?;
            needs("api_version", &file.api_version)?;
        }
    }
    let prices = match (
        file.input_usd_per_1m,
        file.output_usd_per_1m,
        file.host_usd_per_hour,
        file.tokens_per_s,
    ) {
        (Some(input), Some(output), None, None) => Prices {
            input_per_1m: input,
            output_per_1m: output,
        },
        (None, None, Some(host), Some(speed)) if speed > 0.0 => {
            Prices::from_host(host, speed, file.prefill_speedup)
        }
        _ => {
            return Err(format!(
                "deployment {name:?}: give input_usd_per_1m and output_usd_per_1m, or host_usd_per_hour and tokens_per_s (> 0)"
            ));
        }
    };
    if file.context_window == 0 {
        return Err(format!("deployment {name:?}: context_window must be > 0"));
    }
    let embedder = file.capabilities.contains(&Capability::Embeddings);
    match file.dimensions {
        None if embedder => {
            return Err(format!(
                "deployment {name:?}: an embedder needs dimensions (its vector length)"
            ));
        }
        Some(0) => return Err(format!("deployment {name:?}: dimensions must be > 0")),
        Some(_) if !embedder => {
            return Err(format!(
                "deployment {name:?}: dimensions is for embedders (capabilities = [\"embeddings\"])"
            ));
        }
        _ => {}
    }
    let batch_prices = batch_prices(name, &file, prices)?;
    if file.batch_concurrency == Some(0) {
        return Err(format!(
            "deployment {name:?}: batch_concurrency must be > 0"
        ));
    }
    if let Some((tag, q)) = file.quality.iter().find(|(_, q)| !(0.0..=1.0).contains(*q)) {
        return Err(format!(
            "deployment {name:?}: quality {tag} = {q} is outside 0..1"
        ));
    }
    Ok(Deployment {
        name: file.name,
        provider: file.provider,
        model: file.model,
        base_url: file.base_url,
        api_key_env: file.api_key_env,
        azure_deployment: file.azure_deployment,
        api_version: file.api_version,
        prices,
        context_window: file.context_window,
        capabilities: file.capabilities,
        quality: file.quality,
        measured: BTreeMap::new(),
        dimensions: file.dimensions,
        batch_prices,
        batch_concurrency: file.batch_concurrency.unwrap_or(DEFAULT_BATCH_CONCURRENCY),
    })
}

/// A deployment's batch prices: set outright, a fraction of its prices,
/// or (neither given) its prices.
fn batch_prices(name: &str, file: &DeploymentFile, prices: Prices) -> Result<Prices, String> {
    match (
        file.batch_input_usd_per_1m,
        file.batch_output_usd_per_1m,
        file.batch_discount,
    ) {
        (None, None, None) => Ok(prices),
        (Some(input), Some(output), None) => Ok(Prices {
            input_per_1m: input,
            output_per_1m: output,
        }),
        (None, None, Some(fraction)) if (0.0..=1.0).contains(&fraction) => {
            let scaled = |price: Usd| Usd((price.0 as f64 * fraction).round() as u64);
            Ok(Prices {
                input_per_1m: scaled(prices.input_per_1m),
                output_per_1m: scaled(prices.output_per_1m),
            })
        }
        (None, None, Some(fraction)) => Err(format!(
            "deployment {name:?}: batch_discount {fraction} is outside 0..1 (the fraction of the price batch lines pay)"
        )),
        _ => Err(format!(
            "deployment {name:?}: give batch_input_usd_per_1m and batch_output_usd_per_1m, or batch_discount, not both"
        )),
    }
}

/// A logical model's deployments must all answer the same endpoint, and
/// its embedders must produce vectors of one length.
fn check_logical_model(name: &str, deployments: &[&Deployment]) -> Result<(), String> {
    let Some(first) = deployments.first() else {
        return Err(format!("model {name:?} lists no deployment"));
    };
    for other in &deployments[1..] {
        if other.is_embedder() != first.is_embedder() {
            return Err(format!(
                "model {name:?} mixes embedders and chat deployments ({} and {})",
                first.name, other.name
            ));
        }
        if other.dimensions != first.dimensions {
            return Err(format!(
                "model {name:?} mixes embedders of different dimensions: {} gives {} and {} gives {}; a logical model may mix local and remote embedders only when their dimensions match",
                first.name,
                first.dimensions.unwrap_or(0),
                other.name,
                other.dimensions.unwrap_or(0)
            ));
        }
    }
    Ok(())
}

impl RouterCatalog {
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: RouterFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut deployments = Vec::with_capacity(file.deployment.len());
        for raw in file.deployment {
            if deployments.iter().any(|d: &Deployment| d.name == raw.name) {
                return Err(format!("deployment {:?} is defined twice", raw.name));
            }
            deployments.push(check_deployment(raw)?);
        }
        let mut models = BTreeMap::new();
        for model in file.model {
            if model.deployments.is_empty() {
                return Err(format!("model {:?} lists no deployment", model.name));
            }
            let indexes = model
                .deployments
                .iter()
                .map(|name| {
                    deployments
                        .iter()
                        .position(|d| d.name == *name)
                        .ok_or_else(|| format!("model {:?}: no deployment {name:?}", model.name))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let listed: Vec<&Deployment> = indexes.iter().map(|&i| &deployments[i]).collect();
            check_logical_model(&model.name, &listed)?;
            if models.insert(model.name.clone(), indexes).is_some() {
                return Err(format!("model {:?} is defined twice", model.name));
            }
        }
        let floors = calibrated(&mut deployments, file.measured, file.task)?;
        Ok(Self {
            deployments,
            models,
            floors,
            fingerprint: {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(text.as_bytes()))
            },
        })
    }

    /// The quality floor of `task`, if the catalog sets one.
    pub fn floor(&self, task: &str) -> Option<f64> {
        self.floors.get(task).copied()
    }

    pub fn deployment(&self, name: &str) -> Option<&Deployment> {
        self.deployments.iter().find(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[deployment]]
name = "gpt-4o-mini"
provider = "openai"
model = "gpt-4o-mini"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
input_usd_per_1m = 0.15
output_usd_per_1m = 0.60
context_window = 128000
capabilities = ["streaming", "json", "tools"]
quality = { general = 0.80, product_copy = 0.85 }

[[deployment]]
name = "gpt-4o-eu"
provider = "azure"
model = "gpt-4o"
base_url = "https://example.openai.azure.com"
azure_deployment = "prod-4o"
api_version = "2024-10-21"
input_usd_per_1m = "2.50"
output_usd_per_1m = "10"
context_window = 128000

[[deployment]]
name = "smollm2-local"
provider = "local"
model = "smollm2-135m-instruct"
host_usd_per_hour = 0.36
tokens_per_s = 100
context_window = 8192
quality = { general = 0.3 }

[[model]]
name = "writer"
deployments = ["smollm2-local", "gpt-4o-mini"]
"#;

    #[test]
    fn the_example_catalog_parses() {
        let catalog = RouterCatalog::parse(EXAMPLE).unwrap();
        assert_eq!(catalog.deployments.len(), 3);
        let azure = catalog.deployment("gpt-4o-eu").unwrap();
        assert_eq!(
            azure.model, "gpt-4o",
            "priced under the model, not the deployment name"
        );
        assert_eq!(azure.prices.output_per_1m.to_string(), "10");
        let local = catalog.deployment("smollm2-local").unwrap();
        assert_eq!(local.prices.output_per_1m.to_string(), "1");
        assert_eq!(catalog.models["writer"], vec![2, 0]);
        let mini = catalog.deployment("gpt-4o-mini").unwrap();
        assert_eq!(mini.quality_for(Some("product_copy")), 0.85);
        assert_eq!(mini.quality_for(Some("unknown-task")), 0.80);
        assert!(mini.capabilities.contains(&Capability::Tools));
    }

    const EMBEDDERS: &str = r#"
[[deployment]]
name = "embed-remote"
provider = "openai_compatible"
model = "all-minilm-l6-v2"
base_url = "http://127.0.0.1:1/v1"
input_usd_per_1m = 0.02
output_usd_per_1m = 0
context_window = 512
capabilities = ["embeddings"]
dimensions = 384

[[deployment]]
name = "embed-local"
provider = "local"
model = "all-minilm-l6-v2"
host_usd_per_hour = 0.36
tokens_per_s = 1000
context_window = 512
capabilities = ["embeddings"]
dimensions = 384

[[model]]
name = "embedder"
deployments = ["embed-local", "embed-remote"]
"#;

    #[test]
    fn embedders_of_one_length_make_a_logical_model() {
        let catalog = RouterCatalog::parse(&format!("{EXAMPLE}{EMBEDDERS}")).unwrap();
        let local = catalog.deployment("embed-local").unwrap();
        assert!(local.is_embedder() && local.dimensions == Some(384));
        assert_eq!(catalog.models["embedder"].len(), 2);
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (
                EXAMPLE.replace("azure_deployment = \"prod-4o\"\n", ""),
                "azure_deployment",
            ),
            (
                EXAMPLE.replace("\"smollm2-local\", ", "\"nope\", "),
                "no deployment \"nope\"",
            ),
            (
                EXAMPLE.replace("tokens_per_s = 100\n", ""),
                "host_usd_per_hour",
            ),
            (
                EXAMPLE.replace("general = 0.3", "general = 3"),
                "outside 0..1",
            ),
            (
                EXAMPLE.replace("context_window = 8192", "context_window = 0"),
                "context_window",
            ),
            (
                EXAMPLE.replace("provider = \"local\"", "provider = \"bedrock\""),
                "bedrock",
            ),
            (
                format!(
                    "{EXAMPLE}\n[[model]]\nname = \"writer\"\ndeployments = [\"gpt-4o-mini\"]\n"
                ),
                "twice",
            ),
            (
                format!("{EXAMPLE}{EMBEDDERS}").replace("dimensions = 384\n", ""),
                "needs dimensions",
            ),
            (
                format!("{EXAMPLE}{EMBEDDERS}").replacen(
                    "dimensions = 384",
                    "dimensions = 1536",
                    1,
                ),
                "mixes embedders of different dimensions: embed-local gives 384 and embed-remote gives 1536",
            ),
            (
                format!(
                    "{EXAMPLE}{EMBEDDERS}[[model]]\nname = \"odd\"\ndeployments = [\"embed-remote\", \"gpt-4o-mini\"]\n"
                ),
                "mixes embedders and chat deployments",
            ),
        ];
        for (text, expected) in cases {
            let error = RouterCatalog::parse(&text).unwrap_err();
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }
}
