//! Envoy-named stats, recorded through the `metrics` crate.
//!
//! [`Store`] is the process's `metrics::Recorder`: counters and gauges are
//! atomics keyed by their full Envoy name (`cluster.web.upstream_rq_total`),
//! so the admin API can list them in Envoy's text, JSON and Prometheus forms.
//! Hot paths keep the returned `metrics::Counter` handles instead of looking
//! names up per request.

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Default)]
pub struct Store {
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    /// Gauges hold f64 bits, as `metrics` stores them.
    gauges: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

static STORE: OnceLock<&'static Store> = OnceLock::new();

/// Installs the store as the global recorder (once per process).
pub fn store() -> &'static Store {
    STORE.get_or_init(|| {
        let s: &'static Store = Box::leak(Box::default());
        // A second recorder can only exist in tests; they still use `s`.
        let _ = metrics::set_global_recorder(StoreRecorder(s));
        s
    })
}

struct StoreRecorder(&'static Store);

impl Recorder for StoreRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.0.counter_cell(key.name()))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.0.gauge_cell(key.name()))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Envoy's `Stats::Utility::sanitizeStatsName`, which every scope prefix
/// goes through: one leading and one trailing `.` dropped, and `://`, `:/`,
/// `:` and NUL each become `_`. So a listener's address stats read
/// `listener.127.0.0.1_80.` and `listener.[__1]_80.`, which tag extractors
/// such as Istio's `listener_address` expect.
pub fn sanitize(name: &str) -> std::borrow::Cow<'_, str> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let trimmed = trimmed.strip_prefix('.').unwrap_or(trimmed);
    if !trimmed.contains([':', '\0']) {
        return std::borrow::Cow::Borrowed(trimmed);
    }
    std::borrow::Cow::Owned(
        trimmed
            .replace("://", "_")
            .replace(":/", "_")
            .replace([':', '\0'], "_"),
    )
}

impl Store {
    fn counter_cell(&self, name: &str) -> Arc<AtomicU64> {
        let name = &*sanitize(name);
        let mut counters = self.counters.lock().unwrap();
        // Found without allocating: the common case after the first use.
        if let Some(c) = counters.get(name) {
            return c.clone();
        }
        counters.entry(name.to_string()).or_default().clone()
    }
    fn gauge_cell(&self, name: &str) -> Arc<AtomicU64> {
        let name = &*sanitize(name);
        self.gauges
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(AtomicU64::new(0f64.to_bits())))
            .clone()
    }

    /// All stats, sorted by name: (name, value, is_counter).
    pub fn snapshot(&self) -> Vec<(String, u64, bool)> {
        let mut out: Vec<_> = self
            .counters
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed), true))
            .collect();
        out.extend(self.gauges.lock().unwrap().iter().map(|(k, v)| {
            (
                k.clone(),
                f64::from_bits(v.load(Ordering::Relaxed)).max(0.0) as u64,
                false,
            )
        }));
        out.sort();
        out
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.snapshot()
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, _)| v)
    }
}

/// A counter handle by full name.
pub fn counter(name: String) -> Counter {
    store();
    metrics::counter!(name)
}

/// Counters under one prefix by fixed name (`<prefix><name>`), each
/// registered on first use and then found again without formatting the
/// name or locking the store: for filters counting outcomes per request.
#[derive(Debug)]
pub struct NamedCounters {
    prefix: String,
    seen: std::sync::RwLock<Vec<(&'static str, Counter)>>,
}

impl NamedCounters {
    pub fn new(prefix: String) -> Self {
        Self {
            prefix,
            seen: Default::default(),
        }
    }

    /// With `names` registered now (shown at zero from the start, as
    /// Envoy's filter stats are).
    pub fn with(prefix: String, names: &[&'static str]) -> Self {
        let seen = names
            .iter()
            .map(|n| (*n, counter(format!("{prefix}{n}"))))
            .collect();
        Self {
            prefix,
            seen: std::sync::RwLock::new(seen),
        }
    }

    pub fn increment(&self, name: &'static str) {
        if let Some((_, c)) = self
            .seen
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(k, _)| *k == name)
        {
            c.increment(1);
            return;
        }
        let c = counter(format!("{}{name}", self.prefix));
        c.increment(1);
        self.seen
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, c));
    }
}

/// Counters by HTTP status under one prefix: the class (`<prefix>2xx`)
/// and, with `per_code`, the code (`<prefix>200`). Each is registered on
/// first use, as Envoy creates them, then found again without allocating.
#[derive(Debug)]
pub struct StatusCounters {
    prefix: String,
    per_code: bool,
    /// Keyed by the code, or by the class digit (1..=5) for classes.
    seen: std::sync::RwLock<Vec<(u16, Counter)>>,
}

impl StatusCounters {
    pub fn new(prefix: String, per_code: bool) -> Self {
        Self {
            prefix,
            per_code,
            seen: Default::default(),
        }
    }

    pub fn record(&self, status: u16) {
        self.bump(status / 100);
        if self.per_code {
            self.bump(status);
        }
    }

    fn bump(&self, key: u16) {
        if let Some((_, c)) = self.seen.read().unwrap().iter().find(|(k, _)| *k == key) {
            c.increment(1);
            return;
        }
        let name = if key < 10 {
            format!("{}{key}xx", self.prefix)
        } else {
            format!("{}{key}", self.prefix)
        };
        let c = counter(name);
        c.increment(1);
        self.seen.write().unwrap().push((key, c));
    }
}

/// A connection manager's request counters (`http.<stat_prefix>.*`),
/// registered once rather than looked up by name per request.
#[derive(Debug)]
pub struct HttpStats {
    pub downstream_cx_total: Counter,
    pub downstream_rq_total: Counter,
    pub downstream_rq_completed: Counter,
    pub downstream_rq: StatusCounters,
    pub no_route: Counter,
    pub no_cluster: Counter,
    pub downstream_rq_timeout: Counter,
    pub downstream_rq_idle_timeout: Counter,
    /// A body a filter buffers was over its limit (413).
    pub downstream_rq_too_large: Counter,
    pub downstream_rq_max_duration_reached: Counter,
}

impl HttpStats {
    pub fn new(stat_prefix: &str) -> Self {
        let p = format!("http.{stat_prefix}.");
        let c = |s: &str| counter(format!("{p}{s}"));
        Self {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_rq_total: c("downstream_rq_total"),
            downstream_rq_completed: c("downstream_rq_completed"),
            downstream_rq: StatusCounters::new(format!("{p}downstream_rq_"), false),
            no_route: c("no_route"),
            no_cluster: c("no_cluster"),
            downstream_rq_timeout: c("downstream_rq_timeout"),
            downstream_rq_idle_timeout: c("downstream_rq_idle_timeout"),
            downstream_rq_too_large: c("downstream_rq_too_large"),
            downstream_rq_max_duration_reached: c("downstream_rq_max_duration_reached"),
        }
    }
}

/// A gauge handle by full name.
pub fn gauge(name: String) -> Gauge {
    store();
    metrics::gauge!(name)
}

/// Envoy's Prometheus name: `envoy_` prefix, non-alphanumerics to `_`.
pub fn prometheus_name(name: &str) -> String {
    let mut s = String::from("envoy_");
    s.extend(
        name.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_are_recorded_by_name() {
        counter("test.a_total".into()).increment(3);
        gauge("test.g".into()).set(7.0);
        assert_eq!(store().get("test.a_total"), Some(3));
        assert_eq!(store().get("test.g"), Some(7));
        assert_eq!(
            prometheus_name("cluster.a-b.upstream_rq"),
            "envoy_cluster_a_b_upstream_rq"
        );
    }

    #[test]
    fn names_are_sanitized_as_envoy_does() {
        for (given, want) in [
            ("listener.127.0.0.1:80.x", "listener.127.0.0.1_80.x"),
            ("listener.[::1]:80.x", "listener.[__1]_80.x"),
            ("listener.[fd00::1:4]:80.x", "listener.[fd00__1_4]_80.x"),
            ("http.unix://a.x", "http.unix_a.x"),
            ("http.a:/b.x", "http.a_b.x"),
            ("plain.name", "plain.name"),
        ] {
            assert_eq!(sanitize(given), want, "{given}");
        }
        counter("test.[::1]:9.c".into()).increment(1);
        assert_eq!(store().get("test.[__1]_9.c"), Some(1));
        assert_eq!(store().get("test.[::1]:9.c"), None);
    }

    #[test]
    fn status_counters_count_classes_and_codes_once_registered() {
        let s = StatusCounters::new("test.sc.upstream_rq_".into(), true);
        for code in [200, 503, 200, 204] {
            s.record(code);
        }
        let got = |n: &str| store().get(&format!("test.sc.upstream_rq_{n}"));
        assert_eq!(got("2xx"), Some(3));
        assert_eq!(got("5xx"), Some(1));
        assert_eq!(got("200"), Some(2));
        assert_eq!(got("204"), Some(1));
        assert_eq!(got("4xx"), None, "never seen, never registered");
        let d = StatusCounters::new("test.sc.downstream_rq_".into(), false);
        d.record(404);
        assert_eq!(store().get("test.sc.downstream_rq_4xx"), Some(1));
        assert_eq!(store().get("test.sc.downstream_rq_404"), None);
    }
}
