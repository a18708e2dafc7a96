//! Envoy-compatible load-balancing algorithms, as pure synchronous code.
//!
//! Each balancer is built over one immutable host list and rebuilt whenever the
//! host set changes, exactly as Envoy rebuilds its per-priority schedulers and
//! hash tables on membership changes. Picks never block on I/O: the only shared
//! mutable state is a round-robin cursor / EDF queue behind a short-lived lock
//! and the per-host in-flight counters that the data plane maintains.
//!
//! What lives here is the *within one host list* part of Envoy's load balancers.
//! Priority levels, panic thresholds, locality weighting, zone-aware routing,
//! slow start and bounded-load hashing are decided by the caller before a host
//! list is handed to [`build`].
//!
//! Retries with a host predicate (Envoy's `previous_hosts`): Envoy calls the
//! algorithm up to `host_selection_retry_max_attempts + 1` times (default 2)
//! and returns the last host even if the predicate still rejects it. Legate does
//! exactly that ([`DEFAULT_HOST_SELECTION_ATTEMPTS`], or the route's value via
//! [`PickContext::attempts`]); the hashing balancers (ring hash, Maglev) keep
//! Envoy's exact rehash sequence, so retries land on Envoy's alternate host.

pub mod edf;
pub mod least_request;
pub mod maglev;
pub mod murmur;
pub mod random;
pub mod ring_hash;
pub mod round_robin;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// One upstream host as the load balancer sees it.
#[derive(Debug)]
pub struct LbHost {
    /// Key hashed by ring hash / Maglev: Envoy uses the host's address string "ip:port" (or hostname when use_hostname_for_hashing).
    pub hash_key: String,
    /// Effective weight, >= 1 (Envoy's load_balancing_weight, default 1).
    pub weight: u32,
    /// Requests in flight to this host; shared with the data plane, read by least-request.
    pub active_requests: Arc<AtomicU64>,
}

/// What a pick may depend on.
pub struct PickContext<'a> {
    /// Hash of the request (from the route's hash_policy), for ring hash and Maglev. None = no hash policy matched: pick at random as Envoy does.
    pub hash: Option<u64>,
    /// Hosts to avoid (retry previous_hosts predicate); return a host not in it if one exists within Envoy's semantics, otherwise any host.
    pub exclude: &'a dyn Fn(usize) -> bool,
    /// A random number source value supplied by the caller (so picks are deterministic in tests).
    pub random: u64,
    /// Host selection attempts for this request: the route's
    /// `host_selection_retry_max_attempts` + 1 when a retry host predicate
    /// is active; `None` uses Envoy's default.
    pub attempts: Option<u32>,
}

/// A load balancer over one immutable host list (rebuilt when the host set changes).
pub trait LoadBalancer: Send + Sync + std::fmt::Debug {
    /// Index into the host slice it was built with, or None if there are no hosts.
    fn pick(&self, ctx: &PickContext) -> Option<usize>;
}

#[derive(Debug, Clone, PartialEq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest {
        choice_count: u32,
        active_request_bias: f64,
    },
    Random,
    RingHash {
        min_ring_size: u64,
        max_ring_size: u64,
        /// `hash_function`: MURMUR_HASH_2 instead of the default XX_HASH.
        murmur: bool,
    },
    Maglev {
        table_size: u64,
    },
}

/// Envoy's default number of host selection attempts when a retry host
/// predicate is active: `host_selection_retry_max_attempts` defaults to 1, and
/// Envoy makes that many *extra* attempts after the first one.
pub const DEFAULT_HOST_SELECTION_ATTEMPTS: u32 = 2;

/// Builds the balancer for a policy over `hosts` (cheap to call on every host-set change).
pub fn build(policy: &LbPolicy, hosts: Arc<[LbHost]>) -> Box<dyn LoadBalancer> {
    match policy {
        LbPolicy::RoundRobin => Box::new(round_robin::RoundRobinLb::new(hosts, fresh_seed())),
        LbPolicy::LeastRequest {
            choice_count,
            active_request_bias,
        } => Box::new(least_request::LeastRequestLb::new(
            hosts,
            *choice_count,
            *active_request_bias,
            fresh_seed(),
        )),
        LbPolicy::Random => Box::new(random::RandomLb::new(hosts)),
        LbPolicy::RingHash {
            min_ring_size,
            max_ring_size,
            murmur,
        } => Box::new(ring_hash::RingHashLb::with_hash(
            &hosts,
            *min_ring_size,
            *max_ring_size,
            *murmur,
        )),
        LbPolicy::Maglev { table_size } => Box::new(maglev::MaglevLb::new(&hosts, *table_size)),
    }
}

/// A per-balancer random seed, like Envoy's `seed_ = random_.random()` taken
/// once when an EDF-based balancer is constructed. Std's `RandomState` is
/// randomly keyed per process and per instance, which is all we need for a
/// start offset, and keeps this module free of an RNG dependency.
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// SplitMix64 finalizer: turns a counter into well-spread 64-bit values.
///
/// Envoy draws a fresh `random_.random()` for every choice (each P2C sample,
/// each retry attempt). A pick here receives a single `ctx.random`, so further
/// values are derived from it deterministically.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sequence of random values one pick consumes: the caller's value first
/// (so a single draw behaves exactly like Envoy's `random() % n`), then values
/// derived from it.
#[derive(Debug, Clone)]
pub(crate) struct RandomStream {
    first: Option<u64>,
    state: u64,
}

impl RandomStream {
    pub(crate) fn new(random: u64) -> Self {
        Self {
            first: Some(random),
            state: random,
        }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        if let Some(first) = self.first.take() {
            return first;
        }
        self.state = self.state.wrapping_add(1);
        mix64(self.state)
    }
}

/// Envoy's `chooseHost` retry loop (`LoadBalancerBase`/`ThreadAwareLoadBalancerBase`):
/// try `attempts` picks, return the first one the predicate accepts, else the
/// last one, as Envoy does.
pub(crate) fn pick_with_retries(
    exclude: &dyn Fn(usize) -> bool,
    attempts: u32,
    mut choose: impl FnMut(u32) -> Option<usize>,
) -> Option<usize> {
    let mut last = None;
    for attempt in 0..attempts.max(1) {
        let host = choose(attempt)?;
        if !exclude(host) {
            return Some(host);
        }
        last = Some(host);
    }
    let last = last?;
    Some(last)
}

/// True when every host has the same weight; Envoy's `hostWeightsAreEqual`,
/// which decides between the cheap unweighted path and the EDF scheduler.
pub(crate) fn weights_are_equal(hosts: &[LbHost]) -> bool {
    hosts
        .windows(2)
        .all(|w| effective_weight(&w[0]) == effective_weight(&w[1]))
}

/// Weight as the balancers use it. Envoy validates weights to be >= 1; a zero
/// here would make EDF deadlines infinite and hash shares empty, so clamp.
pub(crate) fn effective_weight(host: &LbHost) -> u32 {
    host.weight.max(1)
}

/// Envoy's `normalizeHostWeights` for a flat host list (no locality weights):
/// each weight divided by the sum, plus the min and max normalized weight.
/// Returns `(weights, min, max)` with Envoy's starting values `min = 1.0`,
/// `max = 0.0`.
pub(crate) fn normalized_weights(hosts: &[LbHost]) -> (Vec<f64>, f64, f64) {
    let sum: u64 = hosts.iter().map(|h| u64::from(effective_weight(h))).sum();
    let mut min = 1.0_f64;
    let mut max = 0.0_f64;
    let weights = hosts
        .iter()
        .map(|h| {
            // Same operation order as Envoy: weight * locality_weight(1.0) / sum.
            let w = f64::from(effective_weight(h)) * 1.0 / sum as f64;
            min = min.min(w);
            max = max.max(w);
            w
        })
        .collect();
    (weights, min, max)
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// Hosts with the given weights, keyed "10.0.0.{i}:80".
    pub fn hosts(weights: &[u32]) -> Arc<[LbHost]> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| host(&format!("10.0.{}.{}:80", i / 250, i % 250), w))
            .collect::<Vec<_>>()
            .into()
    }

    pub fn host(key: &str, weight: u32) -> LbHost {
        LbHost {
            hash_key: key.to_string(),
            weight,
            active_requests: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn ctx(random: u64) -> PickContext<'static> {
        PickContext {
            hash: None,
            exclude: &|_| false,
            random,
            attempts: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn build_returns_none_without_hosts() {
        let policies = [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: 1.0,
            },
            LbPolicy::Random,
            LbPolicy::RingHash {
                min_ring_size: 1024,
                max_ring_size: 8 * 1024 * 1024,
                murmur: false,
            },
            LbPolicy::Maglev { table_size: 65537 },
        ];
        for policy in &policies {
            let lb = build(policy, hosts(&[]));
            assert_eq!(lb.pick(&ctx(7)), None, "{policy:?}");
        }
    }

    #[test]
    fn build_picks_valid_indices_for_every_policy() {
        let policies = [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: 1.0,
            },
            LbPolicy::Random,
            LbPolicy::RingHash {
                min_ring_size: 1024,
                max_ring_size: 8 * 1024 * 1024,
                murmur: false,
            },
            LbPolicy::Maglev { table_size: 65537 },
        ];
        let hs = hosts(&[1, 2, 3]);
        for policy in &policies {
            let lb = build(policy, hs.clone());
            for r in 0..100u64 {
                let c = PickContext {
                    hash: Some(mix64(r)),
                    exclude: &|_| false,
                    random: mix64(r + 1000),
                    attempts: None,
                };
                let i = lb.pick(&c).expect("hosts exist");
                assert!(i < hs.len(), "{policy:?}");
            }
        }
    }

    #[test]
    fn retry_loop_returns_the_last_pick_when_attempts_run_out() {
        let exclude = |i: usize| i != 3;
        // The chooser always lands on host 0, which is excluded.
        let mut calls = 0;
        let picked = pick_with_retries(&exclude, 2, |_| {
            calls += 1;
            Some(0)
        });
        assert_eq!((picked, calls), (Some(0), 2));
        // An allowed host found on the second attempt is returned.
        assert_eq!(
            pick_with_retries(&exclude, 2, |a| Some(if a == 1 { 3 } else { 0 })),
            Some(3)
        );
    }

    #[test]
    fn random_stream_starts_with_callers_value() {
        let mut s = RandomStream::new(42);
        assert_eq!(s.next_u64(), 42);
        let a = s.next_u64();
        let b = s.next_u64();
        assert_ne!(a, 42);
        assert_ne!(a, b);
    }

    #[test]
    fn normalized_weights_match_envoy() {
        let (w, min, max) = normalized_weights(&hosts(&[1, 3]));
        assert_eq!(w, vec![0.25, 0.75]);
        assert_eq!(min, 0.25);
        assert_eq!(max, 0.75);
    }
}
