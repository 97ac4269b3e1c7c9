//! Polite HTTP fetching for sitemap ingestion: one request at a time with a
//! pause between requests, timeouts, a byte cap per response, a page cap per
//! ingest, the site's robots.txt honoured, and only public addresses
//! reached unless the operator allows more (`FetchPolicy`).

use std::collections::HashMap;
use std::io::Read;
use std::time::{Duration, Instant};

pub use super::fetch_policy::FetchPolicy;

#[derive(Debug, Clone)]
pub struct FetchLimits {
    pub max_pages: usize,
    /// Pause between two requests to the same host.
    pub delay: Duration,
    pub timeout: Duration,
    pub user_agent: String,
    /// Which addresses may be fetched.
    pub policy: FetchPolicy,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            max_pages: 10_000,
            delay: Duration::from_millis(250),
            timeout: Duration::from_secs(20),
            user_agent: format!("qpai/{} (site ingest)", env!("CARGO_PKG_VERSION")),
            policy: FetchPolicy::default(),
        }
    }
}

/// Disallow/Allow rules of one host's robots.txt that apply to qpai.
#[derive(Debug, Default)]
pub struct Robots {
    allow: Vec<String>,
    disallow: Vec<String>,
}

impl Robots {
    /// The rules of a robots.txt: those of the `qpai` group if there is
    /// one, else those of `*`.
    pub fn parse(text: &str) -> Self {
        let mut groups: HashMap<String, Robots> = HashMap::new();
        let mut agents: Vec<String> = Vec::new();
        let mut in_rules = false;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
            match key.as_str() {
                "user-agent" => {
                    if in_rules {
                        agents.clear();
                        in_rules = false;
                    }
                    agents.push(value.to_ascii_lowercase());
                }
                "allow" | "disallow" => {
                    in_rules = true;
                    for agent in &agents {
                        let group = groups.entry(agent.clone()).or_default();
                        if value.is_empty() {
                            continue;
                        }
                        if key == "allow" {
                            group.allow.push(value.to_string());
                        } else {
                            group.disallow.push(value.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        groups
            .remove("qpai")
            .or_else(|| groups.remove("*"))
            .unwrap_or_default()
    }

    /// Whether `path` may be fetched: the longest matching prefix wins;
    /// Allow wins ties.
    pub fn allows(&self, path: &str) -> bool {
        let longest = |rules: &[String]| {
            rules
                .iter()
                .filter(|r| path.starts_with(r.as_str()))
                .map(String::len)
                .max()
        };
        match (longest(&self.allow), longest(&self.disallow)) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(d)) => a >= d,
        }
    }
}

pub struct Fetcher {
    agent: ureq::Agent,
    limits: FetchLimits,
    max_bytes: usize,
    robots: HashMap<String, Robots>,
    last_request: HashMap<String, Instant>,
    pub fetched: usize,
}

impl Fetcher {
    pub fn new(limits: FetchLimits, max_bytes: usize) -> Self {
        let policy = limits.policy.clone();
        let agent = ureq::AgentBuilder::new()
            // Every connection, redirects included, goes to checked addresses.
            .resolver(move |netloc: &str| policy.resolve(netloc))
            .timeout_connect(limits.timeout.min(Duration::from_secs(10)))
            .timeout(limits.timeout)
            .user_agent(&limits.user_agent)
            .redirects(5)
            .build();
        Self {
            agent,
            limits,
            max_bytes,
            robots: HashMap::new(),
            last_request: HashMap::new(),
            fetched: 0,
        }
    }

    pub fn page_budget_left(&self) -> bool {
        self.fetched < self.limits.max_pages
    }

    /// The body of `url`, or why not.
    pub fn get(&mut self, url: &str) -> Result<Vec<u8>, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("bad URL: {e}"))?;
        let host = parsed.origin().ascii_serialization();
        if !self.robots.contains_key(&host) {
            let robots = self
                .raw_get(&format!("{host}/robots.txt"), &host)
                .ok()
                .map(|body| Robots::parse(&String::from_utf8_lossy(&body)))
                .unwrap_or_default();
            self.robots.insert(host.clone(), robots);
        }
        if self
            .robots
            .get(&host)
            .is_some_and(|r| !r.allows(parsed.path()))
        {
            return Err("disallowed by the site's robots.txt".to_string());
        }
        self.fetched += 1;
        self.raw_get(url, &host)
    }

    fn raw_get(&mut self, url: &str, host: &str) -> Result<Vec<u8>, String> {
        if let Some(last) = self.last_request.get(host) {
            let wait = self.limits.delay.saturating_sub(last.elapsed());
            std::thread::sleep(wait);
        }
        self.last_request.insert(host.to_string(), Instant::now());
        let response = match self.agent.get(url).call() {
            Ok(response) => response,
            Err(ureq::Error::Status(code, _)) => return Err(format!("HTTP {code}")),
            Err(error) => return Err(format!("fetch failed: {error}")),
        };
        let mut body = Vec::new();
        response
            .into_reader()
            .take(self.max_bytes as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| format!("reading the response: {e}"))?;
        if body.len() > self.max_bytes {
            return Err(format!(
                "response is over {} bytes (--max-page-bytes)",
                self.max_bytes
            ));
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robots_rules() {
        let robots = Robots::parse(
            "User-agent: other\nDisallow: /\n\nUser-agent: *\nDisallow: /private\nAllow: /private/ok\n",
        );
        assert!(robots.allows("/docs/a"));
        assert!(!robots.allows("/private/x"));
        assert!(robots.allows("/private/ok/y"));
        let own = Robots::parse("User-agent: *\nDisallow: /\nUser-agent: qpai\nDisallow: /no\n");
        assert!(own.allows("/yes"));
        assert!(!own.allows("/no"));
    }
}
