//! Passive health (outlier detection), Envoy's detectors over each
//! upstream request's outcome: consecutive 5xx, consecutive gateway
//! failures (502-504), consecutive local-origin failures (with
//! `split_external_local_origin_errors`), and at each interval success
//! rate and failure percentage over the previous interval's requests.
//! An ejected host is unhealthy to the load balancer (and to panic mode)
//! until `min(base x backoff, max) + jitter` has passed, checked at
//! interval ticks as Envoy checks it. Live state only; the limits are
//! [`OutlierConfig`].

use crate::config::outlier::OutlierConfig;
use crate::stats;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What one upstream attempt came to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The upstream answered with this status (a gRPC status in the
    /// response headers already mapped to its HTTP code).
    Response(u16),
    /// Connecting failed or the connection was reset (Envoy: 503).
    ConnectFailed,
    /// No answer in time (Envoy: 504).
    Timeout,
    /// A TCP proxy's connection was established (Envoy: 200).
    Connected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    LocalOriginSuccessRate,
    FailurePercentage,
    LocalOriginFailurePercentage,
}

impl Kind {
    fn stat(self) -> &'static str {
        match self {
            Kind::Consecutive5xx => "consecutive_5xx",
            Kind::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            Kind::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
            Kind::SuccessRate => "success_rate",
            Kind::LocalOriginSuccessRate => "local_origin_success_rate",
            Kind::FailurePercentage => "failure_percentage",
            Kind::LocalOriginFailurePercentage => "local_origin_failure_percentage",
        }
    }
}

/// Requests and successes in the current interval and the one before.
#[derive(Debug, Default)]
struct Rates {
    total: u64,
    success: u64,
    previous: (u64, u64),
}

impl Rates {
    fn add(&mut self, ok: bool) {
        self.total += 1;
        self.success += u64::from(ok);
    }
    fn swap(&mut self) {
        self.previous = (
            std::mem::take(&mut self.total),
            std::mem::take(&mut self.success),
        );
    }
    /// The previous interval's volume and success rate (percent).
    fn last(&self) -> Option<(u64, f64)> {
        let (t, s) = self.previous;
        (t > 0).then(|| (t, 100.0 * s as f64 / t as f64))
    }
}

#[derive(Debug, Default)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    external: Rates,
    local: Rates,
    ejected_at: Option<Instant>,
    jitter: Duration,
    /// Multiplies the base ejection time; grows with each ejection and
    /// decays one per interval while the host stays healthy.
    backoff: u32,
    unejected_at: Option<Instant>,
}

struct State {
    hosts: HashMap<SocketAddr, Host>,
    active: usize,
}

/// One cluster's detector.
pub struct Detector {
    cfg: OutlierConfig,
    prefix: String,
    state: Mutex<State>,
    active_gauge: metrics::Gauge,
    /// Random numbers for enforcement rolls and jitter (fixed in tests).
    random: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl Detector {
    pub fn new(cluster: &str, cfg: OutlierConfig) -> Self {
        Self::with_random(cluster, cfg, Box::new(rand::random::<u64>))
    }

    pub fn with_random(
        cluster: &str,
        cfg: OutlierConfig,
        random: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        let prefix = format!("cluster.{cluster}.outlier_detection.");
        let active_gauge = stats::gauge(format!("{prefix}ejections_active"));
        active_gauge.set(0.0);
        // Envoy creates every counter with the detector, so each shows 0.
        let kinds = [
            Kind::Consecutive5xx,
            Kind::ConsecutiveGatewayFailure,
            Kind::ConsecutiveLocalOriginFailure,
            Kind::SuccessRate,
            Kind::LocalOriginSuccessRate,
            Kind::FailurePercentage,
            Kind::LocalOriginFailurePercentage,
        ];
        let names = kinds
            .iter()
            .flat_map(|k| ["detected", "enforced"].map(|w| format!("ejections_{w}_{}", k.stat())))
            .chain(
                [
                    "ejections_enforced_total",
                    "ejections_overflow",
                    "ejections_total",
                    "ejections_consecutive_5xx",
                    "ejections_success_rate",
                    "ejections_detected_degradation",
                ]
                .map(str::to_string),
            );
        for n in names {
            stats::counter(format!("{prefix}{n}")).increment(0);
        }
        Self {
            cfg,
            prefix,
            state: Mutex::new(State {
                hosts: HashMap::new(),
                active: 0,
            }),
            active_gauge,
            random,
        }
    }

    pub fn interval(&self) -> Duration {
        self.cfg.interval
    }

    fn count(&self, what: &str) {
        stats::counter(format!("{}{what}", self.prefix)).increment(1);
    }

    /// Keeps state for exactly these hosts: a removed host forgets its
    /// ejection, as Envoy's monitor goes with the host.
    pub fn set_hosts(&self, addrs: &[SocketAddr]) {
        let mut st = self.state.lock().unwrap();
        let before = st.active;
        st.hosts.retain(|a, _| addrs.contains(a));
        for a in addrs {
            st.hosts.entry(*a).or_default();
        }
        st.active = st.hosts.values().filter(|h| h.ejected_at.is_some()).count();
        if st.active != before {
            self.active_gauge.set(st.active as f64);
        }
    }

    pub fn is_ejected(&self, addr: &SocketAddr) -> bool {
        self.state
            .lock()
            .unwrap()
            .hosts
            .get(addr)
            .is_some_and(|h| h.ejected_at.is_some())
    }

    /// Records an attempt's outcome on `addr`; true when a host was ejected.
    pub fn report(&self, addr: SocketAddr, outcome: Outcome, now: Instant) -> bool {
        let mut st = self.state.lock().unwrap();
        let split = self.cfg.split_external_local_origin_errors;
        let code = match (outcome, split) {
            (Outcome::Response(c), _) => c,
            (Outcome::ConnectFailed, false) => 503,
            (Outcome::Timeout, false) => 504,
            (Outcome::Connected, false) => 200,
            (Outcome::ConnectFailed | Outcome::Timeout, true) => {
                let Some(h) = st.hosts.get_mut(&addr) else {
                    return false;
                };
                h.local.add(false);
                h.consecutive_local += 1;
                let fire = h.consecutive_local == self.cfg.consecutive_local_origin_failure;
                return fire
                    && self.consecutive(&mut st, addr, Kind::ConsecutiveLocalOriginFailure, now);
            }
            (Outcome::Connected, true) => {
                if let Some(h) = st.hosts.get_mut(&addr) {
                    h.local.add(true);
                    h.consecutive_local = 0;
                }
                return false;
            }
        };
        let Some(h) = st.hosts.get_mut(&addr) else {
            return false;
        };
        h.external.add(code < 500);
        if !(500..600).contains(&code) {
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            return false;
        }
        let gateway = (502..=504).contains(&code);
        if gateway {
            h.consecutive_gateway += 1;
        } else {
            h.consecutive_gateway = 0;
        }
        h.consecutive_5xx += 1;
        let fire_gw = gateway && h.consecutive_gateway == self.cfg.consecutive_gateway_failure;
        let fire_5xx = h.consecutive_5xx == self.cfg.consecutive_5xx;
        let mut ejected = false;
        if fire_gw {
            ejected |= self.consecutive(&mut st, addr, Kind::ConsecutiveGatewayFailure, now);
        }
        if fire_5xx {
            ejected |= self.consecutive(&mut st, addr, Kind::Consecutive5xx, now);
        }
        ejected
    }

    /// A consecutive-failure detection: counted, ejected if the limits and
    /// the enforcement roll allow, and its streak restarted (unless the host
    /// was already out, as in Envoy).
    fn consecutive(&self, st: &mut State, addr: SocketAddr, kind: Kind, now: Instant) -> bool {
        if st.hosts.get(&addr).is_none_or(|h| h.ejected_at.is_some()) {
            return false;
        }
        self.count(&format!("ejections_detected_{}", kind.stat()));
        if kind == Kind::Consecutive5xx {
            self.count("ejections_consecutive_5xx");
        }
        let ejected = self.eject(st, addr, kind, now);
        if let Some(h) = st.hosts.get_mut(&addr) {
            match kind {
                Kind::Consecutive5xx => h.consecutive_5xx = 0,
                Kind::ConsecutiveGatewayFailure => h.consecutive_gateway = 0,
                _ => h.consecutive_local = 0,
            }
        }
        ejected
    }

    fn enforcing(&self, kind: Kind) -> u32 {
        let c = &self.cfg;
        match kind {
            Kind::Consecutive5xx => c.enforcing_consecutive_5xx,
            Kind::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            Kind::ConsecutiveLocalOriginFailure => c.enforcing_consecutive_local_origin_failure,
            Kind::SuccessRate => c.enforcing_success_rate,
            Kind::LocalOriginSuccessRate => c.enforcing_local_origin_success_rate,
            Kind::FailurePercentage => c.enforcing_failure_percentage,
            Kind::LocalOriginFailurePercentage => c.enforcing_failure_percentage_local_origin,
        }
    }

    /// Envoy's `ejectHost`: at most `max_ejection_percent` of all hosts out
    /// (counting this one; `always_eject_one_host` lets one out whatever
    /// the percentage), then the enforcement roll.
    fn eject(&self, st: &mut State, addr: SocketAddr, kind: Kind, now: Instant) -> bool {
        let total = st.hosts.len().max(1);
        let percent = 100.0 * (st.active + 1) as f64 / total as f64;
        let allowed = percent <= f64::from(self.cfg.max_ejection_percent)
            || (self.cfg.always_eject_one_host && st.active == 0);
        if !allowed {
            self.count("ejections_overflow");
            return false;
        }
        if matches!(kind, Kind::Consecutive5xx | Kind::SuccessRate) {
            self.count("ejections_total");
        }
        if ((self.random)() % 100) as u32 >= self.enforcing(kind) {
            return false;
        }
        let (base, max) = (self.cfg.base_ejection_time, self.cfg.max_ejection_time);
        let jitter_ms = self.cfg.max_ejection_time_jitter.as_millis() as u64;
        let jitter = Duration::from_millis((self.random)() % (jitter_ms + 1));
        let Some(h) = st.hosts.get_mut(&addr) else {
            return false;
        };
        h.ejected_at = Some(now);
        h.jitter = jitter;
        if base.saturating_mul(h.backoff) < max + base {
            h.backoff += 1;
        }
        st.active += 1;
        self.active_gauge.set(st.active as f64);
        self.count("ejections_enforced_total");
        self.count(&format!("ejections_enforced_{}", kind.stat()));
        tracing::info!(prefix = %self.prefix, host = %addr, kind = kind.stat(), "outlier detection: host ejected");
        true
    }

    /// The interval's work, in Envoy's order: hosts whose ejection time
    /// has passed come back, the interval's counts become the last
    /// interval's, success rate and failure percentage are judged on them,
    /// and the backoff of hosts healthy for an interval decays. True when
    /// any host came back or left.
    pub fn tick(&self, now: Instant) -> bool {
        let mut st = self.state.lock().unwrap();
        let (base, max) = (self.cfg.base_ejection_time, self.cfg.max_ejection_time);
        let mut changed = false;
        let mut back = 0;
        for h in st.hosts.values_mut() {
            if let Some(at) = h.ejected_at {
                let out_for = base.saturating_mul(h.backoff).min(max) + h.jitter;
                if now.saturating_duration_since(at) >= out_for {
                    h.ejected_at = None;
                    h.unejected_at = Some(now);
                    h.consecutive_5xx = 0;
                    h.consecutive_gateway = 0;
                    h.consecutive_local = 0;
                    back += 1;
                }
            }
            h.external.swap();
            h.local.swap();
        }
        if back > 0 {
            st.active -= back;
            self.active_gauge.set(st.active as f64);
            changed = true;
        }
        changed |= self.rates(&mut st, false, now);
        changed |= self.rates(&mut st, true, now);
        let interval = self.cfg.interval;
        for h in st.hosts.values_mut() {
            let healthy_long = h.ejected_at.is_none()
                && h.unejected_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= interval);
            if healthy_long {
                h.backoff = h.backoff.saturating_sub(1);
            }
        }
        changed
    }

    /// Success rate and failure percentage over one monitor (external, or
    /// local origin), on the last interval's counts of the hosts not out.
    fn rates(&self, st: &mut State, local: bool, now: Instant) -> bool {
        let c = &self.cfg;
        let n = st.hosts.len() as u32;
        if n < c.success_rate_minimum_hosts && n < c.failure_percentage_minimum_hosts {
            return false;
        }
        let rates: Vec<(SocketAddr, u64, f64)> = st
            .hosts
            .iter()
            .filter(|(_, h)| h.ejected_at.is_none())
            .filter_map(|(a, h)| {
                let (v, sr) = if local {
                    h.local.last()
                } else {
                    h.external.last()
                }?;
                Some((*a, v, sr))
            })
            .collect();
        let sr_set: Vec<_> = rates
            .iter()
            .filter(|(_, v, _)| *v >= u64::from(c.success_rate_request_volume))
            .collect();
        let fp_set: Vec<_> = rates
            .iter()
            .filter(|(_, v, _)| *v >= u64::from(c.failure_percentage_request_volume))
            .collect();
        let (sr_kind, fp_kind) = if local {
            (
                Kind::LocalOriginSuccessRate,
                Kind::LocalOriginFailurePercentage,
            )
        } else {
            (Kind::SuccessRate, Kind::FailurePercentage)
        };
        let mut changed = false;
        if !sr_set.is_empty() && sr_set.len() as u32 >= c.success_rate_minimum_hosts {
            let threshold = success_rate_threshold(
                &sr_set.iter().map(|(_, _, sr)| *sr).collect::<Vec<_>>(),
                c.success_rate_stdev_factor,
            );
            for (a, _, sr) in &sr_set {
                if *sr < threshold {
                    self.count("ejections_success_rate");
                    self.count(&format!("ejections_detected_{}", sr_kind.stat()));
                    changed |= self.eject(st, *a, sr_kind, now);
                }
            }
        }
        if !fp_set.is_empty() && fp_set.len() as u32 >= c.failure_percentage_minimum_hosts {
            for (a, _, sr) in &fp_set {
                if 100.0 - sr >= f64::from(c.failure_percentage_threshold) {
                    self.count(&format!("ejections_detected_{}", fp_kind.stat()));
                    // Envoy would eject a host the success rate just
                    // ejected a second time; one ejection is kept here.
                    if st.hosts.get(a).is_none_or(|h| h.ejected_at.is_none()) {
                        changed |= self.eject(st, *a, fp_kind, now);
                    }
                }
            }
        }
        changed
    }
}

/// Envoy's success-rate threshold: the mean less `factor / 1000`
/// population standard deviations.
pub fn success_rate_threshold(rates: &[f64], factor: u32) -> f64 {
    let n = rates.len() as f64;
    let mean = rates.iter().sum::<f64>() / n;
    let variance = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
    mean - f64::from(factor) / 1000.0 * variance.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::outlier::OutlierConfig;

    /// `a: 1, b: 2` read as one flow mapping.
    fn cfg(fields: &str) -> OutlierConfig {
        let yaml = format!(
            "{{{}}}",
            fields.trim_start_matches('{').trim_end_matches('}')
        );
        let v = legate_proto::json::parse_yaml(&yaml).unwrap();
        let dm =
            legate_proto::json::to_dynamic(v, "envoy.config.cluster.v3.OutlierDetection", true)
                .unwrap();
        OutlierConfig::from_proto(&dm.transcode_to().unwrap(), "outlier_detection").unwrap()
    }

    fn hosts(n: u16) -> Vec<SocketAddr> {
        (1..=n)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect()
    }

    /// Rolls 0: every enforcement above 0 % passes, no jitter.
    fn detector(yaml: &str, n: u16) -> (Detector, Vec<SocketAddr>) {
        let d = Detector::with_random(
            &format!("od-{}", rand::random::<u32>()),
            cfg(yaml),
            Box::new(|| 0),
        );
        let h = hosts(n);
        d.set_hosts(&h);
        (d, h)
    }

    #[test]
    fn five_consecutive_5xx_eject_and_a_success_restarts_the_count() {
        let (d, h) = detector("max_ejection_percent: 100", 2);
        let t = Instant::now();
        for _ in 0..4 {
            assert!(!d.report(h[0], Outcome::Response(500), t));
        }
        assert!(!d.report(h[0], Outcome::Response(200), t));
        for _ in 0..4 {
            assert!(!d.report(h[0], Outcome::Response(500), t));
        }
        assert!(
            d.report(h[0], Outcome::Response(500), t),
            "the fifth in a row"
        );
        assert!(d.is_ejected(&h[0]) && !d.is_ejected(&h[1]));
    }

    #[test]
    fn the_default_ten_percent_ejects_nobody_among_fewer_than_ten_hosts() {
        let (d, h) = detector("{}", 9);
        let t = Instant::now();
        for _ in 0..5 {
            d.report(h[0], Outcome::ConnectFailed, t);
        }
        assert!(!d.is_ejected(&h[0]), "1 of 9 is over 10 %");
        let (d, h) = detector("always_eject_one_host: true", 9);
        for _ in 0..5 {
            d.report(h[0], Outcome::ConnectFailed, t);
        }
        assert!(d.is_ejected(&h[0]));
        for _ in 0..5 {
            d.report(h[1], Outcome::ConnectFailed, t);
        }
        assert!(!d.is_ejected(&h[1]), "only one while another is out");
    }

    #[test]
    fn gateway_failures_are_detected_but_not_enforced_by_default() {
        let (d, h) = detector("max_ejection_percent: 100, consecutive_5xx: 0", 2);
        let t = Instant::now();
        for _ in 0..10 {
            d.report(h[0], Outcome::Response(503), t);
        }
        assert!(
            !d.is_ejected(&h[0]),
            "enforcing_consecutive_gateway_failure is 0"
        );
        let (d, h) = detector(
            "max_ejection_percent: 100, consecutive_5xx: 0, enforcing_consecutive_gateway_failure: 100, consecutive_gateway_failure: 3",
            2,
        );
        for _ in 0..2 {
            d.report(h[0], Outcome::Response(502), t);
        }
        d.report(h[0], Outcome::Response(500), t);
        d.report(h[0], Outcome::Response(504), t);
        assert!(!d.is_ejected(&h[0]), "a 500 breaks a gateway streak");
        d.report(h[0], Outcome::Response(504), t);
        d.report(h[0], Outcome::Timeout, t);
        assert!(d.is_ejected(&h[0]), "504, 504, timeout (504)");
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_and_ends_at_a_tick() {
        let (d, h) = detector(
            "max_ejection_percent: 100, interval: 1s, base_ejection_time: 10s, max_ejection_time: 25s",
            2,
        );
        let t0 = Instant::now();
        let eject = |at: Instant| {
            for _ in 0..5 {
                d.report(h[0], Outcome::Response(500), at);
            }
            assert!(d.is_ejected(&h[0]));
        };
        eject(t0);
        assert!(!d.tick(t0 + Duration::from_millis(9_999)));
        assert!(d.tick(t0 + Duration::from_secs(10)), "back after 10 s");
        // Ejected again at once: 2 x 10 s now.
        let t1 = t0 + Duration::from_secs(10);
        eject(t1);
        assert!(!d.tick(t1 + Duration::from_secs(19)));
        assert!(d.tick(t1 + Duration::from_secs(20)));
        // A third time: 3 x 10 s, capped at 25 s.
        let t2 = t1 + Duration::from_secs(20);
        eject(t2);
        assert!(d.tick(t2 + Duration::from_secs(25)));
    }

    #[test]
    fn success_rate_ejects_hosts_far_below_the_mean() {
        let (d, h) = detector(
            "max_ejection_percent: 100, success_rate_request_volume: 10",
            5,
        );
        let t = Instant::now();
        for (i, a) in h.iter().enumerate() {
            for k in 0..100 {
                // Host 0 fails half; the others never.
                let code = if i == 0 && k % 2 == 0 { 500 } else { 200 };
                d.report(*a, Outcome::Response(code), t);
            }
        }
        assert!(!d.is_ejected(&h[0]), "alternating: never five 5xx in a row");
        // The first tick judges the interval that just ended.
        assert!(d.tick(t + Duration::from_secs(10)));
        assert!(d.is_ejected(&h[0]));
        assert!(h[1..].iter().all(|a| !d.is_ejected(a)));
        // Mean 90, population stdev 20: 90 - 1.9 x 20 = 52 > 50.
        assert!(
            (success_rate_threshold(&[50.0, 100.0, 100.0, 100.0, 100.0], 1900) - 52.0).abs() < 1e-9
        );
    }

    #[test]
    fn split_mode_counts_local_origin_failures_apart() {
        let (d, h) = detector(
            "max_ejection_percent: 100, split_external_local_origin_errors: true, consecutive_local_origin_failure: 2",
            2,
        );
        let t = Instant::now();
        for _ in 0..4 {
            d.report(h[0], Outcome::Response(500), t);
        }
        d.report(h[0], Outcome::ConnectFailed, t);
        assert!(
            !d.is_ejected(&h[0]),
            "4 x 5xx and 1 local failure: neither streak is full"
        );
        d.report(h[0], Outcome::Timeout, t);
        assert!(d.is_ejected(&h[0]), "two local-origin failures in a row");
    }

    #[test]
    fn a_removed_host_leaves_the_count() {
        let (d, h) = detector("max_ejection_percent: 100", 2);
        let t = Instant::now();
        for _ in 0..5 {
            d.report(h[0], Outcome::Response(500), t);
        }
        assert!(d.is_ejected(&h[0]));
        d.set_hosts(&h[1..]);
        for _ in 0..5 {
            d.report(h[1], Outcome::Response(500), t);
        }
        assert!(
            d.is_ejected(&h[1]),
            "the removed host no longer counts as out"
        );
    }
}
