//! From what a user typed after `--model` to files on disk: a catalog id
//! (pulled when missing), a local path, or a hub repository.

use std::path::Path;

use anyhow::bail;

use super::fetch::ModelStore;
use super::{Catalog, hub};
use crate::models::ModelSource;
use crate::models::loader::LoadOptions;

/// Where the model is and how to load it.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub source: ModelSource,
    pub options: LoadOptions,
}

pub fn resolve(spec: &str, catalog: &Catalog, store: &ModelStore) -> anyhow::Result<ResolvedModel> {
    if let Some(entry) = catalog.get(spec) {
        if !store.is_present(entry) {
            tracing::info!(model = spec, "model not in the cache; pulling it");
        }
        let path = store.pull(entry)?;
        let mut options = LoadOptions::new(&entry.id);
        options.kind = Some(entry.kind);
        options.max_context = Some(entry.context_length);
        options.chat_template = entry.chat_template.clone();
        return Ok(ResolvedModel {
            source: ModelSource::from_path(&path)?,
            options,
        });
    }
    let path = Path::new(spec);
    if path.exists() {
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| spec.to_string());
        return Ok(ResolvedModel {
            source: ModelSource::from_path(path)?,
            options: LoadOptions::new(id),
        });
    }
    if spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/') {
        let dir = hub::fetch(spec, "main", &[], true)?;
        return Ok(ResolvedModel {
            source: ModelSource::SafetensorsDir(dir),
            options: LoadOptions::new(spec),
        });
    }
    bail!(
        "unknown model `{spec}`: not a catalog id (see `qpai models list`), not an existing path, not a hub repo (owner/name)"
    )
}

/// Resolves (pulling if needed) and loads an embedding model.
pub fn load_embedding_model(
    spec: &str,
    catalog: &Catalog,
    store: &ModelStore,
) -> anyhow::Result<crate::models::embedding::EmbeddingModel> {
    let resolved = resolve(spec, catalog, store)?;
    let crate::models::ModelSource::SafetensorsDir(dir) = resolved.source else {
        bail!("embedding model `{spec}` is not a model directory");
    };
    crate::models::embedding::EmbeddingModel::load(&dir, spec, &resolved.options.device)
}
