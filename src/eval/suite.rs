//! A suite file (`eval/suites/*.toml`): its dataset, its variants (the
//! cross product of prompts, models, adapters and settings, or the modes
//! of a site search) and its assertions. Loading checks everything that
//! can be checked without a model: every problem names its place in the
//! file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::assertions::Assertion;
use crate::prompts::{PromptTemplate, Prompts};
use crate::rag::SearchMode;

/// Request settings a variant may set.
const SETTINGS: &[&str] = &[
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    name: String,
    #[serde(default)]
    description: String,
    dataset: DatasetFile,
    /// Settings of every variant (each `settings` entry overrides them).
    #[serde(default)]
    defaults: Map<String, Value>,
    variants: VariantsFile,
    #[serde(default, rename = "assert")]
    assertions: Vec<Value>,
    judge: Option<JudgeFile>,
    /// Cases run at once (the command line's `--concurrency` wins).
    concurrency: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetFile {
    /// JSONL or CSV, relative to the suite file.
    path: PathBuf,
    /// The first rows only.
    limit: Option<usize>,
    /// The column naming a case (default `id`; else `case-N`).
    id: Option<String>,
    /// A column whose values split the results into groups (e.g. `kind`).
    group: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JudgeFile {
    model: String,
    #[serde(default = "default_judge_tokens")]
    max_tokens: u32,
}

fn default_judge_tokens() -> u32 {
    200
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantsFile {
    #[serde(default)]
    prompts: Vec<PromptFile>,
    #[serde(default)]
    models: Vec<String>,
    /// Adapter ids; "" is the model without one.
    #[serde(default)]
    adapters: Vec<String>,
    #[serde(default)]
    settings: Vec<Map<String, Value>>,
    /// The task tag (`x-qpai-task`) that `auto` routes by.
    task: Option<String>,
    min_quality: Option<f64>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    response_format: Option<Value>,
    /// Grounded answers: `{site, top_k, mode}` as a request's `rag`.
    rag: Option<Value>,
    /// Variants that search a site instead of asking a model.
    search: Option<SearchFile>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptFile {
    /// `NAME@VERSION` from the prompt registry.
    Registered(String),
    Inline {
        label: String,
        messages: Vec<InlineMessage>,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InlineMessage {
    pub role: String,
    /// A template over the row's columns.
    pub content: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchFile {
    site: String,
    modes: Vec<SearchMode>,
    /// The query: a template over the row's columns.
    query: String,
    #[serde(default = "default_top_k")]
    top_k: usize,
}

fn default_top_k() -> usize {
    50
}

/// The prompt of a chat variant.
#[derive(Debug, Clone)]
pub enum PromptChoice {
    Registered(Arc<PromptTemplate>),
    Inline {
        label: String,
        messages: Vec<InlineMessage>,
    },
}

impl PromptChoice {
    pub fn label(&self) -> String {
        match self {
            PromptChoice::Registered(template) => template.reference(),
            PromptChoice::Inline { label, .. } => label.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChatVariant {
    pub prompt: PromptChoice,
    /// A model, a deployment or a logical model (`auto`).
    pub model: String,
    pub adapter: Option<String>,
    /// Request settings (defaults, then the variant's own).
    pub settings: Map<String, Value>,
    pub settings_label: Option<String>,
    /// Asked as a stream (to time the first token) where its routes can
    /// stream; the check before a run clears it where they cannot.
    pub stream: bool,
}

impl ChatVariant {
    /// The model as a request names it (`MODEL:ADAPTER` with an adapter).
    pub fn request_model(&self) -> String {
        match &self.adapter {
            Some(adapter) => format!("{}:{adapter}", self.model),
            None => self.model.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SearchVariant {
    pub site: String,
    pub mode: SearchMode,
    pub query: String,
    pub top_k: usize,
}

#[derive(Debug, Clone)]
pub enum VariantKind {
    Chat(ChatVariant),
    Search(SearchVariant),
}

/// One variant: a label (unique in the suite) and what it runs.
#[derive(Debug, Clone)]
pub struct Variant {
    pub label: String,
    pub kind: VariantKind,
}

/// What every chat variant of a suite shares.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    pub task: Option<String>,
    pub min_quality: Option<f64>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub response_format: Option<Value>,
    pub rag: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct Judge {
    pub model: String,
    pub max_tokens: u32,
}

/// A dataset row: its id, its 1-based line and its columns.
#[derive(Debug, Clone)]
pub struct Case {
    pub id: String,
    /// Its value of the suite's group column, if any.
    pub group: Option<String>,
    pub line: usize,
    pub columns: Map<String, Value>,
}

/// A loaded suite.
#[derive(Debug)]
pub struct Suite {
    pub name: String,
    pub description: String,
    pub path: PathBuf,
    pub dataset: PathBuf,
    pub cases: Vec<Case>,
    pub variants: Vec<Variant>,
    pub shared: Shared,
    pub assertions: Vec<Assertion>,
    pub judge: Option<Judge>,
    pub concurrency: Option<usize>,
}

fn problem(path: &Path, place: &str, message: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{}: {place}: {message}", path.display())
}

impl Suite {
    /// Reads `path` and its dataset; prompts are looked up in `prompts`.
    pub fn load(path: &Path, prompts: &Prompts) -> anyhow::Result<Suite> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let file: SuiteFile =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let assertions = file
            .assertions
            .iter()
            .enumerate()
            .map(|(index, value)| {
                Assertion::parse(value, base)
                    .map_err(|e| problem(path, &format!("assert[{index}]"), e))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let judge = file.judge.map(|j| Judge {
            model: j.model,
            max_tokens: j.max_tokens,
        });
        if judge.is_none()
            && let Some(index) = assertions.iter().position(Assertion::needs_judge)
        {
            return Err(problem(
                path,
                &format!("assert[{index}]"),
                "llm-rubric needs a judge: add [judge] model = \"...\" to the suite",
            ));
        }
        check_settings(path, "defaults", &file.defaults)?;
        let variants = variants(path, &file.variants, &file.defaults, prompts)?;
        let dataset = base.join(&file.dataset.path);
        let cases = read_cases(
            &dataset,
            file.dataset.id.as_deref(),
            file.dataset.group.as_deref(),
            file.dataset.limit,
        )?;
        let variants_file = file.variants;
        Ok(Suite {
            name: file.name,
            description: file.description,
            path: path.to_path_buf(),
            dataset,
            cases,
            variants,
            shared: Shared {
                task: variants_file.task,
                min_quality: variants_file.min_quality,
                tools: variants_file.tools,
                tool_choice: variants_file.tool_choice,
                response_format: variants_file.response_format,
                rag: variants_file.rag,
            },
            assertions,
            judge,
            concurrency: file.concurrency,
        })
    }

    /// The local models the suite's chat variants and judge may need.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .variants
            .iter()
            .filter_map(|v| match &v.kind {
                VariantKind::Chat(chat) => Some(chat.model.clone()),
                VariantKind::Search(_) => None,
            })
            .chain(self.judge.iter().map(|j| j.model.clone()))
            .collect();
        models.sort();
        models.dedup();
        models
    }

    /// Whether any part needs the embedding model.
    pub fn needs_embeddings(&self) -> bool {
        self.assertions.iter().any(Assertion::needs_embeddings)
            || self.shared.rag.is_some()
            || self
                .variants
                .iter()
                .any(|v| matches!(v.kind, VariantKind::Search(_)))
    }
}

fn check_settings(path: &Path, place: &str, settings: &Map<String, Value>) -> anyhow::Result<()> {
    for key in settings.keys() {
        if !SETTINGS.contains(&key.as_str()) && key != "label" {
            return Err(problem(
                path,
                place,
                format!(
                    "unknown setting {key:?} (known: {}, label)",
                    SETTINGS.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn variants(
    path: &Path,
    file: &VariantsFile,
    defaults: &Map<String, Value>,
    prompts: &Prompts,
) -> anyhow::Result<Vec<Variant>> {
    if let Some(search) = &file.search {
        if !file.models.is_empty() || !file.prompts.is_empty() {
            return Err(problem(
                path,
                "variants",
                "search variants take no models or prompts",
            ));
        }
        if search.modes.is_empty() {
            return Err(problem(
                path,
                "variants.search.modes",
                "name at least one mode",
            ));
        }
        return Ok(search
            .modes
            .iter()
            .map(|&mode| Variant {
                label: format!("{}/{}", search.site, mode_name(mode)),
                kind: VariantKind::Search(SearchVariant {
                    site: search.site.clone(),
                    mode,
                    query: search.query.clone(),
                    top_k: search.top_k,
                }),
            })
            .collect());
    }
    if file.models.is_empty() {
        return Err(problem(path, "variants.models", "name at least one model"));
    }
    if file.prompts.is_empty() {
        return Err(problem(
            path,
            "variants.prompts",
            "name at least one prompt",
        ));
    }
    let prompt_choices = file
        .prompts
        .iter()
        .enumerate()
        .map(|(index, prompt)| match prompt {
            PromptFile::Registered(reference) => prompts
                .get_reference(reference)
                .map(PromptChoice::Registered)
                .map_err(|e| problem(path, &format!("variants.prompts[{index}]"), e.message)),
            PromptFile::Inline { label, messages } => {
                if messages.is_empty() {
                    return Err(problem(
                        path,
                        &format!("variants.prompts[{index}]"),
                        "an inline prompt needs messages",
                    ));
                }
                Ok(PromptChoice::Inline {
                    label: label.clone(),
                    messages: messages.clone(),
                })
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let adapters: Vec<Option<String>> = if file.adapters.is_empty() {
        vec![None]
    } else {
        file.adapters
            .iter()
            .map(|a| (!a.is_empty()).then(|| a.clone()))
            .collect()
    };
    let settings = if file.settings.is_empty() {
        vec![Map::new()]
    } else {
        file.settings.clone()
    };
    for (index, entry) in settings.iter().enumerate() {
        check_settings(path, &format!("variants.settings[{index}]"), entry)?;
    }
    let mut variants = Vec::new();
    for prompt in &prompt_choices {
        for model in &file.models {
            for adapter in &adapters {
                for entry in &settings {
                    let mut merged = defaults.clone();
                    let mut own = entry.clone();
                    let settings_label = own
                        .remove("label")
                        .map(|l| l.as_str().map_or(l.to_string(), str::to_string));
                    merged.extend(own);
                    let chat = ChatVariant {
                        prompt: prompt.clone(),
                        model: model.clone(),
                        adapter: adapter.clone(),
                        settings: merged,
                        settings_label,
                        stream: true,
                    };
                    let mut label = format!("{} · {}", prompt.label(), chat.request_model());
                    if let Some(extra) = &chat.settings_label {
                        label.push_str(&format!(" · {extra}"));
                    }
                    variants.push(Variant {
                        label,
                        kind: VariantKind::Chat(chat),
                    });
                }
            }
        }
    }
    let mut labels: Vec<&str> = variants.iter().map(|v| v.label.as_str()).collect();
    labels.sort();
    if let Some(pair) = labels.windows(2).find(|w| w[0] == w[1]) {
        return Err(problem(
            path,
            "variants",
            format!("two variants are both {:?}: give settings a label", pair[0]),
        ));
    }
    Ok(variants)
}

pub fn mode_name(mode: SearchMode) -> &'static str {
    match mode {
        SearchMode::Vector => "vector",
        SearchMode::Fulltext => "fulltext",
        SearchMode::Hybrid => "hybrid",
    }
}

fn read_cases(
    path: &Path,
    id_column: Option<&str>,
    group_column: Option<&str>,
    limit: Option<usize>,
) -> anyhow::Result<Vec<Case>> {
    let content =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let records = crate::batches::rows::read_table(path, &content)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let id_column = id_column.unwrap_or("id");
    let mut seen = std::collections::HashSet::new();
    let mut cases = Vec::new();
    for (index, (line, columns)) in records
        .into_iter()
        .take(limit.unwrap_or(usize::MAX))
        .enumerate()
    {
        let id = match columns.get(id_column) {
            Some(Value::String(id)) => id.clone(),
            Some(other) => other.to_string(),
            None => format!("case-{}", index + 1),
        };
        if !seen.insert(id.clone()) {
            anyhow::bail!(
                "{}: line {line}: the id {id:?} is used twice",
                path.display()
            );
        }
        let group = group_column.map(|name| match columns.get(name) {
            Some(Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        });
        cases.push(Case {
            id,
            group,
            line,
            columns,
        });
    }
    if cases.is_empty() {
        anyhow::bail!("{} has no rows", path.display());
    }
    Ok(cases)
}
