//! JSONL records, one page per line:
//! `{"url", "title"?, "text" | "html" | "markdown", "lang"?, "updated"?}`.

use std::io::{BufRead, Read};
use std::path::Path;

use serde::Deserialize;

use super::{ReadOptions, ReadOutcome, SourceItem, document, html, markdown, page_url};
use crate::rag::document::{Document, Section};

#[derive(Debug, Deserialize)]
pub struct Record {
    pub url: String,
    pub title: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub markdown: Option<String>,
    pub lang: Option<String>,
    pub updated: Option<String>,
}

impl Record {
    /// The page this record describes.
    pub fn into_document(self, options: &ReadOptions) -> Result<Document, String> {
        if self.url.trim().is_empty() {
            return Err("`url` is empty".to_string());
        }
        let (title, sections) = match (self.text, self.html, self.markdown) {
            (Some(text), None, None) => (
                self.title,
                vec![Section {
                    headings: Vec::new(),
                    text,
                }],
            ),
            (None, Some(source), None) => {
                let page = html::extract(&source);
                (self.title.or(page.title), page.sections)
            }
            (None, None, Some(source)) => {
                let page = markdown::parse(&source, false)?;
                (
                    self.title.or(page.front.title).or(page.first_h1),
                    page.sections,
                )
            }
            _ => return Err("give exactly one of `text`, `html` or `markdown`".to_string()),
        };
        let url = page_url(Some(&self.url), &self.url, options.base_url.as_ref());
        let fallback = url.clone();
        document(url, title, &fallback, self.lang, self.updated, sections)
    }
}

pub fn read(
    path: &Path,
    options: &ReadOptions,
    emit: &mut dyn FnMut(SourceItem) -> bool,
) -> anyhow::Result<ReadOutcome> {
    let file = std::fs::File::open(path)?;
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    let mut number = 0usize;
    let mut records = 0usize;
    loop {
        line.clear();
        // Lines are capped so one runaway record cannot exhaust memory.
        let read = (&mut reader)
            .take(options.max_page_bytes as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            break;
        }
        number += 1;
        let origin = format!("{}:{number}", path.display());
        if line.len() > options.max_page_bytes {
            // Skip the rest of the oversized line.
            let mut rest = Vec::new();
            reader.read_until(b'\n', &mut rest)?;
            records += 1;
            if !emit(SourceItem {
                origin,
                document: Err(format!(
                    "record is over {} bytes (--max-page-bytes)",
                    options.max_page_bytes
                )),
            }) {
                break;
            }
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        records += 1;
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        let document = std::str::from_utf8(&line)
            .map_err(|e| format!("not valid UTF-8: {e}"))
            .and_then(|t| serde_json::from_str::<Record>(t).map_err(|e| format!("bad record: {e}")))
            .and_then(|record| record.into_document(options));
        if !emit(SourceItem { origin, document }) {
            break;
        }
    }
    if records == 0 {
        anyhow::bail!("{} holds no records", path.display());
    }
    Ok(ReadOutcome::default())
}
