//! A circuit breaker per deployment. Closed: requests flow; after
//! `threshold` failures in a row it opens and the deployment is skipped for
//! `cooldown`; then it is half-open and one probe request decides: success
//! closes it, failure opens it again. A 429's Retry-After also keeps a
//! deployment aside until then, without counting as a failure.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug, Clone)]
struct Breaker {
    state: BreakerState,
    failures_in_a_row: u32,
    open_until: Option<Instant>,
    /// Set while a half-open probe is in flight.
    probing: bool,
    /// A 429's Retry-After: skipped until then.
    cooling_until: Option<Instant>,
    last_error: Option<String>,
    successes: u64,
    failures: u64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed,
            failures_in_a_row: 0,
            open_until: None,
            probing: false,
            cooling_until: None,
            last_error: None,
            successes: 0,
            failures: 0,
        }
    }
}

/// A deployment's health as `GET /v1/router/health` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentHealth {
    pub deployment: String,
    pub state: BreakerState,
    pub failures_in_a_row: u32,
    /// Seconds until an open breaker lets a probe through.
    pub retry_in_s: Option<f64>,
    /// Seconds until a rate-limited deployment is tried again.
    pub cooling_for_s: Option<f64>,
    pub last_error: Option<String>,
    pub successes: u64,
    pub failures: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    pub threshold: u32,
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            threshold: 5,
            cooldown: Duration::from_secs(30),
        }
    }
}

pub struct Breakers {
    config: BreakerConfig,
    breakers: Mutex<HashMap<String, Breaker>>,
}

/// What `admit` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// Half-open: this request is the probe.
    Probe,
    Open,
    Cooling,
}

impl Breakers {
    pub fn new(config: BreakerConfig) -> Breakers {
        Breakers {
            config,
            breakers: Mutex::default(),
        }
    }

    fn with<T>(&self, deployment: &str, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        f(breakers.entry(deployment.to_string()).or_default())
    }

    /// Whether a request may go to `deployment` now.
    pub fn admit(&self, deployment: &str) -> Admission {
        let now = Instant::now();
        self.with(deployment, |b| {
            if b.cooling_until.is_some_and(|t| now < t) {
                return Admission::Cooling;
            }
            match b.state {
                BreakerState::Closed => Admission::Go,
                BreakerState::Open if b.open_until.is_some_and(|t| now < t) => Admission::Open,
                BreakerState::Open | BreakerState::HalfOpen if !b.probing => {
                    b.state = BreakerState::HalfOpen;
                    b.probing = true;
                    Admission::Probe
                }
                BreakerState::Open | BreakerState::HalfOpen => Admission::Open,
            }
        })
    }

    pub fn success(&self, deployment: &str) {
        self.with(deployment, |b| {
            b.state = BreakerState::Closed;
            b.failures_in_a_row = 0;
            b.open_until = None;
            b.probing = false;
            b.successes += 1;
        });
    }

    pub fn failure(&self, deployment: &str, error: &str) {
        let config = self.config;
        self.with(deployment, |b| {
            b.failures += 1;
            b.failures_in_a_row += 1;
            b.last_error = Some(error.to_string());
            let trips =
                b.state == BreakerState::HalfOpen || b.failures_in_a_row >= config.threshold;
            if trips {
                if b.state != BreakerState::Open {
                    tracing::warn!(deployment, error, "circuit opened");
                }
                b.state = BreakerState::Open;
                b.open_until = Some(Instant::now() + config.cooldown);
            }
            b.probing = false;
        });
    }

    /// A probe that ended without a verdict (the request was refused
    /// before reaching the deployment) lets the next request probe.
    pub fn abandon_probe(&self, deployment: &str) {
        self.with(deployment, |b| b.probing = false);
    }

    /// Keeps `deployment` aside for `seconds` (a 429's Retry-After).
    pub fn cool(&self, deployment: &str, seconds: f64) {
        let until = Instant::now() + Duration::from_secs_f64(seconds.min(3600.0));
        self.with(deployment, |b| {
            b.cooling_until = Some(b.cooling_until.map_or(until, |t| t.max(until)));
        });
    }

    /// Every deployment's health, `names` in order.
    pub fn snapshot<'a>(&self, names: impl Iterator<Item = &'a str>) -> Vec<DeploymentHealth> {
        let now = Instant::now();
        let breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        names
            .map(|name| {
                let b = breakers.get(name).cloned().unwrap_or_default();
                let left =
                    |t: Option<Instant>| t.filter(|t| *t > now).map(|t| (t - now).as_secs_f64());
                DeploymentHealth {
                    deployment: name.to_string(),
                    state: b.state,
                    failures_in_a_row: b.failures_in_a_row,
                    retry_in_s: left(b.open_until),
                    cooling_for_s: left(b.cooling_until),
                    last_error: b.last_error,
                    successes: b.successes,
                    failures: b.failures,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_then_one_probe_decides() {
        let breakers = Breakers::new(BreakerConfig {
            threshold: 2,
            cooldown: Duration::from_millis(50),
        });
        assert_eq!(breakers.admit("a"), Admission::Go);
        breakers.failure("a", "500");
        assert_eq!(breakers.admit("a"), Admission::Go);
        breakers.failure("a", "500");
        assert_eq!(breakers.admit("a"), Admission::Open);
        assert_eq!(
            breakers.admit("b"),
            Admission::Go,
            "breakers are per deployment"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(breakers.admit("a"), Admission::Probe);
        assert_eq!(breakers.admit("a"), Admission::Open, "one probe at a time");
        breakers.failure("a", "still 500");
        assert_eq!(
            breakers.admit("a"),
            Admission::Open,
            "a failed probe reopens"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(breakers.admit("a"), Admission::Probe);
        breakers.success("a");
        assert_eq!(breakers.admit("a"), Admission::Go);
        let health = breakers.snapshot(["a"].into_iter());
        assert_eq!(health[0].state, BreakerState::Closed);
        assert_eq!((health[0].successes, health[0].failures), (1, 3));
    }

    #[test]
    fn retry_after_keeps_a_deployment_aside_without_tripping() {
        let breakers = Breakers::new(BreakerConfig::default());
        breakers.cool("a", 0.05);
        assert_eq!(breakers.admit("a"), Admission::Cooling);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(breakers.admit("a"), Admission::Go);
    }
}
