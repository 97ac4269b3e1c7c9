//! WordPress WXR export files (RSS with `wp:` and `content:` elements):
//! published posts and pages become documents; attachments, menu items,
//! drafts and the like are skipped.

use std::path::Path;

use quick_xml::Reader;
use quick_xml::events::Event;

use super::{ReadOptions, ReadOutcome, SourceItem, decode_page, document, html, page_url};

#[derive(Default)]
struct Item {
    title: String,
    link: String,
    content: String,
    post_type: String,
    status: String,
    modified: String,
    published: String,
    id: String,
}

/// Which item field an element's text goes to.
fn field<'a>(item: &'a mut Item, element: &[u8]) -> Option<&'a mut String> {
    Some(match element {
        b"title" => &mut item.title,
        b"link" => &mut item.link,
        b"content:encoded" => &mut item.content,
        b"wp:post_type" => &mut item.post_type,
        b"wp:status" => &mut item.status,
        b"wp:post_modified_gmt" => &mut item.modified,
        b"pubDate" => &mut item.published,
        b"wp:post_id" => &mut item.id,
        _ => return None,
    })
}

/// Reads the WXR export at `path` (see `read_export`).
pub fn read(
    path: &Path,
    options: &ReadOptions,
    emit: &mut dyn FnMut(SourceItem) -> bool,
) -> anyhow::Result<ReadOutcome> {
    // The whole export is read at once; its size limit is that of 64 pages.
    let limit = options.max_page_bytes.saturating_mul(64);
    let text = decode_page(std::fs::read(path)?, limit)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    read_export(&text, &path.display().to_string(), options, emit)
}

/// Reads the items of an export's text, handing each published post or
/// page to `emit` (which returns false to stop early); `name` (the file's
/// path) starts error messages and each item's origin.
pub fn read_export(
    text: &str,
    name: &str,
    options: &ReadOptions,
    emit: &mut dyn FnMut(SourceItem) -> bool,
) -> anyhow::Result<ReadOutcome> {
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let mut item: Option<Item> = None;
    let mut language: Option<String> = None;
    let mut channel_language = String::new();
    let mut items = 0usize;
    loop {
        let event = match reader.read_event() {
            Ok(event) => event,
            Err(error) => {
                let at = reader.error_position();
                return Ok(ReadOutcome {
                    interrupted: Some(format!(
                        "{name}: XML error at byte {at}: {error}; the items after it were not read"
                    )),
                });
            }
        };
        let mut text_of = |t: &str, stack: &[Vec<u8>], item: &mut Option<Item>| {
            let element = stack.last().map(Vec::as_slice).unwrap_or_default();
            match item {
                Some(item) => {
                    if let Some(target) = field(item, element) {
                        target.push_str(t);
                    }
                }
                None if element == b"language" => channel_language.push_str(t),
                None => {}
            }
        };
        match event {
            Event::Start(start) => {
                let name = start.name().as_ref().to_vec();
                if name == b"item" {
                    item = Some(Item::default());
                }
                stack.push(name);
            }
            Event::End(end) => {
                stack.pop();
                if end.name().as_ref() == b"language" && item.is_none() {
                    language = Some(channel_language.trim().to_string()).filter(|l| !l.is_empty());
                }
                if end.name().as_ref() == b"item"
                    && let Some(done) = item.take()
                {
                    items += 1;
                    if let Some(source_item) = to_document(done, name, &language, options)
                        && !emit(source_item)
                    {
                        break;
                    }
                }
            }
            Event::Text(t) => {
                let decoded = t.decode().map_err(|e| anyhow::anyhow!("{e}"))?;
                text_of(&decoded, &stack, &mut item);
            }
            Event::CData(t) => {
                let decoded = t.decode().map_err(|e| anyhow::anyhow!("{e}"))?;
                text_of(&decoded, &stack, &mut item);
            }
            Event::GeneralRef(reference) => {
                let name = reference.decode().map_err(|e| anyhow::anyhow!("{e}"))?;
                let resolved = match reference.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    _ => quick_xml::escape::resolve_predefined_entity(&name)
                        .map_or_else(|| format!("&{name};"), str::to_string),
                };
                text_of(&resolved, &stack, &mut item);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if items == 0 {
        anyhow::bail!("{name} holds no <item> elements");
    }
    Ok(ReadOutcome::default())
}

/// `None` for what is not a published post or page.
fn to_document(
    item: Item,
    name: &str,
    language: &Option<String>,
    options: &ReadOptions,
) -> Option<SourceItem> {
    let post_type = item.post_type.trim();
    if !matches!(post_type, "post" | "page" | "") {
        return None;
    }
    let status = item.status.trim();
    if !matches!(status, "publish" | "") {
        return None;
    }
    let link = item.link.trim().to_string();
    let origin = format!("{name} item {}", item.id.trim());
    if link.is_empty() {
        return Some(SourceItem {
            origin,
            document: Err("item has no <link>".to_string()),
        });
    }
    let updated = [item.modified.trim(), item.published.trim()]
        .into_iter()
        .find(|d| !d.is_empty() && !d.starts_with("0000"))
        .map(str::to_string);
    let url = page_url(Some(&link), &link, options.base_url.as_ref());
    let title = Some(item.title.trim().to_string());
    let document = if item.content.len() > options.max_page_bytes {
        Err(format!(
            "post is {} bytes; the limit is {} (--max-page-bytes)",
            item.content.len(),
            options.max_page_bytes
        ))
    } else {
        let sections = html::fragment_sections(&item.content);
        document(url, title, &link, language.clone(), updated, sections)
    };
    Some(SourceItem { origin, document })
}
