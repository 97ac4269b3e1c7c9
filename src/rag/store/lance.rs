//! The LanceDB store: the only module that talks to lancedb.

use std::collections::{HashMap, HashSet};

use arrow_array::{Array, Int32Array, RecordBatch};
use arrow_schema::DataType;
use futures::TryStreamExt;
use lancedb::DistanceType;
pub use lancedb::Table;
use lancedb::index::Index;
use lancedb::index::scalar::{FtsIndexBuilder, FullTextSearchQuery};
use lancedb::index::vector::IvfPqIndexBuilder;
use lancedb::query::{ExecutableQuery, QueryBase, Select};
use lancedb::table::OptimizeAction;

use super::{ChunkRow, PageState, SearchHit, SiteStats, quote, rows};
use crate::rag::{RagError, RagResult, SiteName};

/// The cargo feature an object-storage scheme needs, when this build lacks it.
fn missing_feature(scheme: &str) -> Option<&'static str> {
    match scheme {
        "s3" | "s3+ddb" if !cfg!(feature = "s3") => Some("s3"),
        "gs" if !cfg!(feature = "gcs") => Some("gcs"),
        "az" | "abfs" if !cfg!(feature = "azure") => Some("azure"),
        _ => None,
    }
}

#[derive(Clone)]
pub struct Store {
    db: lancedb::Connection,
    pub uri: String,
}

impl Store {
    /// Opens (creating if needed) the database at `uri`: a local directory
    /// or any URI lancedb accepts.
    pub async fn open(uri: &str) -> RagResult<Self> {
        let scheme = uri.split_once("://").map(|(s, _)| s);
        if let Some(feature) = scheme.and_then(missing_feature) {
            return Err(RagError::InvalidRequest {
                param: "rag_uri",
                message: format!(
                    "{uri}: this qpai was built without object storage for this scheme; build it with the `{feature}` feature"
                ),
            });
        }
        if scheme.is_none() {
            std::fs::create_dir_all(uri)
                .map_err(|e| anyhow::anyhow!("creating the RAG store {uri}: {e}"))?;
        }
        let db = lancedb::connect(uri).execute().await?;
        Ok(Self {
            db,
            uri: uri.to_string(),
        })
    }

    pub async fn sites(&self) -> RagResult<Vec<String>> {
        Ok(self.db.table_names().execute().await?)
    }

    pub async fn exists(&self, site: &SiteName) -> RagResult<bool> {
        Ok(self.sites().await?.iter().any(|s| s == site.as_str()))
    }

    pub async fn create_site(
        &self,
        site: &SiteName,
        dimensions: usize,
        model: &str,
    ) -> RagResult<()> {
        if self.exists(site).await? {
            return Err(RagError::SiteExists(site.to_string()));
        }
        self.db
            .create_empty_table(site.as_str(), rows::schema(dimensions, model))
            .execute()
            .await?;
        Ok(())
    }

    pub async fn delete_site(&self, site: &SiteName) -> RagResult<()> {
        if !self.exists(site).await? {
            return Err(RagError::SiteNotFound(site.to_string()));
        }
        self.db.drop_table(site.as_str(), &[]).await?;
        Ok(())
    }

    async fn table(&self, site: &SiteName) -> RagResult<Table> {
        match self.db.open_table(site.as_str()).execute().await {
            Ok(table) => Ok(table),
            Err(lancedb::Error::TableNotFound { .. }) => {
                Err(RagError::SiteNotFound(site.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The site's table, checked to hold vectors of `model`.
    pub async fn site_table(&self, site: &SiteName, model: &str) -> RagResult<Table> {
        let table = self.table(site).await?;
        let stored = rows::embedding_model(table.schema().await?.as_ref());
        if stored != model {
            return Err(RagError::ModelMismatch {
                site: site.to_string(),
                stored,
                served: model.to_string(),
            });
        }
        Ok(table)
    }

    pub async fn stats(&self, site: &SiteName) -> RagResult<SiteStats> {
        let table = self.table(site).await?;
        let schema = table.schema().await?;
        let dimensions = match schema
            .field_with_name("vector")
            .map(|f| f.data_type().clone())
        {
            Ok(DataType::FixedSizeList(_, n)) => n as usize,
            _ => 0,
        };
        let pages = self.page_states(&table).await?.len();
        Ok(SiteStats {
            site: site.to_string(),
            chunks: table.count_rows(None).await?,
            pages,
            embedding_model: rows::embedding_model(&schema),
            dimensions,
            indexes: table
                .list_indices()
                .await?
                .into_iter()
                .map(|i| format!("{} ({})", i.columns.join(","), i.index_type))
                .collect(),
            version: table.version().await?,
        })
    }

    /// Every chunk id of the site, sorted.
    pub async fn chunk_ids(&self, site: &SiteName) -> RagResult<Vec<String>> {
        let table = self.table(site).await?;
        let mut stream = table
            .query()
            .select(Select::columns(&["chunk_id"]))
            .execute()
            .await?;
        let mut ids = Vec::new();
        while let Some(batch) = stream.try_next().await? {
            let column = rows::strings(&batch, "chunk_id")?;
            ids.extend((0..batch.num_rows()).map(|i| column.value(i).to_string()));
        }
        ids.sort();
        Ok(ids)
    }

    /// Every row of the site (vectors included), in table order.
    pub async fn rows(&self, site: &SiteName) -> RagResult<Vec<ChunkRow>> {
        let table = self.table(site).await?;
        let mut stream = table.query().execute().await?;
        let mut rows = Vec::new();
        while let Some(batch) = stream.try_next().await? {
            rows.extend(rows::chunk_rows(&batch)?);
        }
        Ok(rows)
    }

    /// What is stored for each page URL.
    pub async fn page_states(&self, table: &Table) -> RagResult<HashMap<String, PageState>> {
        let mut stream = table
            .query()
            .select(Select::columns(&[
                "url",
                "page_hash",
                "chunk_count",
                "source",
                "origin",
            ]))
            .execute()
            .await?;
        let mut pages: HashMap<String, PageState> = HashMap::new();
        while let Some(batch) = stream.try_next().await? {
            let url = rows::strings(&batch, "url")?;
            let hash = rows::strings(&batch, "page_hash")?;
            let source = rows::strings(&batch, "source")?;
            let origin = rows::strings(&batch, "origin")?;
            let count = batch
                .column_by_name("chunk_count")
                .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
                .ok_or_else(|| anyhow::anyhow!("chunk_count column missing"))?;
            for row in 0..batch.num_rows() {
                let page = pages.entry(url.value(row).to_string()).or_default();
                *page
                    .rows_by_hash
                    .entry(hash.value(row).to_string())
                    .or_default() += 1;
                page.chunk_count.insert(
                    hash.value(row).to_string(),
                    count.value(row).max(0) as usize,
                );
                page.source = source.value(row).to_string();
                page.origin = origin.value(row).to_string();
            }
        }
        Ok(pages)
    }

    /// Adds the rows of new or changed pages in one commit, then removes the
    /// rows those pages had before (any other hash). A crash in between
    /// leaves both, which the next ingest cleans up (`PageState::is_current`).
    pub async fn write_pages(
        &self,
        table: &Table,
        rows: Vec<ChunkRow>,
        pages: &[(String, String)],
    ) -> RagResult<()> {
        if !rows.is_empty() {
            let schema = table.schema().await?;
            table
                .add(rows::record_batch(&schema, rows)?)
                .execute()
                .await?;
        }
        if !pages.is_empty() {
            let predicate = pages
                .iter()
                .map(|(url, hash)| {
                    format!("(url = {} AND page_hash != {})", quote(url), quote(hash))
                })
                .collect::<Vec<_>>()
                .join(" OR ");
            table.delete(predicate.as_str()).await?;
        }
        Ok(())
    }

    /// Deletes every row of these pages.
    pub async fn delete_pages(&self, table: &Table, urls: &[String]) -> RagResult<()> {
        for batch in urls.chunks(256) {
            let list = batch
                .iter()
                .map(|u| quote(u))
                .collect::<Vec<_>>()
                .join(", ");
            table.delete(format!("url IN ({list})").as_str()).await?;
        }
        Ok(())
    }

    /// Keeps the indexes: a BM25 index on `text` always, an IVF-PQ index on
    /// `vector` once the table has `ann_min_rows` rows; then compacts the
    /// table, folds new rows into the indexes and prunes old versions.
    pub async fn maintain(
        &self,
        table: &Table,
        ann_min_rows: usize,
        changed: bool,
    ) -> RagResult<Vec<String>> {
        let rows = table.count_rows(None).await?;
        let indexed: HashSet<String> = table
            .list_indices()
            .await?
            .into_iter()
            .flat_map(|i| i.columns)
            .collect();
        let mut built = Vec::new();
        if rows > 0 && !indexed.contains("text") {
            table
                .create_index(&["text"], Index::FTS(FtsIndexBuilder::default()))
                .execute()
                .await?;
            built.push("text (FTS)".to_string());
        }
        if rows >= ann_min_rows.max(256) && !indexed.contains("vector") {
            let partitions = ((rows as f64).sqrt() as u32).clamp(1, 4096);
            table
                .create_index(
                    &["vector"],
                    Index::IvfPq(
                        IvfPqIndexBuilder::default()
                            .distance_type(DistanceType::Cosine)
                            .num_partitions(partitions),
                    ),
                )
                .execute()
                .await?;
            built.push(format!("vector (IVF_PQ, {partitions} partitions)"));
        }
        if rows > 0 && changed {
            table.optimize(OptimizeAction::All).await?;
        }
        Ok(built)
    }

    /// The `limit` nearest chunks by cosine similarity.
    pub async fn vector_search(
        &self,
        table: &Table,
        vector: &[f32],
        limit: usize,
        filter: Option<&str>,
    ) -> RagResult<Vec<SearchHit>> {
        let mut query = table
            .vector_search(vector)?
            .column("vector")
            .distance_type(DistanceType::Cosine)
            .nprobes(32)?
            .refine_factor(4)
            .limit(limit)
            .select(Select::columns(rows::VECTOR_COLUMNS));
        if let Some(filter) = filter {
            query = query.only_if(filter);
        }
        let batches: Vec<RecordBatch> = query.execute().await?.try_collect().await?;
        rows::hits(&batches, "_distance", |d| 1.0 - d)
    }

    /// The `limit` best chunks by BM25 over `text`.
    pub async fn fulltext_search(
        &self,
        table: &Table,
        text: &str,
        limit: usize,
        filter: Option<&str>,
    ) -> RagResult<Vec<SearchHit>> {
        if table.count_rows(None).await? == 0 {
            return Ok(Vec::new());
        }
        let mut query = table
            .query()
            .full_text_search(FullTextSearchQuery::new(text.to_string()))
            .limit(limit)
            .select(Select::columns(rows::FULLTEXT_COLUMNS));
        if let Some(filter) = filter {
            query = query.only_if(filter);
        }
        let batches: Vec<RecordBatch> = query.execute().await?.try_collect().await?;
        rows::hits(&batches, "_score", |s| s)
    }
}
