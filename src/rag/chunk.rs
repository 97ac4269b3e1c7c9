//! Heading-aware chunking within a token budget of the embedding model.
//! Each section (text under one heading path) is cut on line, then sentence,
//! then token boundaries, packed into chunks of at most `max_tokens`, with
//! `overlap_tokens` of trailing text carried into the next chunk of the same
//! section. Each chunk starts with its heading line ("Title > H2 > H3") so
//! that both the embedding and the full-text index see its context. Ids are
//! content hashes: the same page gives the same ids.

use sha2::{Digest, Sha256};

use super::document::Document;
use crate::models::embedding::EmbeddingModel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkConfig {
    /// Token budget of a chunk's text, heading line included.
    pub max_tokens: usize,
    pub overlap_tokens: usize,
}

impl ChunkConfig {
    /// 200 tokens (or what the model takes, less its special tokens), 32 of overlap.
    pub fn for_model(model: &EmbeddingModel) -> Self {
        Self {
            max_tokens: 200.min(model.max_tokens.saturating_sub(2)).max(16),
            overlap_tokens: 32,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.max_tokens < 16 {
            return Err("the chunk size must be at least 16 tokens".to_string());
        }
        if self.overlap_tokens * 2 > self.max_tokens {
            return Err("the chunk overlap must be at most half the chunk size".to_string());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub id: String,
    pub index: usize,
    /// "Title > Heading > Subheading".
    pub heading: String,
    /// The heading line, a newline, then the chunk's text.
    pub text: String,
}

/// A piece of text that is never split further, with its token count and
/// the separator that goes before it.
struct Unit<'a> {
    text: &'a str,
    tokens: usize,
    joiner: &'static str,
}

/// Counts tokens of the embedding model (without special tokens).
pub trait TokenCounter {
    /// Byte offsets of each token.
    fn offsets(&self, text: &str) -> Vec<(usize, usize)>;
}

impl TokenCounter for EmbeddingModel {
    fn offsets(&self, text: &str) -> Vec<(usize, usize)> {
        self.token_offsets(text).unwrap_or_default()
    }
}

pub fn chunk_document(
    document: &Document,
    config: &ChunkConfig,
    counter: &dyn TokenCounter,
) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    for section in &document.sections {
        let mut path = vec![document.title.as_str()];
        // The page title often repeats as the first heading.
        let headings = section.headings.iter().skip(usize::from(
            section.headings.first() == Some(&document.title),
        ));
        path.extend(headings.map(String::as_str));
        let heading = path.join(" > ");
        let heading_tokens = counter.offsets(&heading).len() + 1;
        let budget = config
            .max_tokens
            .saturating_sub(heading_tokens)
            .max(config.max_tokens / 4);
        let overlap = config.overlap_tokens.min(budget / 2);
        for body in pack(&units(&section.text, budget, counter), budget, overlap) {
            let index = chunks.len();
            let text = format!("{heading}\n{body}");
            chunks.push(Chunk {
                id: chunk_id(&document.url, index, &text),
                index,
                heading: heading.clone(),
                text,
            });
        }
    }
    chunks
}

fn chunk_id(url: &str, index: usize, text: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(url.as_bytes());
    hasher.update([0]);
    hasher.update(index.to_le_bytes());
    hasher.update(text.as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

/// Lines, then sentences of long lines, then token windows of long sentences.
fn units<'a>(text: &'a str, budget: usize, counter: &dyn TokenCounter) -> Vec<Unit<'a>> {
    let mut units = Vec::new();
    for line in text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
    {
        let tokens = counter.offsets(line).len();
        if tokens <= budget {
            units.push(Unit {
                text: line,
                tokens,
                joiner: "\n",
            });
            continue;
        }
        for (i, sentence) in sentences(line).into_iter().enumerate() {
            let joiner = if i == 0 { "\n" } else { " " };
            let offsets = counter.offsets(sentence);
            if offsets.len() <= budget {
                units.push(Unit {
                    text: sentence,
                    tokens: offsets.len(),
                    joiner,
                });
                continue;
            }
            for (j, window) in offsets.chunks(budget).enumerate() {
                let start = if j == 0 { 0 } else { window[0].0 };
                let end = if (j + 1) * budget >= offsets.len() {
                    sentence.len()
                } else {
                    offsets[(j + 1) * budget].0
                };
                let piece = sentence[start..end].trim();
                if !piece.is_empty() {
                    let joiner = if j == 0 { joiner } else { " " };
                    units.push(Unit {
                        text: piece,
                        tokens: window.len(),
                        joiner,
                    });
                }
            }
        }
    }
    units
}

/// Splits after `.`, `!` or `?` followed by whitespace.
fn sentences(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = line.as_bytes();
    for i in 0..bytes.len().saturating_sub(1) {
        if matches!(bytes[i], b'.' | b'!' | b'?') && bytes[i + 1].is_ascii_whitespace() {
            let sentence = line[start..=i].trim();
            if !sentence.is_empty() {
                out.push(sentence);
            }
            start = i + 1;
        }
    }
    let rest = line[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Packs units into chunk bodies of at most `budget` tokens, each starting
/// with the previous chunk's last whole units (lines or sentences) that fit
/// in `overlap` tokens.
fn pack(units: &[Unit<'_>], budget: usize, overlap: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut tokens = 0;
    let mut fresh = 0; // units in `current` that are not overlap
    for (i, unit) in units.iter().enumerate() {
        if tokens + unit.tokens > budget && fresh > 0 {
            bodies.push(render(units, &current));
            let mut carried = Vec::new();
            let mut carried_tokens = 0;
            for &j in current.iter().rev() {
                if carried_tokens + units[j].tokens > overlap
                    || carried_tokens + units[j].tokens + unit.tokens > budget
                {
                    break;
                }
                carried_tokens += units[j].tokens;
                carried.insert(0, j);
            }
            current = carried;
            tokens = carried_tokens;
            fresh = 0;
        }
        current.push(i);
        tokens += unit.tokens;
        fresh += 1;
    }
    if fresh > 0 {
        bodies.push(render(units, &current));
    }
    bodies
}

fn render(units: &[Unit<'_>], indices: &[usize]) -> String {
    let mut body = String::new();
    for (n, &i) in indices.iter().enumerate() {
        if n > 0 {
            body.push_str(units[i].joiner);
        }
        body.push_str(units[i].text);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rag::document::Section;

    /// One token per whitespace-separated word.
    struct Words;

    impl TokenCounter for Words {
        fn offsets(&self, text: &str) -> Vec<(usize, usize)> {
            let mut out = Vec::new();
            let mut start = None;
            for (i, c) in text.char_indices() {
                match (c.is_whitespace(), start) {
                    (false, None) => start = Some(i),
                    (true, Some(s)) => {
                        out.push((s, i));
                        start = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = start {
                out.push((s, text.len()));
            }
            out
        }
    }

    fn doc(text: &str) -> Document {
        Document {
            url: "u".into(),
            title: "T".into(),
            sections: vec![
                Section {
                    headings: vec!["T".into(), "A".into()],
                    text: text.into(),
                },
                Section {
                    headings: vec!["B".into()],
                    text: "short".into(),
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn budget_overlap_headings_and_stable_ids() {
        let config = ChunkConfig {
            max_tokens: 12,
            overlap_tokens: 3,
        };
        let text = "one two three four five. six seven eight nine ten.\neleven twelve\n\
                    w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20";
        let chunks = chunk_document(&doc(text), &config, &Words);
        for chunk in &chunks {
            assert!(Words.offsets(&chunk.text).len() <= 12, "{chunk:?}");
        }
        assert_eq!(chunks[0].heading, "T > A");
        assert!(chunks[0].text.starts_with("T > A\n"));
        assert_eq!(chunks.last().unwrap().text, "T > B\nshort");
        // Every word of the section is in some chunk, in order.
        let all: Vec<&str> = chunks.iter().flat_map(|c| c.text.lines().skip(1)).collect();
        assert!(all.join(" ").contains("w20"));
        // Sentences longer than the overlap are not repeated.
        assert_eq!(
            chunks[1].text,
            "T > A\nsix seven eight nine ten.\neleven twelve"
        );
        // Short ones are: each chunk starts with the last sentence of the one before.
        let short = (1..=10)
            .map(|i| format!("a{i} b{i}."))
            .collect::<Vec<_>>()
            .join(" ");
        let overlapping = chunk_document(&doc(&short), &config, &Words);
        assert_eq!(overlapping[0].text, "T > A\na1 b1. a2 b2. a3 b3. a4 b4.");
        assert_eq!(overlapping[1].text, "T > A\na4 b4. a5 b5. a6 b6. a7 b7.");
        let again = chunk_document(&doc(text), &config, &Words);
        assert_eq!(chunks, again);
        let ids: std::collections::HashSet<_> = chunks.iter().map(|c| &c.id).collect();
        assert_eq!(ids.len(), chunks.len());
        let changed = chunk_document(&doc("other text"), &config, &Words);
        assert_ne!(changed[0].id, chunks[0].id);
    }
}
