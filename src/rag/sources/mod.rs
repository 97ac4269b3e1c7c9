//! Where pages come from: a directory of built HTML and/or Markdown/MDX, a
//! WordPress WXR export, a sitemap.xml (local or fetched over HTTP), or JSONL
//! records. Each source yields one item per page; a page that cannot be read
//! is an error for that page only.

pub mod directory;
pub mod fetch;
mod fetch_policy;
pub mod html;
pub mod jsonl;
pub mod markdown;
pub mod sitemap;
pub mod wxr;

use std::path::Path;

use anyhow::bail;

use super::document::{Document, Section};

/// One page read from a source, or why it could not be.
#[derive(Debug)]
pub struct SourceItem {
    /// File path or URL the page came from (for error reports).
    pub origin: String,
    pub document: Result<Document, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Directory,
    Wxr,
    Sitemap,
    Jsonl,
}

#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Prefix for pages that have no absolute URL of their own.
    pub base_url: Option<url::Url>,
    /// Larger pages are refused (each on its own).
    pub max_page_bytes: usize,
    pub fetch: fetch::FetchLimits,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            base_url: None,
            max_page_bytes: 8 * 1024 * 1024,
            fetch: fetch::FetchLimits::default(),
        }
    }
}

/// How reading ended: a source cut short (broken XML, a sitemap that could
/// not be fetched) must not make the ingest delete the pages it did not reach.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    pub interrupted: Option<String>,
}

/// What kind of source `location` is.
pub fn detect(location: &str) -> anyhow::Result<SourceKind> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Ok(SourceKind::Sitemap);
    }
    let path = Path::new(location);
    if path.is_dir() {
        return Ok(SourceKind::Directory);
    }
    if !path.is_file() {
        bail!("source {location} does not exist");
    }
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match extension.as_str() {
        "jsonl" | "ndjson" => Ok(SourceKind::Jsonl),
        "html" | "htm" | "md" | "mdx" | "markdown" => Ok(SourceKind::Directory),
        "xml" => {
            let mut head = vec![0u8; 4096];
            let n = std::io::Read::read(&mut std::fs::File::open(path)?, &mut head)?;
            let head = String::from_utf8_lossy(&head[..n]);
            if head.contains("<urlset") || head.contains("<sitemapindex") {
                Ok(SourceKind::Sitemap)
            } else if head.contains("<rss") {
                Ok(SourceKind::Wxr)
            } else {
                bail!(
                    "{location}: an XML file that is neither a sitemap nor a WordPress (WXR) export"
                )
            }
        }
        _ => bail!(
            "{location}: not a known source (a directory, .jsonl, a WXR or sitemap .xml, .html, .md/.mdx, or an http(s) sitemap URL)"
        ),
    }
}

/// Reads every page of the source, handing each to `emit` (which returns
/// false to stop early).
pub fn read(
    location: &str,
    options: &ReadOptions,
    emit: &mut dyn FnMut(SourceItem) -> bool,
) -> anyhow::Result<ReadOutcome> {
    match detect(location)? {
        SourceKind::Directory => directory::read(Path::new(location), options, emit),
        SourceKind::Jsonl => jsonl::read(Path::new(location), options, emit),
        SourceKind::Wxr => wxr::read(Path::new(location), options, emit),
        SourceKind::Sitemap => sitemap::read(location, options, emit),
    }
}

/// How many pages reading `location` will give, where that is known before
/// reading (a directory); None for other sources.
pub fn page_count(location: &str) -> Option<usize> {
    match detect(location).ok()? {
        SourceKind::Directory => Some(directory::count_pages(Path::new(location))),
        _ => None,
    }
}

/// Text of a page's bytes: refuses what is too big, binary, or not UTF-8.
pub fn decode_page(bytes: Vec<u8>, max_bytes: usize) -> Result<String, String> {
    if bytes.len() > max_bytes {
        return Err(format!(
            "page is {} bytes; the limit is {max_bytes} (--max-page-bytes)",
            bytes.len()
        ));
    }
    if bytes.is_empty() {
        return Err("empty file".to_string());
    }
    if bytes.iter().take(8192).any(|&b| b == 0) {
        return Err("binary content (NUL bytes), not a text page".to_string());
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "not valid UTF-8 (first bad byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// The page's URL: `own` when absolute, else joined onto the base URL, else as is.
pub fn page_url(own: Option<&str>, relative: &str, base: Option<&url::Url>) -> String {
    if let Some(own) = own.filter(|u| u.starts_with("http://") || u.starts_with("https://")) {
        return own.to_string();
    }
    let relative = own.unwrap_or(relative);
    match base.and_then(|b| b.join(relative.trim_start_matches('/')).ok()) {
        Some(joined) => joined.to_string(),
        None => relative.to_string(),
    }
}

/// A document from extracted parts, or an error when it has no text.
pub fn document(
    url: String,
    title: Option<String>,
    fallback_title: &str,
    lang: Option<String>,
    updated: Option<String>,
    sections: Vec<Section>,
) -> Result<Document, String> {
    let document = Document {
        url,
        title: title
            .filter(|t| !t.trim().is_empty())
            .unwrap_or_else(|| fallback_title.to_string()),
        lang: lang.map(|l| l.to_ascii_lowercase()),
        updated: updated.map(|u| normalise_date(&u)),
        sections,
    };
    if document.is_empty() {
        return Err("no text content".to_string());
    }
    Ok(document)
}

/// ISO 8601 where the date can be read (RFC 3339, RFC 2822, `YYYY-MM-DD[ HH:MM:SS]`), else as given.
pub fn normalise_date(date: &str) -> String {
    let date = date.trim();
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(date) {
        return d
            .to_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    }
    if let Ok(d) = chrono::DateTime::parse_from_rfc2822(date) {
        return d
            .to_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    }
    if let Ok(d) = chrono::NaiveDateTime::parse_from_str(date, "%Y-%m-%d %H:%M:%S") {
        return d
            .and_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d") {
        return d.to_string();
    }
    date.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_dates() {
        let base = url::Url::parse("https://ex.com/docs/").unwrap();
        assert_eq!(
            page_url(None, "a/b.html", Some(&base)),
            "https://ex.com/docs/a/b.html"
        );
        assert_eq!(
            page_url(Some("https://c.com/x"), "a", Some(&base)),
            "https://c.com/x"
        );
        assert_eq!(page_url(None, "a/b.html", None), "a/b.html");
        assert_eq!(
            normalise_date("Tue, 05 Mar 2024 10:00:00 +0100"),
            "2024-03-05T09:00:00Z"
        );
        assert_eq!(normalise_date("2024-03-05"), "2024-03-05");
        assert_eq!(
            normalise_date("2024-03-05 10:11:12"),
            "2024-03-05T10:11:12Z"
        );
        assert_eq!(
            decode_page(vec![0, 1, 2], 10).unwrap_err(),
            "binary content (NUL bytes), not a text page"
        );
        assert!(
            decode_page(vec![0xff, b'a'], 10)
                .unwrap_err()
                .contains("UTF-8")
        );
        assert!(
            decode_page(vec![b'a'; 11], 10)
                .unwrap_err()
                .contains("limit")
        );
    }
}
