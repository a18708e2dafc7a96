//! Listeners: Legate's own accept loops feeding one shared pingora
//! `HttpProxy`, so listeners can be added and removed at run time (pingora
//! itself binds only at start-up) while every listener shares one upstream
//! connection pool, as Envoy's cluster manager does.

pub mod corked;
pub mod hcm;
pub mod http_conn;
pub mod listener_filters;
pub mod mirror;
pub mod request;
pub mod tcp_proxy;
pub mod workers;
pub mod xfcc;

use crate::cluster_manager::ClusterManager;
use crate::config::listener::{Codec, Hcm, Listener, NetworkFilter};
use crate::config::socket_options::{SocketOpt, Stage};
use crate::stats;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{GetProxyDigest, GetSocketDigest, SocketDigest};
use pingora_http::ResponseHeader;
use pingora_proxy::HttpProxy;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Per-connection facts handed to the connection manager through pingora's
/// proxy digest (the one per-connection slot pingora carries for us, on
/// HTTP/1 and HTTP/2 alike).
pub struct ConnMeta {
    pub listener: String,
    pub hcm: Arc<Hcm>,
    /// The connection is TLS, terminated by Legate.
    pub tls: bool,
    /// On TLS connections, the client's certificate chain (mTLS), set once
    /// the handshake is over: `x-forwarded-client-cert` is made from it.
    pub peer_tls: Option<Arc<std::sync::OnceLock<xfcc::PeerTls>>>,
    /// Whether an HTTP/1 connection closes after the current request.
    pub closing: Arc<http_conn::Closing>,
    /// The listener's `per_connection_buffer_limit_bytes`.
    pub buffer_limit: u32,
    /// The SNI the filter chain was chosen by (Envoy's requested server
    /// name), empty without one.
    pub sni: String,
    /// Whether the local address is a restored original destination.
    pub restored: bool,
    /// The listener's traffic_direction is OUTBOUND (tracing as egress).
    pub outbound: bool,
    /// ... or INBOUND (`istio.stats` reports as the destination).
    pub inbound: bool,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One version of a listener: its config and the drain signal of the
/// connections it accepted.
struct Generation {
    config: Arc<Listener>,
    drain: watch::Receiver<bool>,
}

struct Running {
    config: Arc<Listener>,
    local_addr: SocketAddr,
    /// Whether an accept loop runs: a `bind_to_port: false` listener gets
    /// one only as the kernel LB's userspace fallback.
    bound: bool,
    /// Flipped to start draining: H2 GOAWAY, H1 `Connection: close`, and
    /// after the drain time the connections are closed.
    drain: watch::Sender<bool>,
    /// What the accept loop hands new connections.
    current: Arc<arc_swap::ArcSwap<Generation>>,
    /// One per address bound (`additional_addresses` add theirs).
    accept: Vec<(SocketAddr, tokio::task::JoinHandle<()>)>,
}

type RunningMap = Arc<Mutex<HashMap<String, Running>>>;

/// What the accept loops share.
#[derive(Clone)]
struct Ctx {
    /// One per worker (each with its own upstream connection pool), in
    /// the workers' order; at least one.
    proxies: Arc<[Arc<HttpProxy<hcm::HcmProxy>>]>,
    clusters: Arc<ClusterManager>,
    drain_time: Duration,
    /// Every listener, for handing connections over by address.
    running: RunningMap,
    /// `/healthcheck/fail` is in force.
    health_failed: Arc<std::sync::atomic::AtomicBool>,
    /// Where accept loops and connections run.
    workers: Arc<workers::Workers>,
}

impl Ctx {
    /// The proxy of the worker this runs on (the first one off a worker).
    fn proxy(&self) -> &Arc<HttpProxy<hcm::HcmProxy>> {
        let i = workers::current().unwrap_or(0);
        &self.proxies[i % self.proxies.len()]
    }

    /// The listener a connection to `addr` belongs to, as Envoy finds it
    /// for `use_original_dst`: the exact address, else a listener on the
    /// same port at the unspecified address of the same family.
    fn listener_at(&self, addr: SocketAddr) -> Option<Arc<Generation>> {
        let running = self.running.lock().unwrap();
        let any = SocketAddr::new(
            match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            },
            addr.port(),
        );
        let find = |a: SocketAddr| {
            running.values().find(|r| {
                (r.config.address == a || r.config.additional.contains(&a))
                    && r.config.udp.is_none()
            })
        };
        find(addr)
            .or_else(|| find(any))
            .map(|r| r.current.load_full())
    }
}

/// A connection as accepted, before its listener filters ran.
struct Accepted {
    sock: tokio::net::TcpStream,
    /// The socket's own peer: `direct_source_prefix_ranges` matches it.
    direct_peer: SocketAddr,
    /// The client: the direct peer, or what a PROXY header said.
    peer: SocketAddr,
    /// Where the client connected: the socket's address, or the original
    /// destination (a redirected connection, or one handed over).
    local: SocketAddr,
    /// Whether `local` was restored (by `original_dst`, a PROXY header or
    /// the kernel LB's redirect): only then does an ORIGINAL_DST cluster
    /// have a destination, as in Envoy.
    restored: bool,
}

/// Owns the running listeners.
pub struct ListenerManager {
    ctx: Ctx,
    running: RunningMap,
}

/// A listening socket, not yet registered with a runtime: the worker that
/// runs its accept loop registers it.
fn bind(
    addr: SocketAddr,
    freebind: bool,
    opts: &[SocketOpt],
) -> std::io::Result<std::net::TcpListener> {
    let s = crate::config::socket_options::listening_socket(addr, true, opts)?;
    if freebind {
        // A VIP need not be a local address.
        if addr.is_ipv4() {
            s.set_freebind(true)?;
        } else {
            s.set_freebind_ipv6(true)?;
        }
    }
    s.bind(&addr.into())?;
    SocketOpt::apply_all(opts, Stage::Bound, &s, true, addr.is_ipv6())?;
    s.listen(1024)?;
    SocketOpt::apply_all(opts, Stage::Listening, &s, true, addr.is_ipv6())?;
    Ok(s.into())
}

impl Running {
    fn stop(self) {
        self.accept.iter().for_each(|(_, a)| a.abort());
        let _ = self.drain.send(true);
    }
}

impl ListenerManager {
    pub fn new(
        proxies: Vec<Arc<HttpProxy<hcm::HcmProxy>>>,
        clusters: Arc<ClusterManager>,
        drain_time: Duration,
        workers: Arc<workers::Workers>,
        health_failed: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        assert!(!proxies.is_empty(), "a listener manager needs a proxy");
        let running = RunningMap::default();
        Self {
            ctx: Ctx {
                proxies: proxies.into(),
                clusters,
                drain_time,
                running: running.clone(),
                health_failed,
                workers,
            },
            running,
        }
    }

    /// Binds and starts a listener; returns the bound address.
    pub fn add(&self, config: Arc<Listener>) -> std::io::Result<SocketAddr> {
        let (drain, drain_rx) = watch::channel(false);
        let current = Arc::new(arc_swap::ArcSwap::from_pointee(Generation {
            config: config.clone(),
            drain: drain_rx,
        }));
        let (local_addr, accept) = if config.udp.is_some() {
            let (a, task) = self.serve_udp(&config, &current)?;
            (a, vec![(a, task)])
        } else if config.bind_to_port {
            // Every address is bound before any accepts: one that cannot be
            // bound fails the listener whole.
            let mut sockets = Vec::with_capacity(1 + config.additional.len());
            for a in std::iter::once(&config.address).chain(&config.additional) {
                sockets.push(bind(*a, false, &config.socket_options)?);
            }
            let local_addr = sockets[0].local_addr()?;
            let accept = self.accept_on(sockets, &current)?;
            (local_addr, accept)
        } else {
            // As Envoy: registered, never bound, so nothing is accepted here.
            (config.address, vec![])
        };
        tracing::info!(listener = %config.name, address = %local_addr, bound = config.bind_to_port, "listener started");
        stats::counter("listener_manager.listener_added".into()).increment(1);
        let mut running = self.running.lock().unwrap();
        let old = running.insert(
            config.name.clone(),
            Running {
                bound: config.bind_to_port,
                config,
                local_addr,
                drain,
                current,
                accept,
            },
        );
        if let Some(old) = old {
            old.stop();
        }
        stats::gauge("listener_manager.total_listeners_active".into()).set(running.len() as f64);
        Ok(local_addr)
    }

    /// Binds a UDP listener's socket and starts reading datagrams on a
    /// worker. The loop reads the listener's current generation for each
    /// datagram, so an update in place applies to new sessions.
    fn serve_udp(
        &self,
        config: &Listener,
        current: &Arc<arc_swap::ArcSwap<Generation>>,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        // Registered by the worker whose runtime runs its loop.
        let sock = crate::udp_proxy::socket::bind(config.address, &config.socket_options)?;
        let local_addr = sock.local_addr()?;
        let current = current.clone();
        let read: crate::udp_proxy::session::Current = Box::new(move || {
            let g = current.load();
            g.config.udp.clone()
        });
        let (stats, clusters) = (config.stat_prefix.clone(), self.ctx.clusters.clone());
        let task = self.ctx.workers.spawn(async move {
            match tokio::net::UdpSocket::from_std(sock) {
                Ok(sock) => crate::udp_proxy::session::serve(sock, stats, read, clusters).await,
                Err(e) => {
                    tracing::error!(error = %e, "cannot register a UDP socket; not reading it")
                }
            }
        });
        Ok((local_addr, task))
    }

    /// Adds a listener or updates one in place. On the same address the
    /// socket stays open: new connections get the new config while the old
    /// connections drain (`--drain-time-s`). A new address is bound first,
    /// so a failure leaves the old listener serving.
    pub fn upsert(&self, config: Arc<Listener>) -> std::io::Result<SocketAddr> {
        {
            let mut running = self.running.lock().unwrap();
            if let Some(r) = running.get_mut(&config.name) {
                if r.config.address == config.address
                    && r.config.bind_to_port == config.bind_to_port
                    && r.config.udp.is_some() == config.udp.is_some()
                    && r.config.socket_options == config.socket_options
                {
                    if r.bound && r.config.udp.is_none() {
                        self.rebind_additional(r, &config)?;
                    }
                    let (drain, drain_rx) = watch::channel(false);
                    r.current.store(Arc::new(Generation {
                        config: config.clone(),
                        drain: drain_rx,
                    }));
                    let _ = std::mem::replace(&mut r.drain, drain).send(true);
                    r.config = config;
                    stats::counter("listener_manager.listener_modified".into()).increment(1);
                    tracing::info!(listener = %r.config.name, "listener updated in place; old connections drain");
                    return Ok(r.local_addr);
                }
            }
        }
        self.add(config)
    }

    /// An accept loop per bound socket, each with its address.
    fn accept_on(
        &self,
        sockets: Vec<std::net::TcpListener>,
        current: &Arc<arc_swap::ArcSwap<Generation>>,
    ) -> std::io::Result<Vec<(SocketAddr, tokio::task::JoinHandle<()>)>> {
        sockets
            .into_iter()
            .map(|tcp| {
                let addr = tcp.local_addr()?;
                let task =
                    self.ctx
                        .workers
                        .spawn(accept_loop(tcp, current.clone(), self.ctx.clone()));
                Ok((addr, task))
            })
            .collect()
    }

    /// An update in place whose `additional_addresses` changed: the new
    /// ones are bound first (a failure leaves the listener as it was), the
    /// ones kept keep their sockets, the ones gone stop accepting.
    fn rebind_additional(&self, r: &mut Running, config: &Listener) -> std::io::Result<()> {
        if r.config.additional == config.additional {
            return Ok(());
        }
        let mut added = Vec::new();
        for a in config
            .additional
            .iter()
            .filter(|a| !r.config.additional.contains(a))
        {
            added.push(bind(*a, false, &config.socket_options)?);
        }
        let gone: Vec<SocketAddr> = r
            .config
            .additional
            .iter()
            .filter(|a| !config.additional.contains(a))
            .copied()
            .collect();
        r.accept.retain(|(a, task)| {
            // The primary is kept by address; an additional one by whether
            // it stays (a port-0 address is matched by what it bound).
            let stays = !gone
                .iter()
                .any(|g| g == a || (g.port() == 0 && g.ip() == a.ip()));
            if !stays {
                task.abort();
            }
            stays
        });
        r.accept.extend(self.accept_on(added, &r.current)?);
        Ok(())
    }

    /// Starts accepting on a `bind_to_port: false` listener (binding its
    /// address even if it is not local): the kernel LB's fallback when it
    /// cannot serve the VIP. Returns false if there is no such listener or
    /// it already accepts.
    pub fn serve_unbound(&self, name: &str) -> std::io::Result<bool> {
        let mut running = self.running.lock().unwrap();
        let Some(r) = running.get_mut(name) else {
            return Ok(false);
        };
        if r.bound {
            return Ok(false);
        }
        let mut sockets = Vec::with_capacity(1 + r.config.additional.len());
        for a in std::iter::once(&r.config.address).chain(&r.config.additional) {
            sockets.push(bind(*a, true, &r.config.socket_options)?);
        }
        r.local_addr = sockets[0].local_addr()?;
        r.accept = self.accept_on(sockets, &r.current)?;
        r.bound = true;
        tracing::info!(listener = %name, address = %r.local_addr, "unbound listener now accepts in userspace (kernel LB fallback)");
        Ok(true)
    }

    /// Serves a connection the kernel LB redirected to Legate with the
    /// listener at its original destination `orig`, found as Envoy's
    /// `use_original_dst` finds it. False when no listener has that address.
    pub fn serve_redirected(
        &self,
        orig: SocketAddr,
        sock: tokio::net::TcpStream,
        peer: SocketAddr,
    ) -> bool {
        let Some(gen) = self.ctx.listener_at(orig) else {
            return false;
        };
        spawn_connection(gen, sock, peer, Some(orig), &self.ctx);
        true
    }

    /// Stops a listener: no new connections; open ones drain.
    pub fn remove(&self, name: &str) -> bool {
        let mut running = self.running.lock().unwrap();
        let Some(r) = running.remove(name) else {
            return false;
        };
        r.stop();
        stats::counter("listener_manager.listener_removed".into()).increment(1);
        stats::gauge("listener_manager.total_listeners_active".into()).set(running.len() as f64);
        tracing::info!(listener = %name, "listener removed; its connections drain");
        true
    }

    /// Stops accepting on every listener (or only INBOUND ones) and asks
    /// open connections to finish.
    pub fn drain_all(&self, inbound_only: bool) {
        for r in self
            .running
            .lock()
            .unwrap()
            .values()
            .filter(|r| !inbound_only || r.config.inbound)
        {
            r.accept.iter().for_each(|(_, a)| a.abort());
            let _ = r.drain.send(true);
        }
    }

    /// `/healthcheck/fail` (true) and `/healthcheck/ok`: while failed, HTTP
    /// connections on `drain_type: DEFAULT` listeners close after their
    /// next request, as Envoy's drain manager decides.
    pub fn set_health_check_failed(&self, failed: bool) {
        self.ctx
            .health_failed
            .store(failed, std::sync::atomic::Ordering::Relaxed);
    }

    /// A running listener's config.
    pub fn get(&self, name: &str) -> Option<Arc<Listener>> {
        self.running
            .lock()
            .unwrap()
            .get(name)
            .map(|r| r.config.clone())
    }

    /// Every listener's config.
    pub fn configs(&self) -> Vec<Arc<Listener>> {
        self.running
            .lock()
            .unwrap()
            .values()
            .map(|r| r.config.clone())
            .collect()
    }

    /// (name, bound address) of every listener.
    pub fn list(&self) -> Vec<(String, SocketAddr)> {
        let mut v: Vec<_> = self
            .running
            .lock()
            .unwrap()
            .values()
            .map(|r| (r.config.name.clone(), r.local_addr))
            .collect();
        v.sort();
        v
    }
}

async fn accept_loop(
    tcp: std::net::TcpListener,
    current: Arc<arc_swap::ArcSwap<Generation>>,
    ctx: Ctx,
) {
    let tcp = match tokio::net::TcpListener::from_std(tcp) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot register a listening socket; not accepting on it");
            return;
        }
    };
    loop {
        let (sock, peer) = match tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        spawn_connection(current.load_full(), sock, peer, None, &ctx);
    }
}

/// Serves one accepted connection with a listener generation. `local`
/// overrides the socket's own address for filter chain matching (the
/// original destination of a redirected connection).
fn spawn_connection(
    gen: Arc<Generation>,
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    ctx: &Ctx,
) {
    let config = &gen.config;
    // Counted from accept to close, filter phase included, as Envoy counts.
    let Ok(slot) = crate::overload::admit(config.exempt, &config.stat_prefix) else {
        tracing::debug!(%peer, listener = %config.name, "global connection limit reached; closing");
        return;
    };
    let _ = sock.set_nodelay(true);
    let workers = &ctx.workers;
    let ctx = ctx.clone();
    workers.spawn_connection(sock, move |sock| async move {
        let _slot = slot;
        let restored = local.is_some();
        let Some(local) = local.or_else(|| sock.local_addr().ok()) else {
            return;
        };
        let mut conn = Accepted {
            sock,
            direct_peer: peer,
            peer,
            local,
            restored,
        };
        let mut gen = gen;
        let mut handed_off = false;
        loop {
            let drain = gen.drain.clone();
            let work = serve_connection(conn, gen.config.clone(), &ctx, &drain, handed_off);
            // After a drain starts, connections get the drain time to
            // finish and are then closed, as Envoy closes them.
            let next = tokio::select! {
                next = work => next,
                _ = drain_deadline(drain.clone(), ctx.drain_time) => {
                    tracing::debug!(%peer, "drain time over; closing the connection");
                    None
                }
            };
            // Handed over (`use_original_dst`): once, as in Envoy.
            let Some((c, g)) = next else { break };
            (conn, gen, handed_off) = (c, g, true);
        }
    });
}

async fn drain_deadline(mut drain: watch::Receiver<bool>, drain_time: Duration) {
    if drain.wait_for(|d| *d).await.is_err() {
        // The listener is gone without draining (process exit): never fire.
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(drain_time).await;
}

/// The listener's access log line for a connection no filter chain takes.
fn log_unmatched(
    config: &Listener,
    conn: &crate::config::filter_chain::ConnInfo<'_>,
    direct_peer: SocketAddr,
    clusters: &Arc<crate::cluster_manager::ClusterManager>,
) {
    if config.access_log.is_empty() {
        return;
    }
    let e = crate::access_log::Entry {
        start: std::time::SystemTime::now(),
        duration: Duration::ZERO,
        bytes_received: 0,
        bytes_sent: 0,
        downstream_remote: conn.peer,
        downstream_direct_remote: direct_peer,
        downstream_local: conn.local,
        upstream_host: None,
        upstream_local: None,
        upstream_cluster: "",
        response_flags: "NR",
        requested_server_name: conn.server_name,
        http: None,
        trace: None,
    };
    for l in &config.access_log {
        l.log(&e, clusters);
    }
}

/// Runs a listener's filters, then its filter chain. Returns the connection
/// and the listener to hand it to when `use_original_dst` says so (and
/// `handed_off` says it has not been handed over already).
async fn serve_connection(
    mut conn: Accepted,
    config: Arc<Listener>,
    ctx: &Ctx,
    drain: &watch::Receiver<bool>,
    handed_off: bool,
) -> Option<(Accepted, Arc<Generation>)> {
    let mut found = listener_filters::Found::default();
    if !config.listener_filters.is_empty() {
        let filters = &config.listener_filters;
        let run = listener_filters::run(
            &mut conn.sock,
            filters,
            config.listener_filters_timeout,
            &mut found,
        );
        match run.await {
            Ok(()) => {}
            Err(listener_filters::Stop::TimedOut)
                if config.continue_on_listener_filters_timeout => {}
            Err(listener_filters::Stop::TimedOut) => {
                stats::counter(format!("{}.downstream_pre_cx_timeout", config.stat_prefix))
                    .increment(1);
                return None;
            }
            Err(listener_filters::Stop::Close) => return None,
        }
    }
    conn.peer = found.peer.unwrap_or(conn.peer);
    if let Some(restored) = found.local {
        conn.local = restored;
        conn.restored = true;
        if config.use_original_dst && !handed_off {
            if let Some(to) = ctx.listener_at(restored) {
                if to.config.name != config.name {
                    tracing::debug!(peer = %conn.peer, %restored, from = %config.name, to = %to.config.name, "original destination: handing the connection over");
                    return Some((conn, to));
                }
            }
        }
    }
    let Accepted {
        sock,
        direct_peer,
        peer,
        local,
        restored,
    } = conn;
    config
        .cx_total
        .get_or_init(|| stats::counter(format!("{}.downstream_cx_total", config.stat_prefix)))
        .increment(1);
    let conn = crate::config::filter_chain::ConnInfo {
        local,
        peer,
        direct_peer,
        server_name: &found.sni,
        transport_protocol: if found.tls { "tls" } else { "raw_buffer" },
        application_protocols: &found.alpn,
    };
    let Some(filter) = config.select(&conn) else {
        stats::counter(format!("{}.no_filter_chain_match", config.stat_prefix)).increment(1);
        log_unmatched(&config, &conn, direct_peer, &ctx.clusters);
        tracing::debug!(%peer, listener = %config.name, "no filter chain matches; closing");
        return None;
    };
    // Rate limits and connection limits first: a connection over one is
    // closed without being read (after a connection_limit's delay).
    for r in &filter.ratelimits {
        if !r.try_take(std::time::Instant::now()) {
            stats::counter(format!("local_ratelimit.{}.rate_limited", r.stat_prefix)).increment(1);
            return None;
        }
    }
    let mut _slots = Vec::with_capacity(filter.limits.len());
    for l in &filter.limits {
        match l.try_acquire() {
            Some(slot) => _slots.push(slot),
            None => {
                if let Some(d) = l.delay {
                    tokio::time::sleep(d).await;
                }
                return None;
            }
        }
    }
    let facts = |sni: &'_ str, cert: Option<&'_ [u8]>| -> bool {
        rbac_allows(
            filter,
            &crate::config::rbac::Facts {
                local,
                peer,
                remote: peer,
                sni,
                peer_cert: cert,
                http: None,
            },
        )
    };
    let tcp_conn = |sni: String, alpn: Option<Vec<u8>>, peer_san: String| tcp_proxy::Conn {
        peer,
        direct_peer,
        local,
        restored,
        sni,
        alpn,
        peer_san,
        inbound: config.inbound,
        exchange: filter.exchange.clone(),
        istio_stats: filter.istio_stats.clone(),
    };
    let hcm = match &filter.filter {
        NetworkFilter::Tcp(t) => {
            match &filter.tls {
                None => {
                    if facts(&found.sni, None) {
                        let c = tcp_conn(found.sni.clone(), None, String::new());
                        tcp_proxy::serve(sock, c, t.clone(), ctx.clusters.clone()).await
                    }
                }
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
                    let hs = tokio::time::timeout(filter.handshake_timeout, acceptor.accept(sock));
                    let down = handshake_done(hs.await, &config, peer)?;
                    let c = down.get_ref().1;
                    let cert = c.peer_certificates().and_then(|p| p.first());
                    let sni = c.server_name().unwrap_or("").to_string();
                    if facts(&sni, cert.map(|c| c.as_ref())) {
                        let alpn = c.alpn_protocol().map(<[u8]>::to_vec);
                        let san = crate::tls::verify::uri_san(cert.map(|c| c.as_ref()));
                        let c = tcp_conn(sni, alpn, san);
                        tcp_proxy::serve(down, c, t.clone(), ctx.clusters.clone()).await
                    }
                }
            }
            return None;
        }
        NetworkFilter::Http(h) => h.clone(),
    };
    hcm.stats().downstream_cx_total.increment(1);
    let codec = hcm.codec;
    let fd = sock.as_raw_fd();
    let peer_tls = filter
        .tls
        .as_ref()
        .map(|_| Arc::new(std::sync::OnceLock::new()));
    let xfcc_needs_local = matches!(
        hcm.xfcc,
        xfcc::Mode::AppendForward | xfcc::Mode::SanitizeSet
    );
    let settings = hcm.conn.clone();
    let closing = Arc::new(http_conn::Closing::new(
        settings.max_requests,
        settings.max_duration,
        config
            .drains_on_health_check_fail
            .then(|| ctx.health_failed.clone()),
    ));
    let meta = ConnMeta {
        listener: config.name.clone(),
        closing: closing.clone(),
        buffer_limit: config.buffer_limit,
        hcm,
        tls: filter.tls.is_some(),
        peer_tls: peer_tls.clone(),
        sni: found.sni.clone(),
        restored,
        outbound: config.outbound,
        inbound: config.inbound,
    };
    let dummy = Box::new(ResponseHeader::build(200, None).expect("static response header"));
    let digest = ProxyDigest::new(dummy, Some(Box::new(meta)));
    let (stream, is_h2): (pingora_core::protocols::Stream, bool) = match &filter.tls {
        None => {
            if !facts(&found.sni, None) {
                return None;
            }
            // Decide the protocol ourselves: pingora's own h2c check waits
            // for 24 bytes, which hangs a shorter HTTP/1.1 request.
            let is_h2 = sniff_h2(&sock).await?;
            let mut stream: pingora_core::protocols::l4::stream::Stream = sock.into();
            stream.set_socket_digest(digest_of(fd, peer, local));
            stream.set_proxy_digest(digest);
            (Box::new(stream), is_h2)
        }
        Some(tls) => {
            let mut stream: pingora_core::protocols::l4::stream::Stream = sock.into();
            stream.set_socket_digest(digest_of(fd, peer, local));
            stream.set_proxy_digest(digest);
            let acceptor =
                pingora_core::listeners::tls::Acceptor::from_server_config(tls.config.clone());
            let hs = tokio::time::timeout(filter.handshake_timeout, acceptor.tls_handshake(stream));
            let stream = handshake_done(hs.await, &config, peer)?;
            use pingora_core::protocols::{Ssl, ALPN};
            if let Some(t) = stream.get_ssl() {
                if !facts(t.server_name().unwrap_or(""), t.peer_certificate_der()) {
                    return None;
                }
            }
            if let (Some(t), Some(peer_tls)) = (stream.get_ssl(), &peer_tls) {
                if let Some(chain) = t.peer_cert_chain_der().filter(|c| !c.is_empty()) {
                    let _ = peer_tls.set(xfcc::PeerTls {
                        chain: chain.iter().map(|c| c.to_vec()).collect(),
                        local_uris: if xfcc_needs_local {
                            tls.local_uris(t.server_name())
                        } else {
                            Vec::new()
                        },
                        ..Default::default()
                    });
                }
            }
            // ALPN decides; without it, HTTP/1.1 unless the codec is HTTP/2.
            let is_h2 = match stream.selected_alpn_proto() {
                Some(ALPN::H2) => true,
                Some(_) => false,
                None => codec == Codec::Http2,
            };
            (Box::new(stream), is_h2)
        }
    };
    if (codec == Codec::Http2 && !is_h2) || (codec == Codec::Http1 && is_h2) {
        tracing::debug!(%peer, ?codec, "protocol not allowed by codec_type");
        return None;
    }
    let conn = http_conn::Conn {
        proxy: ctx.proxy(),
        settings: &settings,
        drain,
        closing,
    };
    if is_h2 {
        let (stream, gathered) = corked::Corked::new(stream, corked::SendAt::LoopEnd);
        corked::flush_when_idle(gathered, conn.http2(Box::new(stream))).await;
    } else {
        let (stream, gathered) = corked::Corked::new(stream, corked::SendAt::Park);
        corked::flush_when_idle(gathered, conn.http1(Box::new(stream))).await;
    }
    None
}

/// The socket facts pingora hands the connection manager, with the
/// addresses the listener filters settled on (a PROXY header's client, an
/// original destination) rather than the socket's own.
fn digest_of(fd: std::os::fd::RawFd, peer: SocketAddr, local: SocketAddr) -> SocketDigest {
    use pingora_core::protocols::l4::socket::SocketAddr as Addr;
    let d = SocketDigest::from_raw_fd(fd);
    let _ = d.peer_addr.set(Some(Addr::Inet(peer)));
    let _ = d.local_addr.set(Some(Addr::Inet(local)));
    d
}

/// The chain's `rbac` filters, in order; false: close the connection (as
/// Envoy's network RBAC does, without a response).
fn rbac_allows(
    chain: &crate::config::listener::FilterChain,
    f: &crate::config::rbac::Facts,
) -> bool {
    for r in &chain.rbac {
        let (ok, policy) = r.allows(f);
        let outcome = if ok { "allowed" } else { "denied" };
        // Envoy concatenates: Istio's `tcp.` gives `tcp.rbac.allowed`.
        stats::counter(format!("{}rbac.{outcome}", r.stat_prefix)).increment(1);
        if !ok {
            tracing::debug!(peer = %f.peer, ?policy, "rbac: connection denied");
            return false;
        }
    }
    true
}

/// A finished (or failed, or timed out) TLS handshake: the stream, or None
/// after counting the failure as Envoy's listener `ssl.*` stats do.
fn handshake_done<S, E: std::fmt::Display>(
    r: Result<Result<S, E>, tokio::time::error::Elapsed>,
    config: &Listener,
    peer: SocketAddr,
) -> Option<S> {
    let p = &config.stat_prefix;
    match r {
        Ok(Ok(s)) => {
            stats::counter(format!("{p}.ssl.handshake")).increment(1);
            Some(s)
        }
        Ok(Err(e)) => {
            stats::counter(format!("{p}.ssl.connection_error")).increment(1);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            stats::counter(format!("{p}.ssl.connection_error")).increment(1);
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Peeks until the bytes either diverge from the HTTP/2 preface (HTTP/1) or
/// complete it (h2c). `None`: the client closed or stayed silent.
async fn sniff_h2(sock: &tokio::net::TcpStream) -> Option<bool> {
    let mut buf = [0u8; 24];
    let sniff = listener_filters::peek_until(sock, &mut buf, |b, full| {
        if b != &H2_PREFACE[..b.len()] {
            Some(false)
        } else {
            full.then_some(true)
        }
    });
    // Envoy's default listener_filters_timeout.
    tokio::time::timeout(Duration::from_secs(15), sniff)
        .await
        .ok()
        .flatten()
}
