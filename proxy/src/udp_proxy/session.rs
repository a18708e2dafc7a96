//! A UDP listener at run time. Each client (its address and the address it
//! sent to) gets a session: a host picked by the cluster's balancer and a
//! connected socket to it, whose replies go back from the listener's
//! socket. A session ends after `idle_timeout` without a datagram either
//! way. Datagrams without a route or a healthy host are dropped, as Envoy
//! drops them.

use super::config::{Hash, UdpListener, UdpProxy};
use super::socket;
use crate::cluster_manager::{Cluster, ClusterManager, UpstreamHost};
use crate::stats;
use metrics::{Counter, Gauge};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// What the loop reads for each datagram: the listener's current config
/// (an update in place applies to new sessions).
pub type Current = Box<dyn Fn() -> Option<Arc<UdpListener>> + Send + Sync>;

/// `udp.<stat_prefix>.*`, registered when a proxy config is first used,
/// as Envoy creates them with the filter.
struct ProxyStats {
    no_route: Counter,
    rx_bytes: Counter,
    rx_datagrams: Counter,
    rx_errors: Counter,
    total: Counter,
    tx_bytes: Counter,
    tx_datagrams: Counter,
    tx_errors: Counter,
    idle_timeout: Counter,
    active: Gauge,
}

impl ProxyStats {
    fn new(prefix: &str) -> Self {
        let c = |n: &str| stats::counter(format!("udp.{prefix}.{n}"));
        Self {
            no_route: c("downstream_sess_no_route"),
            rx_bytes: c("downstream_sess_rx_bytes"),
            rx_datagrams: c("downstream_sess_rx_datagrams"),
            rx_errors: c("downstream_sess_rx_errors"),
            total: c("downstream_sess_total"),
            tx_bytes: c("downstream_sess_tx_bytes"),
            tx_datagrams: c("downstream_sess_tx_datagrams"),
            tx_errors: c("downstream_sess_tx_errors"),
            idle_timeout: c("idle_timeout"),
            active: stats::gauge(format!("udp.{prefix}.downstream_sess_active")),
        }
    }
}

/// A cluster's `cluster.<name>.udp.*` and byte counters.
struct ClusterUdpStats {
    tx_datagrams: Counter,
    tx_errors: Counter,
    rx_datagrams: Counter,
    rx_errors: Counter,
    rx_dropped: Counter,
    tx_bytes: Counter,
    rx_bytes: Counter,
}

impl ClusterUdpStats {
    fn new(cluster: &str) -> Self {
        let c = |n: &str| stats::counter(format!("cluster.{cluster}.{n}"));
        Self {
            tx_datagrams: c("udp.sess_tx_datagrams"),
            tx_errors: c("udp.sess_tx_errors"),
            rx_datagrams: c("udp.sess_rx_datagrams"),
            rx_errors: c("udp.sess_rx_errors"),
            rx_dropped: c("udp.sess_rx_datagrams_dropped"),
            tx_bytes: c("upstream_cx_tx_bytes_total"),
            rx_bytes: c("upstream_cx_rx_bytes_total"),
        }
    }
}

/// A session's identity: the client, where it sent to, and (with per-packet
/// balancing) the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    peer: SocketAddr,
    local: SocketAddr,
    host: Option<SocketAddr>,
}

type Sessions = Arc<Mutex<HashMap<Key, Arc<Session>>>>;

struct Session {
    key: Key,
    config: Arc<UdpProxy>,
    stats: Arc<ProxyStats>,
    /// The cluster as it was when the session began: a CDS update of it
    /// ends the session, as in Envoy.
    cluster: Arc<Cluster>,
    cstats: ClusterUdpStats,
    host: Arc<UpstreamHost>,
    upstream: Option<UdpSocket>,
    /// Milliseconds after `born` of the last datagram either way.
    last: AtomicU64,
    born: Instant,
    start: SystemTime,
    /// Payload bytes from the client and to it, for the access log.
    rx: AtomicU64,
    tx: AtomicU64,
    flags: &'static str,
    /// The cluster's connection slot (circuit breaker) the session holds.
    _slot: Option<crate::breakers::Slot>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// For access logs that export (they pick a collector host at flush).
    clusters: Arc<ClusterManager>,
}

impl Session {
    fn touch(&self) {
        self.last
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Stops its reader; the rest goes when the last handle does.
    fn stop(&self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stats.active.decrement(1.0);
        self.host.active_requests.fetch_sub(1, Ordering::Relaxed);
        if self.config.access_log.is_empty() {
            return;
        }
        let e = crate::access_log::Entry {
            start: self.start,
            duration: self.born.elapsed(),
            bytes_received: self.rx.load(Ordering::Relaxed),
            bytes_sent: self.tx.load(Ordering::Relaxed),
            downstream_remote: self.key.peer,
            downstream_direct_remote: self.key.peer,
            downstream_local: self.key.local,
            upstream_host: Some(self.host.addr),
            upstream_local: self.upstream.as_ref().and_then(|u| u.local_addr().ok()),
            // Envoy's UDP sessions never set the upstream cluster.
            upstream_cluster: "",
            response_flags: self.flags,
            requested_server_name: "",
            http: None,
            trace: None,
        };
        for l in &self.config.access_log {
            l.log(&e, &self.clusters);
        }
    }
}

/// Ends every session when the listener's loop stops.
struct EndAll(Sessions);

impl Drop for EndAll {
    fn drop(&mut self) {
        let all: Vec<_> = self.0.lock().unwrap().drain().map(|(_, s)| s).collect();
        for s in all {
            s.stop();
        }
    }
}

/// The listener's loop: reads datagrams until it is aborted.
pub async fn serve(
    sock: UdpSocket,
    listener_stats: String,
    current: Current,
    clusters: Arc<ClusterManager>,
) {
    let sock = Arc::new(sock);
    let sessions = EndAll(Sessions::default());
    let dropped = stats::counter(format!(
        "{listener_stats}.udp.downstream_rx_datagram_dropped"
    ));
    let mut seen: Option<(Arc<UdpProxy>, Arc<ProxyStats>)> = None;
    let mut buf = vec![0u8; 65536];
    loop {
        let Some(listener) = current() else { return };
        let max = listener.max_datagram;
        let r = match socket::recv(&sock, &mut buf[..max]).await {
            Ok(r) => r,
            Err(e) => {
                if let Some((_, s)) = &seen {
                    s.rx_errors.increment(1);
                }
                tracing::debug!(error = %e, "udp: receive failed");
                continue;
            }
        };
        if r.truncated {
            dropped.increment(1);
            continue;
        }
        let Some(proxy) = &listener.proxy else {
            continue;
        };
        let stats = match &seen {
            Some((p, s)) if Arc::ptr_eq(p, proxy) => s.clone(),
            _ => {
                let s = Arc::new(ProxyStats::new(&proxy.stat_prefix));
                seen = Some((proxy.clone(), s.clone()));
                s
            }
        };
        let ctx = Datagram {
            proxy,
            stats: &stats,
            clusters: &clusters,
            sessions: &sessions.0,
            sock: &sock,
        };
        ctx.handle(&buf[..r.len], r.peer, r.local);
    }
}

/// What handling one datagram needs.
struct Datagram<'a> {
    proxy: &'a Arc<UdpProxy>,
    stats: &'a Arc<ProxyStats>,
    clusters: &'a Arc<ClusterManager>,
    sessions: &'a Sessions,
    sock: &'a Arc<UdpSocket>,
}

impl Datagram<'_> {
    fn handle(&self, data: &[u8], peer: SocketAddr, local: SocketAddr) {
        let mut key = Key {
            peer,
            local,
            host: None,
        };
        let mut repick = None;
        if !self.proxy.per_packet {
            let existing = self.sessions.lock().unwrap().get(&key).cloned();
            if let Some(s) = existing {
                match self.still_serves(&s) {
                    Keep::Yes => return forward(&s, data),
                    Keep::No(host) => {
                        self.end(&key);
                        repick = host.map(|h| (s.cluster.clone(), h));
                    }
                }
            }
        }
        let Some(cluster) = self.route(peer, local) else {
            self.stats.no_route.increment(1);
            return;
        };
        // A host re-picked from the session's cluster serves only if the
        // route still gives that cluster.
        let repick = repick
            .filter(|(c, _)| Arc::ptr_eq(c, &cluster))
            .map(|(_, h)| h);
        let Some(host) = repick.or_else(|| self.pick(&cluster, peer)) else {
            cluster.stats.upstream_cx_none_healthy.increment(1);
            return;
        };
        if self.proxy.per_packet {
            key.host = Some(host.addr);
            let existing = self.sessions.lock().unwrap().get(&key).cloned();
            if let Some(s) = existing {
                return forward(&s, data);
            }
        }
        if let Some(s) = self.open(key, cluster, host) {
            forward(&s, data);
        }
    }

    /// The cluster the route gives, if it exists.
    fn route(&self, peer: SocketAddr, local: SocketAddr) -> Option<Arc<Cluster>> {
        let headers = http::HeaderMap::new();
        let metadata = serde_json::Map::new();
        let d = crate::config::unified_matcher::Data {
            headers: &headers,
            pseudo: Default::default(),
            metadata: &metadata,
            remote: Some(peer),
            direct_remote: Some(peer),
            local: Some(local),
            sni: "",
            response: None,
        };
        self.clusters.get(self.proxy.routes.evaluate(&d)?)
    }

    fn pick(&self, cluster: &Cluster, peer: SocketAddr) -> Option<Arc<UpstreamHost>> {
        let hash = self.proxy.hash.map(|h| match h {
            Hash::SourceIp => xxhash_rust::xxh64::xxh64(peer.ip().to_string().as_bytes(), 0),
            Hash::Key(k) => k,
        });
        cluster
            .snapshot()
            .pick(hash, rand::random(), &|_| false, None)
    }

    /// Whether a sticky session keeps its host: not after its cluster was
    /// replaced or its host removed (Envoy ends such sessions then; here
    /// the next datagram finds out), and not when its host is unhealthy
    /// and the balancer offers a healthy other one.
    fn still_serves(&self, s: &Session) -> Keep {
        let current = self.clusters.get(&s.cluster.config.name);
        let Some(cluster) = current.filter(|c| Arc::ptr_eq(c, &s.cluster)) else {
            return Keep::No(None);
        };
        let snap = cluster.snapshot();
        let Some(now) = snap.all_hosts.iter().find(|h| h.addr == s.host.addr) else {
            return Keep::No(None);
        };
        if now.healthy || now.degraded {
            return Keep::Yes;
        }
        match self.pick(&cluster, s.key.peer) {
            Some(h) if h.addr != s.host.addr && (h.healthy || h.degraded) => Keep::No(Some(h)),
            _ => Keep::Yes,
        }
    }

    fn end(&self, key: &Key) {
        if let Some(s) = self.sessions.lock().unwrap().remove(key) {
            s.stop();
        }
    }

    /// Starts a session, or refuses it when the cluster's connection
    /// breaker is full (counted as a session, as Envoy counts it).
    fn open(
        &self,
        key: Key,
        cluster: Arc<Cluster>,
        host: Arc<UpstreamHost>,
    ) -> Option<Arc<Session>> {
        self.stats.total.increment(1);
        self.stats.active.increment(1.0);
        host.active_requests.fetch_add(1, Ordering::Relaxed);
        let slot = cluster
            .breakers
            .default_priority()
            .connections
            .try_acquire();
        let cstats = ClusterUdpStats::new(&cluster.config.name);
        let upstream = match slot {
            Some(_) => match connect(host.addr, cluster.config.bind.for_peer(host.addr)) {
                Ok(u) => Some(u),
                Err(e) => {
                    cstats.tx_errors.increment(1);
                    tracing::debug!(upstream = %host.addr, error = %e, "udp: cannot open the upstream socket");
                    None
                }
            },
            None => {
                cluster.stats.upstream_cx_overflow.increment(1);
                None
            }
        };
        let s = Arc::new(Session {
            key,
            config: self.proxy.clone(),
            stats: self.stats.clone(),
            flags: if slot.is_none() { "UO" } else { "" },
            cluster,
            cstats,
            host,
            upstream,
            last: AtomicU64::new(0),
            born: Instant::now(),
            start: SystemTime::now(),
            rx: AtomicU64::new(0),
            tx: AtomicU64::new(0),
            _slot: slot,
            task: Mutex::new(None),
            clusters: self.clusters.clone(),
        });
        // Refused (or no socket): logged and gone, the datagram dropped.
        s.upstream.as_ref()?;
        let task = tokio::spawn(replies(s.clone(), self.sock.clone(), self.sessions.clone()));
        *s.task.lock().unwrap() = Some(task);
        self.sessions.lock().unwrap().insert(key, s.clone());
        Some(s)
    }
}

enum Keep {
    Yes,
    /// The session ends; a new one takes this host, if given.
    No(Option<Arc<UpstreamHost>>),
}

/// A socket connected to the host, from the cluster's bind address if any.
fn connect(host: SocketAddr, bind: Option<SocketAddr>) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if host.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(bind.unwrap_or(any))?;
    s.connect(host)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// A client's datagram to the session's host.
fn forward(s: &Session, data: &[u8]) {
    let Some(up) = &s.upstream else { return };
    s.touch();
    s.stats.rx_datagrams.increment(1);
    s.stats.rx_bytes.increment(data.len() as u64);
    s.rx.fetch_add(data.len() as u64, Ordering::Relaxed);
    match socket::send(up, data) {
        Ok(_) => {
            s.cstats.tx_datagrams.increment(1);
            s.cstats.tx_bytes.increment(data.len() as u64);
        }
        Err(e) => {
            s.cstats.tx_errors.increment(1);
            tracing::debug!(upstream = %s.host.addr, error = %e, "udp: send to upstream failed");
        }
    }
}

/// The session's other half: the host's datagrams back to the client, and
/// the idle timer. Errors (an ICMP unreachable, say) are counted and keep
/// the session alive, as in Envoy.
async fn replies(s: Arc<Session>, sock: Arc<UdpSocket>, sessions: Sessions) {
    let Some(up) = &s.upstream else { return };
    let limit = s.config.upstream_max_datagram;
    let mut buf = vec![0u8; limit + 1];
    let idle = s.config.idle_timeout;
    loop {
        let last = Duration::from_millis(s.last.load(Ordering::Relaxed));
        let deadline = s.born + last + idle;
        tokio::select! {
            r = up.recv(&mut buf) => {
                s.touch();
                match r {
                    Ok(n) if n > limit => s.cstats.rx_dropped.increment(1),
                    Ok(n) => reply(&s, &sock, &buf[..n]),
                    Err(e) => {
                        s.cstats.rx_errors.increment(1);
                        tracing::debug!(upstream = %s.host.addr, error = %e, "udp: upstream receive failed");
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let moved = Duration::from_millis(s.last.load(Ordering::Relaxed)) != last;
                if !moved {
                    s.stats.idle_timeout.increment(1);
                    sessions.lock().unwrap().remove(&s.key);
                    return;
                }
            }
        }
    }
}

fn reply(s: &Session, sock: &UdpSocket, data: &[u8]) {
    s.cstats.rx_datagrams.increment(1);
    s.cstats.rx_bytes.increment(data.len() as u64);
    s.tx.fetch_add(data.len() as u64, Ordering::Relaxed);
    match socket::send_from(sock, data, s.key.local, s.key.peer) {
        Ok(_) => {
            s.stats.tx_datagrams.increment(1);
            s.stats.tx_bytes.increment(data.len() as u64);
        }
        Err(e) => {
            s.stats.tx_errors.increment(1);
            tracing::debug!(client = %s.key.peer, error = %e, "udp: send to client failed");
        }
    }
}
