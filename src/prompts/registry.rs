//! The prompt registry: the templates shipped in `prompts/` (built into the
//! binary) and those in a prompts directory (`<data dir>/prompts` unless
//! told otherwise), by name and version. A file is named
//! `NAME.vVERSION.j2` and says the same name and version in its front
//! matter. Files without front matter are qpai's own internal templates
//! and are not listed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::template::{PromptTemplate, Variable};
use crate::error::{ApiError, ApiResult};

/// The templates shipped with qpai.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "product_description.v1.j2",
        include_str!("../../prompts/product_description.v1.j2"),
    ),
    (
        "product_description.v2.j2",
        include_str!("../../prompts/product_description.v2.j2"),
    ),
    ("faq.v1.j2", include_str!("../../prompts/faq.v1.j2")),
    (
        "seo_meta.v1.j2",
        include_str!("../../prompts/seo_meta.v1.j2"),
    ),
    (
        "translation.v1.j2",
        include_str!("../../prompts/translation.v1.j2"),
    ),
    (
        "rag_answer.v1.j2",
        include_str!("../../prompts/rag_answer.v1.j2"),
    ),
];

/// A prompt as listed: its newest version's description and variables.
#[derive(Debug, Clone, Serialize)]
pub struct PromptSummary {
    pub id: String,
    pub object: &'static str,
    pub latest_version: u32,
    pub versions: Vec<u32>,
    pub description: String,
    pub variables: BTreeMap<String, Variable>,
    pub model: Option<String>,
}

/// Every prompt, by name then version.
#[derive(Debug, Clone, Default)]
pub struct Prompts {
    templates: BTreeMap<String, BTreeMap<u32, Arc<PromptTemplate>>>,
}

impl Prompts {
    /// The built-in templates only.
    pub fn built_in() -> Prompts {
        let mut prompts = Prompts::default();
        for (file, text) in BUILT_IN {
            prompts
                .add(file, text)
                .unwrap_or_else(|e| panic!("built-in prompt {file}: {e}"));
        }
        prompts
    }

    /// The built-in templates and those of `dir` (when it exists).
    pub fn load(dir: &Path) -> anyhow::Result<Prompts> {
        let mut prompts = Prompts::built_in();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(prompts);
        };
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "j2"))
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            if !text.starts_with("+++") {
                continue;
            }
            let file = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            prompts
                .add(file, &text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        Ok(prompts)
    }

    fn add(&mut self, file: &str, text: &str) -> Result<(), String> {
        let template = PromptTemplate::parse(text)?;
        let expected = format!("{}.v{}.j2", template.name, template.version);
        if file != expected {
            return Err(format!("its front matter says {expected}"));
        }
        let versions = self.templates.entry(template.name.clone()).or_default();
        match versions.get(&template.version) {
            Some(existing) if existing.source != template.source => Err(format!(
                "{} is already defined with another text; a new text needs a new version",
                template.reference()
            )),
            Some(_) => Ok(()),
            None => {
                versions.insert(template.version, Arc::new(template));
                Ok(())
            }
        }
    }

    /// Prompt `name` at `version` (a number; the newest when None).
    pub fn get(&self, name: &str, version: Option<&str>) -> ApiResult<Arc<PromptTemplate>> {
        let versions = self.templates.get(name).ok_or_else(|| ApiError {
            code: Some("prompt_not_found"),
            ..ApiError::invalid_param("prompt.id", format!("No prompt '{name}'."))
        })?;
        let found = match version {
            None => versions.values().next_back(),
            Some(text) => text
                .trim()
                .trim_start_matches('v')
                .parse::<u32>()
                .ok()
                .and_then(|v| versions.get(&v)),
        };
        found.cloned().ok_or_else(|| ApiError {
            code: Some("prompt_version_not_found"),
            ..ApiError::invalid_param(
                "prompt.version",
                format!(
                    "Prompt '{name}' has no version '{}' (it has {}).",
                    version.unwrap_or_default(),
                    versions
                        .keys()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
    }

    /// `NAME@VERSION` or `NAME` (the newest).
    pub fn get_reference(&self, reference: &str) -> ApiResult<Arc<PromptTemplate>> {
        match reference.split_once('@') {
            Some((name, version)) => self.get(name, Some(version)),
            None => self.get(reference, None),
        }
    }

    pub fn list(&self) -> Vec<PromptSummary> {
        self.templates
            .iter()
            .filter_map(|(name, versions)| {
                let (latest, template) = versions.iter().next_back()?;
                Some(PromptSummary {
                    id: name.clone(),
                    object: "prompt",
                    latest_version: *latest,
                    versions: versions.keys().copied().collect(),
                    description: template.description.clone(),
                    variables: template.variables.clone(),
                    model: template.model.clone(),
                })
            })
            .collect()
    }

    /// Every version of `name`, oldest first.
    pub fn versions(&self, name: &str) -> ApiResult<Vec<Arc<PromptTemplate>>> {
        self.get(name, None)?;
        Ok(self.templates[name].values().cloned().collect())
    }
}

/// The lines of `old` and `new` as a unified-style diff: ` ` kept, `-`
/// removed, `+` added (a longest common subsequence of lines).
pub fn diff_lines(old: &str, new: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let mut common = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            common[i][j] = if a[i] == b[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            (i, j) = (i + 1, j + 1);
        } else if j < b.len() && (i == a.len() || common[i][j + 1] >= common[i + 1][j]) {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_prompts_load_and_resolve_by_version() {
        let prompts = Prompts::built_in();
        let names: Vec<String> = prompts.list().into_iter().map(|p| p.id).collect();
        for name in [
            "faq",
            "product_description",
            "rag_answer",
            "seo_meta",
            "translation",
        ] {
            assert!(names.contains(&name.to_string()), "{name}: {names:?}");
        }
        assert_eq!(prompts.get("product_description", None).unwrap().version, 2);
        assert_eq!(
            prompts
                .get("product_description", Some("1"))
                .unwrap()
                .version,
            1
        );
        assert_eq!(
            prompts
                .get_reference("product_description@v1")
                .unwrap()
                .version,
            1
        );
        let missing = prompts.get("nope", None).unwrap_err();
        assert_eq!(missing.param.as_deref(), Some("prompt.id"));
        let version = prompts.get("faq", Some("9")).unwrap_err();
        assert_eq!(version.param.as_deref(), Some("prompt.version"));
    }

    #[test]
    fn a_directory_adds_prompts_but_cannot_redefine_a_version() {
        let dir = tempfile::tempdir().unwrap();
        let own = "+++\nname = \"own\"\nversion = 1\ndescription = \"d\"\n+++\nHi.\n";
        std::fs::write(dir.path().join("own.v1.j2"), own).unwrap();
        std::fs::write(dir.path().join("internal.j2"), "no front matter").unwrap();
        let prompts = Prompts::load(dir.path()).unwrap();
        assert_eq!(prompts.get("own", None).unwrap().template, "Hi.\n");
        std::fs::write(dir.path().join("wrong.v2.j2"), own).unwrap();
        assert!(
            Prompts::load(dir.path()).is_err(),
            "the file name must match"
        );
        std::fs::remove_file(dir.path().join("wrong.v2.j2")).unwrap();
        let faq = BUILT_IN.iter().find(|(f, _)| *f == "faq.v1.j2").unwrap().1;
        std::fs::write(dir.path().join("faq.v1.j2"), faq.replace("FAQ", "Q&A")).unwrap();
        let error = Prompts::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("new version"), "{error}");
    }

    #[test]
    fn diffs_mark_removed_and_added_lines() {
        assert_eq!(diff_lines("a\nb\nc\n", "a\nc\nd\n"), "  a\n- b\n  c\n+ d\n");
    }
}
