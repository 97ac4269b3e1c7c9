//! Ingestion: pages from a source are chunked, embedded and written to the
//! site's table in batches. Unchanged pages (same content hash) are skipped,
//! changed ones replaced, and pages of the same source that are gone are
//! deleted. A page that cannot be read is reported and keeps what the table
//! had for it. Re-running a killed ingest converges to the same table.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;
use tokio::sync::mpsc;

use super::chunk::chunk_document;
use super::document::Document;
use super::sources::{self, ReadOptions, ReadOutcome, SourceItem};
use super::store::{ChunkRow, PageState};
use super::{Rag, RagError, RagResult, SiteName};

/// Pages written per commit.
const PAGES_PER_BATCH: usize = 64;
/// Chunks embedded per commit.
const CHUNKS_PER_BATCH: usize = 512;

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
    let mut pending: Vec<Pending> = Vec::new();
    let mut cleanups: Vec<(String, String)> = Vec::new();
    let mut pending_chunks = 0usize;
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
                cleanups.push((document.url.clone(), hash));
                report.updated += 1;
            }
            _ => {
                if state.is_some_and(|s| s.rows_by_hash.contains_key(&hash)) {
                    // Rows of this very hash but not all of them: start over.
                    rag.store
                        .delete_pages(&table, std::slice::from_ref(&document.url))
                        .await?;
                }
                if state.is_some() {
                    report.updated += 1;
                } else {
                    report.added += 1;
                }
                pending_chunks += document.sections.len();
                pending.push(Pending {
                    document,
                    origin: item.origin,
                    hash,
                });
            }
        }
        progress.set_message(format!(
            "{} new, {} changed, {} unchanged, {} failed",
            report.added, report.updated, report.unchanged, report.failed
        ));
        if pending.len() >= PAGES_PER_BATCH || pending_chunks >= CHUNKS_PER_BATCH {
            report.chunks_written +=
                write(rag, &table, &options.source_id, &mut pending, &mut cleanups).await?;
            pending_chunks = 0;
        }
    }
    report.chunks_written +=
        write(rag, &table, &options.source_id, &mut pending, &mut cleanups).await?;
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

/// Embeds the pending pages' chunks and writes them in one commit.
async fn write(
    rag: &Rag,
    table: &lancedb::Table,
    source: &str,
    pending: &mut Vec<Pending>,
    cleanups: &mut Vec<(String, String)>,
) -> RagResult<usize> {
    if pending.is_empty() && cleanups.is_empty() {
        return Ok(0);
    }
    let pages = std::mem::take(pending);
    let embedder = rag.embedder.clone();
    let config = rag.chunking;
    let chunked = tokio::task::spawn_blocking(move || {
        pages
            .into_iter()
            .map(|p| {
                let chunks = chunk_document(&p.document, &config, embedder.as_ref());
                (p, chunks)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| anyhow::anyhow!("chunking task: {e}"))?;
    let texts: Vec<String> = chunked
        .iter()
        .flat_map(|(_, chunks)| chunks.iter().map(|c| c.text.clone()))
        .collect();
    let mut vectors = rag.embed(texts).await?.into_iter();
    let mut rows = Vec::new();
    let mut replaced = std::mem::take(cleanups);
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
        replaced.push((page.document.url.clone(), page.hash.clone()));
    }
    let written = rows.len();
    rag.store.write_pages(table, rows, &replaced).await?;
    Ok(written)
}
