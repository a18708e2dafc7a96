//! `tcp_proxy`: one upstream connection per downstream connection, bytes
//! copied both ways. A half-close is passed on (`shutdown(SHUT_WR)`) and the
//! other direction keeps flowing, as Envoy does. A connection with no bytes
//! either way for `idle_timeout` (Envoy's default: 1 h) is closed.

use crate::cluster_manager::ClusterManager;
use crate::config::listener::TcpProxy;
use crate::stats;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A downstream connection split into its read and write halves: a plain
/// socket splits for free; a TLS stream shares its session between them.
pub trait Halves: Send + 'static {
    type R: AsyncRead + Unpin + Send;
    type W: AsyncWrite + Unpin + Send;
    fn halves(self) -> (Self::R, Self::W);
    /// The TCP socket underneath (a second handle on it), to reset it
    /// once the halves are in use.
    fn socket(&self) -> Option<socket2::Socket>;
}

impl Halves for TcpStream {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = NoFinOnDrop;
    fn halves(self) -> (Self::R, Self::W) {
        let (r, w) = self.into_split();
        (r, NoFinOnDrop(Some(w)))
    }
    fn socket(&self) -> Option<socket2::Socket> {
        socket2::SockRef::from(self).try_clone().ok()
    }
}

impl Halves for tokio_rustls::server::TlsStream<TcpStream> {
    type R = tokio::io::ReadHalf<Self>;
    type W = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
    fn socket(&self) -> Option<socket2::Socket> {
        socket2::SockRef::from(self.get_ref().0).try_clone().ok()
    }
}

impl Halves for tokio_rustls::client::TlsStream<TcpStream> {
    type R = tokio::io::ReadHalf<Self>;
    type W = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
    fn socket(&self) -> Option<socket2::Socket> {
        socket2::SockRef::from(self.get_ref().0).try_clone().ok()
    }
}

/// tokio's owned write half sends a FIN when dropped; a connection being
/// reset must not end cleanly first. Dropped, this closes nothing itself:
/// the socket closes with its read half, with a FIN or, when asked, a
/// reset. Ends passed on as half-closes are shut down explicitly.
pub struct NoFinOnDrop(Option<tokio::net::tcp::OwnedWriteHalf>);

impl NoFinOnDrop {
    fn half(self: std::pin::Pin<&mut Self>) -> std::pin::Pin<&mut tokio::net::tcp::OwnedWriteHalf> {
        std::pin::Pin::new(self.get_mut().0.as_mut().expect("taken only on drop"))
    }
}

impl Drop for NoFinOnDrop {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.forget();
        }
    }
}

impl AsyncWrite for NoFinOnDrop {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.half().poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.half().poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.half().poll_shutdown(cx)
    }
}

/// The downstream connection's addresses, as the listener settled them.
pub struct Conn {
    /// The client (from a PROXY header when there was one).
    pub peer: SocketAddr,
    pub direct_peer: SocketAddr,
    pub local: SocketAddr,
    /// Whether `local` is a restored original destination (what an
    /// ORIGINAL_DST cluster connects to).
    pub restored: bool,
    /// SNI, from `tls_inspector` or the TLS handshake.
    pub sni: String,
    /// The ALPN protocol the TLS handshake settled on.
    pub alpn: Option<Vec<u8>>,
    /// The client certificate's first URI SAN.
    pub peer_san: String,
    /// The listener's traffic_direction is INBOUND.
    pub inbound: bool,
    /// Istio's network filters on the chain: the metadata exchange and
    /// `istio.stats`.
    pub exchange: Option<Arc<crate::istio::exchange::Exchange>>,
    pub istio_stats: Option<Arc<crate::istio::stats::PluginConfig>>,
}

/// What happened on a connection, for stats and access logs; filled in as
/// it goes, so a connection cut short still reports what it did.
#[derive(Default)]
struct Summary {
    /// The cluster exists (Envoy logs `%UPSTREAM_CLUSTER%` only then).
    cluster_found: bool,
    upstream: Option<SocketAddr>,
    /// The host connected to (its endpoint metadata labels Istio's metrics).
    host: Option<Arc<crate::cluster_manager::UpstreamHost>>,
    upstream_local: Option<SocketAddr>,
    /// Envoy's response flags: `NC` no cluster, `UH` no healthy host,
    /// `UF,URX` every connect attempt failed.
    flags: &'static str,
    rx: AtomicU64,
    tx: AtomicU64,
    /// The peers the metadata exchange read, each side.
    peers: Arc<crate::istio::peer::Peers>,
}

pub async fn serve<D: Halves>(
    down: D,
    conn: Conn,
    t: Arc<TcpProxy>,
    clusters: Arc<ClusterManager>,
) {
    let prefix = format!("tcp.{}.", t.stat_prefix);
    stats::counter(format!("{prefix}downstream_cx_total")).increment(1);
    let (start, began) = (std::time::SystemTime::now(), tokio::time::Instant::now());
    let name = t.pick_cluster(rand::random());
    let mut sum = Summary::default();
    let report = conn
        .istio_stats
        .as_ref()
        .map(|c| crate::istio::stats::TcpReport::new(c.clone()));
    let work = proxy(
        down,
        &conn,
        name,
        &t,
        &clusters,
        &prefix,
        &mut sum,
        report.as_ref(),
    );
    match t.max_duration {
        None => work.await,
        // Dropping the work closes both sockets.
        Some(d) => {
            if tokio::time::timeout(d, work).await.is_err() {
                stats::counter(format!("{prefix}max_downstream_connection_duration")).increment(1);
            }
        }
    }
    let (rx, tx) = (
        sum.rx.load(Ordering::Relaxed),
        sum.tx.load(Ordering::Relaxed),
    );
    stats::counter(format!("{prefix}downstream_cx_rx_bytes_total")).increment(rx);
    stats::counter(format!("{prefix}downstream_cx_tx_bytes_total")).increment(tx);
    if !t.access_log.is_empty() || report.is_some() {
        let e = crate::access_log::Entry {
            start,
            duration: began.elapsed(),
            bytes_received: rx,
            bytes_sent: tx,
            downstream_remote: conn.peer,
            downstream_direct_remote: conn.direct_peer,
            downstream_local: conn.local,
            upstream_host: sum.upstream,
            upstream_local: sum.upstream_local,
            upstream_cluster: if sum.cluster_found { name } else { "" },
            response_flags: sum.flags,
            requested_server_name: &conn.sni,
            http: None,
            trace: None,
        };
        for l in &t.access_log {
            l.log(&e, &clusters);
        }
        if let Some(r) = &report {
            let cluster = clusters.get(name);
            r.closed(&istio_facts(&conn, &sum, r, name, cluster.as_deref()), &e);
        }
    }
}

/// What `istio.stats` labels a connection with.
fn istio_facts<'a>(
    conn: &'a Conn,
    sum: &'a Summary,
    r: &crate::istio::stats::TcpReport,
    name: &'a str,
    cluster: Option<&'a crate::cluster_manager::Cluster>,
) -> crate::istio::stats::Facts<'a> {
    use crate::istio::stats::Reporter;
    let reporter = r.reporter(conn.inbound);
    crate::istio::stats::Facts {
        reporter,
        peer: match reporter {
            Reporter::Client => sum.peers.upstream.get(),
            _ => sum.peers.downstream.get(),
        }
        .map(|p| &**p),
        endpoint: sum.host.as_ref().and_then(|h| h.istio_workload.as_deref()),
        host: None,
        route_name: "",
        cluster,
        cluster_name: name,
        peer_san: &conn.peer_san,
    }
}

#[allow(clippy::too_many_arguments)]
async fn proxy<D: Halves>(
    down: D,
    conn: &Conn,
    name: &str,
    t: &TcpProxy,
    clusters: &ClusterManager,
    prefix: &str,
    sum: &mut Summary,
    report: Option<&crate::istio::stats::TcpReport>,
) {
    let peer = conn.peer;
    let Some(cluster) = clusters.get(name) else {
        // Envoy closes the connection when the cluster does not exist.
        stats::counter(format!("{prefix}downstream_cx_no_route")).increment(1);
        tracing::debug!(%peer, cluster = %name, "tcp_proxy: unknown cluster");
        sum.flags = "NC";
        return;
    };
    sum.cluster_found = true;
    // The cluster's connection limit (DEFAULT priority), checked before
    // connecting as Envoy's tcp_proxy does: over it, the client is closed.
    let Some(_cx) = cluster
        .breakers
        .default_priority()
        .connections
        .try_acquire()
    else {
        cluster.stats.upstream_cx_overflow.increment(1);
        sum.flags = "UO";
        return;
    };
    let snap = cluster.snapshot();
    let mut up = None;
    // Each failed attempt picks again (max_connect_attempts, default 1); as
    // in Envoy's tcp_proxy the balancer is not told which hosts failed.
    for _ in 0..t.max_connect_attempts {
        // Envoy's source_ip hash: xxHash64 of the address as text.
        let hash = t
            .hash_source_ip
            .then(|| xxhash_rust::xxh64::xxh64(peer.ip().to_string().as_bytes(), 0));
        let host = match &cluster.config.original_dst {
            // No header to read: the restored destination, if any.
            Some(od) => od
                .destination(None, conn.restored.then_some(conn.local))
                .0
                .map(|a| cluster.original_dst_host(a)),
            None => snap.pick(hash, rand::random(), &|_| false, None),
        };
        let Some(host) = host else {
            cluster.stats.upstream_cx_none_healthy.increment(1);
            sum.flags = "UH";
            return;
        };
        // Envoy logs the last host tried, connected or not.
        sum.upstream = Some(host.addr);
        let connect = tokio::time::timeout(
            cluster.config.connect_timeout,
            crate::tls::upstream::tcp_connect(host.addr, cluster.config.bind.for_peer(host.addr)),
        );
        match connect.await {
            Ok(Ok(s)) => {
                if let Some(k) = &cluster.config.tcp_keepalive {
                    let _ = k.apply(&s);
                }
                cluster.report(host.addr, crate::outlier::Outcome::Connected);
                up = Some((s, host));
                break;
            }
            Ok(Err(e)) => {
                cluster.report(host.addr, crate::outlier::Outcome::ConnectFailed);
                stats::counter(format!("cluster.{name}.upstream_cx_connect_fail")).increment(1);
                tracing::debug!(%peer, upstream = %host.addr, error = %e, "tcp_proxy: connect failed");
            }
            Err(_) => {
                cluster.report(host.addr, crate::outlier::Outcome::Timeout);
                stats::counter(format!("cluster.{name}.upstream_cx_connect_timeout")).increment(1);
            }
        }
    }
    let Some((up, host)) = up else {
        sum.flags = "UF,URX";
        return;
    };
    sum.upstream_local = up.local_addr().ok();
    stats::counter(format!("cluster.{name}.upstream_cx_total")).increment(1);
    if let Some(h) = &cluster.health {
        h.had_traffic.store(true, Ordering::Relaxed);
    }
    let _ = up.set_nodelay(true);
    host.active_requests.fetch_add(1, Ordering::Relaxed);
    sum.host = Some(host.clone());
    // Istio's metadata exchange, each side on its own ALPN.
    let down_x = conn
        .exchange
        .as_deref()
        .filter(|x| x.active(conn.alpn.as_deref()));
    let up_x = |alpn: Option<&[u8]>| {
        cluster
            .config
            .exchange
            .as_deref()
            .filter(|x| x.active(alpn))
    };
    // Once the upstream's ALPN is known: the exchanges to run, and the
    // connection reported opened if its reporting side learns no peer (one
    // that may learn it counts as opened when it closes).
    let begin = |sum: &Summary, up_alpn: Option<&[u8]>| {
        let up_x = up_x(up_alpn);
        if let Some(r) = report {
            use crate::istio::stats::Reporter;
            let learns = match r.reporter(conn.inbound) {
                Reporter::Client => up_x.is_some(),
                _ => down_x.is_some(),
            };
            if !learns {
                let e = opened_entry(conn, sum, name);
                r.opened(&istio_facts(conn, sum, r, name, Some(&cluster)), &e);
            }
        }
        Exchanges {
            down: down_x,
            up: up_x,
            peers: sum.peers.clone(),
        }
    };
    let idle = match host.tls.as_ref().map(|h| &h.tls) {
        None => {
            let x = begin(sum, None);
            pipe(down, up, t.idle_timeout, sum, x).await
        }
        Some(tls) => {
            use crate::tls::upstream::{handshake, server_name};
            let sni = server_name(Some(&tls.sni), host.addr);
            let hs = tokio::time::timeout(cluster.config.connect_timeout, handshake(tls, sni, up));
            match hs.await {
                Ok(Ok(up)) => {
                    let x = begin(sum, up.get_ref().1.alpn_protocol());
                    pipe(down, up, t.idle_timeout, sum, x).await
                }
                _ => {
                    stats::counter(format!(
                        "cluster.{name}.ssl.connection_error",
                        name = cluster.config.name
                    ))
                    .increment(1);
                    tracing::debug!(%peer, upstream = %host.addr, "tcp_proxy: upstream TLS handshake failed");
                    sum.flags = "UF,URX";
                    false
                }
            }
        }
    };
    host.active_requests.fetch_sub(1, Ordering::Relaxed);
    if idle {
        stats::counter(format!("{prefix}idle_timeout")).increment(1);
    }
}

/// A copy buffer starts small, so idle connections cost little, and grows
/// (to `MAX_BUF`, Envoy's default per-connection buffer limit) while reads
/// keep filling it, so bulk transfers take fewer syscalls: iperf3 through
/// tcp_proxy went from 12.5 to 20.4 Gbit/s (bench/tcp-proxy.sh).
const MIN_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 1024 * 1024;

fn grow_if_full(buf: &mut Vec<u8>, n: usize) {
    if n == buf.len() && buf.len() < MAX_BUF {
        buf.resize(buf.len() * 4, 0);
    }
}

/// How one direction of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Flow {
    /// The reader's end (FIN), passed on as a half-close.
    Fin,
    /// Reading failed: the reading side reset the connection.
    ReadFailed,
    /// Writing failed: the writing side reset the connection.
    WriteFailed,
}

/// Copies one direction until its end or an error, counting the bytes and
/// noting the time of the last ones in `last` (milliseconds since `epoch`).
async fn one_way<R, W>(
    r: &mut R,
    w: &mut W,
    bytes: &AtomicU64,
    last: &AtomicU64,
    epoch: Instant,
) -> Flow
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; MIN_BUF];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => {
                let _ = w.shutdown().await;
                return Flow::Fin;
            }
            Ok(n) => n,
            Err(_) => return Flow::ReadFailed,
        };
        if w.write_all(&buf[..n]).await.is_err() {
            return Flow::WriteFailed;
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        grow_if_full(&mut buf, n);
    }
}

/// Copies both ways at once, each direction on its own: a write that waits
/// for its reader never holds up the other direction (an upstream that
/// echoes, and stops reading while its answers are unread, would otherwise
/// deadlock both). An end is passed on as a half-close; a reset on either
/// side is passed on as a reset of the other, as Envoy does, so a transfer
/// cut short never looks complete. Counts the bytes received from and sent
/// to downstream in `sum` as they pass; returns whether the idle timer
/// fired.
async fn pipe<D: Halves, U: Halves>(
    down: D,
    up: U,
    idle: Option<Duration>,
    sum: &Summary,
    x: Exchanges<'_>,
) -> bool {
    let (down_sock, up_sock) = (down.socket(), up.socket());
    let (mut dr, mut dw) = down.halves();
    let (mut ur, mut uw) = up.halves();
    let last = AtomicU64::new(0);
    let epoch = Instant::now();
    // Each direction sends the frame of the exchange toward its writer's
    // side and reads the frame of the exchange on its reader's side.
    let upward = async {
        let sent = x.up.map(|e| e.frame());
        let read = x.down.map(|e| (e, &x.peers.downstream));
        match exchange(&mut dr, &mut uw, &sum.rx, sent, read).await {
            Some(f) => f,
            None => one_way(&mut dr, &mut uw, &sum.rx, &last, epoch).await,
        }
    };
    let downward = async {
        let sent = x.down.map(|e| e.frame());
        let read = x.up.map(|e| (e, &x.peers.upstream));
        match exchange(&mut ur, &mut dw, &sum.tx, sent, read).await {
            Some(f) => f,
            None => one_way(&mut ur, &mut dw, &sum.tx, &last, epoch).await,
        }
    };
    tokio::pin!(upward, downward);
    let (mut to_up, mut to_down) = (None, None);
    // A day stands in for "never" when the idle timeout is disabled.
    let idle_for = idle.unwrap_or(Duration::from_secs(86_400));
    // Traffic only notes the time; the timer is moved when it fires early,
    // not on every read.
    let timer = tokio::time::sleep(idle_for);
    tokio::pin!(timer);
    let mut idled = false;
    loop {
        tokio::select! {
            f = &mut upward, if to_up.is_none() => to_up = Some(f),
            f = &mut downward, if to_down.is_none() => to_down = Some(f),
            _ = &mut timer, if idle.is_some() => {
                let seen = Duration::from_millis(last.load(Ordering::Relaxed));
                let deadline = epoch + seen + idle_for;
                if deadline <= Instant::now() {
                    idled = true;
                    break;
                }
                timer.as_mut().reset(deadline);
            }
        }
        let failed = |f: Option<Flow>| f.is_some_and(|f| f != Flow::Fin);
        if failed(to_up) || failed(to_down) || (to_up.is_some() && to_down.is_some()) {
            break;
        }
    }
    tracing::debug!(?to_up, ?to_down, idled, "tcp_proxy: connection ended");
    // A failed read is its own side's reset; a failed write, the other's.
    if to_up == Some(Flow::WriteFailed) || to_down == Some(Flow::ReadFailed) {
        reset_on_close(&down_sock);
    }
    if to_up == Some(Flow::ReadFailed) || to_down == Some(Flow::WriteFailed) {
        reset_on_close(&up_sock);
    }
    idled
}

/// Istio's metadata exchange on a connection, each side when active.
struct Exchanges<'a> {
    down: Option<&'a crate::istio::exchange::Exchange>,
    up: Option<&'a crate::istio::exchange::Exchange>,
    peers: Arc<crate::istio::peer::Peers>,
}

/// One direction's part of the exchange, before its bytes are copied:
/// `sent` goes to the writer first; `read` takes the peer's frame off the
/// reader's front (what follows it is passed on). The flow's end if the
/// direction ended on the way.
async fn exchange<R, W>(
    r: &mut R,
    w: &mut W,
    bytes: &AtomicU64,
    sent: Option<bytes::Bytes>,
    read: Option<(
        &crate::istio::exchange::Exchange,
        &std::sync::OnceLock<Arc<crate::istio::peer::Workload>>,
    )>,
) -> Option<Flow>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Some(frame) = sent {
        if w.write_all(&frame).await.is_err() {
            return Some(Flow::WriteFailed);
        }
    }
    let (x, slot) = read?;
    let (peer, rest, failed) = match x.read_peer(r).await {
        Ok((peer, rest)) => (peer, rest, false),
        Err(rest) => (None, rest, true),
    };
    if let Some(p) = peer {
        let _ = slot.set(Arc::new(p));
    }
    if !rest.is_empty() {
        if w.write_all(&rest).await.is_err() {
            return Some(Flow::WriteFailed);
        }
        bytes.fetch_add(rest.len() as u64, Ordering::Relaxed);
    }
    // A reset while the frame was read is the reader's reset, passed on as
    // one (a read after it would see a clean end).
    failed.then_some(Flow::ReadFailed)
}

/// The entry `istio.stats` reads as a connection opens (nothing moved yet).
fn opened_entry<'a>(
    conn: &'a Conn,
    sum: &'a Summary,
    name: &'a str,
) -> crate::access_log::Entry<'a> {
    crate::access_log::Entry {
        start: std::time::SystemTime::now(),
        duration: Duration::ZERO,
        bytes_received: 0,
        bytes_sent: 0,
        downstream_remote: conn.peer,
        downstream_direct_remote: conn.direct_peer,
        downstream_local: conn.local,
        upstream_host: sum.upstream,
        upstream_local: sum.upstream_local,
        upstream_cluster: name,
        response_flags: "",
        requested_server_name: &conn.sni,
        http: None,
        trace: None,
    }
}

/// Makes closing the socket send a reset (RST) rather than a FIN: linger
/// on, with no time to linger. The socket closes when its last handle (the
/// halves, and this one) is dropped.
fn reset_on_close(sock: &Option<socket2::Socket>) {
    if let Some(s) = sock {
        let _ = s.set_linger(Some(Duration::ZERO));
    }
}
