//! Site RAG on the real stack: real files, the real embedding model and a
//! real LanceDB store in a temporary directory.

use std::path::Path;
use std::sync::Arc;

use indicatif::ProgressBar;
use qpai::rag::ingest::{IngestOptions, IngestReport, ingest, spawn_reader};
use qpai::rag::sources::ReadOptions;
use qpai::rag::store::ChunkRow;
use qpai::rag::{Rag, SearchFilter, SearchMode, SearchRequest, SiteName, Store, search};

use crate::embeddings::model;

pub fn page(title: &str, lang: &str, body: &str) -> String {
    format!(
        r#"<!doctype html><html lang="{lang}"><head><title>{title}</title><style>body{{}}</style></head>
<body><header class="site-header">Acme Garden Supplies</header>
<nav><a href="/">Home</a> <a href="/shop">Shop</a></nav>
<main><h1>{title}</h1>{body}</main>
<footer>Copyright Acme Garden Supplies. Newsletter signup.</footer>
<script>trackVisitor();</script></body></html>"#
    )
}

/// A small garden shop site: HTML pages, a Markdown and an MDX page.
pub fn write_site(dir: &Path) {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "index.html",
        &page(
            "Acme Garden Supplies",
            "en",
            "<p>Tools, seeds and soil for home gardeners since 1987.</p>",
        ),
    );
    write(
        "shipping/index.html",
        &page(
            "Shipping and delivery",
            "en",
            "<h2>Delivery times</h2><p>Orders placed before noon ship the same day. Standard delivery takes three to five working days.</p>\
             <h2>Costs</h2><p>Shipping is free on orders over 50 euros; below that a flat fee of 4.90 euros applies.</p>",
        ),
    );
    write(
        "returns/index.html",
        &page(
            "Returns policy",
            "en",
            "<p>You may return unused items within 30 days of delivery for a full refund.</p>\
             <h2>Damaged plants</h2><p>Send us a photo of a damaged plant within 48 hours and we replace it free of charge.</p>",
        ),
    );
    write(
        "de/versand/index.html",
        &page(
            "Versand",
            "de",
            "<p>Bestellungen vor 12 Uhr werden am selben Tag verschickt.</p>",
        ),
    );
    write(
        "guides/tomatoes.md",
        "---\ntitle: Growing tomatoes\nlang: en\nlastmod: 2024-04-02\n---\n# Growing tomatoes\n\n\
         Sow tomato seeds indoors eight weeks before the last frost.\n\n## Watering\n\n\
         Water tomatoes deeply twice a week at the base, never on the leaves, to prevent blight.\n",
    );
    write(
        "guides/compost.mdx",
        "---\ntitle: Making compost\nlang: en\n---\nimport Tip from '../components/Tip'\n\n# Making compost\n\n\
         <Tip>Keep the heap as moist as a wrung-out sponge.</Tip>\n\n\
         Mix green kitchen scraps with brown leaves in equal parts and turn the heap every two weeks.\n",
    );
    write("assets/logo.png", "\u{89}PNG not a page");
}

pub async fn rag(dir: &Path) -> Rag {
    let store = Store::open(&dir.join("rag").display().to_string())
        .await
        .unwrap();
    Rag::new(store, Arc::clone(model()))
}

pub async fn ingest_source(
    rag: &Rag,
    site: &str,
    source: &Path,
    options: ReadOptions,
) -> IngestReport {
    let site = SiteName::parse(site).unwrap();
    let reader = spawn_reader(source.display().to_string(), options);
    let options = IngestOptions {
        source_id: source.display().to_string(),
        prune: true,
        ann_min_rows: 20_000,
    };
    ingest(rag, &site, reader, &options, &ProgressBar::hidden())
        .await
        .unwrap()
}

async fn top(
    rag: &Rag,
    site: &str,
    query: &str,
    mode: SearchMode,
    filter: SearchFilter,
) -> Vec<String> {
    let request = SearchRequest {
        query: query.to_string(),
        top_k: 3,
        mode,
        filter,
    };
    search::search(rag, &SiteName::parse(site).unwrap(), &request)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.url)
        .collect()
}

async fn chunk_ids(rag: &Rag, site: &str) -> Vec<String> {
    rag.store
        .chunk_ids(&SiteName::parse(site).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_search_and_incremental_reingest() {
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    write_site(&site_dir);
    let rag = rag(tmp.path()).await;
    let options = ReadOptions {
        base_url: Some(url::Url::parse("https://acme.example/").unwrap()),
        ..Default::default()
    };
    let report = ingest_source(&rag, "acme", &site_dir, options.clone()).await;
    assert_eq!(
        (report.pages, report.added, report.failed),
        (6, 6, 0),
        "{report:#?}"
    );
    assert!(report.chunks_written >= 6);
    assert_eq!(report.indexes_built, vec!["text (FTS)".to_string()]);

    let site = SiteName::parse("acme").unwrap();
    let stats = rag.store.stats(&site).await.unwrap();
    assert_eq!((stats.pages, stats.chunks), (6, report.chunks_written));
    assert_eq!(stats.embedding_model, "all-minilm-l6-v2");

    // Navigation, header, footer and scripts are not content.
    for chrome in ["Newsletter", "trackVisitor", "Home Shop"] {
        let hits = search::search(
            &rag,
            &site,
            &SearchRequest {
                query: chrome.into(),
                top_k: 10,
                mode: SearchMode::Fulltext,
                filter: SearchFilter::default(),
            },
        )
        .await
        .unwrap();
        assert!(
            hits.iter().all(|h| !h.text.contains(chrome)),
            "{chrome} indexed"
        );
    }

    let none = SearchFilter::default;
    let returns = "https://acme.example/returns/";
    for mode in [SearchMode::Vector, SearchMode::Fulltext, SearchMode::Hybrid] {
        let urls = top(
            &rag,
            "acme",
            "how long do I have to send back an item for a refund",
            mode,
            none(),
        )
        .await;
        if mode != SearchMode::Fulltext {
            assert_eq!(urls[0], returns, "{mode:?}: {urls:?}");
        }
        let urls = top(&rag, "acme", "tomato blight watering", mode, none()).await;
        assert_eq!(
            urls[0], "https://acme.example/guides/tomatoes",
            "{mode:?}: {urls:?}"
        );
    }
    // Filters.
    let german = SearchFilter {
        lang: Some("de".into()),
        url_prefix: None,
    };
    let urls = top(
        &rag,
        "acme",
        "shipping same day",
        SearchMode::Hybrid,
        german,
    )
    .await;
    assert_eq!(urls, vec!["https://acme.example/de/versand/"]);
    let guides = SearchFilter {
        url_prefix: Some("https://acme.example/guides/".into()),
        lang: None,
    };
    let urls = top(&rag, "acme", "shipping costs", SearchMode::Vector, guides).await;
    assert!(
        !urls.is_empty()
            && urls
                .iter()
                .all(|u| u.starts_with("https://acme.example/guides/")),
        "{urls:?}"
    );

    // Same input, same table: nothing rewritten.
    let before = chunk_ids(&rag, "acme").await;
    let version = rag.store.stats(&site).await.unwrap().version;
    let again = ingest_source(&rag, "acme", &site_dir, options.clone()).await;
    assert_eq!(
        (
            again.unchanged,
            again.added,
            again.updated,
            again.deleted,
            again.chunks_written
        ),
        (6, 0, 0, 0, 0)
    );
    assert_eq!(chunk_ids(&rag, "acme").await, before);
    assert_eq!(
        rag.store.stats(&site).await.unwrap().version,
        version,
        "an unchanged ingest committed"
    );

    // One page changed, one removed, one added.
    std::fs::write(
        site_dir.join("returns/index.html"),
        page(
            "Returns policy",
            "en",
            "<p>You may return unused items within 60 days of delivery for a full refund.</p>",
        ),
    )
    .unwrap();
    std::fs::remove_dir_all(site_dir.join("de")).unwrap();
    std::fs::write(
        site_dir.join("guides/roses.md"),
        "# Pruning roses\n\nPrune roses in early spring, just above an outward-facing bud.\n",
    )
    .unwrap();
    let third = ingest_source(&rag, "acme", &site_dir, options).await;
    assert_eq!(
        (third.added, third.updated, third.deleted, third.unchanged),
        (1, 1, 1, 4),
        "{third:#?}"
    );
    let stats = rag.store.stats(&site).await.unwrap();
    assert_eq!(stats.pages, 6);
    let hits = search::search(
        &rag,
        &site,
        &SearchRequest {
            query: "return items refund days".into(),
            top_k: 10,
            mode: SearchMode::Fulltext,
            filter: none(),
        },
    )
    .await
    .unwrap();
    let returns_text: Vec<&str> = hits
        .iter()
        .filter(|h| h.url == returns)
        .map(|h| h.text.as_str())
        .collect();
    assert_eq!(
        returns_text.len(),
        1,
        "old and new version both stored: {returns_text:?}"
    );
    assert!(returns_text[0].contains("60 days"));
    let urls = top(
        &rag,
        "acme",
        "Bestellungen verschickt",
        SearchMode::Fulltext,
        none(),
    )
    .await;
    assert!(
        !urls.iter().any(|u| u.contains("/de/")),
        "removed page still found: {urls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_cut_between_write_and_cleanup_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let site_dir = tmp.path().join("site");
    write_site(&site_dir);
    let rag = rag(tmp.path()).await;
    ingest_source(&rag, "shop", &site_dir, ReadOptions::default()).await;
    let clean = chunk_ids(&rag, "shop").await;
    // A run that died after writing a page's new rows and before deleting
    // its old ones leaves both; so does a stray duplicate row.
    let site = SiteName::parse("shop").unwrap();
    let table = rag.store.site_table(&site, &rag.embedder.id).await.unwrap();
    let stale = ChunkRow {
        chunk_id: "stale".into(),
        url: "returns/index.html".into(),
        title: "Returns policy".into(),
        heading: "Returns policy".into(),
        text: "Returns policy\nan older version".into(),
        lang: Some("en".into()),
        updated: None,
        source: site_dir.display().to_string(),
        origin: site_dir.join("returns/index.html").display().to_string(),
        page_hash: "0123".into(),
        chunk_index: 0,
        chunk_count: 1,
        vector: vec![0.05; 384],
    };
    rag.store
        .write_pages(&table, vec![stale], &[])
        .await
        .unwrap();
    assert_ne!(chunk_ids(&rag, "shop").await, clean);
    let report = ingest_source(&rag, "shop", &site_dir, ReadOptions::default()).await;
    assert_eq!(report.updated, 1, "{report:#?}");
    assert_eq!(report.chunks_written, 0, "{report:#?}");
    assert_eq!(chunk_ids(&rag, "shop").await, clean);
}
