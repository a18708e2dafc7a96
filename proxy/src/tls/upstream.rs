//! TLS origination. HTTP upstreams reach it through pingora's `custom_l4`
//! hook: pingora sees a plaintext peer whose "socket" is already a TLS
//! stream, so every handshake uses the cluster's cached rustls config and
//! Envoy's verification (SAN matchers, pins, SDS) rather than pingora's
//! per-connection config, which checks the chain only. HTTP/2 then runs
//! over the ALPN-negotiated stream as prior knowledge.

use crate::config::tls::ClientTls;
use async_trait::async_trait;
use pingora_core::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// The name a handshake is made for: the SNI when one is sent, else the
/// peer's IP (rustls sends no SNI for an IP, as Envoy sends none).
pub fn server_name(sni: Option<&str>, addr: SocketAddr) -> ServerName<'static> {
    sni.filter(|s| !s.is_empty())
        .and_then(|s| ServerName::try_from(s.to_string()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
}

/// A TLS handshake over `tcp` with the cluster's context.
pub async fn handshake(
    tls: &ClientTls,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> std::io::Result<TlsStream> {
    tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(name, tcp)
        .await
}

/// pingora's `custom_l4` for a TLS cluster: TCP connect, then the TLS
/// handshake, both within `timeout` (the cluster's `connect_timeout`).
#[derive(Debug)]
pub struct TlsConnect {
    pub tls: Arc<ClientTls>,
    /// The SNI; None: none is sent.
    pub sni: Option<String>,
    pub timeout: Duration,
    pub keepalive: Option<crate::config::cluster::TcpKeepalive>,
    /// The cluster's `upstream_bind_config` source addresses.
    pub bind: crate::config::cluster::Bind,
}

impl TlsConnect {
    /// TCP connect and the TLS handshake (the caller bounds it by the
    /// connect timeout).
    pub async fn handshake_with(&self, inet: SocketAddr) -> std::io::Result<TlsStream> {
        let tcp = tcp_connect(inet, self.bind.for_peer(inet)).await?;
        tcp.set_nodelay(true)?;
        if let Some(k) = &self.keepalive {
            k.apply(&tcp)?;
        }
        handshake(&self.tls, server_name(self.sni.as_deref(), inet), tcp).await
    }
}

/// A TCP connection to `addr`, from source address `bind` when the
/// cluster has an `upstream_bind_config`.
pub async fn tcp_connect(addr: SocketAddr, bind: Option<SocketAddr>) -> std::io::Result<TcpStream> {
    let Some(bind) = bind else {
        return TcpStream::connect(addr).await;
    };
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.bind(bind)?;
    s.connect(addr).await
}

/// A byte stream to an upstream host, plaintext or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection Legate makes for itself (side services, mirrors, health
/// checks): TCP, then the host's TLS when it has one, with the host's
/// fixed SNI, else `sni`. Returns the stream and, over TLS, whether ALPN
/// picked h2 (None: plaintext, or nothing was negotiated). `bind`: the
/// cluster's `upstream_bind_config` source address.
pub async fn connect_host(
    addr: SocketAddr,
    tls: Option<&crate::cluster_manager::HostTls>,
    sni: Option<&str>,
    bind: Option<SocketAddr>,
) -> std::io::Result<(Box<dyn Io>, Option<bool>)> {
    let tcp = tcp_connect(addr, bind).await?;
    tcp.set_nodelay(true)?;
    let Some(t) = tls else {
        return Ok((Box::new(tcp), None));
    };
    let fixed = t.connect.as_ref().and_then(|c| c.sni.clone());
    let name = server_name(fixed.as_deref().or(sni), addr);
    let s = handshake(&t.tls, name, tcp).await?;
    let h2 = s.get_ref().1.alpn_protocol().map(|p| p == b"h2");
    Ok((Box::new(s), h2))
}

/// The protocol ALPN picked on a handshake: true for h2.
pub fn negotiated_h2(s: &TlsStream) -> bool {
    s.get_ref().1.alpn_protocol() == Some(b"h2")
}

/// A connection attempt made before pingora asked for one.
// Short-lived, one per attempt; boxing the stream would cost an
// allocation on the common path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Probe {
    Ready(TlsStream),
    Failed(std::io::Error),
    TimedOut,
}

impl Probe {
    /// Connects and handshakes with `c` within its connect timeout.
    pub async fn run(c: &TlsConnect, inet: SocketAddr) -> Probe {
        match tokio::time::timeout(c.timeout, c.handshake_with(inet)).await {
            Ok(Ok(s)) => Probe::Ready(s),
            Ok(Err(e)) => Probe::Failed(e),
            Err(_) => Probe::TimedOut,
        }
    }
}

/// pingora's `custom_l4` handing over a probed connection (its ALPN
/// already read), or the probe's failure as pingora's connect error; a
/// later connection goes through `then`.
#[derive(Debug)]
pub struct Prepared {
    pub probe: std::sync::Mutex<Option<Probe>>,
    pub then: Arc<TlsConnect>,
}

#[async_trait]
impl pingora_core::connectors::L4Connect for Prepared {
    async fn connect(
        &self,
        addr: &pingora_core::protocols::l4::socket::SocketAddr,
    ) -> pingora_error::Result<pingora_core::protocols::l4::stream::Stream> {
        use pingora_error::{Error, ErrorType};
        let probe = self.probe.lock().unwrap_or_else(|e| e.into_inner()).take();
        match probe {
            Some(Probe::Ready(s)) => Ok(VirtualSocketStream::new(Box::new(TlsSocket(s))).into()),
            Some(Probe::Failed(e)) => Error::e_because(
                ErrorType::ConnectError,
                format!("TLS connection to {addr}"),
                e,
            ),
            Some(Probe::TimedOut) => Error::e_explain(
                ErrorType::ConnectTimedout,
                format!("TLS connection to {addr}: timed out"),
            ),
            None => self.then.connect(addr).await,
        }
    }
}

#[async_trait]
impl pingora_core::connectors::L4Connect for TlsConnect {
    async fn connect(
        &self,
        addr: &pingora_core::protocols::l4::socket::SocketAddr,
    ) -> pingora_error::Result<pingora_core::protocols::l4::stream::Stream> {
        use pingora_error::{Error, ErrorType};
        let Some(inet) = addr.as_inet().copied() else {
            return Error::e_explain(ErrorType::ConnectError, "TLS upstreams need an IP address");
        };
        match tokio::time::timeout(self.timeout, self.handshake_with(inet)).await {
            Ok(Ok(s)) => Ok(VirtualSocketStream::new(Box::new(TlsSocket(s))).into()),
            Ok(Err(e)) => Error::e_because(
                ErrorType::ConnectError,
                format!("TLS connection to {inet}"),
                e,
            ),
            Err(_) => Error::e_explain(
                ErrorType::ConnectTimedout,
                format!("TLS connection to {inet}: timed out"),
            ),
        }
    }
}

/// A client TLS stream as pingora's virtual socket.
#[derive(Debug)]
struct TlsSocket(TlsStream);

impl VirtualSocket for TlsSocket {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> std::io::Result<()> {
        match opt {
            VirtualSockOpt::NoDelay => self.0.get_ref().0.set_nodelay(true),
            // TCP keepalive is not applied to upstream sockets
            // (`upstream_connection_options` is accepted with a warning).
            _ => Ok(()),
        }
    }
}

impl AsyncRead for TlsSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
