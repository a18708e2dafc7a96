//! Listener filters: what is learnt about a connection before its filter
//! chain is chosen, run in config order. The inspectors (`tls_inspector`,
//! `http_inspector`) peek and never read, so the chain sees every byte;
//! `proxy_protocol` reads exactly its header; `original_dst` asks the
//! kernel where the connection was going before it was redirected.

pub mod http_inspector;
pub mod proxy_protocol;

use crate::config::listener::{ListenerFilter, ListenerFilterEntry, ProxyProtocolConfig};
use crate::stats;
use crate::tls::hello::{self, Hello, MAX_CLIENT_HELLO};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// What the listener filters found.
#[derive(Debug, Default)]
pub struct Found {
    /// A TLS ClientHello was seen: transport protocol `tls`.
    pub tls: bool,
    pub sni: String,
    /// From the ClientHello, or `http_inspector`'s one protocol.
    pub alpn: Vec<String>,
    /// The client's address from a PROXY protocol header.
    pub peer: Option<SocketAddr>,
    /// The restored destination: from `original_dst`, or a PROXY header.
    /// Set only when it was restored, which is what lets a
    /// `use_original_dst` listener hand the connection over.
    pub local: Option<SocketAddr>,
}

/// Why the listener filters stopped short.
pub enum Stop {
    /// The listener filters' timeout passed first.
    TimedOut,
    /// The client closed, or a filter refused the connection: close it.
    Close,
}

/// Runs a listener's filters in order within `timeout` (for the whole
/// sequence, as Envoy). On a timeout, `found` keeps what was learnt.
pub async fn run(
    sock: &mut TcpStream,
    filters: &[ListenerFilterEntry],
    timeout: Option<Duration>,
    found: &mut Found,
) -> Result<(), Stop> {
    let all = async {
        for e in filters {
            if let Some(p) = &e.disabled {
                // On the restored destination once `original_dst` ran.
                let dst = found.local.or_else(|| sock.local_addr().ok());
                if dst.is_some_and(|d| p.matches(d.port())) {
                    continue;
                }
            }
            match &e.filter {
                ListenerFilter::OriginalDst => original_dst(sock, found),
                ListenerFilter::ProxyProtocol(c) => proxy_protocol(sock, c, found).await?,
                ListenerFilter::TlsInspector => tls_inspector(sock, found).await?,
                ListenerFilter::HttpInspector => http_inspector(sock, found).await?,
            }
        }
        Ok(())
    };
    match timeout {
        Some(t) => tokio::time::timeout(t, all)
            .await
            .unwrap_or(Err(Stop::TimedOut)),
        None => all.await,
    }
}

/// `original_dst`: SO_ORIGINAL_DST (iptables/nftables REDIRECT or DNAT).
/// Without a NAT entry the connection keeps its own address.
fn original_dst(sock: &TcpStream, found: &mut Found) {
    let s = socket2::SockRef::from(sock);
    let local = sock.local_addr().ok();
    let orig = match local {
        Some(SocketAddr::V6(_)) => s.original_dst_ipv6(),
        _ => s.original_dst(),
    };
    if let Some(orig) = orig.ok().and_then(|a| a.as_socket()) {
        // Envoy restores it even when it equals the socket's own address;
        // a hand-off then finds this same listener and nothing changes.
        found.local = Some(orig);
    }
}

/// `proxy_protocol`: reads a v1 or v2 header and takes the client and
/// destination addresses from it.
async fn proxy_protocol(
    sock: &mut TcpStream,
    c: &ProxyProtocolConfig,
    found: &mut Found,
) -> Result<(), Stop> {
    use proxy_protocol::{parse, Parse, Version};
    let count = |what: &str| stats::counter(format!("{}{what}", c.stat_prefix)).increment(1);
    // Room for any v1 line and any v2 address block; a v2 header with
    // TLVs beyond that is peeked again at its own length (up to 64 KiB).
    let mut buf = vec![0u8; 256];
    // A header, or NeedMore once the buffer is full.
    let decide = |b: &[u8], full: bool| match parse(b) {
        Parse::NeedMore if !full => None,
        other => Some(other),
    };
    let mut parsed = peek_until(sock, &mut buf, decide)
        .await
        .ok_or(Stop::Close)?;
    if let (Parse::NeedMore, Some(len)) = (&parsed, proxy_protocol::v2_len(&buf)) {
        buf = vec![0u8; len];
        parsed = peek_until(sock, &mut buf, decide)
            .await
            .ok_or(Stop::Close)?;
    }
    let disallowed = |v: Version| match v {
        Version::V1 => c.disallow_v1,
        Version::V2 => c.disallow_v2,
    };
    // With allow_requests_without_proxy_protocol a disallowed version is
    // not looked for at all: its bytes pass on as data, as Envoy does.
    if c.allow_without {
        if let Parse::Header { version, .. } | Parse::Error(version) = parsed {
            if disallowed(version) {
                parsed = Parse::NotProxy;
            }
        }
    }
    let (version, len, addrs) = match parsed {
        Parse::Header {
            version,
            len,
            addrs,
        } => (version, len, addrs),
        Parse::NotProxy if c.allow_without => {
            count("not_found_allowed");
            return Ok(());
        }
        Parse::NotProxy => {
            count("not_found_disallowed");
            return Err(Stop::Close);
        }
        Parse::Error(v) => {
            count(&format!("versions.{}.error", v.stat()));
            return Err(Stop::Close);
        }
        Parse::NeedMore => {
            count("versions.v2.error");
            return Err(Stop::Close);
        }
    };
    if disallowed(version) {
        count(&format!("versions.{}.disallowed", version.stat()));
        return Err(Stop::Close);
    }
    // The header is queued already; read exactly it, no further.
    sock.read_exact(&mut buf[..len])
        .await
        .map_err(|_| Stop::Close)?;
    count(&format!("versions.{}.found", version.stat()));
    if let Some((src, dst)) = addrs {
        found.peer = Some(src);
        found.local = Some(dst);
    }
    Ok(())
}

/// `http_inspector`: HTTP/1.x or h2c as the application protocol, unless
/// an earlier filter found TLS.
async fn http_inspector(sock: &TcpStream, found: &mut Found) -> Result<(), Stop> {
    use http_inspector::{inspect, Inspect, MAX_INSPECT};
    if found.tls {
        return Ok(());
    }
    let mut buf = vec![0u8; MAX_INSPECT];
    let r = peek_until(sock, &mut buf, |b, full| match inspect(b) {
        Inspect::NeedMore if !full => None,
        Inspect::NeedMore => Some(Inspect::NotHttp),
        other => Some(other),
    })
    .await
    .ok_or(Stop::Close)?;
    match r {
        Inspect::Found(p) => {
            let stat = match p {
                "h2c" => "http2_found",
                "http/1.0" => "http10_found",
                _ => "http11_found",
            };
            stats::counter(format!("http_inspector.{stat}")).increment(1);
            found.alpn = vec![p.to_string()];
        }
        _ => stats::counter("http_inspector.http_not_found".into()).increment(1),
    }
    Ok(())
}

/// Peeks (never reads) at a new connection's first bytes until `decide`
/// has an answer; None when the client closes first. `decide` sees the
/// bytes so far and whether they fill `buf`. While no new bytes come it
/// backs off (1 ms doubling to 50 ms), so a slow sender costs little: peek
/// returns at once while bytes are queued.
pub async fn peek_until<T>(
    sock: &TcpStream,
    buf: &mut [u8],
    mut decide: impl FnMut(&[u8], bool) -> Option<T>,
) -> Option<T> {
    let mut delay = Duration::from_millis(1);
    let mut seen = 0;
    loop {
        let n = match sock.peek(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => n,
        };
        if let Some(t) = decide(&buf[..n], n == buf.len()) {
            return Some(t);
        }
        if n == seen {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
        seen = n;
    }
}

/// `tls_inspector`: SNI, ALPN and the `tls` transport from a ClientHello.
async fn tls_inspector(sock: &TcpStream, found: &mut Found) -> Result<(), Stop> {
    let mut buf = vec![0u8; MAX_CLIENT_HELLO + 64];
    let hello = peek_until(sock, &mut buf, |b, full| match hello::parse(b) {
        Hello::NeedMore if !full => None,
        other => Some(other),
    })
    .await;
    match hello {
        None => Err(Stop::Close),
        Some(Hello::NeedMore | Hello::TooLarge) => {
            stats::counter("tls_inspector.client_hello_too_large".into()).increment(1);
            Err(Stop::Close)
        }
        Some(Hello::NotTls) => {
            stats::counter("tls_inspector.tls_not_found".into()).increment(1);
            Ok(())
        }
        Some(Hello::Tls { sni, alpn }) => {
            stats::counter("tls_inspector.tls_found".into()).increment(1);
            let which = |found: bool, what: &str| {
                let s = if found { "found" } else { "not_found" };
                stats::counter(format!("tls_inspector.{what}_{s}")).increment(1);
            };
            which(sni.is_some(), "sni");
            which(!alpn.is_empty(), "alpn");
            found.tls = true;
            found.sni = sni.unwrap_or_default();
            found.alpn = alpn;
            Ok(())
        }
    }
}
