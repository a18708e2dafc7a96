//! Istio's metrics: counters and histograms with labels, in the custom stat
//! namespace `istiocustom`. Istio's proxy creates them with native tags, so
//! `/stats/prometheus` prints `istio_requests_total{reporter="source",...}`
//! (no `envoy_` prefix: Envoy strips a custom namespace), and `/stats`
//! prints the full name with each tag and value joined in.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Envoy's default histogram buckets (Istio sets none).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// A metric's labels, in their order.
pub type Labels = Vec<(String, String)>;

/// One histogram series.
#[derive(Default)]
pub struct Histogram {
    /// Per bucket (not cumulative), then the values above every bound.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum: AtomicU64,
}

impl Histogram {
    pub fn record(&self, v: u64) {
        let i = BUCKETS
            .iter()
            .position(|&b| v as f64 <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }
}

/// Series kept per kind. Label values come from peers (the peer metadata
/// header any client can send) and from CEL over requests, so the number
/// of series is not the config's to bound: past this, new series are
/// dropped and counted in `istio.metrics_overflow`. (Istio's proxy keeps
/// them in an evictable scope instead.)
pub const MAX_SERIES: usize = 10_000;

type Series<T> = Mutex<BTreeMap<(String, Labels), Arc<T>>>;

/// The series' cell, made if there is room.
fn cell<T: Default>(map: &Series<T>, name: &str, labels: Labels) -> Option<Arc<T>> {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    let key = (name.to_string(), labels);
    if let Some(c) = m.get(&key) {
        return Some(c.clone());
    }
    if m.len() >= MAX_SERIES {
        crate::stats::counter("istio.metrics_overflow".into()).increment(1);
        return None;
    }
    Some(m.entry(key).or_default().clone())
}

/// The series, taken under the lock and read after it (a scrape does not
/// hold up the streams recording).
fn snapshot<T>(map: &Series<T>) -> Vec<((String, Labels), Arc<T>)> {
    let m = map.lock().unwrap_or_else(|e| e.into_inner());
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[derive(Default)]
pub struct Store {
    counters: Series<AtomicU64>,
    histograms: Series<Histogram>,
    gauges: Series<AtomicU64>,
}

pub fn store() -> &'static Store {
    static S: OnceLock<Store> = OnceLock::new();
    S.get_or_init(Store::default)
}

impl Store {
    pub fn add(&self, name: &str, labels: Labels, n: u64) {
        if let Some(c) = cell(&self.counters, name, labels) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn record(&self, name: &str, labels: Labels, v: u64) {
        if let Some(h) = cell(&self.histograms, name, labels) {
            h.record(v);
        }
    }

    pub fn set(&self, name: &str, labels: Labels, v: u64) {
        if let Some(g) = cell(&self.gauges, name, labels) {
            g.store(v, Ordering::Relaxed);
        }
    }

    /// The counter's value, for tests and checks.
    pub fn counter(&self, name: &str, labels: &Labels) -> u64 {
        let m = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&(name.to_string(), labels.clone()))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Prometheus text, as Envoy prints natively tagged stats.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let typed = |out: &mut String, last: &mut String, name: &str, kind: &str| {
            if last != name {
                out.push_str(&format!("# TYPE {name} {kind}\n"));
                *last = name.to_string();
            }
        };
        let mut last = String::new();
        for ((name, labels), v) in &snapshot(&self.counters) {
            typed(&mut out, &mut last, name, "counter");
            out.push_str(&format!(
                "{name}{} {}\n",
                render(labels, None),
                v.load(Ordering::Relaxed)
            ));
        }
        for ((name, labels), v) in &snapshot(&self.gauges) {
            typed(&mut out, &mut last, name, "gauge");
            out.push_str(&format!(
                "{name}{} {}\n",
                render(labels, None),
                v.load(Ordering::Relaxed)
            ));
        }
        for ((name, labels), h) in &snapshot(&self.histograms) {
            typed(&mut out, &mut last, name, "histogram");
            let mut total = 0;
            for (i, c) in h.counts.iter().enumerate() {
                total += c.load(Ordering::Relaxed);
                let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                out.push_str(&format!(
                    "{name}_bucket{} {total}\n",
                    render(labels, Some(&le))
                ));
            }
            let l = render(labels, None);
            out.push_str(&format!(
                "{name}_sum{l} {}\n",
                h.sum.load(Ordering::Relaxed)
            ));
            out.push_str(&format!("{name}_count{l} {total}\n"));
        }
        out
    }

    /// `/stats` lines: `istiocustom.<name>.<tag>.<value>...: <value>`.
    pub fn text(&self) -> Vec<(String, u64)> {
        let full = |name: &str, labels: &Labels| {
            let mut s = format!("istiocustom.{name}");
            for (k, v) in labels {
                s.push_str(&format!(".{k}.{v}"));
            }
            s
        };
        let mut out = Vec::new();
        for ((name, labels), v) in &snapshot(&self.counters) {
            out.push((full(name, labels), v.load(Ordering::Relaxed)));
        }
        for ((name, labels), v) in &snapshot(&self.gauges) {
            out.push((full(name, labels), v.load(Ordering::Relaxed)));
        }
        out
    }
}

/// `{k="v",...}` with Prometheus escaping, `le` last for buckets.
fn render(labels: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{}=\"{}\"", sanitize(k), escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    format!("{{{}}}", parts.join(","))
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_print_as_prometheus() {
        let s = Store::default();
        let l = vec![
            ("reporter".to_string(), "source".to_string()),
            ("a-b".into(), "q\"".into()),
        ];
        s.add("istio_requests_total", l.clone(), 2);
        s.record("istio_request_duration_milliseconds", l.clone(), 3);
        s.record("istio_request_duration_milliseconds", l.clone(), 7_000_000);
        let p = s.prometheus();
        assert!(p.contains("# TYPE istio_requests_total counter\nistio_requests_total{reporter=\"source\",a_b=\"q\\\"\"} 2\n"), "{p}");
        assert!(p.contains("istio_request_duration_milliseconds_bucket{reporter=\"source\",a_b=\"q\\\"\",le=\"1\"} 0\n"), "{p}");
        assert!(p.contains("le=\"5\"} 1\n"), "{p}");
        assert!(p.contains("le=\"3600000\"} 1\n"), "{p}");
        assert!(p.contains("le=\"+Inf\"} 2\n"), "{p}");
        assert!(p.contains("istio_request_duration_milliseconds_sum{reporter=\"source\",a_b=\"q\\\"\"} 7000003\n"), "{p}");
        assert_eq!(s.counter("istio_requests_total", &l), 2);
        assert_eq!(
            s.text()[0].0,
            "istiocustom.istio_requests_total.reporter.source.a-b.q\""
        );
    }

    /// Peers choose label values: the series stop growing at the cap.
    #[test]
    fn series_are_capped() {
        let s = Store::default();
        let l = |i: usize| vec![("source_workload".to_string(), i.to_string())];
        for i in 0..MAX_SERIES + 10 {
            s.add("istio_requests_total", l(i), 1);
        }
        assert_eq!(s.text().len(), MAX_SERIES);
        // An existing series still counts.
        s.add("istio_requests_total", l(0), 1);
        assert_eq!(s.counter("istio_requests_total", &l(0)), 2);
    }
}
