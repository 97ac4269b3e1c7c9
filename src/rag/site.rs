//! Site names: they become LanceDB table names (and paths under the data
//! dir), so only a safe alphabet is accepted.

use std::fmt;

use super::RagError;

pub const MAX_SITE_NAME: usize = 64;

/// A validated site name: 1-64 of `[A-Za-z0-9_-]`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SiteName(String);

impl SiteName {
    pub fn parse(name: &str) -> Result<Self, RagError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_SITE_NAME
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if valid {
            Ok(Self(name.to_string()))
        } else {
            Err(RagError::InvalidSite(format!(
                "invalid site name {name:?}: use 1-{MAX_SITE_NAME} letters, digits, '-' or '_', starting with a letter or digit"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_names_are_refused() {
        for bad in [
            "",
            "../etc",
            "a/b",
            "a b",
            ".hidden",
            "-x",
            "a.b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(SiteName::parse(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["docs", "Shop-2", "a_b", "9"] {
            assert_eq!(SiteName::parse(good).unwrap().as_str(), good);
        }
    }
}
