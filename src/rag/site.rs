//! Site names: they become LanceDB table names (and paths under the data
//! dir), so only a safe alphabet is accepted. Each tenant has a namespace of
//! its own: its site `docs` is stored as `docs.TENANT` (a site name holds no
//! `.`, so no name of one namespace is another's), while the admins' sites
//! keep their plain names. A tenant's names, taken or free, say nothing of
//! another tenant's.

use std::fmt;

use super::RagError;

pub const MAX_SITE_NAME: usize = 64;
/// LanceDB's limit on a table name, which a tenant's site name, a `.` and
/// the tenant's name share.
const MAX_STORED_NAME: usize = 128;

/// A site as stored: a validated name (1-64 of `[A-Za-z0-9_-]`, starting
/// with a letter or digit), followed for a tenant's site by `.` and the
/// tenant. It is shown as the caller named it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SiteName {
    stored: String,
    /// The length of `stored` that the caller named.
    shown: usize,
}

impl SiteName {
    /// A plain site name, as a caller names its own sites.
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
            Ok(Self {
                stored: name.to_string(),
                shown: name.len(),
            })
        } else {
            Err(RagError::InvalidSite(format!(
                "invalid site name {name:?}: use 1-{MAX_SITE_NAME} letters, digits, '-' or '_', starting with a letter or digit"
            )))
        }
    }

    /// A stored name as the admins and the CLI name any site: plain, or
    /// `NAME.TENANT` for a tenant's.
    pub fn parse_stored(name: &str) -> Result<Self, RagError> {
        let Some((site, tenant)) = name.split_once('.') else {
            return Self::parse(name);
        };
        crate::ledger::keys::check_tenant_name(tenant).map_err(RagError::InvalidSite)?;
        let stored = Self::parse(site)?.in_tenant(tenant)?.stored;
        Ok(Self {
            shown: stored.len(),
            stored,
        })
    }

    /// This name in `tenant`'s namespace, still shown as named.
    pub fn in_tenant(self, tenant: &str) -> Result<Self, RagError> {
        let stored = format!("{}.{tenant}", self.stored);
        if stored.len() > MAX_STORED_NAME {
            return Err(RagError::InvalidSite(format!(
                "the site name {:?} is too long for the tenant {tenant:?}: together they take at most {} characters",
                self.stored,
                MAX_STORED_NAME - 1
            )));
        }
        Ok(Self {
            stored,
            shown: self.shown,
        })
    }

    /// `tenant`'s site of this name: in its namespace, or the plain name
    /// when the tenant was given that site before names were per tenant.
    pub fn of_tenant(self, tenant: &str, given_plain: bool) -> Result<Self, RagError> {
        match given_plain {
            true => Ok(self),
            false => self.in_tenant(tenant),
        }
    }

    /// The stored name: the site's table.
    pub fn as_str(&self) -> &str {
        &self.stored
    }

    /// The tenant whose namespace holds the site (none for the admins').
    pub fn tenant(&self) -> Option<&str> {
        self.stored.split_once('.').map(|(_, tenant)| tenant)
    }

    /// The name within its namespace.
    pub fn local_name(&self) -> &str {
        self.stored
            .split_once('.')
            .map_or(&self.stored, |(name, _)| name)
    }
}

impl fmt::Display for SiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.stored[..self.shown])
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

    #[test]
    fn a_tenants_sites_live_in_its_own_namespace() {
        let site = SiteName::parse("docs")
            .unwrap()
            .in_tenant("acme.eu")
            .unwrap();
        assert_eq!(site.as_str(), "docs.acme.eu");
        assert_eq!(site.to_string(), "docs", "shown as the tenant named it");
        assert_eq!(site.tenant(), Some("acme.eu"));
        assert_eq!(site.local_name(), "docs");
        let named = SiteName::parse_stored("docs.acme.eu").unwrap();
        assert_eq!(
            (named.as_str(), named.to_string()),
            ("docs.acme.eu", "docs.acme.eu".into())
        );
        assert_eq!(named.tenant(), Some("acme.eu"));
        let admins = SiteName::parse_stored("docs").unwrap();
        assert_eq!((admins.tenant(), admins.local_name()), (None, "docs"));
        for bad in ["docs.", ".acme", "do cs.acme", "docs.ac me", "a.b.c/d"] {
            assert!(SiteName::parse_stored(bad).is_err(), "{bad:?} accepted");
        }
        assert!(
            SiteName::parse("docs.acme").is_err(),
            "a tenant names no namespace"
        );
        let long = SiteName::parse(&"s".repeat(64)).unwrap();
        assert!(long.clone().in_tenant(&"t".repeat(63)).is_ok());
        assert!(
            long.in_tenant(&"t".repeat(64)).is_err(),
            "past LanceDB's 128"
        );
    }
}
