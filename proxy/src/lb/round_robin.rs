//! Envoy's ROUND_ROBIN (`RoundRobinLoadBalancer` on top of `EdfLoadBalancerBase`).
//!
//! Two regimes, chosen once per host list as Envoy does in `refresh()`:
//! - all weights equal: a plain rotation `hosts[index++ % n]`, where the index
//!   starts at the balancer's random seed so that many proxies (and rebuilds)
//!   do not all start on host 0;
//! - weights differ: smooth weighted round robin through the EDF scheduler,
//!   pre-advanced by `seed` picks (Envoy's `createWithPicks(hosts, weight,
//!   seed_)`, the seed truncated to 32 bits as in Envoy's call) for the same
//!   reason.
//!
//! Slow start (which makes Envoy use EDF even for equal weights while a host
//! warms up) is not modelled here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::edf::EdfScheduler;
use super::{
    effective_weight, pick_with_retries, weights_are_equal, LbHost, LoadBalancer, PickContext,
    DEFAULT_HOST_SELECTION_ATTEMPTS,
};

#[derive(Debug)]
enum Mode {
    /// Equal weights: lock-free rotation cursor (Envoy's `rr_indexes_` entry).
    Rotation(AtomicU64),
    /// Unequal weights: the EDF schedule. A mutex is fine: the critical
    /// section is one heap pop and push.
    Weighted(Mutex<EdfScheduler>),
}

/// Round robin over one host list.
#[derive(Debug)]
pub struct RoundRobinLb {
    hosts: Arc<[LbHost]>,
    mode: Mode,
    attempts: u32,
}

impl RoundRobinLb {
    /// Builds the balancer; `seed` plays the role of Envoy's per-balancer
    /// `seed_ = random.random()` and fixes the starting point.
    pub fn new(hosts: Arc<[LbHost]>, seed: u64) -> Self {
        let mode = if hosts.len() <= 1 || weights_are_equal(&hosts) {
            Mode::Rotation(AtomicU64::new(seed))
        } else {
            let items: Vec<usize> = (0..hosts.len()).collect();
            let weights: Vec<f64> = hosts
                .iter()
                .map(|h| f64::from(effective_weight(h)))
                .collect();
            // Envoy passes the 64-bit seed to a uint32_t parameter.
            let edf = EdfScheduler::create_with_picks(&items, |i| weights[i], seed as u32);
            Mode::Weighted(Mutex::new(edf))
        };
        Self {
            hosts,
            mode,
            attempts: DEFAULT_HOST_SELECTION_ATTEMPTS,
        }
    }

    /// Overrides how many scheduled picks a retry predicate may reject before
    /// then keeping the last pick (Envoy: `host_selection_retry_max_attempts + 1`).
    pub fn with_host_selection_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// One scheduled pick, advancing the rotation or the EDF schedule.
    fn next_host(&self) -> Option<usize> {
        let n = self.hosts.len();
        if n == 0 {
            return None;
        }
        match &self.mode {
            Mode::Rotation(next) => {
                // Wrapping add, like Envoy's uint64_t `index++`.
                let index = next.fetch_add(1, Ordering::Relaxed);
                Some((index % n as u64) as usize)
            }
            Mode::Weighted(edf) => {
                let mut edf = edf.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                // Weights are static for round robin; read them from the host.
                edf.pick_and_add(|i| f64::from(effective_weight(&self.hosts[i])))
            }
        }
    }
}

impl LoadBalancer for RoundRobinLb {
    fn pick(&self, ctx: &PickContext) -> Option<usize> {
        pick_with_retries(ctx.exclude, ctx.attempts.unwrap_or(self.attempts), |_| {
            self.next_host()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{ctx, hosts};
    use super::*;

    fn picks(lb: &RoundRobinLb, n: usize) -> Vec<usize> {
        (0..n).map(|i| lb.pick(&ctx(i as u64)).unwrap()).collect()
    }

    fn max_run(seq: &[usize]) -> usize {
        seq.chunk_by(|a, b| a == b)
            .map(<[usize]>::len)
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn equal_weights_rotate_from_the_seed() {
        let lb = RoundRobinLb::new(hosts(&[1, 1, 1, 1, 1]), 7);
        let seq = picks(&lb, 25);
        // Starts at seed % n and visits hosts in order.
        assert_eq!(&seq[..5], &[2, 3, 4, 0, 1]);
        for cycle in seq.chunks(5) {
            let mut sorted = cycle.to_vec();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4], "each host once per cycle");
        }
    }

    #[test]
    fn rotation_survives_index_wraparound() {
        let lb = RoundRobinLb::new(hosts(&[1, 1, 1]), u64::MAX);
        // u64::MAX % 3 == 0, then the index wraps to 0 (also host 0).
        assert_eq!(picks(&lb, 3), vec![0, 0, 1]);
    }

    #[test]
    fn weighted_shares_are_exact() {
        for seed in [0u64, 1, 12_345, u64::MAX] {
            let lb = RoundRobinLb::new(hosts(&[1, 2, 3, 4]), seed);
            let mut counts = [0u32; 4];
            for h in picks(&lb, 10_000) {
                counts[h] += 1;
            }
            for (i, &c) in counts.iter().enumerate() {
                let expected = 1_000 * (i as u32 + 1);
                assert!(
                    c.abs_diff(expected) <= 1,
                    "seed {seed} host {i}: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn weighted_picks_are_smooth() {
        // A naive weighted RR would emit 3,3,3,3,2,2,2,...; EDF interleaves so
        // that no host repeats more than twice in a row for weights 1..=4.
        let lb = RoundRobinLb::new(hosts(&[1, 2, 3, 4]), 0);
        let seq = picks(&lb, 1_000);
        assert!(max_run(&seq) <= 2, "max run {}", max_run(&seq));
        // Any window of one full cycle (10 picks) holds each host about its
        // weight's worth of times.
        for w in seq.windows(10) {
            for h in 0..4 {
                let c = w.iter().filter(|&&x| x == h).count();
                assert!(c.abs_diff(h + 1) <= 1, "{w:?}: host {h} x{c}");
            }
        }
    }

    #[test]
    fn weights_one_and_five_place_light_host_about_every_sixth_pick() {
        // Never five-then-one bursts of arbitrary length: the light host
        // recurs every 6 picks, +/- 1 for floating-point deadline ties.
        for seed in [0u64, 3, 987_654_321] {
            let lb = RoundRobinLb::new(hosts(&[1, 5]), seed);
            let seq = picks(&lb, 600);
            let zeros: Vec<usize> = (0..seq.len()).filter(|&i| seq[i] == 0).collect();
            assert!(zeros.len().abs_diff(100) <= 1, "{}", zeros.len());
            assert!(
                zeros.windows(2).all(|w| (5..=7).contains(&(w[1] - w[0]))),
                "{zeros:?}"
            );
        }
    }

    #[test]
    fn exclude_skips_to_another_host() {
        // Rotation: host 0 would be next; the retry takes host 1.
        let lb = RoundRobinLb::new(hosts(&[1, 1, 1]), 0);
        let c = PickContext {
            hash: None,
            exclude: &|i| i == 0,
            random: 0,
            attempts: None,
        };
        assert_eq!(lb.pick(&c), Some(1));

        // Weighted: the heavy host keeps coming up from the schedule. Envoy
        // makes 2 attempts and then keeps the last pick; more attempts reach
        // the light host.
        let lb = RoundRobinLb::new(hosts(&[1, 50]), 0);
        let c = PickContext {
            hash: None,
            exclude: &|i| i == 1,
            random: 0,
            attempts: None,
        };
        assert_eq!(lb.pick(&c), Some(1));
        let c = PickContext {
            hash: None,
            exclude: &|i| i == 1,
            random: 0,
            attempts: Some(60),
        };
        assert_eq!(lb.pick(&c), Some(0));

        // Everything excluded: still returns a host.
        let c = PickContext {
            hash: None,
            exclude: &|_| true,
            random: 0,
            attempts: None,
        };
        assert!(lb.pick(&c).is_some());
    }

    #[test]
    fn empty_and_single_host() {
        let lb = RoundRobinLb::new(hosts(&[]), 1);
        assert_eq!(lb.pick(&ctx(0)), None);
        let lb = RoundRobinLb::new(hosts(&[9]), 1);
        assert_eq!(picks(&lb, 3), vec![0, 0, 0]);
    }

    #[test]
    fn concurrent_rotation_is_exact() {
        let lb = Arc::new(RoundRobinLb::new(hosts(&[1, 1, 1, 1]), 0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let lb = lb.clone();
                std::thread::spawn(move || {
                    let mut counts = [0u32; 4];
                    for _ in 0..1_000 {
                        counts[lb.pick(&ctx(0)).unwrap()] += 1;
                    }
                    counts
                })
            })
            .collect();
        let mut total = [0u32; 4];
        for h in handles {
            for (t, c) in total.iter_mut().zip(h.join().unwrap()) {
                *t += c;
            }
        }
        assert_eq!(total, [1_000; 4]);
    }
}
