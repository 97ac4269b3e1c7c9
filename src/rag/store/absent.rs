//! The site store of a build without the `lance` feature: opening it fails
//! with an error that names the feature, so a store (and a table) never
//! exists, and the methods below cannot be reached.

use std::collections::HashMap;
use std::convert::Infallible;

use super::{ChunkRow, PageState, SearchHit, SiteStats};
use crate::rag::{RagError, RagResult, SiteName};

/// A site's table; none exists in this build.
pub enum Table {}

#[derive(Clone)]
pub struct Store {
    never: Infallible,
    pub uri: String,
}

impl Store {
    pub async fn open(uri: &str) -> RagResult<Self> {
        Err(RagError::InvalidRequest {
            param: "rag_uri",
            message: format!(
                "{uri}: this qpai was built without site stores; build it with the `lance` feature (on by default)"
            ),
        })
    }

    pub async fn sites(&self) -> RagResult<Vec<String>> {
        match self.never {}
    }

    pub async fn exists(&self, _site: &SiteName) -> RagResult<bool> {
        match self.never {}
    }

    pub async fn create_site(
        &self,
        _site: &SiteName,
        _dimensions: usize,
        _model: &str,
    ) -> RagResult<()> {
        match self.never {}
    }

    pub async fn delete_site(&self, _site: &SiteName) -> RagResult<()> {
        match self.never {}
    }

    pub async fn site_table(&self, _site: &SiteName, _model: &str) -> RagResult<Table> {
        match self.never {}
    }

    pub async fn stats(&self, _site: &SiteName) -> RagResult<SiteStats> {
        match self.never {}
    }

    pub async fn chunk_ids(&self, _site: &SiteName) -> RagResult<Vec<String>> {
        match self.never {}
    }

    pub async fn rows(&self, _site: &SiteName) -> RagResult<Vec<ChunkRow>> {
        match self.never {}
    }

    pub async fn page_states(&self, table: &Table) -> RagResult<HashMap<String, PageState>> {
        match *table {}
    }

    pub async fn write_pages(
        &self,
        table: &Table,
        _rows: Vec<ChunkRow>,
        _pages: &[(String, String)],
    ) -> RagResult<()> {
        match *table {}
    }

    pub async fn delete_pages(&self, table: &Table, _urls: &[String]) -> RagResult<()> {
        match *table {}
    }

    pub async fn maintain(
        &self,
        table: &Table,
        _ann_min_rows: usize,
        _changed: bool,
    ) -> RagResult<Vec<String>> {
        match *table {}
    }

    pub async fn vector_search(
        &self,
        table: &Table,
        _vector: &[f32],
        _limit: usize,
        _filter: Option<&str>,
    ) -> RagResult<Vec<SearchHit>> {
        match *table {}
    }

    pub async fn fulltext_search(
        &self,
        table: &Table,
        _text: &str,
        _limit: usize,
        _filter: Option<&str>,
    ) -> RagResult<Vec<SearchHit>> {
        match *table {}
    }
}
