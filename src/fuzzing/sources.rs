//! Site content as an ingest reads it: HTML and Markdown pages, WordPress
//! exports, sitemaps and robots.txt files (parsed only: nothing is
//! fetched, and no file is read), and the chunker that cuts a page's
//! document into the pieces that are embedded.

use super::stand_ins;
use crate::rag::chunk::{ChunkConfig, TokenCounter, chunk_document};
use crate::rag::document::{Document, push_text};
use crate::rag::sources::directory::{html_document, markdown_document};
use crate::rag::sources::fetch::Robots;
use crate::rag::sources::{self as site_sources, ReadOptions, decode_page};

/// Pages are read as pages of a site published under this URL.
const BASE_URL: &str = "https://example.com/docs/";

/// An ingest's default options, with the base URL.
fn options() -> ReadOptions {
    ReadOptions {
        base_url: url::Url::parse(BASE_URL).ok(),
        ..ReadOptions::default()
    }
}

/// A built HTML page, as a directory source reads one (bytes to text, the
/// page's text and metadata, its URL); and the same markup as the
/// fragment a WordPress post's content is.
pub fn html(data: &[u8]) {
    let options = options();
    let Ok(text) = decode_page(data.to_vec(), options.max_page_bytes) else {
        return;
    };
    let _ = html_document(&text, "guides/index.html", &options);
    let _ = site_sources::html::fragment_sections(&text);
}

/// A Markdown page, read both as Markdown and as MDX.
pub fn markdown(data: &[u8]) {
    let options = options();
    let Ok(text) = decode_page(data.to_vec(), options.max_page_bytes) else {
        return;
    };
    let _ = markdown_document(&text, "guides/page.md", false, &options);
    let _ = markdown_document(&text, "guides/page.mdx", true, &options);
}

/// A WordPress (WXR) export: every published post and page read.
pub fn wxr(data: &[u8]) {
    let options = options();
    let Ok(text) = decode_page(data.to_vec(), options.max_page_bytes) else {
        return;
    };
    let _ = site_sources::wxr::read_export(&text, "export.xml", &options, &mut |_| true);
}

/// A sitemap or sitemap index, and what a sitemap source makes of each
/// page it lists before fetching it: its URL and last change.
pub fn sitemap(data: &[u8]) {
    let options = options();
    let Ok(text) = decode_page(data.to_vec(), options.max_page_bytes) else {
        return;
    };
    let Ok(listing) = site_sources::sitemap::parse(&text) else {
        return;
    };
    for (url, lastmod) in &listing.pages {
        let _ = site_sources::page_url(Some(url.as_str()), url, options.base_url.as_ref());
        if let Some(date) = lastmod {
            let _ = site_sources::normalise_date(date);
        }
    }
}

/// Paths every robots.txt is asked about, besides those its rules name.
const ROBOTS_PATHS: [&str; 4] = ["/", "/docs/guide", "/private/x", "/wp-admin/admin-ajax.php"];

/// A robots.txt body, read as the fetcher reads one, then asked about
/// some paths and about every value of its lines.
pub fn robots(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let robots = Robots::parse(&text);
    for path in ROBOTS_PATHS {
        let _ = robots.allows(path);
    }
    for line in text.lines() {
        if let Some((_, value)) = line.split_once(':') {
            let _ = robots.allows(value.trim());
        }
    }
}

/// Tokens as the embedding model gives them, from the stand-in tokenizer.
struct StandInTokens;

impl TokenCounter for StandInTokens {
    fn offsets(&self, text: &str) -> Vec<(usize, usize)> {
        stand_ins::token_offsets(text)
    }
}

/// Chunking: the first two bytes are the chunk size and overlap in tokens
/// (refused as an ingest refuses them when invalid), the rest a document
/// (see `document_of`).
pub fn chunker(data: &[u8]) {
    let [max_tokens, overlap_tokens, text @ ..] = data else {
        return;
    };
    let config = ChunkConfig {
        max_tokens: usize::from(*max_tokens),
        overlap_tokens: usize::from(*overlap_tokens),
    };
    if config.validate().is_err() {
        return;
    }
    let document = document_of(&String::from_utf8_lossy(text));
    let _ = chunk_document(&document, &config, &StandInTokens);
}

/// A document from text: the first line its title; a line starting with
/// `#` starts a section under that heading; other lines are text.
fn document_of(text: &str) -> Document {
    let mut lines = text.lines();
    let title = lines.next().unwrap_or_default().to_string();
    let mut headings = vec![title.clone()];
    let mut sections = Vec::new();
    for line in lines {
        match line.strip_prefix('#') {
            Some(heading) => {
                let heading = heading.trim_start_matches('#').trim().to_string();
                headings = vec![title.clone(), heading];
            }
            None => push_text(&mut sections, &headings, line),
        }
    }
    Document {
        url: format!("{BASE_URL}page"),
        title,
        sections,
        ..Document::default()
    }
}
