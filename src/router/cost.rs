//! Prices of deployments, per million tokens, and what a request costs
//! under them (exactly, in `Usd`).

use serde::{Deserialize, Serialize};

use crate::money::Usd;

/// Prices of one deployment, per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prices {
    pub input_per_1m: Usd,
    pub output_per_1m: Usd,
}

impl Prices {
    /// The price of qpai's own models when the catalog gives none.
    pub const FREE: Prices = Prices {
        input_per_1m: Usd::ZERO,
        output_per_1m: Usd::ZERO,
    };

    /// What `input` prompt tokens and `output` completion tokens cost. The
    /// per-token price is a whole number of pico-dollars for prices with up
    /// to six decimals; finer ones are rounded up, never down.
    pub fn cost(&self, input: u64, output: u64) -> Usd {
        let per_token = |price: Usd| (price.0 as u128).div_ceil(1_000_000);
        let total = per_token(self.input_per_1m) * input as u128
            + per_token(self.output_per_1m) * output as u128;
        Usd(u64::try_from(total).unwrap_or(u64::MAX))
    }

    /// The price of a local model: its host's cost per hour spread over the
    /// tokens it produces in that hour (`tokens_per_s`, measured); input
    /// tokens are charged at the same rate per token divided by
    /// `prefill_speedup` (prefill is that much faster than decode).
    pub fn from_host(host_per_hour: Usd, tokens_per_s: f64, prefill_speedup: f64) -> Prices {
        let per_hour_tokens = (tokens_per_s.max(1e-9) * 3600.0) / 1e6;
        let output = (host_per_hour.0 as f64 / per_hour_tokens).ceil() as u64;
        let input = (output as f64 / prefill_speedup.max(1.0)).ceil() as u64;
        Prices {
            input_per_1m: Usd(input),
            output_per_1m: Usd(output),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_exact_and_add_up() {
        let prices = Prices {
            input_per_1m: Usd::parse("0.15").unwrap(),
            output_per_1m: Usd::parse("0.6").unwrap(),
        };
        // 1000 prompt tokens at $0.15/1M and 500 completion tokens at $0.60/1M.
        assert_eq!(prices.cost(1000, 500).to_string(), "0.00045");
        // Many small requests sum to exactly the cost of their total.
        let rows: Vec<Usd> = (0..1000).map(|i| prices.cost(i, 2 * i)).collect();
        let total_in: u64 = (0..1000).sum();
        assert_eq!(
            rows.iter().copied().sum::<Usd>(),
            prices.cost(total_in, 2 * total_in)
        );
    }

    #[test]
    fn a_local_model_is_priced_from_its_host_and_speed() {
        // $0.36 an hour at 100 tokens/s: 360,000 tokens an hour, $1 per 1M.
        let prices = Prices::from_host(Usd::parse("0.36").unwrap(), 100.0, 4.0);
        assert_eq!(prices.output_per_1m.to_string(), "1");
        assert_eq!(prices.input_per_1m.to_string(), "0.25");
    }
}
