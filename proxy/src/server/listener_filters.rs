//! Listener filters: what is learnt about a connection before its filter
//! chain is chosen. Only `tls_inspector` so far: it peeks (never reads) the
//! ClientHello, so the chain's own TLS handshake sees every byte.

use crate::stats;
use crate::tls::hello::{self, Hello, MAX_CLIENT_HELLO};
use std::time::Duration;
use tokio::net::TcpStream;

/// What the listener filters found.
#[derive(Debug, Default)]
pub struct Found {
    /// A TLS ClientHello was seen: transport protocol `tls`.
    pub tls: bool,
    pub sni: String,
    pub alpn: Vec<String>,
}

pub enum Outcome {
    Found(Found),
    /// The listener filters' timeout passed first.
    TimedOut,
    /// The client closed, or the hello was too large: close the connection.
    Close,
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

/// Runs `tls_inspector` on a new connection within `timeout`.
pub async fn tls_inspector(sock: &TcpStream, timeout: Option<Duration>) -> Outcome {
    let peek = async {
        let mut buf = vec![0u8; MAX_CLIENT_HELLO + 64];
        let hello = peek_until(sock, &mut buf, |b, full| match hello::parse(b) {
            Hello::NeedMore if !full => None,
            other => Some(other),
        })
        .await;
        match hello {
            None => Outcome::Close,
            Some(Hello::NeedMore | Hello::TooLarge) => {
                stats::counter("tls_inspector.client_hello_too_large".into()).increment(1);
                Outcome::Close
            }
            Some(Hello::NotTls) => {
                stats::counter("tls_inspector.tls_not_found".into()).increment(1);
                Outcome::Found(Found::default())
            }
            Some(Hello::Tls { sni, alpn }) => {
                stats::counter("tls_inspector.tls_found".into()).increment(1);
                let which = |found: bool, what: &str| {
                    let s = if found { "found" } else { "not_found" };
                    stats::counter(format!("tls_inspector.{what}_{s}")).increment(1);
                };
                which(sni.is_some(), "sni");
                which(!alpn.is_empty(), "alpn");
                Outcome::Found(Found {
                    tls: true,
                    sni: sni.unwrap_or_default(),
                    alpn,
                })
            }
        }
    };
    match timeout {
        Some(t) => tokio::time::timeout(t, peek)
            .await
            .unwrap_or(Outcome::TimedOut),
        None => peek.await,
    }
}
