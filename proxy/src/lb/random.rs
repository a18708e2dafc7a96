//! Envoy's RANDOM (`RandomLoadBalancer`).
//!
//! Envoy picks `hosts[random % hosts.len()]` and ignores host weights
//! entirely (weights only matter to Envoy's priority / locality selection,
//! which happens before this host list is chosen). We follow that: the
//! caller's `ctx.random` is used exactly as Envoy's `random()` value, so the
//! first choice is reproducible against Envoy given the same random number.

use std::sync::Arc;

use super::{
    pick_with_retries, LbHost, LoadBalancer, PickContext, RandomStream,
    DEFAULT_HOST_SELECTION_ATTEMPTS,
};

/// Uniform random choice over one host list.
#[derive(Debug)]
pub struct RandomLb {
    hosts: Arc<[LbHost]>,
    attempts: u32,
}

impl RandomLb {
    /// Builds the balancer; it holds no state besides the host list.
    pub fn new(hosts: Arc<[LbHost]>) -> Self {
        Self {
            hosts,
            attempts: DEFAULT_HOST_SELECTION_ATTEMPTS,
        }
    }

    /// Overrides how many random draws a retry predicate may reject before
    /// then keeping the last pick (Envoy: `host_selection_retry_max_attempts + 1`).
    pub fn with_host_selection_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }
}

impl LoadBalancer for RandomLb {
    fn pick(&self, ctx: &PickContext) -> Option<usize> {
        let n = self.hosts.len() as u64;
        if n == 0 {
            return None;
        }
        // Each retry attempt draws a new random value, as Envoy's does.
        let mut rng = RandomStream::new(ctx.random);
        pick_with_retries(ctx.exclude, ctx.attempts.unwrap_or(self.attempts), |_| {
            Some((rng.next_u64() % n) as usize)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::mix64;
    use super::super::test_support::{ctx, hosts};
    use super::*;

    #[test]
    fn picks_random_mod_len() {
        let lb = RandomLb::new(hosts(&[1, 1, 1, 1, 1]));
        for r in [0u64, 1, 4, 5, 123_456_789, u64::MAX] {
            assert_eq!(lb.pick(&ctx(r)), Some((r % 5) as usize));
        }
    }

    #[test]
    fn ignores_weights_and_is_uniform() {
        let lb = RandomLb::new(hosts(&[1, 10, 100]));
        let mut counts = [0u32; 3];
        for i in 0..30_000u64 {
            counts[lb.pick(&ctx(mix64(i))).unwrap()] += 1;
        }
        for c in counts {
            assert!(
                (f64::from(c) / 30_000.0 - 1.0 / 3.0).abs() < 0.02,
                "{counts:?}"
            );
        }
    }

    #[test]
    fn exclude_retries_a_bounded_number_of_times() {
        let lb = RandomLb::new(hosts(&[1, 1, 1]));
        for r in 0..300u64 {
            let c = PickContext {
                hash: None,
                exclude: &|i| i == (r % 3) as usize,
                random: mix64(r),
                attempts: Some(32),
            };
            assert_ne!(lb.pick(&c).unwrap(), (r % 3) as usize);
        }
        // Envoy's default (2 attempts) can end on an excluded host: with only
        // one allowed host of ten that happens most of the time.
        let lb = RandomLb::new(hosts(&[1; 10]));
        let found = (0..300u64)
            .filter(|r| {
                lb.pick(&PickContext {
                    hash: None,
                    exclude: &|i| i != 7,
                    random: mix64(*r),
                    attempts: None,
                }) == Some(7)
            })
            .count();
        assert!(found > 0 && found < 150, "{found}");
        // All excluded: some host anyway.
        assert!(lb
            .pick(&PickContext {
                hash: None,
                exclude: &|_| true,
                random: 4,
                attempts: None
            })
            .is_some());
    }

    #[test]
    fn no_hosts() {
        assert_eq!(RandomLb::new(hosts(&[])).pick(&ctx(3)), None);
    }
}
