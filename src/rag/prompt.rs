//! The grounded-answer prompt: retrieved chunks, numbered, then the
//! question, rendered from a versioned template in `prompts/`.

use minijinja::context;
use serde::Serialize;

use super::SearchHit;

/// Name (and version) of the template, reported with each grounded answer.
pub const TEMPLATE_NAME: &str = "rag_answer.v1";
const TEMPLATE: &str = include_str!("../../prompts/rag_answer.v1.j2");

#[derive(Debug, Clone, Serialize)]
struct PromptSource<'a> {
    title: &'a str,
    url: &'a str,
    text: &'a str,
}

/// The user turn that replaces the question: sources, instructions, question.
pub fn render(question: &str, sources: &[SearchHit]) -> Result<String, minijinja::Error> {
    let sources: Vec<PromptSource<'_>> = sources
        .iter()
        .map(|s| PromptSource {
            title: &s.title,
            url: &s.url,
            text: s
                .text
                .split_once('\n')
                .map_or(s.text.as_str(), |(_, body)| body),
        })
        .collect();
    crate::prompts::render(
        TEMPLATE_NAME,
        crate::prompts::template::body(TEMPLATE),
        context! { question, sources => minijinja::value::Serde(&sources) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_the_sources() {
        let hit = |t: &str, u: &str| SearchHit {
            url: u.into(),
            title: t.into(),
            heading: t.into(),
            text: format!("{t}\nbody of {t}"),
            score: 1.0,
            chunk_id: "x".into(),
            lang: None,
            updated: None,
        };
        let prompt = render("Why?", &[hit("A", "https://a"), hit("B", "https://b")]).unwrap();
        assert!(prompt.contains("[1] A (https://a)\nbody of A"), "{prompt}");
        assert!(prompt.contains("[2] B (https://b)\nbody of B"), "{prompt}");
        assert!(prompt.trim_end().ends_with("Question: Why?"), "{prompt}");
        let empty = render("Why?", &[]).unwrap();
        assert!(empty.contains("No sources"), "{empty}");
    }
}
