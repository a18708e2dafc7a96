//! Circuit breakers' live state: per cluster and routing priority, the
//! connections, pending requests, active requests and retries in use,
//! checked against [`crate::config::circuit_breakers`]'s limits, with
//! Envoy's `circuit_breakers.<priority>.*` gauges. A slot is taken with
//! `try_acquire` and given back when its [`Slot`] drops, so every path
//! (success, reset, timeout, retry, client abort) releases it.

use crate::config::circuit_breakers::{CircuitBreakers, Thresholds};
use crate::stats;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One limited resource.
pub struct Resource {
    max: u64,
    count: AtomicU64,
    open: metrics::Gauge,
    remaining: Option<metrics::Gauge>,
    /// Woken when a slot is given back (pending requests wait on it).
    freed: tokio::sync::Notify,
}

impl Resource {
    /// A limit without gauges of its own (a host's connections: Envoy
    /// keeps no per-host breaker gauges).
    pub fn unpublished(max: u64) -> Arc<Self> {
        Arc::new(Self {
            max,
            count: AtomicU64::new(0),
            open: metrics::Gauge::noop(),
            remaining: None,
            freed: tokio::sync::Notify::new(),
        })
    }

    fn new(max: u64, prefix: &str, open: &str, remaining: Option<&str>) -> Arc<Self> {
        let r = Arc::new(Self {
            max,
            count: AtomicU64::new(0),
            open: stats::gauge(format!("{prefix}{open}")),
            remaining: remaining.map(|n| stats::gauge(format!("{prefix}{n}"))),
            freed: tokio::sync::Notify::new(),
        });
        r.open.set(if max > 0 { 0.0 } else { 1.0 });
        if let Some(g) = &r.remaining {
            g.set(max as f64);
        }
        r
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The gauges after the count went from `before` to `after`: the open
    /// gauge is written only when the limit is crossed (every request
    /// takes and gives back slots, and most never reach a limit).
    fn publish(&self, before: u64, after: u64) {
        if (before < self.max) != (after < self.max) {
            self.open.set(if after < self.max { 0.0 } else { 1.0 });
        }
        if let Some(g) = &self.remaining {
            g.set(self.max.saturating_sub(after) as f64);
        }
    }

    /// A slot when fewer than `max` are in use.
    fn try_acquire_under(self: &Arc<Self>, max: u64) -> Option<Slot> {
        let mut n = self.count.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match self
                .count
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.publish(n, n + 1);
                    return Some(Slot(self.clone()));
                }
                Err(now) => n = now,
            }
        }
    }

    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.try_acquire_under(self.max)
    }

    /// A slot even over the limit: Envoy opens a pool's first connection
    /// whatever `max_connections` says, so a cluster never starves.
    pub fn acquire_over_limit(self: &Arc<Self>) -> Slot {
        let n = self.count.fetch_add(1, Ordering::AcqRel);
        self.publish(n, n + 1);
        Slot(self.clone())
    }

    /// Waits for a slot.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(s) = self.try_acquire() {
                return s;
            }
            freed.await;
        }
    }
}

/// A resource slot in use; given back when dropped.
pub struct Slot(Arc<Resource>);

impl Drop for Slot {
    fn drop(&mut self) {
        let n = self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.publish(n, n - 1);
        self.0.freed.notify_one();
    }
}

/// One priority's resources.
pub struct Priority {
    pub thresholds: Thresholds,
    pub connections: Arc<Resource>,
    pub pending: Arc<Resource>,
    pub requests: Arc<Resource>,
    pub retries: Arc<Resource>,
}

impl Priority {
    fn new(cluster: &str, name: &str, t: &Thresholds) -> Self {
        let prefix = format!("cluster.{cluster}.circuit_breakers.{name}.");
        let rem = |n: &'static str| t.track_remaining.then_some(n);
        // Envoy publishes the pool gauges too; Legate has no pools to count.
        stats::gauge(format!("{prefix}cx_pool_open")).set(0.0);
        if t.track_remaining {
            stats::gauge(format!("{prefix}remaining_cx_pools")).set(u64::MAX as f64);
        }
        Self {
            connections: Resource::new(t.max_connections, &prefix, "cx_open", rem("remaining_cx")),
            pending: Resource::new(
                t.max_pending_requests,
                &prefix,
                "rq_pending_open",
                rem("remaining_pending"),
            ),
            requests: Resource::new(t.max_requests, &prefix, "rq_open", rem("remaining_rq")),
            retries: Resource::new(
                t.max_retries,
                &prefix,
                "rq_retry_open",
                rem("remaining_retries"),
            ),
            thresholds: t.clone(),
        }
    }

    /// A retry slot: under `max_retries`, or under the retry budget when
    /// one is set (a share of the active and pending requests, with a
    /// floor), as Envoy's `RetryBudgetImpl`.
    pub fn try_retry(&self) -> Option<Slot> {
        match self.thresholds.retry_budget {
            None => self.retries.try_acquire(),
            Some(b) => {
                let load = self.requests.count() + self.pending.count();
                let max = ((b.percent / 100.0 * load as f64) as u64).max(b.min_concurrency);
                let slot = self.retries.try_acquire_under(max);
                // Envoy shows no retries remaining while a budget decides.
                if let Some(g) = &self.retries.remaining {
                    g.set(0.0);
                }
                slot
            }
        }
    }
}

/// A cluster's circuit breakers: DEFAULT and HIGH priority.
pub struct Breakers {
    pub priorities: [Priority; 2],
}

impl Breakers {
    pub fn new(cluster: &str, cb: &CircuitBreakers) -> Self {
        Self {
            priorities: [
                Priority::new(cluster, "default", &cb.priorities[0]),
                Priority::new(cluster, "high", &cb.priorities[1]),
            ],
        }
    }

    /// The DEFAULT priority (Legate routes everything at it: route
    /// `priority` is not supported).
    pub fn default_priority(&self) -> &Priority {
        &self.priorities[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::circuit_breakers::RetryBudget;

    fn breakers(t: Thresholds) -> Breakers {
        let cb = CircuitBreakers {
            priorities: [t, Thresholds::default()],
            per_host_connections: None,
        };
        Breakers::new(&format!("cb-test-{}", rand::random::<u32>()), &cb)
    }

    #[test]
    fn slots_are_given_back_on_drop_and_never_go_negative() {
        let b = breakers(Thresholds {
            max_requests: 2,
            ..Default::default()
        });
        let p = b.default_priority();
        let one = p.requests.try_acquire().unwrap();
        let two = p.requests.try_acquire().unwrap();
        assert!(
            p.requests.try_acquire().is_none(),
            "a third is over the limit"
        );
        drop(one);
        let three = p.requests.try_acquire().unwrap();
        drop((two, three));
        assert_eq!(p.requests.count(), 0);
    }

    #[test]
    fn the_retry_budget_is_a_share_of_active_and_pending_requests() {
        let b = breakers(Thresholds {
            retry_budget: Some(RetryBudget {
                percent: 50.0,
                min_concurrency: 1,
            }),
            max_retries: 0,
            ..Default::default()
        });
        let p = b.default_priority();
        // No load: the floor of 1 (max_retries 0 no longer applies).
        let first = p.try_retry().unwrap();
        assert!(p.try_retry().is_none());
        // 6 active requests: 50 % is 3 concurrent retries.
        let active: Vec<_> = (0..6).map(|_| p.requests.try_acquire().unwrap()).collect();
        let more: Vec<_> = (0..2).map(|_| p.try_retry().unwrap()).collect();
        assert!(p.try_retry().is_none());
        drop((first, more, active));
        assert_eq!(p.retries.count(), 0);
    }

    #[tokio::test]
    async fn a_waiter_gets_the_slot_given_back() {
        let b = breakers(Thresholds {
            max_connections: 1,
            ..Default::default()
        });
        let cx = b.default_priority().connections.clone();
        let held = cx.try_acquire().unwrap();
        let waiter = tokio::spawn({
            let cx = cx.clone();
            async move { cx.acquire().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter was woken")
            .unwrap();
        drop(got);
        assert_eq!(cx.count(), 0);
    }
}
