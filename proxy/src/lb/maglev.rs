//! Envoy's MAGLEV (`MaglevTable`, from
//! `source/extensions/load_balancing_policies/maglev/maglev_lb.cc`), built so
//! that the lookup table is slot-for-slot identical to Envoy's.
//!
//! Maglev (Eisenbud et al., NSDI '16, section 3.4) gives every host a
//! pseudo-random permutation of table slots, `(offset + skip * j) % M`, and
//! lets hosts take turns claiming their next free slot until the table is
//! full. A prime `M` makes every permutation visit every slot. Envoy's weighted
//! variant, reproduced here:
//! - hosts are processed in ascending order of their hash key (not host-list
//!   order), so the table does not depend on the order the control plane
//!   listed the hosts in;
//! - `offset = xxh64(key, seed 0) % M`, `skip = xxh64(key, seed 1) % (M - 1) + 1`;
//! - weights are normalized (`w_i / sum`); in fill round `r` (1, 2, ...) a host
//!   takes a turn only if `r * w_i >= target_i`, after which `target_i` grows
//!   by the largest normalized weight. The heaviest host takes a turn every
//!   round, a host with a third of that weight every third round, so slot
//!   counts end up proportional to weights.
//!
//! Lookup is `table[hash % M]`. [`MaglevLb::table`] exposes the table (host
//! index per slot) so the same table can be written into eBPF maps.
//!
//! Retries: Envoy's attempt `k > 0` looks up `hash ^ (u64::MAX - k + 1)`
//! (flipping most bits moves far across the table); after the attempts it
//! returns the last candidate even if excluded. We keep that exactly, with
//! Envoy's default of 2 attempts and no further scan.
//!
//! With no request hash, Envoy looks up a random number instead; so do we,
//! with `ctx.random`.

use xxhash_rust::xxh64::xxh64;

use super::{
    normalized_weights, pick_with_retries, LbHost, LoadBalancer, PickContext,
    DEFAULT_HOST_SELECTION_ATTEMPTS,
};

/// Envoy's default `table_size` (the paper's recommended prime).
pub const DEFAULT_TABLE_SIZE: u64 = 65_537;

/// Marks an unclaimed slot while filling.
const EMPTY: u32 = u32::MAX;

/// Deterministic primality test by trial division; table sizes are at most a
/// few million, so this is instant.
pub fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n & 1 == 0 {
        return false;
    }
    // Odd divisors up to sqrt(n); `u64::is_multiple_of` would postdate the
    // workspace's minimum Rust version.
    (3u64..)
        .step_by(2)
        .take_while(|d| d.saturating_mul(*d) <= n)
        .all(|d| n.rem_euclid(d) != 0)
}

/// Smallest prime >= `n`.
pub fn next_prime(n: u64) -> u64 {
    let mut candidate = n.max(2);
    while !is_prime(candidate) {
        candidate += 1;
    }
    candidate
}

/// A host's state while the table is being filled (Envoy's `TableBuildEntry`).
#[derive(Debug)]
struct BuildEntry {
    host: u32,
    offset: u64,
    skip: u64,
    weight: f64,
    target_weight: f64,
    next: u64,
    count: u64,
}

impl BuildEntry {
    /// The host's `next`-th preferred slot. Wrapping arithmetic mirrors
    /// Envoy's unsigned 64-bit math (it cannot overflow for valid sizes).
    fn permutation(&self, table_size: u64) -> usize {
        (self.offset.wrapping_add(self.skip.wrapping_mul(self.next)) % table_size) as usize
    }
}

/// A Maglev lookup table over one host list.
#[derive(Debug)]
pub struct MaglevLb {
    table: Vec<u32>,
    table_size: u64,
    attempts: u32,
}

impl MaglevLb {
    /// Builds the table. Envoy rejects a non-prime `table_size` at config
    /// time; since a non-prime size can make the fill loop spin forever, a
    /// non-prime size is rounded up to the next prime here instead.
    pub fn new(hosts: &[LbHost], table_size: u64) -> Self {
        let table_size = if is_prime(table_size) {
            table_size
        } else {
            next_prime(table_size)
        };
        Self {
            table: build_table(hosts, table_size),
            table_size,
            attempts: DEFAULT_HOST_SELECTION_ATTEMPTS,
        }
    }

    /// Overrides the number of lookups tried when a retry predicate rejects
    /// hosts (Envoy: `host_selection_retry_max_attempts + 1`).
    pub fn with_host_selection_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Host index for every slot; empty when there are no hosts.
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// The (prime) table size actually used.
    pub fn table_size(&self) -> u64 {
        self.table_size
    }

    /// Envoy's `MaglevTable::chooseHost(hash, attempt)`.
    pub fn choose(&self, hash: u64, attempt: u32) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let hash = if attempt > 0 {
            // Envoy: hash ^= ~0ULL - attempt + 1.
            hash ^ u64::MAX.wrapping_sub(u64::from(attempt)).wrapping_add(1)
        } else {
            hash
        };
        Some(self.table[(hash % self.table_size) as usize] as usize)
    }
}

fn build_table(hosts: &[LbHost], table_size: u64) -> Vec<u32> {
    if hosts.is_empty() {
        return Vec::new();
    }
    let (weights, _, max_weight) = normalized_weights(hosts);

    // Envoy sorts (key, host, weight) tuples; equal keys are not expected,
    // and a stable sort keeps host-list order for them.
    let mut order: Vec<usize> = (0..hosts.len()).collect();
    order.sort_by(|&a, &b| {
        hosts[a]
            .hash_key
            .as_bytes()
            .cmp(hosts[b].hash_key.as_bytes())
    });

    let mut entries: Vec<BuildEntry> = order
        .into_iter()
        .map(|i| {
            let key = hosts[i].hash_key.as_bytes();
            BuildEntry {
                host: i as u32,
                offset: xxh64(key, 0) % table_size,
                skip: xxh64(key, 1) % (table_size - 1) + 1,
                weight: weights[i],
                target_weight: 0.0,
                next: 0,
                count: 0,
            }
        })
        .collect();

    let mut table = vec![EMPTY; table_size as usize];
    let mut filled: u64 = 0;
    let mut iteration: u32 = 1;
    while filled < table_size {
        for entry in entries.iter_mut() {
            if filled >= table_size {
                break;
            }
            // Skip this round unless the host's weight has "caught up".
            if f64::from(iteration) * entry.weight < entry.target_weight {
                continue;
            }
            entry.target_weight += max_weight;
            let mut slot = entry.permutation(table_size);
            while table[slot] != EMPTY {
                entry.next += 1;
                slot = entry.permutation(table_size);
            }
            table[slot] = entry.host;
            entry.next += 1;
            entry.count += 1;
            filled += 1;
        }
        iteration += 1;
    }
    debug_assert_eq!(
        entries.iter().map(|e| e.count).sum::<u64>(),
        table_size,
        "every slot claimed exactly once"
    );
    table
}

impl LoadBalancer for MaglevLb {
    fn pick(&self, ctx: &PickContext) -> Option<usize> {
        let hash = ctx.hash.unwrap_or(ctx.random);
        pick_with_retries(
            ctx.exclude,
            ctx.attempts.unwrap_or(self.attempts),
            |attempt| self.choose(hash, attempt),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{host, hosts};
    use super::*;
    use proptest::prelude::*;

    fn named(keys: &[&str], weights: &[u32]) -> Vec<LbHost> {
        keys.iter().zip(weights).map(|(k, &w)| host(k, w)).collect()
    }

    fn ports_90_to_95() -> Vec<LbHost> {
        let keys: Vec<String> = (90..96).map(|p| format!("127.0.0.1:{p}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        named(&keys, &[1; 6])
    }

    fn hash_ctx(hash: u64) -> PickContext<'static> {
        PickContext {
            hash: Some(hash),
            exclude: &|_| false,
            random: 0,
            attempts: None,
        }
    }

    // Golden table from Envoy's test/extensions/load_balancing_policies/
    // maglev/maglev_lb_test.cc, TEST_F(MaglevLoadBalancerTest, Basic).
    #[test]
    fn envoy_golden_basic_table() {
        let lb = MaglevLb::new(&ports_90_to_95(), 7);
        assert_eq!(lb.table(), &[2, 4, 0, 1, 5, 0, 3]);
        for i in 0..21u64 {
            assert_eq!(
                lb.pick(&hash_ctx(i)),
                Some(lb.table()[(i % 7) as usize] as usize)
            );
        }
    }

    // Envoy: TEST_F(MaglevLoadBalancerTest, BasicWithHostName) (hash keys are
    // the hostnames "90".."95").
    #[test]
    fn envoy_golden_hostname_table() {
        let hs = named(&["90", "91", "92", "93", "94", "95"], &[1; 6]);
        assert_eq!(MaglevLb::new(&hs, 7).table(), &[2, 5, 0, 3, 4, 1, 0]);
    }

    // Envoy: TEST_F(MaglevLoadBalancerTest, Weighted): weights 1 and 2, 17 slots
    // (6 and 11 entries).
    #[test]
    fn envoy_golden_weighted_table() {
        let hs = named(&["127.0.0.1:90", "127.0.0.1:91"], &[1, 2]);
        let lb = MaglevLb::new(&hs, 17);
        assert_eq!(
            lb.table(),
            &[1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 1]
        );
        assert_eq!(lb.table().iter().filter(|&&h| h == 0).count(), 6);
    }

    // Envoy: TEST_F(MaglevLoadBalancerTest, BasicWithRetryHostPredicate).
    #[test]
    fn envoy_golden_retry_rehash() {
        let lb = MaglevLb::new(&ports_90_to_95(), 7).with_host_selection_attempts(3);
        let ctx = |exclude: &'static dyn Fn(usize) -> bool| PickContext {
            hash: Some(10),
            exclude,
            random: 0,
            attempts: None,
        };
        assert_eq!(lb.pick(&ctx(&|_| false)), Some(1));
        assert_eq!(lb.pick(&ctx(&|i| i == 1)), Some(0));
        // Exhausted retries return the last candidate.
        assert_eq!(lb.pick(&ctx(&|_| true)), Some(5));
        // Default attempts (2) reach the first rehash too.
        let lb = MaglevLb::new(&ports_90_to_95(), 7);
        assert_eq!(lb.pick(&ctx(&|i| i == 1)), Some(0));
    }

    // Envoy: TEST_F(MaglevLoadBalancerTest, BasicStability): host-list order
    // does not change which host owns which slot.
    #[test]
    fn envoy_golden_order_independent() {
        let hs = ports_90_to_95();
        let base = MaglevLb::new(&hs, 7);
        let permutation = [3usize, 5, 0, 4, 1, 2];
        let shuffled: Vec<LbHost> = permutation
            .iter()
            .map(|&i| host(&hs[i].hash_key, hs[i].weight))
            .collect();
        let lb = MaglevLb::new(&shuffled, 7);
        let by_key = |lb: &MaglevLb, hs: &[LbHost]| -> Vec<String> {
            lb.table()
                .iter()
                .map(|&h| hs[h as usize].hash_key.clone())
                .collect()
        };
        assert_eq!(by_key(&lb, &shuffled), by_key(&base, &hs));
    }

    #[test]
    fn no_hosts_single_host_and_non_prime_sizes() {
        assert_eq!(MaglevLb::new(&[], 7).pick(&hash_ctx(1)), None);
        let one = MaglevLb::new(&hosts(&[7]), 17);
        assert!(one.table().iter().all(|&h| h == 0));
        let lb = MaglevLb::new(&hosts(&[1, 1]), 8);
        assert_eq!(lb.table_size(), 11);
        assert_eq!(lb.table().len(), 11);
        assert_eq!(MaglevLb::new(&hosts(&[1]), 0).table_size(), 2);
        assert!(is_prime(DEFAULT_TABLE_SIZE) && is_prime(2) && !is_prime(1) && !is_prime(65_535));
    }

    fn slot_counts(lb: &MaglevLb, n_hosts: usize) -> Vec<u64> {
        let mut counts = vec![0u64; n_hosts];
        for &h in lb.table() {
            counts[h as usize] += 1;
        }
        counts
    }

    /// Fraction of slots whose owner changed, and the same among slots whose
    /// old owner survived.
    fn disruption(weights: &[u32], removed: usize) -> (f64, f64) {
        let all = hosts(weights);
        let before = MaglevLb::new(&all, DEFAULT_TABLE_SIZE);
        let rest: Vec<LbHost> = all
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != removed)
            .map(|(_, h)| host(&h.hash_key, h.weight))
            .collect();
        let after = MaglevLb::new(&rest, DEFAULT_TABLE_SIZE);
        let to_old = |j: u32| if (j as usize) < removed { j } else { j + 1 };
        let pairs = before.table().iter().zip(after.table());
        let moved = pairs.clone().filter(|&(&o, &n)| o != to_old(n)).count();
        let staying = before
            .table()
            .iter()
            .filter(|&&o| o as usize != removed)
            .count();
        let moved_staying = pairs
            .filter(|&(&o, &n)| o as usize != removed && o != to_old(n))
            .count();
        (
            moved as f64 / DEFAULT_TABLE_SIZE as f64,
            moved_staying as f64 / staying.max(1) as f64,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        // Slot shares are checked *relative* to the expected share (±2 %):
        // the table is exact, so there is no sampling noise to allow for.
        #[test]
        fn slot_shares_match_weights(weights in proptest::collection::vec(1u32..=10, 2..=20)) {
            let hs = hosts(&weights);
            let lb = MaglevLb::new(&hs, DEFAULT_TABLE_SIZE);
            let total: u32 = weights.iter().sum();
            for (i, &c) in slot_counts(&lb, hs.len()).iter().enumerate() {
                let expected = DEFAULT_TABLE_SIZE as f64 * f64::from(weights[i]) / f64::from(total);
                prop_assert!((c as f64 - expected).abs() <= 0.02 * expected,
                    "host {} has {} slots, expected {:.1}", i, c, expected);
            }
        }

        // Equal weights: removing one of N hosts moves at most 1/N + 5 % of
        // the slots, and few slots of surviving hosts.
        #[test]
        fn removal_moves_about_one_nth(
            n in 2usize..=20,
            removed_pick in any::<proptest::sample::Index>(),
        ) {
            let removed = removed_pick.index(n);
            let (moved, moved_staying) = disruption(&vec![1; n], removed);
            prop_assert!(moved <= 1.0 / n as f64 + 0.05, "moved {:.4} of {} hosts", moved, n);
            prop_assert!(moved_staying <= 0.05, "surviving hosts lost {:.4}", moved_staying);
        }

        // Random weights: the removed host's own share (1/N for equal weights)
        // plus 5 %.
        #[test]
        fn weighted_removal_moves_about_the_removed_share(
            weights in proptest::collection::vec(1u32..=10, 2..=20),
            removed_pick in any::<proptest::sample::Index>(),
        ) {
            let removed = removed_pick.index(weights.len());
            let (moved, moved_staying) = disruption(&weights, removed);
            let total: u32 = weights.iter().sum();
            let share = f64::from(weights[removed]) / f64::from(total);
            prop_assert!(moved <= share + 0.05, "moved {:.4}, removed share {:.4}", moved, share);
            prop_assert!(moved_staying <= 0.05, "surviving hosts lost {:.4}", moved_staying);
        }
    }
}
