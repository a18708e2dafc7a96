//! Envoy's LEAST_REQUEST (`LeastRequestLoadBalancer`).
//!
//! - All weights equal: power of `choice_count` choices (default 2, "P2C").
//!   Sample `choice_count` hosts uniformly *with replacement* and keep the one
//!   with the fewest active requests; on a tie the earlier sample wins, as in
//!   Envoy's `unweightedHostPickNChoices`. Sampling instead of scanning keeps
//!   picks O(1) and avoids every proxy herding onto the same idle host.
//! - Weights differ: EDF over the effective weight
//!   `weight / (active_requests + 1) ^ active_request_bias` (default bias 1.0),
//!   evaluated when a host is (re)inserted into the schedule, exactly like
//!   Envoy's `hostWeight`. Busy hosts are therefore picked less often but never
//!   drained completely.
//!
//! Newer Envoy versions also use the weighted path for equal weights when
//! `active_request_bias` is *explicitly* configured (runtime flag
//! `least_request_lb_active_request_bias_forces_weighted`). [`LbPolicy`]
//! carries a plain `f64`, so [`super::build`] cannot tell "explicit" from
//! "default"; callers that know can use [`LeastRequestLb::new_forcing_weighted`].
//! Not modelled: `FULL_SCAN` selection, counting pending requests, slow start.
//!
//! [`LbPolicy`]: super::LbPolicy

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::edf::EdfScheduler;
use super::{
    effective_weight, pick_with_retries, weights_are_equal, LbHost, LoadBalancer, PickContext,
    RandomStream, DEFAULT_HOST_SELECTION_ATTEMPTS,
};

#[derive(Debug)]
enum Mode {
    /// Equal weights: sample `choice_count` hosts per pick.
    Choices,
    /// Unequal weights: load-scaled EDF schedule.
    Weighted(Mutex<EdfScheduler>),
}

/// Least request over one host list.
#[derive(Debug)]
pub struct LeastRequestLb {
    hosts: Arc<[LbHost]>,
    choice_count: u32,
    active_request_bias: f64,
    mode: Mode,
    attempts: u32,
}

impl LeastRequestLb {
    /// Builds the balancer. `seed` pre-advances the EDF schedule like Envoy's
    /// `seed_` (unused for equal weights, where every pick is random anyway).
    pub fn new(
        hosts: Arc<[LbHost]>,
        choice_count: u32,
        active_request_bias: f64,
        seed: u64,
    ) -> Self {
        Self::build(hosts, choice_count, active_request_bias, seed, false)
    }

    /// As [`Self::new`], but always uses the weighted (EDF) path, matching
    /// newer Envoy when `active_request_bias` is explicitly configured.
    pub fn new_forcing_weighted(
        hosts: Arc<[LbHost]>,
        choice_count: u32,
        active_request_bias: f64,
        seed: u64,
    ) -> Self {
        Self::build(hosts, choice_count, active_request_bias, seed, true)
    }

    fn build(
        hosts: Arc<[LbHost]>,
        choice_count: u32,
        active_request_bias: f64,
        seed: u64,
        force_weighted: bool,
    ) -> Self {
        // Envoy falls back to 1.0 for a negative or NaN bias.
        let active_request_bias = if active_request_bias.is_nan() || active_request_bias < 0.0 {
            1.0
        } else {
            active_request_bias
        };
        let unweighted = !force_weighted && weights_are_equal(&hosts);
        // Envoy skips the scheduler for 0 or 1 hosts: the answer is fixed.
        let mode = if unweighted || hosts.len() <= 1 {
            Mode::Choices
        } else {
            let items: Vec<usize> = (0..hosts.len()).collect();
            let edf = EdfScheduler::create_with_picks(
                &items,
                |i| host_weight(&hosts[i], active_request_bias),
                seed as u32,
            );
            Mode::Weighted(Mutex::new(edf))
        };
        Self {
            hosts,
            // Envoy's proto requires >= 2; zero would pick nothing, so clamp.
            choice_count: choice_count.max(1),
            active_request_bias,
            mode,
            attempts: DEFAULT_HOST_SELECTION_ATTEMPTS,
        }
    }

    /// Overrides how many picks a retry predicate may reject before falling
    /// back to the last pick (Envoy: `host_selection_retry_max_attempts + 1`).
    pub fn with_host_selection_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    fn active(&self, i: usize) -> u64 {
        self.hosts[i].active_requests.load(Ordering::Relaxed)
    }

    fn pick_once(&self, rng: &mut RandomStream) -> Option<usize> {
        let n = self.hosts.len();
        if n == 0 {
            return None;
        }
        match &self.mode {
            Mode::Choices => {
                let mut candidate: Option<usize> = None;
                for _ in 0..self.choice_count {
                    let sampled = (rng.next_u64() % n as u64) as usize;
                    candidate = match candidate {
                        Some(c) if self.active(sampled) >= self.active(c) => Some(c),
                        _ => Some(sampled),
                    };
                }
                candidate
            }
            Mode::Weighted(edf) => {
                let mut edf = edf.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                edf.pick_and_add(|i| host_weight(&self.hosts[i], self.active_request_bias))
            }
        }
    }
}

/// Envoy's `LeastRequestLoadBalancer::hostWeight`:
/// `weight / (active + 1) ^ bias`, with the common bias values special-cased
/// (1.0 avoids `pow`, 0.0 means plain weighted round robin).
fn host_weight(host: &LbHost, bias: f64) -> f64 {
    let weight = f64::from(effective_weight(host));
    let active = host.active_requests.load(Ordering::Relaxed);
    // Envoy guards the +1 against overflow the same way.
    let denominator = if active == u64::MAX {
        active
    } else {
        active + 1
    } as f64;
    if bias == 1.0 {
        weight / denominator
    } else if bias != 0.0 {
        weight / denominator.powf(bias)
    } else {
        weight
    }
}

impl LoadBalancer for LeastRequestLb {
    fn pick(&self, ctx: &PickContext) -> Option<usize> {
        // One random stream for the whole pick, so each sample and each retry
        // attempt sees a fresh value (Envoy calls random() every time).
        let mut rng = RandomStream::new(ctx.random);
        pick_with_retries(ctx.exclude, ctx.attempts.unwrap_or(self.attempts), |_| {
            self.pick_once(&mut rng)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::mix64;
    use super::super::test_support::{ctx, hosts};
    use super::*;

    fn set_active(hosts: &[LbHost], active: &[u64]) {
        for (h, &a) in hosts.iter().zip(active) {
            h.active_requests.store(a, Ordering::Relaxed);
        }
    }

    fn shares(lb: &LeastRequestLb, n_hosts: usize, picks: u64) -> Vec<u64> {
        let mut counts = vec![0u64; n_hosts];
        for i in 0..picks {
            counts[lb.pick(&ctx(mix64(i))).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn p2c_prefers_the_idle_host() {
        let hs = hosts(&[1, 1, 1, 1]);
        set_active(&hs, &[5, 0, 5, 5]);
        let lb = LeastRequestLb::new(hs, 2, 1.0, 0);
        let counts = shares(&lb, 4, 20_000);
        // Host 1 wins whenever it is sampled: P = 1 - (3/4)^2 = 7/16; each
        // busy host gets (1 - 7/16) / 3 = 3/16.
        let p1 = counts[1] as f64 / 20_000.0;
        assert!((p1 - 7.0 / 16.0).abs() < 0.02, "{counts:?}");
        for &c in [counts[0], counts[2], counts[3]].iter() {
            assert!(counts[1] > 2 * c, "{counts:?}");
        }
    }

    #[test]
    fn more_choices_concentrate_on_the_idle_host() {
        let hs = hosts(&[1, 1, 1, 1]);
        set_active(&hs, &[5, 0, 5, 5]);
        let lb = LeastRequestLb::new(hs, 5, 1.0, 0);
        let counts = shares(&lb, 4, 20_000);
        // P = 1 - (3/4)^5 ~= 0.763.
        let p1 = counts[1] as f64 / 20_000.0;
        assert!((p1 - (1.0 - 0.75f64.powi(5))).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn single_choice_is_uniform() {
        let hs = hosts(&[1, 1, 1, 1]);
        set_active(&hs, &[5, 0, 5, 5]);
        let lb = LeastRequestLb::new(hs, 1, 1.0, 0);
        for c in shares(&lb, 4, 20_000) {
            assert!((c as f64 / 20_000.0 - 0.25).abs() < 0.02);
        }
    }

    #[test]
    fn ties_keep_the_first_sample() {
        // Both samples tie at 0 active: the first sample (ctx.random % n) wins.
        let lb = LeastRequestLb::new(hosts(&[1, 1, 1]), 2, 1.0, 0);
        for r in 0..30u64 {
            assert_eq!(lb.pick(&ctx(r)), Some((r % 3) as usize));
        }
    }

    #[test]
    fn weighted_shares_follow_weight_over_active_plus_one() {
        let hs = hosts(&[1, 2, 2, 4]);
        set_active(&hs, &[0, 1, 0, 3]);
        // Effective weights 1/1, 2/2, 2/1, 4/4 = 1, 1, 2, 1 (sum 5).
        let lb = LeastRequestLb::new(hs, 2, 1.0, 99);
        let counts = shares(&lb, 4, 10_000);
        let expected = [2_000, 2_000, 4_000, 2_000];
        for (c, e) in counts.iter().zip(expected) {
            assert!(c.abs_diff(e) <= 2, "{counts:?}");
        }
    }

    #[test]
    fn bias_zero_ignores_load_and_bias_two_squares_it() {
        let hs = hosts(&[1, 2, 2, 4]);
        set_active(&hs, &[0, 1, 0, 3]);
        let lb = LeastRequestLb::new(hs.clone(), 2, 0.0, 5);
        let counts = shares(&lb, 4, 9_000);
        for (c, e) in counts.iter().zip([1_000, 2_000, 2_000, 4_000]) {
            assert!(c.abs_diff(e) <= 2, "bias 0: {counts:?}");
        }
        // Bias 2: 1/1, 2/4, 2/1, 4/16 = 1, 0.5, 2, 0.25 (sum 3.75).
        let lb = LeastRequestLb::new(hs, 2, 2.0, 5);
        let counts = shares(&lb, 4, 15_000);
        for (c, e) in counts.iter().zip([4_000, 2_000, 8_000, 1_000]) {
            assert!(c.abs_diff(e) <= 2, "bias 2: {counts:?}");
        }
    }

    #[test]
    fn weighted_path_reacts_to_load_changes() {
        let hs = hosts(&[1, 2]);
        let lb = LeastRequestLb::new(hs.clone(), 2, 1.0, 0);
        // Host 1 becomes very busy; once its queued entry is consumed, its new
        // deadline is far away and host 0 takes almost all picks.
        hs[1].active_requests.store(1_000, Ordering::Relaxed);
        let counts = shares(&lb, 2, 1_000);
        assert!(counts[1] <= 3, "{counts:?}");
    }

    #[test]
    fn forcing_weighted_uses_load_even_for_equal_weights() {
        let hs = hosts(&[1, 1]);
        set_active(&hs, &[0, 3]);
        // Effective weights 1 and 1/4: exact 4:1 split, no sampling noise.
        let lb = LeastRequestLb::new_forcing_weighted(hs, 2, 1.0, 0);
        let counts = shares(&lb, 2, 5_000);
        assert!(counts[0].abs_diff(4_000) <= 2, "{counts:?}");
    }

    #[test]
    fn exclude_retries_a_bounded_number_of_times() {
        let hs = hosts(&[1, 1, 1, 1]);
        set_active(&hs, &[5, 0, 5, 5]);
        let lb = LeastRequestLb::new(hs, 2, 1.0, 0);
        let c = |r, attempts| PickContext {
            hash: None,
            exclude: &|i| i == 1,
            random: r,
            attempts,
        };
        // With enough attempts the excluded (least loaded) host is avoided.
        for r in 0..500u64 {
            assert_ne!(lb.pick(&c(mix64(r), Some(64))).unwrap(), 1);
        }
        // Envoy returns the last pick when its attempts run out: with a
        // single attempt the least loaded host still wins often.
        let hits = (0..500u64)
            .filter(|r| lb.pick(&c(mix64(*r), Some(1))) == Some(1))
            .count();
        assert!(hits > 100, "{hits}");
    }

    #[test]
    fn empty_and_single_host() {
        assert_eq!(
            LeastRequestLb::new(hosts(&[]), 2, 1.0, 0).pick(&ctx(1)),
            None
        );
        let lb = LeastRequestLb::new(hosts(&[3]), 2, 1.0, 0);
        assert_eq!(lb.pick(&ctx(1)), Some(0));
    }

    #[test]
    fn invalid_bias_falls_back_to_one() {
        let lb = LeastRequestLb::new(hosts(&[1, 2]), 2, f64::NAN, 0);
        assert_eq!(lb.active_request_bias, 1.0);
        let lb = LeastRequestLb::new(hosts(&[1, 2]), 2, -3.0, 0);
        assert_eq!(lb.active_request_bias, 1.0);
    }
}
