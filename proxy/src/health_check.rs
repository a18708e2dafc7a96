//! Active health checking: one task per host of a cluster with
//! `health_checks`, probing it over HTTP or TCP (through the host's TLS
//! when the cluster originates TLS) with Envoy's state machine.
//!
//! - A host starts unhealthy; its first successful check makes it healthy
//!   at once, later ones after `healthy_threshold` successes in a row.
//! - A healthy host turns unhealthy after `unhealthy_threshold` network
//!   failures or timeouts in a row, or at once on an HTTP status that is
//!   neither expected nor retriable (retriable ones count to the
//!   threshold).
//! - Checks run every `interval` (`unhealthy_interval` while unhealthy, the
//!   edge intervals while a change is pending), or every
//!   `no_traffic_interval` while the cluster has never opened a
//!   connection, plus jitter.
//! - `x-envoy-degraded` in a passing HTTP response marks the host degraded.
//!
//! The cluster's initialisation waits for the first round, as Envoy's does.

use crate::cluster_manager::HostTls;
use crate::config::health_check::{Check, HealthCheckConfig, HttpCheck};
use crate::tls::upstream::Io;
use metrics::{Counter, Gauge};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass {
        degraded: bool,
    },
    /// A wrong answer (an HTTP status, a TCP payload); `retriable` counts
    /// toward the threshold instead of failing at once.
    Fail {
        retriable: bool,
    },
    /// No answer: connection refused or reset, or the timeout.
    Network,
}

/// Where and how a host is checked.
#[derive(Debug, Clone)]
pub struct Target {
    /// The host, as the balancer knows it.
    pub key: SocketAddr,
    /// Where checks go (`alt_port` or the endpoint's health check port).
    pub addr: SocketAddr,
    /// The `Host` header: the check's `host`, else the endpoint's health
    /// check hostname, else the cluster's name.
    pub host: String,
    pub tls: Option<HostTls>,
    /// The cluster's `upstream_bind_config` source address.
    pub bind: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transition {
    Unchanged,
    Changed,
    ChangePending,
}

#[derive(Debug)]
struct HostState {
    target: Target,
    failed: bool,
    degraded: bool,
    first: bool,
    num_healthy: u32,
    num_unhealthy: u32,
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for HostState {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The cluster's `health_check.*` stats.
#[derive(Debug)]
struct Stats {
    attempt: Counter,
    success: Counter,
    failure: Counter,
    network_failure: Counter,
    healthy: Gauge,
    degraded: Gauge,
}

/// A cluster's health checker.
#[derive(Debug)]
pub struct Checker {
    cfg: HealthCheckConfig,
    hosts: Mutex<HashMap<SocketAddr, HostState>>,
    /// The cluster, once running: new hosts get their task then.
    cluster: Mutex<Option<Weak<crate::cluster_manager::Cluster>>>,
    /// The cluster has opened an upstream connection (then `interval`
    /// applies rather than `no_traffic_interval`).
    pub had_traffic: AtomicBool,
    stats: Stats,
}

impl Checker {
    pub fn new(cluster: &str, cfg: HealthCheckConfig) -> Checker {
        let p = format!("cluster.{cluster}.health_check.");
        let c = |s: &str| crate::stats::counter(format!("{p}{s}"));
        let g = |s: &str| crate::stats::gauge(format!("{p}{s}"));
        Checker {
            cfg,
            hosts: Mutex::default(),
            cluster: Mutex::default(),
            had_traffic: AtomicBool::new(false),
            stats: Stats {
                attempt: c("attempt"),
                success: c("success"),
                failure: c("failure"),
                network_failure: c("network_failure"),
                healthy: g("healthy"),
                degraded: g("degraded"),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, HostState>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether active checks hold the host out (failed, or not yet checked).
    pub fn failed(&self, addr: &SocketAddr) -> bool {
        self.lock().get(addr).is_some_and(|h| h.failed)
    }

    pub fn degraded(&self, addr: &SocketAddr) -> bool {
        self.lock()
            .get(addr)
            .is_some_and(|h| h.degraded && !h.failed)
    }

    /// The cluster's hosts now: new ones start unhealthy and get a task
    /// (once the cluster runs); gone ones stop being checked.
    pub fn set_hosts(&self, targets: Vec<Target>) {
        let weak = self
            .cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut hosts = self.lock();
        let keep: std::collections::HashSet<SocketAddr> = targets.iter().map(|t| t.key).collect();
        hosts.retain(|a, _| keep.contains(a));
        for t in targets {
            if let Some(h) = hosts.get_mut(&t.key) {
                h.target = t;
                continue;
            }
            let addr = t.key;
            let task = weak
                .clone()
                .map(|w| spawn(w, addr, self.cfg.initial_jitter));
            hosts.insert(
                addr,
                HostState {
                    target: t,
                    failed: true,
                    degraded: false,
                    first: true,
                    num_healthy: 0,
                    num_unhealthy: 0,
                    task,
                },
            );
        }
    }

    /// Starts checking: a task per known host.
    pub fn start(&self, cluster: Weak<crate::cluster_manager::Cluster>) {
        *self.cluster.lock().unwrap_or_else(|e| e.into_inner()) = Some(cluster.clone());
        for (addr, h) in self.lock().iter_mut() {
            if h.task.is_none() {
                h.task = Some(spawn(cluster.clone(), *addr, self.cfg.initial_jitter));
            }
        }
    }

    /// Waits (at most `timeout` plus the initial jitter) until every host
    /// has had its first check.
    pub async fn first_round(&self) {
        let wait = self
            .cfg
            .timeout
            .saturating_add(self.cfg.initial_jitter)
            .saturating_add(Duration::from_millis(200));
        let deadline = tokio::time::Instant::now()
            .checked_add(wait)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        while self.lock().values().any(|h| h.first) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Records a check; true when the host's health changed.
    fn record(&self, addr: SocketAddr, o: Outcome) -> Option<(bool, Transition)> {
        let mut hosts = self.lock();
        let h = hosts.get_mut(&addr)?;
        let mut t = Transition::Unchanged;
        match o {
            Outcome::Pass { degraded } => {
                self.stats.success.increment(1);
                h.num_unhealthy = 0;
                if h.failed {
                    h.num_healthy += 1;
                    if h.first || h.num_healthy >= self.cfg.healthy_threshold {
                        h.failed = false;
                        t = Transition::Changed;
                    } else {
                        t = Transition::ChangePending;
                    }
                }
                if h.degraded != degraded {
                    h.degraded = degraded;
                    t = Transition::Changed;
                }
            }
            Outcome::Fail { .. } | Outcome::Network => {
                self.stats.failure.increment(1);
                if o == Outcome::Network {
                    self.stats.network_failure.increment(1);
                }
                h.num_healthy = 0;
                if !h.failed {
                    h.num_unhealthy += 1;
                    let at_once = o == Outcome::Fail { retriable: false };
                    if at_once || h.num_unhealthy >= self.cfg.unhealthy_threshold {
                        h.failed = true;
                        t = Transition::Changed;
                    } else {
                        t = Transition::ChangePending;
                    }
                }
            }
        }
        h.first = false;
        let failed = h.failed;
        let (healthy, degraded) = hosts.values().fold((0, 0), |(a, d), h| {
            (
                a + usize::from(!h.failed),
                d + usize::from(!h.failed && h.degraded),
            )
        });
        self.stats.healthy.set(healthy as f64);
        self.stats.degraded.set(degraded as f64);
        Some((failed, t))
    }

    /// Envoy's next interval for a host in `failed` state after `t`.
    fn next_interval(&self, failed: bool, t: Transition) -> Duration {
        let c = &self.cfg;
        let base = if self.had_traffic.load(Ordering::Relaxed) {
            match (failed, t == Transition::ChangePending) {
                (true, true) => c.unhealthy_edge_interval,
                (true, false) => c.unhealthy_interval,
                (false, true) => c.healthy_edge_interval,
                (false, false) => c.interval,
            }
        } else if !failed {
            c.no_traffic_healthy_interval
                .unwrap_or(c.no_traffic_interval)
        } else {
            c.no_traffic_interval
        };
        let ms = base.as_millis() as u64;
        let mut extra = 0;
        let pct = u64::from(c.interval_jitter_percent) * ms / 100;
        if pct > 0 {
            extra += rand::random::<u64>() % pct;
        }
        let j = c.interval_jitter.as_millis() as u64;
        if j > 0 {
            extra += rand::random::<u64>() % j;
        }
        base + Duration::from_millis(extra)
    }

    fn target(&self, addr: &SocketAddr) -> Option<Target> {
        self.lock().get(addr).map(|h| h.target.clone())
    }

    async fn check(&self, t: &Target) -> Outcome {
        self.stats.attempt.increment(1);
        let work = async {
            match &self.cfg.check {
                Check::Http(h) => http_check(h, t).await,
                Check::Tcp { send, receive } => tcp_check(send, receive, t).await,
                Check::Grpc {
                    service_name,
                    authority,
                    metadata,
                } => grpc_check(service_name, authority, metadata, t).await,
            }
        };
        tokio::time::timeout(self.cfg.timeout, work)
            .await
            .unwrap_or(Outcome::Network)
    }
}

fn spawn(
    cluster: Weak<crate::cluster_manager::Cluster>,
    addr: SocketAddr,
    jitter: Duration,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let j = jitter.as_millis() as u64;
        if j > 0 {
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % j)).await;
        }
        loop {
            let Some(c) = cluster.upgrade() else { return };
            let Some(hc) = c.health.clone() else { return };
            let Some(target) = hc.target(&addr) else {
                return;
            };
            drop(c);
            let outcome = hc.check(&target).await;
            let Some((failed, t)) = hc.record(addr, outcome) else {
                return;
            };
            if t == Transition::Changed {
                if let Some(c) = cluster.upgrade() {
                    c.republish();
                }
            }
            tokio::time::sleep(hc.next_interval(failed, t)).await;
        }
    })
    .abort_handle()
}

/// A connection to the target, through its TLS when it has one (whose
/// context offers only what the check speaks: `health_alpn`).
async fn connect(t: &Target) -> std::io::Result<Box<dyn Io>> {
    let sni = t.tls.as_ref().map(|x| x.tls.sni.as_str());
    let (io, _) = crate::tls::upstream::connect_host(t.addr, t.tls.as_ref(), sni, t.bind).await?;
    Ok(io)
}

/// The ALPN a check offers: h2 for HTTP/2 and gRPC checks, nothing for
/// HTTP/1 and TCP ones (Envoy's checks offer none of the cluster's).
pub fn health_alpn(check: &Check) -> &'static [&'static str] {
    match check {
        Check::Http(h) if h.http2 => &["h2"],
        Check::Grpc { .. } => &["h2"],
        _ => &[],
    }
}

/// What a TCP check reads looking for its payload before it gives up.
const TCP_RECEIVE_LIMIT: usize = 64 * 1024;

/// Whether `blocks` all appear in `data`, in order (Envoy's fuzzy match).
fn contains_in_order(data: &[u8], blocks: &[Vec<u8>]) -> bool {
    let mut at = 0;
    for b in blocks {
        match data[at..]
            .windows(b.len().max(1))
            .position(|w| w == b.as_slice())
        {
            Some(i) => at += i + b.len(),
            None if b.is_empty() => {}
            None => return false,
        }
    }
    true
}

async fn tcp_check(send: &[u8], receive: &[Vec<u8>], t: &Target) -> Outcome {
    let Ok(mut s) = connect(t).await else {
        return Outcome::Network;
    };
    if !send.is_empty() && s.write_all(send).await.is_err() {
        return Outcome::Network;
    }
    if receive.is_empty() {
        return Outcome::Pass { degraded: false };
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if contains_in_order(&got, receive) {
            return Outcome::Pass { degraded: false };
        }
        match s.read(&mut buf).await {
            // A close before the payload came is a network failure in
            // Envoy: it counts toward the threshold.
            Ok(0) => return Outcome::Network,
            Ok(n) if got.len() + n > TCP_RECEIVE_LIMIT => {
                return Outcome::Fail { retriable: false }
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => return Outcome::Network,
        }
    }
}

async fn http_check(h: &HttpCheck, t: &Target) -> Outcome {
    use http_body_util::BodyExt;
    let Ok(io) = connect(t).await else {
        return Outcome::Network;
    };
    let io = hyper_util::rt::TokioIo::new(io);
    let body = http_body_util::Full::new(bytes::Bytes::from(h.send.clone().unwrap_or_default()));
    let mut req = http::Request::builder()
        .method(h.method.clone())
        .uri(&h.path)
        .header(http::header::HOST, &t.host)
        .header(http::header::USER_AGENT, "Envoy/HC");
    if h.http2 {
        let scheme = if t.tls.is_some() { "https" } else { "http" };
        req = req.uri(format!("{scheme}://{}{}", t.host, h.path));
    }
    let Ok(mut req) = req.body(body) else {
        return Outcome::Fail { retriable: false };
    };
    for name in &h.headers_to_remove {
        req.headers_mut().remove(name);
    }
    for (k, v, append) in &h.headers_to_add {
        if *append {
            req.headers_mut().append(k.clone(), v.clone());
        } else {
            req.headers_mut().insert(k.clone(), v.clone());
        }
    }
    let resp = if h.http2 {
        let Ok((mut send, conn)) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await
        else {
            return Outcome::Network;
        };
        tokio::spawn(conn);
        send.send_request(req).await
    } else {
        let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(io).await else {
            return Outcome::Network;
        };
        tokio::spawn(conn);
        send.send_request(req).await
    };
    let Ok(resp) = resp else {
        return Outcome::Network;
    };
    let status = resp.status().as_u16();
    let degraded = resp.headers().contains_key("x-envoy-degraded");
    // Envoy looks at the body before the status: a missing payload fails
    // at once even under a retriable status.
    if !h.receive.is_empty() {
        let mut got = Vec::new();
        let mut body = resp.into_body();
        while got.len() < h.response_buffer {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        got.extend_from_slice(d);
                    }
                }
                Some(Err(_)) => return Outcome::Network,
                None => break,
            }
        }
        got.truncate(h.response_buffer);
        if !contains_in_order(&got, &h.receive) {
            return Outcome::Fail { retriable: false };
        }
    }
    if !h.expected(status) {
        return Outcome::Fail {
            retriable: h.retriable(status),
        };
    }
    Outcome::Pass { degraded }
}

/// `grpc.health.v1.Health/Check` for `service`: SERVING passes; another
/// status, or a call that fails (grpc-status other than 0), fails at once;
/// no answer is a network failure.
async fn grpc_check(
    service: &str,
    authority: &str,
    metadata: &[(http::HeaderName, http::HeaderValue)],
    t: &Target,
) -> Outcome {
    use http_body_util::BodyExt;
    let Ok(io) = connect(t).await else {
        return Outcome::Network;
    };
    let Ok((mut send, conn)) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    else {
        return Outcome::Network;
    };
    tokio::spawn(conn);
    // HealthCheckRequest { service = 1 }, in one length-prefixed message.
    let mut msg = Vec::with_capacity(service.len() + 8);
    if !service.is_empty() {
        msg.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let authority = if authority.is_empty() {
        t.host.as_str()
    } else {
        authority
    };
    let scheme = if t.tls.is_some() { "https" } else { "http" };
    let mut req = match http::Request::post(format!(
        "{scheme}://{authority}/grpc.health.v1.Health/Check"
    ))
    .header(http::header::CONTENT_TYPE, "application/grpc")
    .header(http::header::TE, "trailers")
    .header(http::header::USER_AGENT, "Envoy/HC")
    .body(http_body_util::Full::new(bytes::Bytes::from(framed)))
    {
        Ok(r) => r,
        Err(_) => return Outcome::Fail { retriable: false },
    };
    for (k, v) in metadata {
        req.headers_mut().append(k.clone(), v.clone());
    }
    let Ok(resp) = send.send_request(req).await else {
        return Outcome::Network;
    };
    if resp.status() != http::StatusCode::OK {
        return Outcome::Fail { retriable: false };
    }
    let mut status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = Vec::new();
    let mut stream = resp.into_body();
    while let Some(f) = stream.frame().await {
        let Ok(f) = f else {
            return Outcome::Network;
        };
        if let Some(d) = f.data_ref() {
            if body.len() + d.len() > 4096 {
                return Outcome::Fail { retriable: false };
            }
            body.extend_from_slice(d);
        }
        if let Some(tr) = f.trailers_ref() {
            if let Some(s) = tr.get("grpc-status").and_then(|v| v.to_str().ok()) {
                status = Some(s.to_string());
            }
        }
    }
    if status.as_deref() != Some("0") {
        return Outcome::Fail { retriable: false };
    }
    // One message: HealthCheckResponse { status = 1 }, SERVING being 1.
    let serving = body.get(5..).is_some_and(|m| m == [0x08, 0x01]);
    if serving {
        Outcome::Pass { degraded: false }
    } else {
        Outcome::Fail { retriable: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(unhealthy: u32, healthy: u32) -> Checker {
        let cfg = HealthCheckConfig {
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(1),
            initial_jitter: Duration::ZERO,
            interval_jitter: Duration::ZERO,
            interval_jitter_percent: 0,
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
            alt_port: None,
            no_traffic_interval: Duration::from_secs(60),
            no_traffic_healthy_interval: None,
            unhealthy_interval: Duration::from_secs(2),
            unhealthy_edge_interval: Duration::from_secs(3),
            healthy_edge_interval: Duration::from_secs(4),
            check: Check::Tcp {
                send: Vec::new(),
                receive: Vec::new(),
            },
        };
        Checker::new("unit", cfg)
    }

    #[test]
    fn envoys_state_machine() {
        let c = checker(2, 2);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        c.set_hosts(vec![Target {
            key: a,
            addr: a,
            host: "h".into(),
            tls: None,
            bind: None,
        }]);
        assert!(c.failed(&a), "a new host starts unhealthy");
        let pass = Outcome::Pass { degraded: false };
        // The first pass makes it healthy at once.
        assert_eq!(c.record(a, pass), Some((false, Transition::Changed)));
        // Network failures count toward unhealthy_threshold.
        assert_eq!(
            c.record(a, Outcome::Network),
            Some((false, Transition::ChangePending))
        );
        assert_eq!(
            c.record(a, Outcome::Network),
            Some((true, Transition::Changed))
        );
        // Back after healthy_threshold passes.
        assert_eq!(c.record(a, pass), Some((true, Transition::ChangePending)));
        assert_eq!(c.record(a, pass), Some((false, Transition::Changed)));
        // A wrong answer that is not retriable fails it at once; a
        // retriable one counts.
        assert_eq!(
            c.record(a, Outcome::Fail { retriable: true }),
            Some((false, Transition::ChangePending))
        );
        assert_eq!(c.record(a, pass), Some((false, Transition::Unchanged)));
        assert_eq!(
            c.record(a, Outcome::Fail { retriable: false }),
            Some((true, Transition::Changed))
        );
        // Intervals: no traffic yet, then by state.
        assert_eq!(
            c.next_interval(true, Transition::Unchanged),
            Duration::from_secs(60)
        );
        c.had_traffic.store(true, Ordering::Relaxed);
        assert_eq!(
            c.next_interval(true, Transition::Unchanged),
            Duration::from_secs(2)
        );
        assert_eq!(
            c.next_interval(true, Transition::ChangePending),
            Duration::from_secs(3)
        );
        assert_eq!(
            c.next_interval(false, Transition::ChangePending),
            Duration::from_secs(4)
        );
        assert_eq!(
            c.next_interval(false, Transition::Unchanged),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn fuzzy_payload_match() {
        assert!(contains_in_order(
            b"hello big world",
            &[b"hello".to_vec(), b"world".to_vec()]
        ));
        assert!(!contains_in_order(
            b"world hello",
            &[b"hello".to_vec(), b"world".to_vec()]
        ));
        assert!(contains_in_order(b"", &[]));
    }
}
