//! The bootstrap's `overload_manager`, as far as Legate runs it: the
//! global downstream connection limit. A connection accepted over the
//! limit is closed at once and counted in
//! `listener.<prefix>.downstream_global_cx_overflow`. The limit comes
//! from one of two places, which Envoy 1.40 treats differently (checked
//! against it):
//! - the `envoy.resource_monitors.global_downstream_max_connections`
//!   monitor: listeners with `ignore_global_conn_limit` or
//!   `bypass_overload_manager`, and the admin listener (which bypasses
//!   the overload manager), neither count nor are refused;
//! - the deprecated `overload.global_downstream_max_connections` runtime
//!   key, used when no monitor is configured: every accepted connection
//!   counts, and only `ignore_global_conn_limit` (the admin's own, for
//!   the admin listener) exempts a listener from refusal.
//!
//! Overload actions and load shed points change traffic under pressure;
//! Legate does not run them, so the field registry refuses them naming
//! the field. Other resource monitors only feed actions, so without
//! actions they change nothing and are accepted with a warning.

use crate::config::{index, join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::overload::v3::OverloadManager;
use legate_proto::envoy_types::pb::envoy::extensions::resource_monitors::downstream_connections::v3::DownstreamConnectionsConfig;
use std::sync::atomic::{AtomicU64, Ordering};

/// The monitor's config type: Envoy picks the proactive monitor by it.
const DOWNSTREAM_CONNECTIONS: &str =
    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

/// The name Envoy knows the limit's monitor by.
const MONITOR_NAME: &str = "envoy.resource_monitors.global_downstream_max_connections";

/// The deprecated runtime key for the same limit; the monitor wins.
pub const RUNTIME_KEY: &str = "overload.global_downstream_max_connections";

/// What of `overload_manager` Legate runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverloadConfig {
    /// `max_active_downstream_connections` of the connections monitor.
    pub max_connections: Option<u64>,
}

impl OverloadConfig {
    pub fn from_proto(o: &OverloadManager, path: &str) -> Result<Self> {
        // `actions` and `loadshed_points` are refused by the field registry.
        let mut out = Self::default();
        for (i, m) in o.resource_monitors.iter().enumerate() {
            let p = index(path, "resource_monitors", i);
            let Some(a) = m.config_type.as_ref().map(|c| match c {
                legate_proto::envoy_types::pb::envoy::config::overload::v3::resource_monitor::ConfigType::TypedConfig(a) => a,
            }) else {
                continue;
            };
            // Envoy makes the limit's (proactive) monitor by its name, then
            // needs its config type; either alone finds no implementation.
            let typed = legate_proto::type_name(&a.type_url) == DOWNSTREAM_CONNECTIONS;
            match (m.name == MONITOR_NAME, typed) {
                (false, false) => continue,
                (true, true) => {}
                _ => {
                    return Err(ConfigError::new(
                        join(&p, "name"),
                        format!(
                            "Didn't find a registered implementation for '{}' with type {}: the connection limit's monitor is named {MONITOR_NAME} with {DOWNSTREAM_CONNECTIONS}",
                            m.name,
                            legate_proto::type_name(&a.type_url)
                        ),
                    ))
                }
            }
            let c: DownstreamConnectionsConfig =
                crate::http_filters::decode(a, &join(&p, "typed_config"))?;
            if out.max_connections.is_some() {
                return Err(ConfigError::new(
                    join(&p, "name"),
                    "the downstream connections monitor is configured twice",
                ));
            }
            out.max_connections = Some(c.max_active_downstream_connections.max(0) as u64);
        }
        Ok(out)
    }
}

/// Connections that count against the limit, process-wide.
static ACTIVE: AtomicU64 = AtomicU64::new(0);
/// The monitor's limit; `u64::MAX` when there is none.
static MONITOR: AtomicU64 = AtomicU64::new(u64::MAX);
/// The runtime key's limit; `u64::MAX` when unset.
static RUNTIME: AtomicU64 = AtomicU64::new(u64::MAX);

/// Sets the monitor's limit (the bootstrap's; it cannot change over xDS).
pub fn set_limit(max: Option<u64>) {
    MONITOR.store(max.unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Sets the runtime key's limit from the current runtime (the bootstrap's
/// static layers, then each RTDS update), as Envoy reads it at each accept.
pub fn set_runtime(runtime: &crate::runtime::Runtime) {
    // A static layer's numbers arrive as doubles (protobuf Struct); a
    // negative or non-numeric value is no integer, so no limit.
    let v = runtime.get(RUNTIME_KEY).and_then(|v| match v {
        serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
        v => v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }),
    });
    RUNTIME.store(v.unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// A connection's place under the limit, given back when dropped.
#[derive(Debug)]
pub struct Slot(());

impl Drop for Slot {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A place for a new connection, or None when `limit` is reached.
fn try_allocate(limit: u64) -> Option<Slot> {
    ACTIVE
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < limit).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(()))
}

/// Connections counted now (for tests and the admin's view).
pub fn active() -> u64 {
    ACTIVE.load(Ordering::Relaxed)
}

/// A connection refused because the global limit is reached.
#[derive(Debug, thiserror::Error)]
#[error("the global downstream connection limit is reached")]
pub struct Overflow;

/// What exempts a listener from the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exempt {
    /// `ignore_global_conn_limit`.
    pub ignore_limit: bool,
    /// `bypass_overload_manager` (always, for the admin listener).
    pub bypass: bool,
}

/// The gate a listener puts each accepted connection through: its place
/// (None when it does not count), or the overflow, counted under the
/// listener's stat prefix.
pub fn admit(exempt: Exempt, stat_prefix: &str) -> std::result::Result<Option<Slot>, Overflow> {
    let monitor = MONITOR.load(Ordering::Relaxed);
    let slot = if monitor != u64::MAX {
        if exempt.ignore_limit || exempt.bypass {
            return Ok(None);
        }
        try_allocate(monitor)
    } else if exempt.ignore_limit {
        // The runtime key counts every accepted connection.
        try_allocate(u64::MAX)
    } else {
        try_allocate(RUNTIME.load(Ordering::Relaxed))
    };
    match slot {
        Some(s) => Ok(Some(s)),
        None => {
            crate::stats::counter(format!("{stat_prefix}.downstream_global_cx_overflow"))
                .increment(1);
            Err(Overflow)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Result<OverloadConfig> {
        let v = legate_proto::json::parse_yaml(yaml).unwrap();
        let msg: OverloadManager =
            legate_proto::json::to_message(v, "envoy.config.overload.v3.OverloadManager", true)
                .unwrap();
        OverloadConfig::from_proto(&msg, "overload_manager")
    }

    #[test]
    fn the_connections_monitor_sets_the_limit() {
        let c = config(
            r#"
resource_monitors:
- name: envoy.resource_monitors.global_downstream_max_connections
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
    max_active_downstream_connections: 50000
- name: envoy.resource_monitors.fixed_heap
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig
    max_heap_size_bytes: 1000
"#,
        )
        .unwrap();
        assert_eq!(c.max_connections, Some(50000));
    }

    /// Envoy 1.40 refuses the connections config under another name:
    /// "Didn't find a registered implementation".
    #[test]
    fn the_monitor_needs_its_name() {
        let e = config(
            r#"
resource_monitors:
- name: envoy.resource_monitors.downstream_connections
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
    max_active_downstream_connections: 5
"#,
        )
        .unwrap_err();
        assert_eq!(e.path, "overload_manager.resource_monitors[0].name");
    }
}
