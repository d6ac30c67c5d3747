//! The probability that a member is still active ("alive"), from their own
//! purchase history, with the MBG/NBD model (Batislam, Denizel & Filiztekin
//! 2007), the modified BG/NBD of Fader, Hardie & Lee (2005) also used by the
//! `lifetimes` library's `ModifiedBetaGeoFitter`:
//!
//! ```text
//! P(alive | x, t_x, T) = 1 / (1 + a / (b + x) · ((α + T) / (α + t_x))^(r + x))
//! ```
//!
//! `x` is the number of repeat purchases (purchases − 1), `t_x` the time
//! from the first to the last purchase and `T` the time from the first
//! purchase to now, in days. While a member buys at their own rhythm the
//! probability stays high; it falls as the silence grows compared with that
//! rhythm (for fixed `x` and `t_x` it strictly decreases with `T`). Unlike
//! the plain BG/NBD, a member with a single purchase can lapse too.
//!
//! `r`, `α`, `a` and `b` describe the population. Written by hand: it is
//! one closed formula, and no maintained Rust crate provides it.

use serde::Deserialize;

/// `[personalization.model]`: population parameters, time in days.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelParameters {
    /// Shape of the purchase-rate distribution (default 0.243).
    #[serde(default = "default_r")]
    pub r: f64,
    /// Scale of the purchase-rate distribution, in days (default 30.9).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Drop-out beta distribution (defaults 0.793 and 2.426).
    #[serde(default = "default_a")]
    pub a: f64,
    #[serde(default = "default_b")]
    pub b: f64,
}

// The defaults are the published BG/NBD estimates for the CDNOW data set
// (Fader, Hardie & Lee 2005: r 0.243, α 4.414 weeks, a 0.793, b 2.426),
// α converted to days. A program with a history fits its own (for
// example with `lifetimes`) and sets them.
fn default_r() -> f64 {
    0.243
}

fn default_alpha() -> f64 {
    4.414 * 7.0
}

fn default_a() -> f64 {
    0.793
}

fn default_b() -> f64 {
    2.426
}

impl Default for ModelParameters {
    fn default() -> Self {
        Self {
            r: default_r(),
            alpha: default_alpha(),
            a: default_a(),
            b: default_b(),
        }
    }
}

impl ModelParameters {
    /// `(key, message)` for each parameter that is not positive.
    pub fn problems(&self) -> Vec<(String, String)> {
        [("r", self.r), ("alpha", self.alpha), ("a", self.a), ("b", self.b)]
            .into_iter()
            .filter(|(_, value)| !(value.is_finite() && *value > 0.0))
            .map(|(key, value)| {
                (
                    key.to_string(),
                    format!("{value} must be a positive number (fit the model to your history, or leave the default)"),
                )
            })
            .collect()
    }

    /// P(alive) after `repeat` repeat purchases, the last `last_at` days
    /// after the first, `age` days after the first (`age ≥ last_at`).
    pub fn p_alive(&self, repeat: f64, last_at: f64, age: f64) -> f64 {
        let age = age.max(last_at);
        // In logarithms: the power overflows for long, busy histories.
        let log_ratio = (self.r + repeat) * ((self.alpha + age) / (self.alpha + last_at)).ln();
        let odds = (self.a / (self.b + repeat)).ln() + log_ratio;
        1.0 / (1.0 + odds.exp())
    }
}

impl ModelParameters {
    /// Days after the first purchase at which P(alive) falls to `p`, for
    /// a member with `repeat` repeat purchases, the last `last_at` days
    /// after the first (the formula solved for `T`). At least `last_at`:
    /// a member already below `p` at the last purchase is there at once.
    pub fn age_at(&self, p: f64, repeat: f64, last_at: f64) -> f64 {
        let odds = 1.0 / p.clamp(1e-9, 1.0 - 1e-9) - 1.0;
        let ratio = ((odds * (self.b + repeat) / self.a).ln() / (self.r + repeat)).exp();
        ((self.alpha + last_at) * ratio - self.alpha).max(last_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_formula_by_hand() {
        // x = 5, t_x = 150, T = 260, α = 4.414 × 7 = 30.898:
        // 1 / (1 + 0.793/7.426 · (290.898/180.898)^5.243).
        let p = ModelParameters::default().p_alive(5.0, 150.0, 260.0);
        let by_hand = 1.0 / (1.0 + 0.793 / 7.426 * (290.898_f64 / 180.898).powf(5.243));
        assert!((p - by_hand).abs() < 1e-12, "{p} vs {by_hand}");
        assert!((p - 0.437).abs() < 0.001, "{p}");
    }

    #[test]
    fn the_age_at_a_probability_inverts_the_formula() {
        let model = ModelParameters::default();
        for (repeat, last_at) in [(0.0, 0.0), (2.0, 60.0), (5.0, 150.0), (30.0, 900.0)] {
            for p in [0.5, 0.2] {
                let age = model.age_at(p, repeat, last_at);
                assert!(
                    (model.p_alive(repeat, last_at, age) - p).abs() < 1e-9,
                    "x {repeat}, t_x {last_at}, p {p}: age {age}"
                );
            }
        }
        // Every 30 days for 150 days: at risk (0.5) 96 days after the last
        // purchase — a little over three of the member's intervals.
        let age = model.age_at(0.5, 5.0, 150.0);
        assert!((age - 150.0 - 96.3).abs() < 0.1, "{age}");
    }

    #[test]
    fn decreases_with_the_time_since_the_last_purchase() {
        let model = ModelParameters::default();
        for repeat in [0.0, 1.0, 5.0, 40.0] {
            let mut previous = 1.0;
            for day in 0..=1_000 {
                let p = model.p_alive(repeat, 100.0, 100.0 + day as f64);
                assert!(
                    p < previous || (day == 0 && p <= previous),
                    "x {repeat}, day {day}"
                );
                assert!((0.0..=1.0).contains(&p));
                previous = p;
            }
        }
    }

    #[test]
    fn a_steady_buyer_is_more_alive_than_an_occasional_one_after_the_same_silence() {
        let model = ModelParameters::default();
        // 60 days of silence after the last purchase, the first 300 days ago.
        let steady = model.p_alive(10.0, 240.0, 300.0);
        let occasional = model.p_alive(1.0, 240.0, 300.0);
        assert!(
            steady < occasional,
            "a frequent buyer's silence says more: {steady} vs {occasional}"
        );
        // Long histories stay finite.
        assert!(model.p_alive(5_000.0, 3_000.0, 3_100.0).is_finite());
    }
}
