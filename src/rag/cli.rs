//! `qpai ingest`, `qpai search` and `qpai sites`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use super::chunk::ChunkConfig;
use super::ingest::{IngestOptions, IngestReport, ingest as run_ingest, spawn_reader};
use super::sources::{self, ReadOptions, fetch::FetchLimits};
use super::{Rag, SearchFilter, SearchRequest, SiteName, Store, search};
use crate::catalog::Catalog;
use crate::catalog::fetch::ModelStore;
use crate::catalog::resolve::load_embedding_model;
use crate::config::{EmbeddingArgs, GlobalArgs, IngestArgs, SearchArgs, SitesCommand};
use crate::ledger::Ledger;

async fn rag(global: &GlobalArgs, embedding: &EmbeddingArgs) -> anyhow::Result<Rag> {
    let store = Store::open(&global.rag_uri()).await?;
    let catalog = Catalog::load(global.catalog.as_deref())?;
    let models = ModelStore::new(global.models_dir());
    let spec = embedding.embedding_model.clone();
    let model = tokio::task::spawn_blocking(move || load_embedding_model(&spec, &catalog, &models))
        .await??;
    Ok(Rag::new(store, Arc::new(model)))
}

/// A source's identity: its canonical path, or its URL.
fn source_id(source: &str) -> String {
    if source.contains("://") {
        return source.to_string();
    }
    std::fs::canonicalize(source).map_or_else(|_| source.to_string(), |p| p.display().to_string())
}

/// The site an operator names: with `--tenant`, the tenant's site in its
/// namespace (or the plain name it was given before names were per
/// tenant); else any stored name (`NAME`, or `NAME.TENANT`).
async fn operator_site(
    global: &GlobalArgs,
    name: &str,
    tenant: Option<&str>,
) -> anyhow::Result<SiteName> {
    let Some(tenant) = tenant else {
        return Ok(SiteName::parse_stored(name)?);
    };
    crate::ledger::keys::check_tenant_name(tenant).map_err(anyhow::Error::msg)?;
    let site = SiteName::parse(name)?;
    let ledger = Ledger::open(&global.database_url()).await?;
    let given_plain = ledger.site_owner(site.as_str()).await?.as_deref() == Some(tenant);
    Ok(site.of_tenant(tenant, given_plain)?)
}

pub async fn ingest(args: IngestArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let site = operator_site(global, &args.site, args.tenant.as_deref()).await?;
    super::sources::detect(&args.source)?;
    let base_url = args
        .base_url
        .as_deref()
        .map(|u| url::Url::parse(u).with_context(|| format!("--base-url {u}")))
        .transpose()?;
    let mut rag = rag(global, &args.embedding).await?;
    if let Some(tokens) = args.chunk_tokens {
        rag.chunking.max_tokens = tokens.min(rag.embedder.max_tokens.saturating_sub(2));
    }
    rag.chunking.overlap_tokens = args.chunk_overlap;
    let config: ChunkConfig = rag.chunking;
    config.validate().map_err(anyhow::Error::msg)?;
    let read_options = ReadOptions {
        base_url,
        max_page_bytes: args.max_page_bytes,
        fetch: FetchLimits {
            max_pages: args.max_pages,
            delay: Duration::from_millis(args.fetch_delay_ms),
            policy: args.fetch.policy(),
            ..FetchLimits::default()
        },
    };
    let options = IngestOptions {
        source_id: source_id(&args.source),
        prune: !args.no_prune,
        ann_min_rows: args.ann_min_rows,
    };
    // A bar with an ETA where the source knows its size, else a spinner.
    let (progress, template) = match sources::page_count(&args.source) {
        Some(total) => (
            ProgressBar::new(total as u64),
            "{bar:30} {pos}/{len} pages [{elapsed} < {eta}] {per_sec} {msg}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{spinner} {pos} pages [{elapsed}] {per_sec} {msg}",
        ),
    };
    progress.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    let reader = spawn_reader(args.source.clone(), read_options);
    let report = run_ingest(&rag, &site, reader, &options, &progress).await;
    progress.finish_and_clear();
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(report: &IngestReport) {
    println!(
        "site {}: {} pages read in {:.1} s ({:.1} pages/s): {} added, {} updated, {} unchanged, {} deleted; {} chunks written",
        report.site,
        report.pages,
        report.seconds,
        report.pages as f64 / report.seconds.max(1e-9),
        report.added,
        report.updated,
        report.unchanged,
        report.deleted,
        report.chunks_written
    );
    for index in &report.indexes_built {
        println!("built index on {index}");
    }
    if let Some(why) = &report.interrupted {
        println!("source not read to its end (nothing was pruned): {why}");
    }
    if !report.errors.is_empty() {
        println!("{} pages failed:", report.failed);
        for error in &report.errors {
            println!("  {}: {}", error.origin, error.error);
        }
    }
}

pub async fn search(args: SearchArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let site = SiteName::parse_stored(&args.site)?;
    let rag = rag(global, &args.embedding).await?;
    let request = SearchRequest {
        query: args.query,
        top_k: args.top_k,
        mode: args.mode,
        filter: SearchFilter {
            url_prefix: args.url_prefix,
            lang: args.lang,
        },
    };
    let hits = search::search(&rag, &site, &request).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "results": hits }))?
        );
        return Ok(());
    }
    for (rank, hit) in hits.iter().enumerate() {
        let snippet: String = hit.text.lines().skip(1).collect::<Vec<_>>().join(" ");
        let snippet: String = snippet.chars().take(160).collect();
        println!(
            "{}. [{:.4}] {} — {}\n   {}",
            rank + 1,
            hit.score,
            hit.url,
            hit.heading,
            snippet
        );
    }
    Ok(())
}

pub async fn sites(command: SitesCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    let store = Store::open(&global.rag_uri()).await?;
    match command {
        SitesCommand::List => {
            for site in store.sites().await? {
                println!("{site}");
            }
        }
        SitesCommand::Create {
            site,
            tenant,
            embedding,
        } => {
            let site = operator_site(global, &site, tenant.as_deref()).await?;
            let rag = rag(global, &embedding).await?;
            store
                .create_site(&site, rag.embedder.dimensions, &rag.embedder.id)
                .await?;
            println!("created site {site} ({})", rag.embedder.id);
        }
        SitesCommand::Stats { site } => {
            let stats = store.stats(&SiteName::parse_stored(&site)?).await?;
            println!("{}", serde_json::to_string_pretty(&stats)?);
        }
        SitesCommand::Delete { site } => {
            let site = SiteName::parse_stored(&site)?;
            store.delete_site(&site).await?;
            Ledger::open(&global.database_url())
                .await?
                .release_site(site.as_str())
                .await?;
            println!("deleted site {site}");
        }
    }
    Ok(())
}

pub async fn bench_search(
    args: crate::config::BenchSearchArgs,
    global: &GlobalArgs,
) -> anyhow::Result<()> {
    let source = SiteName::parse(&args.site)?;
    let target = SiteName::parse(&format!("{}-bench", args.site))?;
    let rag = rag(global, &args.embedding).await?;
    if !args.reuse || !rag.store.exists(&target).await? {
        let started = std::time::Instant::now();
        super::bench::grow(&rag, &source, &target, args.rows).await?;
        eprintln!(
            "built {target} ({} rows) in {:.0} s",
            args.rows,
            started.elapsed().as_secs_f64()
        );
    }
    let stats = rag.store.stats(&target).await?;
    eprintln!("indexes: {}", stats.indexes.join(", "));
    let results = super::bench::latencies(&rag, &target, &args.queries, args.top_k).await?;
    println!("| mode | rows | queries | p50 ms | p99 ms | mean ms |\n|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            r.mode
                .map_or("query embedding only".to_string(), |m| format!("{m:?}")
                    .to_lowercase()),
            r.rows,
            r.queries,
            r.p50_ms,
            r.p99_ms,
            r.mean_ms
        );
    }
    Ok(())
}
