//! Choosing the next token: penalties, temperature, top-k, top-p and a seeded
//! random generator, plus log-probabilities of the model's distribution.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::constraint::Constraint;
use super::types::SamplingParams;

/// Below this temperature, sampling is greedy.
const GREEDY_TEMPERATURE: f32 = 1e-5;
/// Candidates with a smaller probability than this are left out of the
/// sorted nucleus for top-p (their total mass is < vocab * 1e-9).
const NUCLEUS_FLOOR: f32 = 1e-9;

/// The outcome of one sampling step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u32,
    /// log-probability of `id` and of the best `k` tokens (raw model distribution).
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampler: holds the random state and the counts of generated tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// `stream` separates the random streams of the `n` choices of one request.
    pub fn new(params: SamplingParams, stream: u64) -> Self {
        let rng = match params.seed {
            Some(seed) => {
                StdRng::seed_from_u64(seed.wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            }
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            counts: HashMap::new(),
        }
    }

    /// Picks the next token from `logits` (modified in place), with `bias`
    /// added to the logits (OpenAI's `logit_bias`) and, with a grammar, among
    /// the tokens it allows: the token is drawn first and checked; only a
    /// refused draw pays for the full mask and is drawn again. Fails when the
    /// grammar allows nothing.
    pub fn sample_steered(
        &mut self,
        logits: &mut [f32],
        top_logprobs: Option<usize>,
        bias: &[(u32, f32)],
        constraint: Option<&mut Constraint>,
    ) -> Result<Sampled, String> {
        let (logprob_of, top) = match top_logprobs {
            Some(k) => {
                let lse = log_sum_exp(logits);
                let top = top_k_indices(logits, k)
                    .into_iter()
                    .map(|i| (i as u32, logits[i] - lse))
                    .collect();
                (Some(lse), top)
            }
            None => (None, Vec::new()),
        };
        let raw = logprob_of.map(|_| logits.to_vec());
        self.apply_penalties(logits);
        for &(id, value) in bias {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit += value;
            }
        }
        let mut id = self.pick(logits);
        if let Some(constraint) = constraint
            && !constraint.allows(id as u32)
        {
            metrics::counter!("qpai_grammar_masks_total").increment(1);
            if !constraint.mask(logits)? {
                return Err("the output grammar allows no further token".into());
            }
            id = self.pick(logits);
        }
        *self.counts.entry(id as u32).or_default() += 1;
        Ok(Sampled {
            id: id as u32,
            logprob: logprob_of.zip(raw).map(|(lse, raw)| raw[id] - lse),
            top,
        })
    }

    fn pick(&mut self, logits: &[f32]) -> usize {
        if self.params.temperature < GREEDY_TEMPERATURE {
            argmax(logits)
        } else {
            self.draw(logits)
        }
    }

    /// OpenAI semantics: logit -= count * frequency_penalty + (count > 0) * presence_penalty.
    fn apply_penalties(&self, logits: &mut [f32]) {
        let (freq, pres) = (self.params.frequency_penalty, self.params.presence_penalty);
        if freq == 0.0 && pres == 0.0 {
            return;
        }
        for (&id, &count) in &self.counts {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit -= count as f32 * freq + pres;
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> usize {
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut candidates: Vec<(usize, f32)> = match self.params.top_k {
            Some(k) if k < logits.len() => top_k_indices(logits, k)
                .into_iter()
                .map(|i| (i, ((logits[i] - max) * inv_t).exp()))
                .collect(),
            _ => logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i, ((l - max) * inv_t).exp()))
                .collect(),
        };
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        if self.params.top_p < 1.0 {
            candidates.retain(|c| c.1 / total >= NUCLEUS_FLOOR);
            candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let budget = self.params.top_p * total;
            let mut cumulative = 0.0;
            let keep = candidates
                .iter()
                .position(|c| {
                    cumulative += c.1;
                    cumulative >= budget
                })
                .map_or(candidates.len(), |i| i + 1);
            candidates.truncate(keep.max(1));
        }
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut target = self.rng.random::<f32>() * total;
        for &(i, weight) in &candidates {
            if target < weight {
                return i;
            }
            target -= weight;
        }
        candidates.last().map_or(0, |c| c.0)
    }
}

/// Index of the largest value; the lowest index wins ties.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

fn log_sum_exp(values: &[f32]) -> f32 {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = values.iter().map(|&v| (v - max).exp()).sum();
    max + sum.ln()
}

/// Indices of the `k` largest values, largest first (lower index first on ties).
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let order = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let mut indices: Vec<usize> = (0..values.len()).collect();
    if k < indices.len() {
        indices.select_nth_unstable_by(k - 1, order);
        indices.truncate(k);
    }
    indices.sort_by(order);
    indices
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Sampler {
        fn sample(&mut self, logits: &mut [f32], top_logprobs: Option<usize>) -> Sampled {
            self.sample_steered(logits, top_logprobs, &[], None)
                .unwrap()
        }
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut sampler = Sampler::new(params(0.0), 0);
        let mut logits = vec![0.1, 2.0, 1.9, -3.0];
        assert_eq!(sampler.sample(&mut logits, None).id, 1);
    }

    #[test]
    fn same_seed_same_draws_and_streams_differ() {
        let draw = |stream| {
            let mut p = params(1.0);
            p.seed = Some(42);
            let mut sampler = Sampler::new(p, stream);
            (0..32)
                .map(|_| sampler.sample(&mut [0.0; 50], None).id)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        assert_ne!(draw(0), draw(1));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let mut p = params(1.5);
        p.top_k = Some(1);
        let mut sampler = Sampler::new(p, 0);
        for _ in 0..20 {
            assert_eq!(sampler.sample(&mut [1.0, 3.0, 2.9], None).id, 1);
        }
        let mut p = params(1.0);
        p.top_p = 0.5;
        let mut sampler = Sampler::new(p, 0);
        // Token 0 carries ~0.88 of the mass: the 0.5 nucleus is {0}.
        for _ in 0..20 {
            assert_eq!(sampler.sample(&mut [3.0, 1.0, 0.0], None).id, 0);
        }
    }

    #[test]
    fn penalties_follow_openai_semantics() {
        let mut p = params(0.0);
        p.frequency_penalty = 1.0;
        let mut sampler = Sampler::new(p, 0);
        assert_eq!(sampler.sample(&mut [2.0, 1.5], None).id, 0);
        // Token 0 was generated once: 2.0 - 1.0 < 1.5.
        assert_eq!(sampler.sample(&mut [2.0, 1.5], None).id, 1);
    }

    #[test]
    fn logprobs_are_log_softmax_of_the_raw_logits() {
        let mut sampler = Sampler::new(params(0.0), 0);
        let sampled = sampler.sample(&mut [0.0, 2f32.ln(), f32::NEG_INFINITY], Some(2));
        // probabilities 1/3, 2/3, 0
        assert_eq!(sampled.id, 1);
        assert!((sampled.logprob.unwrap() - (2.0f32 / 3.0).ln()).abs() < 1e-6);
        assert_eq!(sampled.top[0].0, 1);
        assert!((sampled.top[1].1 - (1.0f32 / 3.0).ln()).abs() < 1e-6);
    }

    #[test]
    fn logit_bias_moves_the_choice() {
        let mut sampler = Sampler::new(params(0.0), 0);
        let mut logits = [2.0, 1.0, 0.0];
        let sampled = sampler
            .sample_steered(&mut logits, None, &[(0, -100.0), (2, 1.5)], None)
            .unwrap();
        assert_eq!(sampled.id, 2);
    }
}
