//! Earliest-deadline-first scheduler, after Envoy's
//! `source/common/upstream/edf_scheduler.h`.
//!
//! Weighted round robin and weighted least request both use it. Each entry
//! carries a deadline `current_time + 1 / weight`; a pick takes the entry with
//! the earliest deadline, advances `current_time` to it and re-inserts the entry
//! with a freshly computed weight. That yields *smooth* weighted rotation (a
//! weight-3 host is spread across the cycle rather than picked 3 times in a
//! row) with O(log n) picks and floating-point weights, which least request
//! needs because its weights change with load.
//!
//! Ties on the deadline go to the entry inserted first (a monotonically
//! increasing insertion counter), as in Envoy, so the schedule is fully
//! deterministic.
//!
//! Not carried over: Envoy's `peekAgain`/pre-pick list (only used for
//! preconnect) and weak-pointer expiry (our entries are indices into an
//! immutable host list; the whole scheduler is rebuilt on host changes).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One queued entry: `item` is an index into the balancer's host list.
#[derive(Debug, Clone, Copy)]
struct EdfEntry {
    deadline: f64,
    /// Insertion order, the FIFO tie breaker for equal deadlines.
    order: u64,
    item: usize,
}

impl PartialEq for EdfEntry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for EdfEntry {}

impl PartialOrd for EdfEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for EdfEntry {
    /// Reversed so that `BinaryHeap` (a max-heap) pops the earliest deadline,
    /// then the lowest insertion order.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .deadline
            .total_cmp(&self.deadline)
            .then_with(|| other.order.cmp(&self.order))
    }
}

/// Envoy's `EdfScheduler<C>` over host indices.
#[derive(Debug, Clone, Default)]
pub struct EdfScheduler {
    queue: BinaryHeap<EdfEntry>,
    current_time: f64,
    order_offset: u64,
}

/// Envoy caps the number of emulated start-up picks (`% (UINT_MAX / 10)`).
const MAX_PRE_PICKS: u32 = 429_496_729;

/// Envoy adds this to every weight while emulating start-up picks so that
/// weights that are multiples of each other do not produce deadlines that
/// differ only by rounding (see the comment in Envoy's `createWithPicks`).
const PRE_PICK_WEIGHT_EPSILON: f64 = 1e-13;

/// Deadlines must stay finite and ordered; a non-positive weight (which Envoy
/// asserts never happens) is treated as the smallest positive weight.
fn sane_weight(weight: f64) -> f64 {
    if weight > 0.0 {
        weight
    } else {
        f64::MIN_POSITIVE
    }
}

impl EdfScheduler {
    /// An empty scheduler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `item` with deadline `current_time + 1 / weight`.
    pub fn add(&mut self, weight: f64, item: usize) {
        debug_assert!(weight > 0.0, "EDF weights must be positive");
        let deadline = self.current_time + 1.0 / sane_weight(weight);
        self.queue.push(EdfEntry {
            deadline,
            order: self.order_offset,
            item,
        });
        self.order_offset += 1;
    }

    /// Pops the earliest-deadline entry, advances time to its deadline and
    /// re-inserts it with `weight_of(item)` (the weight may have changed since
    /// it was queued, e.g. active requests for least request).
    pub fn pick_and_add(&mut self, weight_of: impl Fn(usize) -> f64) -> Option<usize> {
        let entry = self.queue.pop()?;
        debug_assert!(entry.deadline >= self.current_time);
        self.current_time = entry.deadline;
        self.add(weight_of(entry.item), entry.item);
        Some(entry.item)
    }

    /// Number of queued entries.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Envoy's `createWithPicks`: a scheduler over `items` in the state it
    /// would be in after `picks` picks, computed in O(n) instead of O(picks).
    ///
    /// Envoy seeds every EDF-based balancer this way with a random number of
    /// picks so that all Envoys (and every rebuild) do not start hammering the
    /// same host first. For P picks over weights w_i summing to W, each entry
    /// has certainly been picked at least floor(P * w_i / W) times; those picks
    /// are emulated arithmetically and the remaining (< n) picks are performed
    /// one by one. Entries with equal weights may break ties differently from a
    /// literal replay, exactly as in Envoy.
    pub fn create_with_picks(
        items: &[usize],
        weight_of: impl Fn(usize) -> f64,
        picks: u32,
    ) -> Self {
        let picks = picks % MAX_PRE_PICKS;
        if items.is_empty() {
            return Self::new();
        }
        let aug_weight = |item: usize| sane_weight(weight_of(item)) + PRE_PICK_WEIGHT_EPSILON;
        let weights_sum: f64 = items.iter().map(|&it| aug_weight(it)).sum();
        let picks_f = f64::from(picks);

        let mut queue = Vec::with_capacity(items.len());
        let mut picks_so_far: u64 = 0;
        let mut max_pick_time = 0.0_f64;
        for (i, &item) in items.iter().enumerate() {
            let weight = aug_weight(item);
            // Lower bound of this entry's share of the picks; `as` truncates.
            let mut floor_picks = (weight * picks_f / weights_sum) as u32;
            // Floating point can make floor(A*B) exceed A*B; Envoy then gives
            // back one emulated pick and lets the replay loop below do it.
            if floor_picks > 0 && f64::from(floor_picks) / weight >= picks_f / weights_sum {
                floor_picks -= 1;
            }
            let pick_time = f64::from(floor_picks) / weight;
            let deadline = (f64::from(floor_picks) + 1.0) / weight;
            queue.push(EdfEntry {
                deadline,
                order: i as u64,
                item,
            });
            max_pick_time = max_pick_time.max(pick_time);
            picks_so_far += u64::from(floor_picks);
        }

        // Time is the latest moment any entry was (emulated-)picked.
        let mut scheduler = Self {
            queue: BinaryHeap::from(queue),
            current_time: max_pick_time,
            order_offset: items.len() as u64,
        };
        while picks_so_far < u64::from(picks) {
            scheduler.pick_and_add(&weight_of);
            picks_so_far += 1;
        }
        scheduler
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights_fn(weights: &'static [f64]) -> impl Fn(usize) -> f64 {
        move |i| weights[i]
    }

    fn scheduler(weights: &'static [f64]) -> EdfScheduler {
        let mut s = EdfScheduler::new();
        for (i, &w) in weights.iter().enumerate() {
            s.add(w, i);
        }
        s
    }

    #[test]
    fn shares_follow_weights_exactly() {
        const W: &[f64] = &[1.0, 2.0, 3.0, 4.0];
        let mut s = scheduler(W);
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            counts[s.pick_and_add(weights_fn(W)).unwrap()] += 1;
        }
        // 10_000 picks = 1_000 full cycles of 10; allow one pick of slack per
        // host for the partial cycle boundary.
        for (i, &c) in counts.iter().enumerate() {
            let expected = 1_000 * (i as u32 + 1);
            assert!(c.abs_diff(expected) <= 1, "host {i}: {c} vs {expected}");
        }
    }

    #[test]
    fn every_prefix_is_within_one_pick_of_ideal() {
        // Smoothness in the strong sense: after any number of picks, each
        // host has been chosen within one pick of its exact share.
        const W: &[f64] = &[1.0, 2.0, 3.0, 4.0];
        let mut s = scheduler(W);
        let mut counts = [0f64; 4];
        for n in 1..=1_000u32 {
            counts[s.pick_and_add(weights_fn(W)).unwrap()] += 1.0;
            for (i, &c) in counts.iter().enumerate() {
                let ideal = f64::from(n) * W[i] / 10.0;
                assert!(
                    (c - ideal).abs() <= 1.0,
                    "after {n}: host {i} {c} vs {ideal}"
                );
            }
        }
    }

    #[test]
    fn ties_go_to_insertion_order() {
        const W: &[f64] = &[1.0, 1.0, 1.0];
        let mut s = scheduler(W);
        let picks: Vec<_> = (0..6)
            .map(|_| s.pick_and_add(weights_fn(W)).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weights_one_and_five_interleave() {
        // Ideal deadlines: host1 at 0.2, 0.4, ...; host0 at 1, 2, .... Host0
        // wins the exact tie at 1.0 because its entry was queued first. Later
        // "ties" are decided by floating-point drift in the accumulated 0.2
        // steps (as in Envoy, which uses doubles too), so the light host's
        // gap is 6 +/- 1 rather than exactly 6.
        const W: &[f64] = &[1.0, 5.0];
        let mut s = scheduler(W);
        let picks: Vec<_> = (0..600)
            .map(|_| s.pick_and_add(weights_fn(W)).unwrap())
            .collect();
        assert_eq!(&picks[..6], &[1, 1, 1, 1, 0, 1]);
        let zeros: Vec<_> = (0..picks.len()).filter(|&i| picks[i] == 0).collect();
        assert!(zeros.len().abs_diff(100) <= 1, "{}", zeros.len());
        assert!(
            zeros.windows(2).all(|w| (5..=7).contains(&(w[1] - w[0]))),
            "{zeros:?}"
        );
    }

    #[test]
    fn weight_changes_apply_on_reinsert() {
        // Host 0 becomes much lighter after its first pick.
        let mut s = scheduler(&[1.0, 1.0]);
        let first = s.pick_and_add(|i| if i == 0 { 0.01 } else { 1.0 });
        assert_eq!(first, Some(0));
        let next: Vec<_> = (0..10)
            .map(|_| s.pick_and_add(|i| if i == 0 { 0.01 } else { 1.0 }).unwrap())
            .collect();
        assert!(next.iter().all(|&h| h == 1), "{next:?}");
    }

    #[test]
    fn create_with_picks_matches_replaying_the_picks() {
        // Pairwise irrational weight ratios: no two deadlines ever coincide,
        // so tie-breaking (which Envoy documents may differ from a literal
        // replay) cannot affect the comparison.
        const W: &[f64] = &[
            1.0,
            std::f64::consts::SQRT_2,
            1.732_050_807_568_877_2,
            std::f64::consts::E,
            std::f64::consts::PI,
        ];
        let items: Vec<usize> = (0..W.len()).collect();
        for picks in [0u32, 1, 2, 3, 7, 10, 23, 100, 997, 12_345] {
            let mut replayed = scheduler(W);
            for _ in 0..picks {
                replayed.pick_and_add(weights_fn(W));
            }
            let mut fast = EdfScheduler::create_with_picks(&items, weights_fn(W), picks);
            let a: Vec<_> = (0..50)
                .map(|_| replayed.pick_and_add(weights_fn(W)).unwrap())
                .collect();
            let b: Vec<_> = (0..50)
                .map(|_| fast.pick_and_add(weights_fn(W)).unwrap())
                .collect();
            assert_eq!(a, b, "picks={picks}");
        }
    }

    #[test]
    fn create_with_picks_handles_huge_pick_counts_and_empty_input() {
        let empty = EdfScheduler::create_with_picks(&[], |_| 1.0, 5);
        assert!(empty.is_empty());
        let mut s = EdfScheduler::create_with_picks(&[0, 1, 2], |i| (i + 1) as f64, u32::MAX);
        assert_eq!(s.len(), 3);
        let mut counts = [0u32; 3];
        for _ in 0..600 {
            counts[s.pick_and_add(|i| (i + 1) as f64).unwrap()] += 1;
        }
        assert_eq!(counts.iter().sum::<u32>(), 600);
        for (i, &c) in counts.iter().enumerate() {
            assert!(c.abs_diff(100 * (i as u32 + 1)) <= 1, "{counts:?}");
        }
    }
}
