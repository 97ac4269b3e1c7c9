//! `qpai bench-search`: search latency on a large table. The table is grown
//! from a real ingested site: each copy of a chunk keeps its text and gets its
//! vector jittered (Gaussian noise, renormalised) and a distinct URL, until
//! the wanted row count; then the BM25 and IVF-PQ indexes are built and every
//! query of a query set is timed in each mode (query embedding included).

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::search::search;
use super::store::ChunkRow;
use super::{Rag, SearchFilter, SearchMode, SearchRequest, SiteName};

#[derive(Debug, Serialize)]
pub struct LatencyResult {
    /// None: the query embedding alone.
    pub mode: Option<SearchMode>,
    pub rows: usize,
    pub queries: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

/// Standard deviation of the noise added to each vector component.
const JITTER: f32 = 0.02;

/// A standard normal sample (Box-Muller).
fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(1e-12);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn jittered(row: &ChunkRow, copy: usize, rng: &mut StdRng) -> ChunkRow {
    let mut vector: Vec<f32> = row
        .vector
        .iter()
        .map(|x| x + JITTER * gaussian(rng))
        .collect();
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    vector.iter_mut().for_each(|x| *x /= norm);
    ChunkRow {
        chunk_id: format!("{}-{copy}", row.chunk_id),
        url: format!("{}#copy-{copy}", row.url),
        page_hash: format!("{}-{copy}", row.page_hash),
        vector,
        ..row.clone()
    }
}

/// Builds `target` (replacing it) with `rows` rows grown from `source`.
pub async fn grow(
    rag: &Rag,
    source: &SiteName,
    target: &SiteName,
    rows: usize,
) -> anyhow::Result<()> {
    let seed_rows = rag.store.rows(source).await?;
    anyhow::ensure!(!seed_rows.is_empty(), "site {source} is empty");
    if rag.store.exists(target).await? {
        rag.store.delete_site(target).await?;
    }
    rag.store
        .create_site(target, rag.embedder.dimensions, &rag.embedder.id)
        .await?;
    let table = rag.store.site_table(target, &rag.embedder.id).await?;
    let mut rng = StdRng::seed_from_u64(7);
    let mut written = 0;
    let bar = indicatif::ProgressBar::new(rows as u64);
    while written < rows {
        let take = (rows - written).min(20_000);
        let batch: Vec<ChunkRow> = (written..written + take)
            .map(|i| {
                let row = &seed_rows[i % seed_rows.len()];
                jittered(row, i / seed_rows.len(), &mut rng)
            })
            .collect();
        rag.store.write_pages(&table, batch, &[]).await?;
        written += take;
        bar.set_position(written as u64);
    }
    bar.finish_and_clear();
    let started = Instant::now();
    let built = rag.store.maintain(&table, 1, true).await?;
    tracing::info!(
        ?built,
        seconds = started.elapsed().as_secs_f64(),
        "indexes built"
    );
    Ok(())
}

/// The `query` of each line of a JSONL query set.
fn query_texts(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let content =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    crate::batches::rows::read_table(path, &content)?
        .into_iter()
        .map(|(line, fields)| match fields.get("query") {
            Some(serde_json::Value::String(query)) => Ok(query.clone()),
            _ => anyhow::bail!("{}:{line}: no \"query\" string", path.display()),
        })
        .collect()
}

pub async fn latencies(
    rag: &Rag,
    site: &SiteName,
    queries_path: &std::path::Path,
    top_k: usize,
) -> anyhow::Result<Vec<LatencyResult>> {
    let queries = query_texts(queries_path)?;
    let rows = rag.store.stats(site).await?.chunks;
    let mut results = Vec::new();
    // The query embedding alone (part of the vector and hybrid times).
    let mut times = Vec::with_capacity(queries.len());
    for query in &queries {
        let started = Instant::now();
        rag.embed(vec![query.clone()]).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    results.push(summary(None, rows, times));
    for mode in [SearchMode::Vector, SearchMode::Fulltext, SearchMode::Hybrid] {
        let mut times = Vec::with_capacity(queries.len());
        // One untimed pass warms the caches (index pages, model).
        for timed in [false, true] {
            for query in &queries {
                let request = SearchRequest {
                    query: query.clone(),
                    top_k,
                    mode,
                    filter: SearchFilter::default(),
                };
                let started = Instant::now();
                search(rag, site, &request).await?;
                if timed {
                    times.push(started.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
        results.push(summary(Some(mode), rows, times));
    }
    Ok(results)
}

fn summary(mode: Option<SearchMode>, rows: usize, mut times: Vec<f64>) -> LatencyResult {
    times.sort_by(f64::total_cmp);
    let at = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    LatencyResult {
        mode,
        rows,
        queries: times.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        mean_ms: times.iter().sum::<f64>() / times.len().max(1) as f64,
    }
}
