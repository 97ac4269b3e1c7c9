//! A page as read from a source, before chunking.

use sha2::{Digest, Sha256};

/// Text under one heading path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Section {
    /// Headings from the outermost down to the one this text is under.
    pub headings: Vec<String>,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Document {
    /// The page's identity in the site: its canonical URL when it declares
    /// one, else the source's URL or path.
    pub url: String,
    pub title: String,
    pub lang: Option<String>,
    /// Last update as given by the source (ISO 8601 where it could be read).
    pub updated: Option<String>,
    pub sections: Vec<Section>,
}

impl Document {
    /// Hash of everything that ends up in the page's chunks.
    pub fn content_hash(&self) -> String {
        let mut hasher = Sha256::new();
        for field in [
            self.url.as_str(),
            &self.title,
            self.lang.as_deref().unwrap_or(""),
            self.updated.as_deref().unwrap_or(""),
        ] {
            hasher.update(field.as_bytes());
            hasher.update([0]);
        }
        for section in &self.sections {
            for heading in &section.headings {
                hasher.update(heading.as_bytes());
                hasher.update([1]);
            }
            hasher.update(section.text.as_bytes());
            hasher.update([2]);
        }
        hex::encode(&hasher.finalize()[..16])
    }

    pub fn is_empty(&self) -> bool {
        self.sections.iter().all(|s| s.text.trim().is_empty())
    }
}

/// Adds text to the section under `headings`, starting a new section when
/// the heading path changed.
pub fn push_text(sections: &mut Vec<Section>, headings: &[String], text: &str) {
    if text.trim().is_empty() {
        return;
    }
    match sections.last_mut() {
        Some(last) if last.headings == headings => {
            if !last.text.is_empty() && !last.text.ends_with('\n') {
                last.text.push('\n');
            }
            last.text.push_str(text);
        }
        _ => sections.push(Section {
            headings: headings.to_vec(),
            text: text.to_string(),
        }),
    }
}
