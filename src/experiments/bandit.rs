//! Thompson sampling over the arms of an experiment. A binary metric keeps
//! a Beta(1 + successes, 1 + failures) posterior per arm; a float metric a
//! Normal-Gamma posterior of the mean (prior μ0 0, κ0 0.01, α0 1, β0 1:
//! nearly flat, so a few observations dominate). Each assignment draws
//! once from every posterior and takes the largest draw, less the arm's
//! price when the experiment weighs cost. The probability that an arm is
//! best is the share of joint draws it wins.

use rand::Rng;
use rand_distr::{Beta, Distribution, Gamma, Normal};
use serde::Serialize;

use super::MetricKind;

/// Draws behind each probability of being best.
pub const BEST_DRAWS: usize = 20_000;

/// What an arm's feedback adds up to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Evidence {
    pub n: u64,
    pub sum: f64,
    pub sum_sq: f64,
}

/// An arm's posterior of its mean reward.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Posterior {
    Beta {
        alpha: f64,
        beta: f64,
    },
    /// Normal-Gamma: the mean ~ N(mu, 1 / (kappa τ)), τ ~ Gamma(alpha, rate beta).
    NormalGamma {
        mu: f64,
        kappa: f64,
        alpha: f64,
        beta: f64,
    },
}

const PRIOR_KAPPA: f64 = 0.01;
const PRIOR_ALPHA: f64 = 1.0;
const PRIOR_BETA: f64 = 1.0;

impl Posterior {
    pub fn from_evidence(kind: MetricKind, evidence: Evidence) -> Posterior {
        let n = evidence.n as f64;
        match kind {
            MetricKind::Boolean => Posterior::Beta {
                alpha: 1.0 + evidence.sum,
                beta: 1.0 + (n - evidence.sum).max(0.0),
            },
            MetricKind::Float => {
                let mean = if n > 0.0 { evidence.sum / n } else { 0.0 };
                let squares = (evidence.sum_sq - n * mean * mean).max(0.0);
                let kappa = PRIOR_KAPPA + n;
                Posterior::NormalGamma {
                    mu: n * mean / kappa,
                    kappa,
                    alpha: PRIOR_ALPHA + n / 2.0,
                    beta: PRIOR_BETA
                        + squares / 2.0
                        + PRIOR_KAPPA * n * mean * mean / (2.0 * kappa),
                }
            }
        }
    }

    /// The posterior mean of the reward.
    pub fn mean(&self) -> f64 {
        match *self {
            Posterior::Beta { alpha, beta } => alpha / (alpha + beta),
            Posterior::NormalGamma { mu, .. } => mu,
        }
    }

    /// One draw of the mean reward.
    pub fn sample(&self, rng: &mut impl Rng) -> f64 {
        match *self {
            Posterior::Beta { alpha, beta } => {
                Beta::new(alpha, beta).map(|d| d.sample(rng)).unwrap_or(0.5)
            }
            Posterior::NormalGamma {
                mu,
                kappa,
                alpha,
                beta,
            } => {
                let precision = Gamma::new(alpha, 1.0 / beta)
                    .map(|d| d.sample(rng))
                    .unwrap_or(1.0)
                    .max(1e-12);
                Normal::new(mu, (1.0 / (kappa * precision)).sqrt())
                    .map(|d| d.sample(rng))
                    .unwrap_or(mu)
            }
        }
    }

    /// The central 95% interval of the mean, from draws.
    pub fn interval(&self, rng: &mut impl Rng) -> [f64; 2] {
        let mut draws: Vec<f64> = (0..4000).map(|_| self.sample(rng)).collect();
        draws.sort_by(f64::total_cmp);
        [draws[100], draws[3899]]
    }
}

/// An arm as the sampler sees it: its posterior and its mean price.
#[derive(Debug, Clone, Copy)]
pub struct Arm {
    pub posterior: Posterior,
    /// Mean US dollars per request so far.
    pub cost: f64,
}

/// The arm to assign: the largest posterior draw less `cost_weight` ×
/// its price.
pub fn choose(arms: &[Arm], cost_weight: f64, rng: &mut impl Rng) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (index, arm) in arms.iter().enumerate() {
        let utility = arm.posterior.sample(rng) - cost_weight * arm.cost;
        if utility > best.1 {
            best = (index, utility);
        }
    }
    best.0
}

/// Each arm's probability of being best (by utility), from joint draws.
pub fn probability_best(arms: &[Arm], cost_weight: f64, rng: &mut impl Rng) -> Vec<f64> {
    let mut wins = vec![0u64; arms.len()];
    if arms.is_empty() {
        return Vec::new();
    }
    for _ in 0..BEST_DRAWS {
        wins[choose(arms, cost_weight, rng)] += 1;
    }
    wins.iter().map(|&w| w as f64 / BEST_DRAWS as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn beta(successes: u64, n: u64) -> Arm {
        Arm {
            posterior: Posterior::from_evidence(
                MetricKind::Boolean,
                Evidence {
                    n,
                    sum: successes as f64,
                    sum_sq: successes as f64,
                },
            ),
            cost: 0.0,
        }
    }

    #[test]
    fn posteriors_follow_the_evidence() {
        let arm = beta(30, 100).posterior;
        assert_eq!(
            arm,
            Posterior::Beta {
                alpha: 31.0,
                beta: 71.0
            }
        );
        let values = [2.0, 4.0, 6.0];
        let evidence = Evidence {
            n: 3,
            sum: values.iter().sum(),
            sum_sq: values.iter().map(|v| v * v).sum(),
        };
        let normal = Posterior::from_evidence(MetricKind::Float, evidence);
        assert!((normal.mean() - 4.0).abs() < 0.02, "{normal:?}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let [low, high] = normal.interval(&mut rng);
        assert!(low < 4.0 && high > 4.0 && high - low < 10.0, "{low} {high}");
    }

    #[test]
    fn probability_best_favours_the_better_arm_and_prices_count() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let arms = [beta(20, 100), beta(60, 100)];
        let p = probability_best(&arms, 0.0, &mut rng);
        assert!(p[1] > 0.99 && (p[0] + p[1] - 1.0).abs() < 1e-9, "{p:?}");
        // The better arm costs $0.01 a request; at 100 reward per dollar
        // its edge of 0.4 is gone.
        let priced = [
            arms[0],
            Arm {
                cost: 0.01,
                ..arms[1]
            },
        ];
        let p = probability_best(&priced, 100.0, &mut rng);
        assert!(p[0] > 0.99, "{p:?}");
    }
}
