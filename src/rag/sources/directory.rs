//! A directory of pages: built static HTML (a Jamstack site's output) and/or
//! Markdown/MDX sources, walked in a stable order. Other files are ignored.

use std::path::Path;

use super::{
    ReadOptions, ReadOutcome, SourceItem, decode_page, document, html, markdown, page_url,
};
use crate::rag::document::Document;

#[derive(Clone, Copy)]
enum PageFormat {
    Html,
    Markdown { mdx: bool },
}

fn format_of(path: &Path) -> Option<PageFormat> {
    let extension = path.extension()?.to_str()?.to_ascii_lowercase();
    match extension.as_str() {
        "html" | "htm" => Some(PageFormat::Html),
        "md" | "markdown" => Some(PageFormat::Markdown { mdx: false }),
        "mdx" => Some(PageFormat::Markdown { mdx: true }),
        _ => None,
    }
}

/// How many pages `read` will meet under `root` (for a progress bar).
pub fn count_pages(root: &Path) -> usize {
    if root.is_file() {
        return usize::from(format_of(root).is_some());
    }
    walker(root)
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && format_of(e.path()).is_some())
        .count()
}

fn walker(root: &Path) -> impl Iterator<Item = walkdir::Result<walkdir::DirEntry>> {
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'))
}

pub fn read(
    root: &Path,
    options: &ReadOptions,
    emit: &mut dyn FnMut(SourceItem) -> bool,
) -> anyhow::Result<ReadOutcome> {
    if root.is_file() {
        let base = root.parent().unwrap_or(Path::new("."));
        if let Some(format) = format_of(root) {
            emit(read_page(base, root, format, options));
        }
        return Ok(ReadOutcome::default());
    }
    let mut found = 0usize;
    for entry in walker(root) {
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                let origin = error
                    .path()
                    .map_or_else(|| root.display().to_string(), |p| p.display().to_string());
                found += 1;
                if !emit(SourceItem {
                    origin,
                    document: Err(format!("cannot read: {error}")),
                }) {
                    break;
                }
                continue;
            }
        };
        if !entry.file_type().is_file() {
            continue;
        }
        let Some(format) = format_of(entry.path()) else {
            continue;
        };
        found += 1;
        if !emit(read_page(root, entry.path(), format, options)) {
            break;
        }
    }
    if found == 0 {
        anyhow::bail!(
            "{} holds no pages (.html, .htm, .md, .markdown or .mdx files)",
            root.display()
        );
    }
    Ok(ReadOutcome::default())
}

fn read_page(root: &Path, path: &Path, format: PageFormat, options: &ReadOptions) -> SourceItem {
    let origin = path.display().to_string();
    let relative = path
        .strip_prefix(root)
        .unwrap_or(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/");
    let document = std::fs::read(path)
        .map_err(|e| format!("cannot read: {e}"))
        .and_then(|bytes| decode_page(bytes, options.max_page_bytes))
        .and_then(|text| match format {
            PageFormat::Html => html_document(&text, &relative, options),
            PageFormat::Markdown { mdx } => markdown_document(&text, &relative, mdx, options),
        });
    SourceItem { origin, document }
}

/// With a base URL, `a/index.html` is served as `a/` (as static hosts do);
/// without one, pages are named by their path under the root.
fn html_route<'a>(relative: &'a str, options: &ReadOptions) -> &'a str {
    if options.base_url.is_none() {
        return relative;
    }
    ["index.html", "index.htm"]
        .iter()
        .find_map(|index| relative.strip_suffix(index))
        .filter(|dir| dir.is_empty() || dir.ends_with('/'))
        .unwrap_or(relative)
}

/// A built HTML page's document: its text and metadata, named by its
/// canonical URL, else by `relative` (its path under the site's root).
pub fn html_document(
    text: &str,
    relative: &str,
    options: &ReadOptions,
) -> Result<Document, String> {
    let page = html::extract(text);
    let route = html_route(relative, options);
    let url = page_url(page.canonical.as_deref(), route, options.base_url.as_ref());
    let first_heading = page
        .sections
        .first()
        .and_then(|s| s.headings.first().cloned());
    document(
        url,
        page.title.or(first_heading),
        relative,
        page.lang,
        page.updated,
        page.sections,
    )
}

/// `docs/guide.md` is served as `docs/guide`; `index.md`, `_index.md` and
/// `README.md` as their directory.
fn markdown_route(relative: &str, slug: Option<&str>) -> String {
    let (dir, file) = relative.rsplit_once('/').unwrap_or(("", relative));
    let stem = file.rsplit_once('.').map_or(file, |(s, _)| s);
    let name = slug.unwrap_or(stem);
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    if slug.is_none() && matches!(stem, "index" | "_index" | "README" | "readme") {
        prefix
    } else {
        format!("{prefix}{name}")
    }
}

/// A Markdown (or MDX) page's document, named by its front matter's URL,
/// else by its route from `relative` (its path under the site's root);
/// drafts are refused.
pub fn markdown_document(
    text: &str,
    relative: &str,
    mdx: bool,
    options: &ReadOptions,
) -> Result<Document, String> {
    let page = markdown::parse(text, mdx)?;
    if page.front.draft {
        return Err("draft (front matter `draft: true`): skipped".to_string());
    }
    let route = markdown_route(relative, page.front.slug.as_deref());
    let url = page_url(page.front.url.as_deref(), &route, options.base_url.as_ref());
    document(
        url,
        page.front.title.or(page.first_h1),
        relative,
        page.front.lang,
        page.front.updated,
        page.sections,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_routes() {
        assert_eq!(markdown_route("docs/guide.md", None), "docs/guide");
        assert_eq!(markdown_route("docs/index.mdx", None), "docs/");
        assert_eq!(markdown_route("index.md", None), "");
        assert_eq!(
            markdown_route("blog/2024/post.md", Some("hello")),
            "blog/2024/hello"
        );
    }
}
