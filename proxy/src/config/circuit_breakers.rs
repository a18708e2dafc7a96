//! A cluster's `circuit_breakers`: limits per routing priority (DEFAULT
//! and HIGH), as Envoy's `ResourceManagers::load` reads them. The first
//! `thresholds` entry of a priority wins (later ones are ignored, as in
//! Envoy); a priority without one gets Envoy's defaults.

use super::{index, join, ConfigError, Result, Wrapped};
use legate_proto::envoy_types::pb::envoy::config::cluster::v3 as pb;
use legate_proto::envoy_types::pb::envoy::config::core::v3::RoutingPriority;

/// Envoy's retry budget: concurrent retries may be `percent` of the active
/// and pending requests, and at least `min_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    pub percent: f64,
    pub min_concurrency: u64,
}

/// One priority's limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    pub max_connections: u64,
    pub max_pending_requests: u64,
    pub max_requests: u64,
    pub max_retries: u64,
    /// Replaces `max_retries` when set.
    pub retry_budget: Option<RetryBudget>,
    /// Publishes the `remaining_*` gauges.
    pub track_remaining: bool,
}

impl Default for Thresholds {
    /// Envoy's defaults: 1024 connections, pending and active requests; 3
    /// concurrent retries.
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
            track_remaining: false,
        }
    }
}

/// Both priorities' limits: index 0 DEFAULT, 1 HIGH.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CircuitBreakers {
    pub priorities: [Thresholds; 2],
    /// `per_host_thresholds[].max_connections` (DEFAULT priority): the
    /// connections one host may have.
    pub per_host_connections: Option<u64>,
}

fn priority(p: i32, path: &str) -> Result<usize> {
    match RoutingPriority::try_from(p) {
        Ok(RoutingPriority::Default) => Ok(0),
        Ok(RoutingPriority::High) => Ok(1),
        Err(_) => Err(ConfigError::new(
            join(path, "priority"),
            format!("unknown priority {p}"),
        )),
    }
}

impl CircuitBreakers {
    pub fn from_proto(cb: Option<&pb::CircuitBreakers>, path: &str) -> Result<Self> {
        let mut out = Self::default();
        let Some(cb) = cb else { return Ok(out) };
        let mut seen = [false; 2];
        for (i, t) in cb.thresholds.iter().enumerate() {
            let p = index(path, "thresholds", i);
            let which = priority(t.priority, &p)?;
            if std::mem::replace(&mut seen[which], true) {
                continue;
            }
            out.priorities[which] = thresholds(t, &p)?;
        }
        let mut seen = [false; 2];
        for (i, t) in cb.per_host_thresholds.iter().enumerate() {
            let p = index(path, "per_host_thresholds", i);
            let which = priority(t.priority, &p)?;
            if std::mem::replace(&mut seen[which], true) {
                continue;
            }
            // Envoy: only max_connections has a per-host meaning.
            if t.max_pending_requests.is_some()
                || t.max_requests.is_some()
                || t.max_retries.is_some()
                || t.max_connection_pools.is_some()
                || t.retry_budget.is_some()
            {
                return Err(ConfigError::new(
                    p,
                    "Unsupported field in per_host_thresholds: only max_connections applies per host",
                ));
            }
            // Legate routes everything at DEFAULT priority (route
            // `priority` is refused), so HIGH limits never apply.
            if which == 0 {
                out.per_host_connections = t.max_connections.map(|m| u64::from(m.value));
            }
        }
        Ok(out)
    }
}

fn thresholds(t: &pb::circuit_breakers::Thresholds, path: &str) -> Result<Thresholds> {
    let d = Thresholds::default();
    if t.max_connection_pools.is_some() {
        // Legate keeps one connection pool per worker for the cluster, not
        // one per host and protocol: there is no pool count to limit.
        return Err(ConfigError::new(
            join(path, "max_connection_pools"),
            "not supported: Legate has no per-host connection pools to count",
        ));
    }
    let retry_budget = t.retry_budget.as_ref().map(|b| RetryBudget {
        percent: b.budget_percent.as_ref().map_or(20.0, |p| p.value),
        min_concurrency: b.min_retry_concurrency.val().map_or(3, u64::from),
    });
    if let Some(b) = retry_budget {
        if !(0.0..=100.0).contains(&b.percent) || b.percent.is_nan() {
            return Err(ConfigError::new(
                join(path, "retry_budget.budget_percent"),
                "must be between 0 and 100",
            ));
        }
    }
    let or = |v: Option<u32>, d: u64| v.map_or(d, u64::from);
    Ok(Thresholds {
        max_connections: or(t.max_connections.val(), d.max_connections),
        max_pending_requests: or(t.max_pending_requests.val(), d.max_pending_requests),
        max_requests: or(t.max_requests.val(), d.max_requests),
        max_retries: or(t.max_retries.val(), d.max_retries),
        retry_budget,
        track_remaining: t.track_remaining,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<CircuitBreakers> {
        let v = legate_proto::json::parse_yaml(yaml).unwrap();
        let dm = legate_proto::json::to_dynamic(v, "envoy.config.cluster.v3.CircuitBreakers", true)
            .unwrap();
        let cb: pb::CircuitBreakers = dm.transcode_to().unwrap();
        CircuitBreakers::from_proto(Some(&cb), "circuit_breakers")
    }

    #[test]
    fn unset_fields_and_priorities_take_envoys_defaults() {
        let cb = parse("thresholds: [{max_retries: 1024}]").unwrap();
        assert_eq!(cb.priorities[0].max_retries, 1024);
        assert_eq!(cb.priorities[0].max_requests, 1024);
        assert_eq!(cb.priorities[1], Thresholds::default());
        assert_eq!(cb.priorities[1].max_retries, 3);
    }

    #[test]
    fn the_first_entry_of_a_priority_wins() {
        let cb = parse(
            "thresholds: [{priority: HIGH, max_requests: 5}, {priority: HIGH, max_requests: 9}]",
        )
        .unwrap();
        assert_eq!(cb.priorities[1].max_requests, 5);
        assert_eq!(cb.priorities[0].max_requests, 1024);
    }

    #[test]
    fn a_retry_budget_has_envoys_defaults() {
        let cb = parse("thresholds: [{retry_budget: {}}]").unwrap();
        assert_eq!(
            cb.priorities[0].retry_budget,
            Some(RetryBudget {
                percent: 20.0,
                min_concurrency: 3
            })
        );
    }

    #[test]
    fn per_host_thresholds_keep_only_max_connections() {
        let err = parse("per_host_thresholds: [{max_requests: 2}]").unwrap_err();
        assert_eq!(err.path, "circuit_breakers.per_host_thresholds[0]");
        let cb = parse("per_host_thresholds: [{max_connections: 2}]").unwrap();
        assert_eq!(cb.per_host_connections, Some(2));
        // HIGH priority limits never apply: Legate routes at DEFAULT.
        let cb = parse("per_host_thresholds: [{priority: HIGH, max_connections: 2}]").unwrap();
        assert_eq!(cb.per_host_connections, None);
    }
}
