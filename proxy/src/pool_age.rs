//! `max_connection_duration` for a cluster's pooled HTTP connections.
//! Pingora's pool keeps no connection age, so a cluster with the limit
//! pools its connections per generation: the first request after a
//! generation has lasted the limit starts a new one with a new pool key,
//! and the old generation's connections are never handed out again (they
//! close on their idle timeout, held under the limit too). No connection
//! is used once the limit has passed since it was made, as in Envoy;
//! unlike Envoy, a connection made late in a generation retires with it,
//! before its own limit.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Generations {
    max: Duration,
    /// The current generation and when it started.
    current: Mutex<(u64, Option<Instant>)>,
}

impl Generations {
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            current: Mutex::new((0, None)),
        }
    }

    /// The pool key for a connection wanted now: `base` (the cluster's)
    /// mixed with the current generation, rolled over when it is too old.
    pub fn key(&self, base: u64, now: Instant) -> u64 {
        let mut g = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match g.1 {
            None => g.1 = Some(now),
            Some(started) if now.duration_since(started) >= self.max => *g = (g.0 + 1, Some(now)),
            Some(_) => {}
        }
        xxhash_rust::xxh64::xxh64(&g.0.to_le_bytes(), base)
    }

    /// How long a pooled connection may idle: never past the limit.
    pub fn idle_bound(&self, idle: Option<Duration>) -> Option<Duration> {
        Some(idle.map_or(self.max, |i| i.min(self.max)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_lasts_the_limit_from_its_first_request() {
        let g = Generations::new(Duration::from_secs(2));
        let t0 = Instant::now();
        let k0 = g.key(7, t0);
        assert_eq!(g.key(7, t0 + Duration::from_millis(1999)), k0);
        let k1 = g.key(7, t0 + Duration::from_secs(5));
        assert_ne!(k1, k0);
        // The new generation started at its first request (5 s), not at 4 s.
        assert_eq!(g.key(7, t0 + Duration::from_millis(6999)), k1);
        assert_ne!(g.key(7, t0 + Duration::from_secs(7)), k1);
        // Other clusters' keys stay apart.
        assert_ne!(Generations::new(Duration::from_secs(2)).key(8, t0), k0);
    }

    #[test]
    fn idle_connections_never_outlive_the_limit() {
        let g = Generations::new(Duration::from_secs(2));
        assert_eq!(g.idle_bound(None), Some(Duration::from_secs(2)));
        assert_eq!(
            g.idle_bound(Some(Duration::from_secs(1))),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            g.idle_bound(Some(Duration::from_secs(3600))),
            Some(Duration::from_secs(2))
        );
    }
}
