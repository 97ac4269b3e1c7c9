//! Main text of an HTML page: navigation, page header and footer, scripts and
//! styles are dropped; headings split the text into sections. The tree is
//! walked iteratively, so absurdly deep (or broken) markup cannot overflow
//! the stack.

use ego_tree::iter::Edge;
use scraper::{ElementRef, Html, Node, Selector};

use crate::rag::document::{Section, push_text};

/// What a page says about itself, and its text.
#[derive(Debug, Default)]
pub struct HtmlPage {
    pub title: Option<String>,
    pub lang: Option<String>,
    pub canonical: Option<String>,
    pub updated: Option<String>,
    pub sections: Vec<Section>,
}

/// Elements never read: not content, or not text.
const DROPPED: &[&str] = &[
    "script", "style", "noscript", "template", "svg", "iframe", "object", "canvas", "form",
    "button", "select", "nav", "aside", "head",
];

/// Roles and classes that mark site chrome rather than the page's content.
const CHROME_ROLES: &[&str] = &[
    "navigation",
    "banner",
    "contentinfo",
    "search",
    "complementary",
];
const CHROME_CLASSES: &[&str] = &[
    "navheader",
    "navfooter",
    "navbar",
    "breadcrumb",
    "breadcrumbs",
    "sidebar",
    "skip-link",
    "site-header",
    "site-footer",
    "cookie-banner",
];

/// Elements that end a line of text.
const BLOCKS: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "main",
    "ul",
    "ol",
    "li",
    "dl",
    "dt",
    "dd",
    "table",
    "tr",
    "th",
    "td",
    "caption",
    "blockquote",
    "figure",
    "figcaption",
    "br",
    "hr",
    "pre",
    "address",
    "details",
    "summary",
    "body",
];

/// Where the content is, in order of preference.
const CONTENT_ROOTS: &[&str] = &[
    "main",
    "article",
    "[role=main]",
    "#content",
    "#main-content",
];

fn select_first<'a>(html: &'a Html, selector: &str) -> Option<ElementRef<'a>> {
    let selector = Selector::parse(selector).ok()?;
    html.select(&selector).next()
}

fn text_of(element: ElementRef<'_>) -> String {
    collapse(&element.text().collect::<String>())
}

fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn extract(source: &str) -> HtmlPage {
    let html = Html::parse_document(source);
    let attr = |selector: &str, name: &str| {
        select_first(&html, selector)
            .and_then(|e| e.value().attr(name))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let title = select_first(&html, "title")
        .map(text_of)
        .filter(|t| !t.is_empty())
        .or_else(|| select_first(&html, "h1").map(text_of))
        .filter(|t| !t.is_empty());
    let updated = [
        "meta[property='article:modified_time']",
        "meta[itemprop=dateModified]",
        "meta[name='last-modified']",
        "meta[http-equiv='last-modified']",
        "meta[name='dcterms.modified']",
        "meta[name=date]",
        "meta[property='article:published_time']",
    ]
    .iter()
    .find_map(|s| attr(s, "content"));
    let root = CONTENT_ROOTS
        .iter()
        .find_map(|s| select_first(&html, s))
        .map(|e| (e, true));
    let (root, inside_content) = match root {
        Some(found) => found,
        None => match select_first(&html, "body") {
            Some(body) => (body, false),
            None => (html.root_element(), false),
        },
    };
    HtmlPage {
        title,
        lang: attr("html", "lang"),
        canonical: attr("link[rel~=canonical]", "href"),
        updated,
        sections: sections(root, !inside_content),
    }
}

/// Sections of an HTML fragment (a WordPress post body, an `html` record).
pub fn fragment_sections(source: &str) -> Vec<Section> {
    let html = Html::parse_fragment(source);
    sections(html.root_element(), false)
}

fn is_dropped(element: &scraper::node::Element, drop_page_chrome: bool) -> bool {
    let name = element.name();
    if DROPPED.contains(&name) || (drop_page_chrome && (name == "header" || name == "footer")) {
        return true;
    }
    if element.attr("hidden").is_some() {
        return true;
    }
    if element
        .attr("role")
        .is_some_and(|r| CHROME_ROLES.contains(&r.trim()))
    {
        return true;
    }
    element.classes().any(|c| CHROME_CLASSES.contains(&c))
}

fn heading_level(name: &str) -> Option<usize> {
    match name {
        "h1" => Some(1),
        "h2" => Some(2),
        "h3" => Some(3),
        "h4" => Some(4),
        "h5" => Some(5),
        "h6" => Some(6),
        _ => None,
    }
}

/// Walks the content, tracking the heading path.
struct Walker {
    sections: Vec<Section>,
    /// (level, text) of the open headings.
    headings: Vec<(usize, String)>,
    line: String,
    heading: Option<(usize, String)>,
    pre_depth: usize,
}

impl Walker {
    fn heading_path(&self) -> Vec<String> {
        self.headings.iter().map(|(_, t)| t.clone()).collect()
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let line = if self.pre_depth > 0 {
            line.trim_end().to_string()
        } else {
            line.trim().to_string()
        };
        if !line.is_empty() {
            let path = self.heading_path();
            push_text(&mut self.sections, &path, &line);
        }
    }

    fn text(&mut self, text: &str) {
        if let Some((_, heading)) = &mut self.heading {
            heading.push_str(text);
        } else if self.pre_depth > 0 {
            for (i, part) in text.split('\n').enumerate() {
                if i > 0 {
                    self.end_line();
                }
                self.line.push_str(part);
            }
        } else {
            let starts_with_space = text.starts_with(char::is_whitespace);
            let collapsed = collapse(text);
            if starts_with_space && !self.line.is_empty() && !self.line.ends_with(' ') {
                self.line.push(' ');
            }
            self.line.push_str(&collapsed);
            if text.ends_with(char::is_whitespace) && !collapsed.is_empty() {
                self.line.push(' ');
            }
        }
    }
}

fn sections(root: ElementRef<'_>, drop_page_chrome: bool) -> Vec<Section> {
    let mut walker = Walker {
        sections: Vec::new(),
        headings: Vec::new(),
        line: String::new(),
        heading: None,
        pre_depth: 0,
    };
    let mut skipping: Option<ego_tree::NodeId> = None;
    for edge in root.traverse() {
        match edge {
            Edge::Open(node) => {
                if skipping.is_some() {
                    continue;
                }
                match node.value() {
                    Node::Element(element) => {
                        if node.id() != root.id() && is_dropped(element, drop_page_chrome) {
                            skipping = Some(node.id());
                            continue;
                        }
                        let name = element.name();
                        if let Some(level) = heading_level(name) {
                            walker.end_line();
                            walker.heading = Some((level, String::new()));
                        } else if BLOCKS.contains(&name) {
                            walker.end_line();
                            if name == "pre" {
                                walker.pre_depth += 1;
                            }
                        }
                    }
                    Node::Text(text) => walker.text(text),
                    _ => {}
                }
            }
            Edge::Close(node) => {
                if let Some(id) = skipping {
                    if id == node.id() {
                        skipping = None;
                    }
                    continue;
                }
                let Node::Element(element) = node.value() else {
                    continue;
                };
                let name = element.name();
                if heading_level(name).is_some() {
                    if let Some((level, text)) = walker.heading.take() {
                        let text = collapse(&text);
                        walker.headings.retain(|(l, _)| *l < level);
                        if !text.is_empty() {
                            walker.headings.push((level, text));
                        }
                    }
                } else if BLOCKS.contains(&name) {
                    walker.end_line();
                    if name == "pre" {
                        walker.pre_depth = walker.pre_depth.saturating_sub(1);
                    }
                }
            }
        }
    }
    walker.end_line();
    walker.sections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_main_content_with_its_heading_path() {
        let page = extract(
            r#"<!doctype html><html lang="de"><head><title>Shop &amp; more</title>
            <link rel="canonical" href="https://example.com/a/">
            <meta property="article:modified_time" content="2024-05-01T10:00:00Z">
            <style>.x{}</style><script>var x = 1;</script></head>
            <body><header>Site banner</header><nav><a href="/">Home</a></nav>
            <main><h1>Guide</h1><p>Intro <b>bold</b> text.</p>
            <h2>Setup</h2><p>Step one.</p><pre>a  b
  c</pre><h3>Deep</h3><ul><li>x</li><li>y</li></ul>
            <h2>Usage</h2><p>Use it.</p></main><footer>(c) footer</footer></body></html>"#,
        );
        assert_eq!(page.title.as_deref(), Some("Shop & more"));
        assert_eq!(page.lang.as_deref(), Some("de"));
        assert_eq!(page.canonical.as_deref(), Some("https://example.com/a/"));
        assert_eq!(page.updated.as_deref(), Some("2024-05-01T10:00:00Z"));
        let rendered: Vec<(String, String)> = page
            .sections
            .iter()
            .map(|s| (s.headings.join(" > "), s.text.clone()))
            .collect();
        assert_eq!(
            rendered,
            vec![
                ("Guide".into(), "Intro bold text.".into()),
                ("Guide > Setup".into(), "Step one.\na  b\n  c".into()),
                ("Guide > Setup > Deep".into(), "x\ny".into()),
                ("Guide > Usage".into(), "Use it.".into()),
            ]
        );
        let all: String = page.sections.iter().map(|s| s.text.as_str()).collect();
        for chrome in ["banner", "Home", "footer", "var x"] {
            assert!(!all.contains(chrome), "{chrome} kept: {all}");
        }
    }

    #[test]
    fn broken_markup_still_gives_text() {
        let page = extract("<html><body><div><p>one &bogus; two<p>three<div><h2>H</h2>four");
        let text: Vec<&str> = page.sections.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(text, vec!["one &bogus; two\nthree", "four"]);
        let deep = format!(
            "{}deep text{}",
            "<div>".repeat(50_000),
            "</div>".repeat(50_000)
        );
        let page = extract(&deep);
        assert_eq!(page.sections[0].text, "deep text");
    }
}
