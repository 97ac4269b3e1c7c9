//! Failed authentications per client address. Past `LIMIT` failures within
//! a `WINDOW`, the address gets 429s without its keys being looked up,
//! until the window is over; keys that authenticated in the last
//! `GOOD_FOR` still pass, so a client with a working key behind the same
//! address (a NAT, a proxy) keeps working while a guesser is held off.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed authentications an address may make within a window.
pub const LIMIT: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(60);
/// How long a key that authenticated passes a blocked address.
const GOOD_FOR: Duration = Duration::from_secs(600);
/// Entries kept at most in each map; then the expired ones go.
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub struct AuthFailures {
    /// Per address: the window's start and its failures.
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Hashes of keys that authenticated, and when.
    good: Mutex<HashMap<String, Instant>>,
}

impl AuthFailures {
    /// How long `address` must wait, if it is blocked and `key_hash` has
    /// not authenticated lately.
    pub fn blocked(&self, address: IpAddr, key_hash: &str) -> Option<Duration> {
        let now = Instant::now();
        let retry = {
            let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let &(since, count) = failures.get(&address)?;
            let left = WINDOW.checked_sub(now.duration_since(since))?;
            (count >= LIMIT).then_some(left)?
        };
        let good = self.good.lock().unwrap_or_else(|e| e.into_inner());
        match good.get(key_hash) {
            Some(at) if now.duration_since(*at) < GOOD_FOR => None,
            _ => Some(retry),
        }
    }

    pub fn failed(&self, address: IpAddr) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_ENTRIES {
            failures.retain(|_, (since, _)| now.duration_since(*since) < WINDOW);
        }
        let entry = failures.entry(address).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }

    pub fn succeeded(&self, key_hash: &str) {
        let now = Instant::now();
        let mut good = self.good.lock().unwrap_or_else(|e| e.into_inner());
        if good.len() >= MAX_ENTRIES {
            good.retain(|_, at| now.duration_since(*at) < GOOD_FOR);
        }
        good.insert(key_hash.to_string(), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_held_off_after_its_failures_but_good_keys_pass() {
        let guard = AuthFailures::default();
        let (guesser, other): (IpAddr, IpAddr) = (
            "203.0.113.7".parse().unwrap(),
            "203.0.113.8".parse().unwrap(),
        );
        for _ in 0..LIMIT - 1 {
            guard.failed(guesser);
        }
        assert_eq!(guard.blocked(guesser, "h"), None);
        guard.failed(guesser);
        let retry = guard.blocked(guesser, "h").unwrap();
        assert!(retry <= WINDOW && retry > WINDOW - Duration::from_secs(5));
        assert_eq!(guard.blocked(other, "h"), None);
        guard.succeeded("good");
        assert_eq!(guard.blocked(guesser, "good"), None);
    }
}
