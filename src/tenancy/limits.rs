//! Per-key rate limits: requests and tokens per minute, as token buckets
//! that refill continuously (a full minute's allowance may be spent at
//! once, then it comes back at limit/60 per second). A refusal says how
//! long until the request would fit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    updated: Instant,
}

impl Bucket {
    /// Takes `amount` from a bucket of `per_minute`, or says how long to wait.
    fn take(&mut self, amount: f64, per_minute: f64, now: Instant) -> Result<(), Duration> {
        let rate = per_minute / 60.0;
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * rate).min(per_minute);
        self.updated = now;
        if amount <= self.level {
            self.level -= amount;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((amount - self.level) / rate))
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Requests,
    Tokens,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refused {
    pub limit: Limit,
    pub per_minute: u32,
    pub retry_after: Duration,
    /// The request alone is larger than a minute's allowance.
    pub never_fits: bool,
}

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<(String, Limit), Bucket>>,
}

impl RateLimiter {
    /// Counts one request against `key`'s requests per minute.
    pub fn request(&self, key: &str, rpm: Option<u32>) -> Result<(), Refused> {
        self.take(key, Limit::Requests, rpm, 1)
    }

    /// Counts `tokens` against `key`'s tokens per minute.
    pub fn tokens(&self, key: &str, tpm: Option<u32>, tokens: u64) -> Result<(), Refused> {
        self.take(key, Limit::Tokens, tpm, tokens)
    }

    fn take(
        &self,
        key: &str,
        limit: Limit,
        per_minute: Option<u32>,
        amount: u64,
    ) -> Result<(), Refused> {
        let Some(per_minute) = per_minute else {
            return Ok(());
        };
        let refused = |retry_after, never_fits| Refused {
            limit,
            per_minute,
            retry_after,
            never_fits,
        };
        if amount > u64::from(per_minute) {
            return Err(refused(Duration::from_secs(60), true));
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry((key.to_string(), limit)).or_insert(Bucket {
            level: f64::from(per_minute),
            updated: now,
        });
        bucket
            .take(amount as f64, f64::from(per_minute), now)
            .map_err(|wait| refused(wait, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_spends_its_minute_then_refills_at_the_rate() {
        let start = Instant::now();
        let mut bucket = Bucket {
            level: 60.0,
            updated: start,
        };
        for _ in 0..60 {
            bucket.take(1.0, 60.0, start).unwrap();
        }
        let wait = bucket.take(1.0, 60.0, start).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        bucket
            .take(1.0, 60.0, start + Duration::from_secs(1))
            .unwrap();
        assert!(
            bucket
                .take(1.0, 60.0, start + Duration::from_secs(1))
                .is_err()
        );
    }

    #[test]
    fn keys_are_limited_apart_and_oversized_requests_never_fit() {
        let limiter = RateLimiter::default();
        limiter.request("a", Some(2)).unwrap();
        limiter.request("a", Some(2)).unwrap();
        let refused = limiter.request("a", Some(2)).unwrap_err();
        assert_eq!(refused.limit, Limit::Requests);
        assert!(!refused.never_fits && refused.retry_after.as_secs_f64() > 29.0);
        limiter.request("b", Some(2)).unwrap();
        limiter.request("a", None).unwrap();
        assert!(limiter.tokens("a", Some(100), 101).unwrap_err().never_fits);
        limiter.tokens("a", Some(100), 100).unwrap();
    }
}
