//! sitemap.xml (and sitemap index) sources. The sitemap itself may be a local
//! file or an http(s) URL; its pages are fetched over HTTP with `fetch`'s
//! limits (or read from disk when they are `file://` URLs or paths).

use quick_xml::Reader;
use quick_xml::events::Event;

use super::fetch::Fetcher;
use super::{ReadOptions, ReadOutcome, SourceItem, decode_page, document, html, page_url};

/// Nested sitemap indexes followed at most this deep.
const MAX_DEPTH: usize = 3;

/// What one sitemap file lists.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sitemap {
    /// Page URLs, each with its `lastmod` when given.
    pub pages: Vec<(String, Option<String>)>,
    /// Nested sitemaps (of a sitemap index).
    pub sitemaps: Vec<String>,
}

/// Reads a `<urlset>` or `<sitemapindex>` document.
pub fn parse(text: &str) -> Result<Sitemap, String> {
    let mut reader = Reader::from_str(text);
    let mut sitemap = Sitemap::default();
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let (mut loc, mut lastmod) = (String::new(), String::new());
    loop {
        match reader.read_event() {
            Err(e) => {
                return Err(format!(
                    "XML error at byte {}: {e}",
                    reader.error_position()
                ));
            }
            Ok(Event::Eof) => break,
            Ok(Event::Start(start)) => {
                let name = start.local_name().as_ref().to_vec();
                if name == b"url" || name == b"sitemap" {
                    loc.clear();
                    lastmod.clear();
                }
                stack.push(name);
            }
            Ok(Event::End(end)) => {
                stack.pop();
                let loc = loc.trim().to_string();
                match end.local_name().as_ref() {
                    b"url" if !loc.is_empty() => {
                        let lastmod = Some(lastmod.trim().to_string()).filter(|l| !l.is_empty());
                        sitemap.pages.push((loc, lastmod));
                    }
                    b"sitemap" if !loc.is_empty() => sitemap.sitemaps.push(loc),
                    _ => {}
                }
            }
            Ok(Event::Text(t)) => {
                let text = t.decode().map_err(|e| e.to_string())?;
                match stack.last().map(Vec::as_slice) {
                    Some(b"loc") => loc.push_str(&text),
                    Some(b"lastmod") => lastmod.push_str(&text),
                    _ => {}
                }
            }
            Ok(Event::GeneralRef(r)) => {
                let name = r.decode().map_err(|e| e.to_string())?;
                let resolved = quick_xml::escape::resolve_predefined_entity(&name).unwrap_or("");
                if stack.last().map(Vec::as_slice) == Some(b"loc") {
                    loc.push_str(resolved);
                }
            }
            Ok(_) => {}
        }
    }
    Ok(sitemap)
}

fn is_remote(location: &str) -> bool {
    location.starts_with("http://") || location.starts_with("https://")
}

/// The text at `location`: fetched, or read from a file where `local` (a
/// sitemap fetched over HTTP may name only http(s) locations: the server
/// reads no files for whoever wrote it).
fn load(
    location: &str,
    local: bool,
    fetcher: &mut Fetcher,
    max_bytes: usize,
) -> Result<String, String> {
    let bytes = if is_remote(location) {
        fetcher.get(location)?
    } else if !local {
        return Err("a sitemap fetched over HTTP may list only http(s) URLs".to_string());
    } else {
        let path = location.strip_prefix("file://").unwrap_or(location);
        std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?
    };
    decode_page(bytes, max_bytes)
}

pub fn read(
    location: &str,
    options: &ReadOptions,
    emit: &mut dyn FnMut(SourceItem) -> bool,
) -> anyhow::Result<ReadOutcome> {
    let mut fetcher = Fetcher::new(options.fetch.clone(), options.max_page_bytes);
    let local = !is_remote(location);
    // A sitemap may list up to 50k URLs; allow it a larger size than a page.
    let sitemap_limit = options.max_page_bytes.max(64 * 1024 * 1024);
    let mut queue = vec![(location.to_string(), 0usize)];
    let mut outcome = ReadOutcome::default();
    let mut pages = 0usize;
    while let Some((sitemap_location, depth)) = queue.pop() {
        let sitemap = match load(&sitemap_location, local, &mut fetcher, sitemap_limit)
            .and_then(|t| parse(&t))
        {
            Ok(sitemap) => sitemap,
            Err(error) if depth == 0 => anyhow::bail!("sitemap {sitemap_location}: {error}"),
            Err(error) => {
                outcome.interrupted = Some(format!("sitemap {sitemap_location}: {error}"));
                continue;
            }
        };
        if depth < MAX_DEPTH {
            queue.extend(sitemap.sitemaps.into_iter().rev().map(|s| (s, depth + 1)));
        }
        for (url, lastmod) in sitemap.pages {
            if is_remote(&url) && !fetcher.page_budget_left() {
                outcome.interrupted = Some(format!(
                    "stopped after {} fetched pages (--max-pages)",
                    fetcher.fetched
                ));
                return Ok(outcome);
            }
            pages += 1;
            let document =
                load(&url, local, &mut fetcher, options.max_page_bytes).and_then(|text| {
                    let page = html::extract(&text);
                    let own = page.canonical.as_deref().or(Some(url.as_str()));
                    let page_url = page_url(own, &url, options.base_url.as_ref());
                    document(
                        page_url,
                        page.title,
                        &url,
                        page.lang,
                        page.updated.or(lastmod),
                        page.sections,
                    )
                });
            if !emit(SourceItem {
                origin: url,
                document,
            }) {
                return Ok(outcome);
            }
        }
    }
    if pages == 0 {
        anyhow::bail!("sitemap {location} lists no pages");
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urlsets_and_indexes() {
        let set = parse(
            r#"<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
            <url><loc>https://ex.com/a?x=1&amp;y=2</loc><lastmod>2024-01-02</lastmod></url>
            <url><loc> https://ex.com/b </loc></url></urlset>"#,
        )
        .unwrap();
        assert_eq!(
            set.pages,
            vec![
                (
                    "https://ex.com/a?x=1&y=2".to_string(),
                    Some("2024-01-02".to_string())
                ),
                ("https://ex.com/b".to_string(), None)
            ]
        );
        let index = parse(
            "<sitemapindex><sitemap><loc>https://ex.com/s1.xml</loc></sitemap></sitemapindex>",
        )
        .unwrap();
        assert_eq!(index.sitemaps, vec!["https://ex.com/s1.xml"]);
        assert!(parse("<urlset><url><loc>x</url></urlset>").is_err());
    }
}
