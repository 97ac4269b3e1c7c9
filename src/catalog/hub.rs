//! Models from the Hugging Face hub through hf-hub, honouring its cache
//! (`HF_HOME`) and `HF_HUB_OFFLINE=1` (cache only, no network).

use std::path::PathBuf;

use anyhow::{Context, bail};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// Files of a transformer checkpoint worth fetching when none are listed.
fn wanted(name: &str) -> bool {
    matches!(
        name,
        "config.json" | "tokenizer.json" | "tokenizer_config.json" | "generation_config.json"
    ) || name.ends_with(".safetensors")
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Fetches `files` (or the checkpoint files the repo lists) and returns the
/// local snapshot directory holding them.
pub fn fetch(
    repo_id: &str,
    revision: &str,
    files: &[String],
    progress: bool,
) -> anyhow::Result<PathBuf> {
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let paths: Vec<PathBuf> = if offline() {
        if files.is_empty() {
            bail!(
                "HF_HUB_OFFLINE is set: list the files of `{repo_id}` in the catalog to use the cache"
            );
        }
        let cached = Cache::from_env().repo(repo);
        files
            .iter()
            .map(|f| {
                cached.get(f).with_context(|| {
                    format!("HF_HUB_OFFLINE is set and `{f}` of `{repo_id}`@{revision} is not in the hub cache")
                })
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        let api = ApiBuilder::from_env().with_progress(progress).build()?;
        let remote = api.repo(repo);
        let names: Vec<String> = if files.is_empty() {
            remote
                .info()
                .with_context(|| format!("listing `{repo_id}` on the hub"))?
                .siblings
                .into_iter()
                .map(|s| s.rfilename)
                .filter(|n| wanted(n))
                .collect()
        } else {
            files.to_vec()
        };
        names
            .iter()
            .map(|f| {
                remote
                    .get(f)
                    .with_context(|| format!("downloading `{f}` of `{repo_id}`"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let first = paths
        .first()
        .context("the hub repository has no model files")?;
    Ok(first
        .parent()
        .context("hub file without a directory")?
        .to_path_buf())
}
