//! Ingestion: pages from a source are chunked, embedded and written to the
//! site's table in batches, as a pipeline: the source is read and parsed on
//! one thread, a batch is chunked and embedded while the batch before it is
//! written to LanceDB, and all table changes go through the one writer, in
//! order. Unchanged pages (same content hash) are skipped,
//! changed ones replaced, and pages of the same source that are gone are
//! deleted. A page that cannot be read is reported and keeps what the table
//! had for it. Re-running a killed ingest converges to the same table.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;
use tokio::sync::mpsc;

use super::chunk::{Chunk, ChunkConfig, chunk_document};
use super::document::Document;
use super::sources::{self, ReadOptions, ReadOutcome, SourceItem};
use super::store::{ChunkRow, PageState};
use super::{Rag, RagError, RagResult, SiteName};
use crate::models::embedding::EmbeddingModel;

/// Pages written per commit.
const PAGES_PER_BATCH: usize = 64;
/// Chunks embedded per commit.
const CHUNKS_PER_BATCH: usize = 512;
/// Chunks sent to the embedding queue at once.
const EMBED_SLICE: usize = 64;

#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Identifies the source (path or URL): pruning only touches its pages.
    pub source_id: String,
    /// Delete this source's pages that the source no longer has.
    pub prune: bool,
    /// Rows from which the table gets an ANN index.
    pub ann_min_rows: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DocumentError {
    pub origin: String,
    pub error: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestReport {
    pub site: String,
    /// Pages read whole from the source.
    pub pages: usize,
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub deleted: usize,
    pub chunks_written: usize,
    pub failed: usize,
    pub errors: Vec<DocumentError>,
    /// Why the source was not read to its end (then nothing was pruned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
    pub indexes_built: Vec<String>,
    pub seconds: f64,
}

/// How the reading of a source ended.
pub type Reader = tokio::task::JoinHandle<anyhow::Result<ReadOutcome>>;

/// Reads `location` on a blocking thread, handing pages over a bounded channel.
pub fn spawn_reader(
    location: String,
    options: ReadOptions,
) -> (mpsc::Receiver<SourceItem>, Reader) {
    let (tx, rx) = mpsc::channel(256);
    let reader = tokio::task::spawn_blocking(move || {
        sources::read(&location, &options, &mut |item| {
            tx.blocking_send(item).is_ok()
        })
    });
    (rx, reader)
}

/// Pages handed over directly (the HTTP API): the source is complete.
pub fn from_documents(items: Vec<SourceItem>) -> (mpsc::Receiver<SourceItem>, Reader) {
    let (tx, rx) = mpsc::channel(items.len().max(1));
    for item in items {
        let _ = tx.try_send(item);
    }
    (rx, tokio::spawn(async { Ok(ReadOutcome::default()) }))
}

/// A page waiting to be embedded and written.
struct Pending {
    document: Document,
    origin: String,
    hash: String,
    /// The table held rows of another version of this page (deleted once
    /// the new rows are in).
    replaces: bool,
}

/// Pages handed from the reading loop to the embedding stage.
#[derive(Default)]
struct Batch {
    pages: Vec<Pending>,
    /// Pages whose new rows a dead run wrote in full: only the old rows go.
    cleanups: Vec<(String, String)>,
    /// Pages with a partial set of rows of this very version: deleted first.
    purge: Vec<String>,
    chunks: usize,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.pages.is_empty() && self.cleanups.is_empty() && self.purge.is_empty()
    }
}

/// Rows handed from the embedding stage to the writer.
struct Embedded {
    rows: Vec<ChunkRow>,
    /// (url, hash): rows of the url with another hash are deleted.
    replaced: Vec<(String, String)>,
    purge: Vec<String>,
}

pub async fn ingest(
    rag: &Rag,
    site: &SiteName,
    (mut items, reader): (mpsc::Receiver<SourceItem>, Reader),
    options: &IngestOptions,
    progress: &ProgressBar,
) -> RagResult<IngestReport> {
    let started = Instant::now();
    if !rag.store.exists(site).await? {
        rag.store
            .create_site(site, rag.embedder.dimensions, &rag.embedder.id)
            .await?;
    }
    let table = rag.store.site_table(site, &rag.embedder.id).await?;
    let states = rag.store.page_states(&table).await?;
    let mut report = IngestReport {
        site: site.to_string(),
        ..Default::default()
    };
    let mut seen_urls: HashMap<String, String> = HashMap::new();
    let mut seen_origins: HashSet<String> = HashSet::new();
    // One batch is embedded while the one before it is written; the
    // channels hold one more each, so reading runs at most a batch ahead.
    let (embed_tx, embed_rx) = mpsc::channel::<Batch>(1);
    let (write_tx, write_rx) = mpsc::channel::<Embedded>(1);
    let classify = async {
        let mut batch = Batch::default();
        while let Some(item) = items.recv().await {
            progress.inc(1);
            seen_origins.insert(item.origin.clone());
            let document = match item.document {
                Ok(document) => document,
                Err(error) => {
                    tracing::debug!(origin = %item.origin, %error, "page skipped");
                    report.failed += 1;
                    report.errors.push(DocumentError {
                        origin: item.origin,
                        error,
                    });
                    continue;
                }
            };
            if let Some(first) = seen_urls.get(&document.url) {
                report.failed += 1;
                report.errors.push(DocumentError {
                    error: format!("duplicate URL {} (already read from {first})", document.url),
                    origin: item.origin,
                });
                continue;
            }
            seen_urls.insert(document.url.clone(), item.origin.clone());
            report.pages += 1;
            let hash = document.content_hash();
            let state = states.get(&document.url);
            match state {
                Some(state) if state.is_current(&hash) => report.unchanged += 1,
                Some(state) if complete(state, &hash) => {
                    // Written by a run that died before removing the old rows.
                    batch.cleanups.push((document.url.clone(), hash));
                    report.updated += 1;
                }
                _ => {
                    if state.is_some_and(|s| s.rows_by_hash.contains_key(&hash)) {
                        // Rows of this very hash but not all of them: start over.
                        batch.purge.push(document.url.clone());
                    }
                    if state.is_some() {
                        report.updated += 1;
                    } else {
                        report.added += 1;
                    }
                    batch.chunks += document.sections.len();
                    batch.pages.push(Pending {
                        document,
                        origin: item.origin,
                        hash,
                        replaces: state.is_some(),
                    });
                }
            }
            progress.set_message(format!(
                "{} new, {} changed, {} unchanged, {} failed",
                report.added, report.updated, report.unchanged, report.failed
            ));
            if (batch.pages.len() >= PAGES_PER_BATCH || batch.chunks >= CHUNKS_PER_BATCH)
                && embed_tx.send(std::mem::take(&mut batch)).await.is_err()
            {
                // A later stage failed; its error is reported below.
                return;
            }
        }
        if !batch.is_empty() {
            let _ = embed_tx.send(batch).await;
        }
        drop(embed_tx);
    };
    let embed = embed_stage(rag, &options.source_id, embed_rx, write_tx);
    let write = write_stage(rag, &table, write_rx);
    let ((), embedded, written) = tokio::join!(classify, embed, write);
    // The writer's error first: it is the one that stopped the others.
    report.chunks_written = written?;
    embedded?;
    match reader
        .await
        .map_err(|e| anyhow::anyhow!("source reader: {e}"))?
    {
        Ok(outcome) => report.interrupted = outcome.interrupted,
        Err(error) if report.pages + report.failed == 0 => {
            return Err(RagError::InvalidRequest {
                param: "source",
                message: format!("{error:#}"),
            });
        }
        Err(error) => report.interrupted = Some(format!("{error:#}")),
    }
    if options.prune && report.interrupted.is_none() {
        // Pages of this source whose file or URL was not met this time; a
        // page that failed to read was met and keeps its stored version.
        let gone: Vec<String> = states
            .iter()
            .filter(|(url, state)| {
                state.source == options.source_id
                    && !seen_origins.contains(&state.origin)
                    && !seen_urls.contains_key(*url)
            })
            .map(|(url, _)| url.clone())
            .collect();
        rag.store.delete_pages(&table, &gone).await?;
        report.deleted = gone.len();
    }
    let changed = report.added + report.updated + report.deleted > 0;
    report.indexes_built = rag
        .store
        .maintain(&table, options.ann_min_rows, changed)
        .await?;
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        site = %site,
        pages = report.pages,
        added = report.added,
        updated = report.updated,
        unchanged = report.unchanged,
        deleted = report.deleted,
        failed = report.failed,
        chunks = report.chunks_written,
        seconds = report.seconds,
        "ingest finished"
    );
    Ok(report)
}

fn complete(state: &PageState, hash: &str) -> bool {
    state
        .rows_by_hash
        .get(hash)
        .is_some_and(|&n| Some(&n) == state.chunk_count.get(hash))
}

/// A batch chunked and tokenized, waiting for its vectors.
struct Prepared {
    chunked: Vec<(Pending, Vec<Chunk>)>,
    ids: Vec<Vec<u32>>,
    cleanups: Vec<(String, String)>,
    purge: Vec<String>,
}

/// Chunks and tokenizes each batch on the blocking pool while the batch
/// before it is embedded, then embeds it through the model's queue (a
/// slice at a time, so queries asked meanwhile are not stuck behind a
/// whole batch) and hands its rows to the writer.
async fn embed_stage(
    rag: &Rag,
    source: &str,
    mut batches: mpsc::Receiver<Batch>,
    rows_out: mpsc::Sender<Embedded>,
) -> RagResult<()> {
    let (prepared_tx, mut prepared_rx) = mpsc::channel::<Prepared>(1);
    let prepare = async move {
        while let Some(batch) = batches.recv().await {
            let embedder = rag.embedder.clone();
            let config = rag.chunking;
            let prepared = tokio::task::spawn_blocking(move || prepare(batch, &config, &embedder))
                .await
                .map_err(|e| anyhow::anyhow!("chunking task: {e}"))??;
            if prepared_tx.send(prepared).await.is_err() {
                break;
            }
        }
        RagResult::Ok(())
    };
    let embed = async {
        while let Some(prepared) = prepared_rx.recv().await {
            let mut vectors = Vec::with_capacity(prepared.ids.len());
            let mut ids = prepared.ids.into_iter();
            loop {
                let slice: Vec<Vec<u32>> = ids.by_ref().take(EMBED_SLICE).collect();
                if slice.is_empty() {
                    break;
                }
                vectors.extend(rag.embedder.embed_queued(slice).await?);
            }
            let embedded = rows(
                prepared.chunked,
                vectors,
                source,
                prepared.cleanups,
                prepared.purge,
            )?;
            if rows_out.send(embedded).await.is_err() {
                break;
            }
        }
        RagResult::Ok(())
    };
    let (prepared, embedded) = tokio::join!(prepare, embed);
    embedded?;
    prepared
}

fn prepare(
    batch: Batch,
    config: &ChunkConfig,
    embedder: &EmbeddingModel,
) -> anyhow::Result<Prepared> {
    let chunked: Vec<_> = batch
        .pages
        .into_iter()
        .map(|page| {
            let chunks = chunk_document(&page.document, config, embedder);
            (page, chunks)
        })
        .collect();
    let ids = chunked
        .iter()
        .flat_map(|(_, chunks)| chunks.iter().map(|c| embedder.tokenize(&c.text)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Prepared {
        chunked,
        ids,
        cleanups: batch.cleanups,
        purge: batch.purge,
    })
}

/// The table rows of a batch's chunks and vectors (in the same order).
fn rows(
    chunked: Vec<(Pending, Vec<Chunk>)>,
    vectors: Vec<Vec<f32>>,
    source: &str,
    cleanups: Vec<(String, String)>,
    purge: Vec<String>,
) -> anyhow::Result<Embedded> {
    let mut vectors = vectors.into_iter();
    let mut rows = Vec::new();
    let mut replaced = cleanups;
    for (page, chunks) in chunked {
        let count = chunks.len() as i32;
        for chunk in chunks {
            let vector = vectors
                .next()
                .ok_or_else(|| anyhow::anyhow!("fewer vectors than chunks"))?;
            rows.push(ChunkRow {
                chunk_id: chunk.id,
                url: page.document.url.clone(),
                title: page.document.title.clone(),
                heading: chunk.heading,
                text: chunk.text,
                lang: page.document.lang.clone(),
                updated: page.document.updated.clone(),
                source: source.to_string(),
                origin: page.origin.clone(),
                page_hash: page.hash.clone(),
                chunk_index: chunk.index as i32,
                chunk_count: count,
                vector,
            });
        }
        if page.replaces {
            replaced.push((page.document.url.clone(), page.hash.clone()));
        }
    }
    Ok(Embedded {
        rows,
        replaced,
        purge,
    })
}

/// Applies each batch to the table in order: purges, then the new rows in
/// one commit, then the rows they replace. Returns the rows written.
async fn write_stage(
    rag: &Rag,
    table: &super::store::Table,
    mut batches: mpsc::Receiver<Embedded>,
) -> RagResult<usize> {
    let mut written = 0;
    while let Some(batch) = batches.recv().await {
        rag.store.delete_pages(table, &batch.purge).await?;
        written += batch.rows.len();
        rag.store
            .write_pages(table, batch.rows, &batch.replaced)
            .await?;
    }
    Ok(written)
}
