//! The site store: one table per site, holding chunks with their vectors,
//! in LanceDB (the `lance` feature, on by default). A build without it
//! (a GPU serving build, the fuzzers) has a store that refuses to open, so
//! everything above compiles and answers with a clear error.
//!
//! Rows carry their page's URL, content hash, source and chunk count, which
//! is what makes re-ingestion incremental and a killed ingest convergent: a
//! page is current when all its rows have its present hash and there are as
//! many as its chunk count.

use std::collections::HashMap;

use serde::Serialize;

#[cfg(not(feature = "lance"))]
mod absent;
#[cfg(feature = "lance")]
mod lance;
#[cfg(feature = "lance")]
mod rows;

#[cfg(not(feature = "lance"))]
pub use absent::{Store, Table};
#[cfg(feature = "lance")]
pub use lance::{Store, Table};

/// One chunk, ready to store.
#[derive(Debug, Clone)]
pub struct ChunkRow {
    pub chunk_id: String,
    pub url: String,
    pub title: String,
    pub heading: String,
    pub text: String,
    pub lang: Option<String>,
    pub updated: Option<String>,
    pub source: String,
    /// The file or URL the page was read from.
    pub origin: String,
    pub page_hash: String,
    pub chunk_index: i32,
    pub chunk_count: i32,
    pub vector: Vec<f32>,
}

/// A stored chunk found by a search, as the API answers it.
#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    pub url: String,
    pub title: String,
    pub heading: String,
    pub text: String,
    /// Cosine similarity (vector), BM25 score (full text) or fused rank score (hybrid).
    pub score: f32,
    pub chunk_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated: Option<String>,
}

/// What the table holds for one page.
#[derive(Debug, Default, Clone)]
pub struct PageState {
    /// Rows per content hash.
    pub rows_by_hash: HashMap<String, usize>,
    /// Expected rows per content hash.
    pub chunk_count: HashMap<String, usize>,
    pub source: String,
    pub origin: String,
}

impl PageState {
    /// True when the page is stored whole with this hash and nothing else.
    pub fn is_current(&self, hash: &str) -> bool {
        self.rows_by_hash.len() == 1
            && self
                .rows_by_hash
                .get(hash)
                .is_some_and(|&n| Some(&n) == self.chunk_count.get(hash))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SiteStats {
    pub site: String,
    pub chunks: usize,
    pub pages: usize,
    pub embedding_model: String,
    pub dimensions: usize,
    pub indexes: Vec<String>,
    pub version: u64,
}

/// SQL string literal.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}
