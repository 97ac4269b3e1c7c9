//! Retrieval over site content: pages of each customer site are read from
//! their sources, chunked by headings within a token budget, embedded, and
//! stored in one LanceDB table per site; search is vector, full-text (BM25)
//! or both fused; chat answers cite the chunks they were given.

pub mod bench;
pub mod chunk;
pub mod cli;
pub mod document;
pub mod ingest;
pub mod prompt;
pub mod search;
pub mod site;
pub mod sources;
pub mod store;

use std::sync::Arc;

use crate::error::{ApiError, ErrorKind};
use crate::models::embedding::EmbeddingModel;

pub use search::{SearchFilter, SearchHit, SearchMode, SearchRequest};
pub use site::SiteName;
pub use store::Store;

/// What can go wrong in a RAG call, sorted by whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum RagError {
    #[error("{0}")]
    InvalidSite(String),
    #[error("no site named '{0}'")]
    SiteNotFound(String),
    #[error("a site named '{0}' already exists")]
    SiteExists(String),
    #[error("{message}")]
    InvalidRequest {
        param: &'static str,
        message: String,
    },
    #[error(
        "site '{site}' was embedded with '{stored}', not with '{served}'; re-create it or serve '{stored}'"
    )]
    ModelMismatch {
        site: String,
        stored: String,
        served: String,
    },
    #[cfg(feature = "lance")]
    #[error(transparent)]
    Store(#[from] lancedb::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub type RagResult<T> = Result<T, RagError>;

/// The RAG side of qpai: the LanceDB store and the embedding model its
/// vectors come from.
#[derive(Clone)]
pub struct Rag {
    pub store: Store,
    pub embedder: Arc<EmbeddingModel>,
    pub chunking: chunk::ChunkConfig,
}

impl Rag {
    pub fn new(store: Store, embedder: Arc<EmbeddingModel>) -> Self {
        let chunking = chunk::ChunkConfig::for_model(&embedder);
        Self {
            store,
            embedder,
            chunking,
        }
    }

    /// Embeds texts on a blocking thread (the model uses every core).
    pub async fn embed(&self, texts: Vec<String>) -> RagResult<Vec<Vec<f32>>> {
        let embedder = self.embedder.clone();
        let ids = tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .map(|t| embedder.tokenize(t))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await
        .map_err(|e| anyhow::anyhow!("tokenizing task: {e}"))??;
        Ok(self.embedder.embed_queued(ids).await?)
    }
}

/// A site error as the API answers it.
impl From<RagError> for ApiError {
    fn from(error: RagError) -> Self {
        match error {
            RagError::InvalidSite(message) => ApiError::invalid_param("site", message),
            RagError::SiteNotFound(site) => ApiError {
                code: Some("site_not_found"),
                param: Some("site".to_string()),
                ..ApiError::not_found(format!("No site named '{site}'."))
            },
            RagError::SiteExists(site) => ApiError {
                kind: ErrorKind::Conflict,
                code: Some("site_exists"),
                ..ApiError::invalid_param("name", format!("A site named '{site}' already exists."))
            },
            RagError::InvalidRequest { param, message } => ApiError::invalid_param(param, message),
            error @ RagError::ModelMismatch { .. } => {
                ApiError::invalid_param("site", error.to_string())
            }
            #[cfg(feature = "lance")]
            RagError::Store(error) => ApiError::internal(format!("site store: {error}")),
            RagError::Other(error) => ApiError::internal(format!("{error:#}")),
        }
    }
}
