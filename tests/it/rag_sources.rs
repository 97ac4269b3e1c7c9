//! Every kind of source, and bad input in each: one bad page is reported on
//! its own and the rest of the ingest goes through.

use std::path::Path;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use qpai::rag::sources::ReadOptions;
use qpai::rag::sources::fetch::{FetchLimits, FetchPolicy};
use qpai::rag::{SearchFilter, SearchMode, SearchRequest, SiteName, search};

use crate::rag::{ingest_source, page, rag};

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn errors_of(report: &qpai::rag::ingest::IngestReport) -> Vec<(String, String)> {
    report
        .errors
        .iter()
        .map(|e| {
            let name = Path::new(&e.origin)
                .file_name()
                .map_or(e.origin.clone(), |n| n.to_string_lossy().to_string());
            (name, e.error.clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pages_fail_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("site");
    write(
        &dir,
        "good.html",
        page(
            "Good page",
            "en",
            "<p>Lavender likes full sun and dry soil.</p>",
        ),
    );
    write(
        &dir,
        "broken.html",
        "<html><head><title>Broken &bogus; markup</title><body><div><p>Unclosed tags &amp; a stray &nbsp entity<p>still readable text about hedges",
    );
    write(&dir, "binary.html", [0u8, 159, 146, 150, 0, 1, 2, 3]);
    write(
        &dir,
        "latin1.html",
        b"<html><body><p>Gr\xfc\xdfe aus K\xf6ln</p></body></html>",
    );
    write(&dir, "empty.html", "");
    write(
        &dir,
        "nothing.html",
        "<html><body><nav>only navigation</nav><script>x()</script></body></html>",
    );
    write(
        &dir,
        "huge.html",
        page("Huge", "en", &"<p>filler words here</p>".repeat(20_000)),
    );
    write(
        &dir,
        "draft.md",
        "---\ntitle: Draft\ndraft: true\n---\nNot yet.\n",
    );
    write(&dir, "bad-front.md", "---\ntitle: [unclosed\n---\nBody.\n");
    // Two pages claiming one canonical URL: the second is refused.
    let canonical = |t: &str| {
        format!(
            r#"<html><head><link rel="canonical" href="https://x.example/same"></head><body><p>{t}</p></body></html>"#
        )
    };
    write(&dir, "dup-a.html", canonical("first copy of the page"));
    write(&dir, "dup-b.html", canonical("second copy of the page"));
    let rag = rag(tmp.path()).await;
    let options = ReadOptions {
        max_page_bytes: 200_000,
        ..Default::default()
    };
    let report = ingest_source(&rag, "bad", &dir, options.clone()).await;
    let errors = errors_of(&report);
    let reason = |name: &str| {
        errors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| panic!("no error for {name}: {errors:?}"))
    };
    assert!(reason("binary.html").contains("binary"), "{errors:?}");
    assert!(reason("latin1.html").contains("UTF-8"), "{errors:?}");
    assert!(reason("empty.html").contains("empty"), "{errors:?}");
    assert!(reason("nothing.html").contains("no text"), "{errors:?}");
    assert!(reason("huge.html").contains("limit"), "{errors:?}");
    assert!(reason("draft.md").contains("draft"), "{errors:?}");
    assert!(
        reason("bad-front.md").contains("front matter"),
        "{errors:?}"
    );
    assert!(reason("dup-b.html").contains("duplicate URL"), "{errors:?}");
    assert_eq!(report.failed, 8, "{errors:?}");
    assert_eq!((report.pages, report.added), (3, 3), "{report:#?}");
    let hits = search::search(
        &rag,
        &SiteName::parse("bad").unwrap(),
        &SearchRequest {
            query: "hedges".into(),
            top_k: 3,
            mode: SearchMode::Fulltext,
            filter: SearchFilter::default(),
        },
    )
    .await
    .unwrap();
    assert_eq!(hits[0].url, "broken.html");
    assert!(
        hits[0].text.contains("Unclosed tags & a stray"),
        "{}",
        hits[0].text
    );

    // A page that turns bad keeps its stored version (it is not "removed").
    write(&dir, "good.html", [0u8, 1, 2]);
    let again = ingest_source(&rag, "bad", &dir, options).await;
    assert_eq!(again.deleted, 0, "{again:#?}");
    let stats = rag
        .store
        .stats(&SiteName::parse("bad").unwrap())
        .await
        .unwrap();
    assert_eq!(stats.pages, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_unknown_sources_and_unsafe_site_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    write(&empty, "style.css", "body {}");
    let error = qpai::rag::sources::read(
        &empty.display().to_string(),
        &ReadOptions::default(),
        &mut |_| true,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("holds no pages"), "{error}");
    let error = qpai::rag::sources::detect("/no/such/dir")
        .unwrap_err()
        .to_string();
    assert!(error.contains("does not exist"), "{error}");
    write(tmp.path(), "data.csv", "a,b");
    let error = qpai::rag::sources::detect(&tmp.path().join("data.csv").display().to_string())
        .unwrap_err()
        .to_string();
    assert!(error.contains("not a known source"), "{error}");
    for name in ["../etc", "a/b", "", "x y", ".hidden"] {
        assert!(SiteName::parse(name).is_err(), "{name:?}");
    }
    // Object storage is a build feature; without it the URI is refused by name.
    if !cfg!(feature = "s3") {
        let Err(error) = qpai::rag::Store::open("s3://bucket/rag").await else {
            panic!("s3:// opened without the s3 feature");
        };
        assert!(error.to_string().contains("`s3`"), "{error}");
    }
}

const WXR: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0" xmlns:content="http://purl.org/rss/1.0/modules/content/" xmlns:wp="http://wordpress.org/export/1.2/">
<channel><title>Bakery</title><language>en-US</language>
<item><title>Our sourdough</title><link>https://bakery.example/sourdough/</link>
<pubDate>Tue, 05 Mar 2024 10:00:00 +0000</pubDate><wp:post_id>1</wp:post_id>
<content:encoded><![CDATA[<h2>Starter</h2><p>Our rye starter is fed twice a day &amp; rests 18 hours.</p>]]></content:encoded>
<wp:post_type>post</wp:post_type><wp:status>publish</wp:status></item>
<item><title>Opening hours &amp; address</title><link>https://bakery.example/hours/</link><wp:post_id>2</wp:post_id>
<content:encoded><![CDATA[<p>Open Tuesday to Sunday from 7 am; closed on Mondays.</p>]]></content:encoded>
<wp:post_type>page</wp:post_type><wp:status>publish</wp:status><wp:post_modified_gmt>2024-05-01 08:00:00</wp:post_modified_gmt></item>
<item><title>Secret draft</title><link>https://bakery.example/?p=3</link><wp:post_id>3</wp:post_id>
<content:encoded><![CDATA[<p>unpublished</p>]]></content:encoded>
<wp:post_type>post</wp:post_type><wp:status>draft</wp:status></item>
<item><title>logo.png</title><link>https://bakery.example/logo/</link><wp:post_id>4</wp:post_id>
<wp:post_type>attachment</wp:post_type><wp:status>inherit</wp:status></item>
<item><title>Empty post</title><link>https://bakery.example/empty/</link><wp:post_id>5</wp:post_id>
<content:encoded><![CDATA[]]></content:encoded><wp:post_type>post</wp:post_type><wp:status>publish</wp:status></item>
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wordpress_exports_and_broken_xml() {
    let tmp = tempfile::tempdir().unwrap();
    let rag = rag(tmp.path()).await;
    let file = tmp.path().join("export.xml");
    write(tmp.path(), "export.xml", format!("{WXR}</channel></rss>"));
    let report = ingest_source(&rag, "bakery", &file, ReadOptions::default()).await;
    assert_eq!((report.pages, report.failed), (2, 1), "{report:#?}");
    assert!(report.errors[0].error.contains("no text"), "{report:#?}");
    let hits = search::search(
        &rag,
        &SiteName::parse("bakery").unwrap(),
        &SearchRequest {
            query: "when are you closed".into(),
            top_k: 1,
            mode: SearchMode::Hybrid,
            filter: SearchFilter {
                lang: Some("en-us".into()),
                url_prefix: None,
            },
        },
    )
    .await
    .unwrap();
    assert_eq!(hits[0].url, "https://bakery.example/hours/");
    assert_eq!(hits[0].title, "Opening hours & address");
    assert_eq!(hits[0].updated.as_deref(), Some("2024-05-01T08:00:00Z"));

    // The export is cut short by broken XML after the first item: what was
    // read is kept, and nothing is pruned for lack of the rest.
    let cut = WXR.replacen(
        "<item><title>Opening hours",
        "<item><title>Opening </wrong> hours",
        1,
    );
    write(tmp.path(), "export.xml", cut);
    let report = ingest_source(&rag, "bakery", &file, ReadOptions::default()).await;
    assert!(
        report
            .interrupted
            .as_deref()
            .is_some_and(|w| w.contains("XML error")),
        "{report:#?}"
    );
    assert_eq!((report.unchanged, report.deleted), (1, 0), "{report:#?}");
    assert_eq!(
        rag.store
            .stats(&SiteName::parse("bakery").unwrap())
            .await
            .unwrap()
            .pages,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_records_each_stand_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let rag = rag(tmp.path()).await;
    let lines = [
        r#"{"url": "https://faq.example/a", "title": "Gift cards", "text": "Gift cards never expire and work online and in store."}"#,
        r##"{"url": "https://faq.example/b", "markdown": "# Loyalty\n\nEvery 10th coffee is free."}"##,
        r#"{"url": "https://faq.example/c", "html": "<h1>Parking</h1><p>Free parking behind the shop.</p>", "lang": "EN"}"#,
        r#"{"url": "https://faq.example/d", "text": "x", "html": "<p>y</p>"}"#,
        r#"{"title": "no url", "text": "t"}"#,
        r#"{"url": "https://faq.example/e", "text": "truncated"#,
        "",
        r#"{"url": "https://faq.example/a", "text": "duplicate"}"#,
    ];
    write(tmp.path(), "faq.jsonl", lines.join("\n"));
    let report = ingest_source(
        &rag,
        "faq",
        &tmp.path().join("faq.jsonl"),
        ReadOptions::default(),
    )
    .await;
    assert_eq!((report.pages, report.failed), (3, 4), "{report:#?}");
    let errors: Vec<&str> = report.errors.iter().map(|e| e.error.as_str()).collect();
    assert!(errors[0].contains("exactly one of"), "{errors:?}");
    assert!(errors[1].contains("missing field `url`"), "{errors:?}");
    assert!(errors[2].contains("EOF"), "{errors:?}");
    assert!(errors[3].contains("duplicate URL"), "{errors:?}");
    assert!(
        report.errors[3].origin.ends_with(":8"),
        "{:?}",
        report.errors[3]
    );
}

/// A site served on loopback: a sitemap index, pages, a 404, and a
/// robots.txt that disallows one page; and `/tricks.xml`, a sitemap that
/// lists a page redirecting to `localhost` and a local file.
pub async fn serve_site() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let port = listener.local_addr().unwrap().port();
    let tricks = format!(
        r#"<urlset><url><loc>{base}/escape</loc></url><url><loc>/etc/hostname</loc></url></urlset>"#
    );
    let sitemap = format!(
        r#"<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
<url><loc>{base}/a</loc><lastmod>2024-02-01</lastmod></url><url><loc>{base}/b</loc></url>
<url><loc>{base}/private/c</loc></url><url><loc>{base}/missing</loc></url></urlset>"#
    );
    let index =
        format!(r#"<sitemapindex><sitemap><loc>{base}/pages.xml</loc></sitemap></sitemapindex>"#);
    let app = Router::new()
        .route("/sitemap.xml", get(move || async move { index }))
        .route("/pages.xml", get(move || async move { sitemap }))
        .route("/tricks.xml", get(move || async move { tricks }))
        .route(
            "/escape",
            get(move || async move {
                axum::response::Redirect::temporary(&format!("http://localhost:{port}/a"))
            }),
        )
        .route(
            "/robots.txt",
            get(|| async { "User-agent: *\nDisallow: /private/\n" }),
        )
        .route(
            "/a",
            get(|| async {
                axum::response::Html(page(
                    "Bike repair",
                    "en",
                    "<p>We fix flat tyres while you wait.</p>",
                ))
            }),
        )
        .route(
            "/b",
            get(|| async {
                axum::response::Html(page(
                    "Bike rental",
                    "en",
                    "<p>Rent a city bike for 12 euros a day.</p>",
                ))
            }),
        )
        .route(
            "/private/c",
            get(|| async { axum::response::Html(page("Private", "en", "<p>secret</p>")) }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "gone") });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// Read options that may fetch from `hosts` (the test site is on loopback).
fn loopback_options(hosts: &[&str]) -> ReadOptions {
    ReadOptions {
        fetch: FetchLimits {
            delay: std::time::Duration::from_millis(5),
            policy: FetchPolicy {
                allow_private: false,
                allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Ingests the sitemap at `url` with `options` into `site` of `rag`.
async fn ingest_sitemap(
    rag: &qpai::rag::Rag,
    site: &SiteName,
    url: String,
    options: ReadOptions,
) -> qpai::rag::RagResult<qpai::rag::ingest::IngestReport> {
    let reader = qpai::rag::ingest::spawn_reader(url.clone(), options);
    let ingest_options = qpai::rag::ingest::IngestOptions {
        source_id: url,
        prune: true,
        ann_min_rows: 20_000,
    };
    qpai::rag::ingest::ingest(
        rag,
        site,
        reader,
        &ingest_options,
        &indicatif::ProgressBar::hidden(),
    )
    .await
}

/// Fetches reach public addresses only: a loopback sitemap is refused by
/// default, a redirect from an allowed host to one that is not is refused
/// at that hop, and a fetched sitemap cannot make the server read a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_fetches_reach_only_public_addresses() {
    let base = serve_site().await;
    let tmp = tempfile::tempdir().unwrap();
    let rag = rag(tmp.path()).await;
    let site = SiteName::parse("doors").unwrap();
    let error = ingest_sitemap(
        &rag,
        &site,
        format!("{base}/sitemap.xml"),
        ReadOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{error:#}").contains("is not a public address"),
        "{error:#}"
    );
    let report = ingest_sitemap(
        &rag,
        &site,
        format!("{base}/tricks.xml"),
        loopback_options(&["127.0.0.1"]),
    )
    .await
    .unwrap();
    assert_eq!((report.pages, report.failed), (0, 2), "{report:#?}");
    let errors: Vec<&str> = report.errors.iter().map(|e| e.error.as_str()).collect();
    assert!(
        errors[0].contains("refusing to fetch from localhost"),
        "{errors:?}"
    );
    assert!(errors[1].contains("only http(s) URLs"), "{errors:?}");
    // The operator's word lets both hosts through.
    let report = ingest_sitemap(
        &rag,
        &site,
        format!("{base}/tricks.xml"),
        loopback_options(&["127.0.0.1", "localhost"]),
    )
    .await
    .unwrap();
    assert_eq!((report.pages, report.failed), (1, 1), "{report:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sitemaps_are_fetched_politely_over_http() {
    let base = serve_site().await;
    let tmp = tempfile::tempdir().unwrap();
    let rag = rag(tmp.path()).await;
    let site = SiteName::parse("bikes").unwrap();
    let options = loopback_options(&["127.0.0.1"]);
    let report = ingest_sitemap(&rag, &site, format!("{base}/sitemap.xml"), options)
        .await
        .unwrap();
    assert_eq!((report.pages, report.failed), (2, 2), "{report:#?}");
    let errors: Vec<(&str, &str)> = report
        .errors
        .iter()
        .map(|e| (e.origin.as_str(), e.error.as_str()))
        .collect();
    assert!(
        errors.contains(&(
            &format!("{base}/private/c"),
            "disallowed by the site's robots.txt"
        )),
        "{errors:?}"
    );
    assert!(
        errors.contains(&(&format!("{base}/missing"), "HTTP 404")),
        "{errors:?}"
    );
    let hits = search::search(
        &rag,
        &site,
        &SearchRequest {
            query: "flat tyre".into(),
            top_k: 1,
            mode: SearchMode::Hybrid,
            filter: SearchFilter::default(),
        },
    )
    .await
    .unwrap();
    assert_eq!(hits[0].url, format!("{base}/a"));
    assert_eq!(hits[0].updated.as_deref(), Some("2024-02-01"));
}
