//! Markdown and MDX pages with YAML (`---`) or TOML (`+++`) front matter.
//! Headings split the text into sections; MDX `import`/`export` lines and
//! JSX/HTML tags are dropped, their inner text kept.

use pulldown_cmark::{Event, HeadingLevel, Parser, Tag, TagEnd};
use yaml_rust2::{Yaml, YamlLoader};

use crate::rag::document::{Section, push_text};

/// Front matter fields qpai reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FrontMatter {
    pub title: Option<String>,
    pub lang: Option<String>,
    pub updated: Option<String>,
    /// `permalink`, `url` or `canonical`: the page's URL.
    pub url: Option<String>,
    pub slug: Option<String>,
    pub draft: bool,
}

impl FrontMatter {
    /// The fields from `get`, which returns the first of the given keys set.
    fn read(get: impl Fn(&[&str]) -> Option<String>, draft: bool) -> Self {
        Self {
            title: get(&["title"]),
            lang: get(&["lang", "language", "locale"]),
            updated: get(&["lastmod", "last_modified", "updated", "modified", "date"]),
            url: get(&["permalink", "url", "canonical"]),
            slug: get(&["slug"]),
            draft,
        }
    }
}

#[derive(Debug, Default)]
pub struct MarkdownPage {
    pub front: FrontMatter,
    pub first_h1: Option<String>,
    pub sections: Vec<Section>,
}

pub fn parse(source: &str, mdx: bool) -> Result<MarkdownPage, String> {
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    let (front, body) = split_front_matter(source)?;
    let body = if mdx {
        strip_mdx_statements(body)
    } else {
        body.to_string()
    };
    let (first_h1, sections) = sections(&body);
    Ok(MarkdownPage {
        front,
        first_h1,
        sections,
    })
}

fn split_front_matter(source: &str) -> Result<(FrontMatter, &str), String> {
    for (fence, yaml) in [("---", true), ("+++", false)] {
        let Some(rest) = source
            .strip_prefix(fence)
            .and_then(|r| r.strip_prefix('\n').or_else(|| r.strip_prefix("\r\n")))
        else {
            continue;
        };
        let close = format!("\n{fence}");
        // Where the front matter ends, and where the closing fence does.
        let (end, after_fence) = if rest.starts_with(fence) {
            (0, fence.len())
        } else if let Some(at) = rest.find(&close) {
            (at, at + close.len())
        } else {
            return Err(format!("front matter opened with {fence} is never closed"));
        };
        let text = &rest[..end];
        let after = &rest[after_fence..];
        let body = after.split_once('\n').map_or("", |(_, b)| b);
        let front = if yaml {
            yaml_front(text)?
        } else {
            toml_front(text)?
        };
        return Ok((front, body));
    }
    Ok((FrontMatter::default(), source))
}

fn yaml_front(text: &str) -> Result<FrontMatter, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("front matter: {e}"))?;
    let Some(doc) = docs.first() else {
        return Ok(FrontMatter::default());
    };
    let get = |keys: &[&str]| {
        keys.iter().find_map(|k| match &doc[*k] {
            Yaml::String(s) => Some(s.trim().to_string()),
            Yaml::Integer(i) => Some(i.to_string()),
            Yaml::Real(r) => Some(r.clone()),
            _ => None,
        })
    };
    Ok(FrontMatter::read(
        get,
        matches!(doc["draft"], Yaml::Boolean(true)),
    ))
}

fn toml_front(text: &str) -> Result<FrontMatter, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| format!("front matter: {e}"))?;
    let get = |keys: &[&str]| {
        keys.iter().find_map(|k| match table.get(*k)? {
            toml::Value::String(s) => Some(s.trim().to_string()),
            toml::Value::Datetime(d) => Some(d.to_string()),
            _ => None,
        })
    };
    let draft = table.get("draft").and_then(toml::Value::as_bool) == Some(true);
    Ok(FrontMatter::read(get, draft))
}

/// Drops MDX `import`/`export` statements outside code fences.
fn strip_mdx_statements(body: &str) -> String {
    let mut in_fence = false;
    body.lines()
        .filter(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
                in_fence = !in_fence;
                return true;
            }
            in_fence || !(line.starts_with("import ") || line.starts_with("export "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text of HTML/JSX markup: everything outside `<...>`.
fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

fn level(level: HeadingLevel) -> usize {
    level as usize
}

fn sections(body: &str) -> (Option<String>, Vec<Section>) {
    let mut sections = Vec::new();
    let mut headings: Vec<(usize, String)> = Vec::new();
    let mut heading: Option<(usize, String)> = None;
    let mut first_h1 = None;
    let mut line = String::new();
    let path = |h: &[(usize, String)]| h.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>();
    let end_line = |line: &mut String, sections: &mut Vec<Section>, h: &[(usize, String)]| {
        let text = std::mem::take(line);
        push_text(sections, &path(h), text.trim_end());
    };
    for event in Parser::new(body) {
        match event {
            Event::Start(Tag::Heading { level: l, .. }) => {
                end_line(&mut line, &mut sections, &headings);
                heading = Some((level(l), String::new()));
            }
            Event::End(TagEnd::Heading(_)) => {
                if let Some((l, text)) = heading.take() {
                    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
                    if l == 1 && first_h1.is_none() {
                        first_h1 = Some(text.clone());
                    }
                    headings.retain(|(open, _)| *open < l);
                    if !text.is_empty() {
                        headings.push((l, text));
                    }
                }
            }
            Event::Text(text) | Event::Code(text) => match &mut heading {
                Some((_, h)) => h.push_str(&text),
                None => {
                    for (i, part) in text.split('\n').enumerate() {
                        if i > 0 {
                            end_line(&mut line, &mut sections, &headings);
                        }
                        line.push_str(part);
                    }
                }
            },
            Event::Html(html) | Event::InlineHtml(html) => {
                let text = strip_tags(&html);
                let target = match &mut heading {
                    Some((_, h)) => h,
                    None => &mut line,
                };
                target.push_str(text.trim_end_matches('\n'));
                if html.ends_with('\n') && heading.is_none() {
                    end_line(&mut line, &mut sections, &headings);
                }
            }
            Event::SoftBreak => match &mut heading {
                Some((_, h)) => h.push(' '),
                None => line.push(' '),
            },
            Event::HardBreak
            | Event::End(
                TagEnd::Paragraph
                | TagEnd::Item
                | TagEnd::CodeBlock
                | TagEnd::TableRow
                | TagEnd::TableHead
                | TagEnd::BlockQuote(_),
            ) => end_line(&mut line, &mut sections, &headings),
            Event::End(TagEnd::TableCell) => line.push(' '),
            _ => {}
        }
    }
    end_line(&mut line, &mut sections, &headings);
    (first_h1, sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_front_matter_and_heading_sections() {
        let page = parse(
            "---\ntitle: \"Returns\"\nlang: en\nlastmod: 2024-03-01\nslug: returns\n---\n\
             # Returns\n\nYou can return\nitems.\n\n## Window\n\n30 days.\n\n```sh\nqpai x\n```\n",
            false,
        )
        .unwrap();
        assert_eq!(page.front.title.as_deref(), Some("Returns"));
        assert_eq!(page.front.lang.as_deref(), Some("en"));
        assert_eq!(page.front.updated.as_deref(), Some("2024-03-01"));
        assert_eq!(page.front.slug.as_deref(), Some("returns"));
        assert_eq!(page.first_h1.as_deref(), Some("Returns"));
        assert_eq!(page.sections.len(), 2);
        assert_eq!(page.sections[0].text, "You can return items.");
        assert_eq!(page.sections[1].headings, vec!["Returns", "Window"]);
        assert_eq!(page.sections[1].text, "30 days.\nqpai x");
    }

    #[test]
    fn mdx_statements_and_toml_front_matter() {
        let page = parse(
            "+++\ntitle = \"T\"\ndraft = true\n+++\nimport X from './x'\n\n<Note>Keep me</Note>\n\nText.\n",
            true,
        )
        .unwrap();
        assert!(page.front.draft);
        let text: Vec<&str> = page.sections.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(text, vec!["Keep me\nText."]);
        assert!(parse("---\ntitle: [unclosed\n---\nx", false).is_err());
        assert!(parse("---\ntitle: x\nno end", false).is_err());
    }

    #[test]
    fn empty_front_matter_is_closed_by_the_next_fence() {
        // The closing fence right after the opening one: what follows it on
        // its line is dropped (here a multi-byte character, which once made
        // the split land inside it), and a later fence is body text.
        let page = parse("---\n---\u{feff}\nBody.\n\n---\n\nMore.\n", false).unwrap();
        assert_eq!(page.front.title, None);
        let text: Vec<&str> = page.sections.iter().map(|s| s.text.as_str()).collect();
        assert!(text.concat().contains("Body."), "{text:?}");
        assert!(text.concat().contains("More."), "{text:?}");
    }
}
