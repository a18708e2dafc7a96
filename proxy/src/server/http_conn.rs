//! The life of one downstream HTTP connection around its requests: the
//! HTTP/1 keep-alive loop and the HTTP/2 stream accept loop, with the
//! connection manager's per-connection settings (Envoy's
//! `common_http_protocol_options.idle_timeout` and
//! `max_requests_per_connection`, `http2_protocol_options`) and the drains
//! that end a connection politely: a listener drain, and `/healthcheck/fail`
//! on listeners whose `drain_type` is `DEFAULT`.
//!
//! Each request is still pingora's (`process_new_http`); only the loops
//! are ours, because pingora applies HTTP/2 settings and idle timeouts per
//! proxy, not per listener.

use super::hcm::HcmProxy;
use crate::config::listener::{H2Settings, HttpConnSettings};
use pingora_core::apps::HttpServerApp;
use pingora_core::protocols::http::v2::server::{self as h2server, H2Accept};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Digest;
use pingora_proxy::HttpProxy;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Envoy answers a client that keeps sending malformed streams by closing
/// the connection; pingora's own loop allows 32.
const MAX_REJECTED_STREAMS: usize = 32;

/// How long an HTTP/2 connection closing on its idle timeout may take to
/// flush its GOAWAY before the socket is dropped.
const GOAWAY_FLUSH: Duration = Duration::from_secs(1);

/// Decides, request by request, that a connection ends after the current
/// one: the request limit, or `/healthcheck/fail` on listeners that drain
/// then (`drain_type: DEFAULT`). HTTP/1 asks in the connection manager's
/// `request_filter` (pingora settles keep-alive only once the request is
/// read); HTTP/2 asks as each stream is accepted.
#[derive(Debug)]
pub struct Closing {
    requests: AtomicU32,
    max_requests: Option<u32>,
    /// None on `MODIFY_ONLY` listeners.
    health_failed: Option<Arc<AtomicBool>>,
}

impl Closing {
    pub fn new(max_requests: Option<u32>, health_failed: Option<Arc<AtomicBool>>) -> Self {
        Self {
            requests: AtomicU32::new(0),
            max_requests,
            health_failed,
        }
    }

    /// Counts one more request; true when the connection should close
    /// after it, as Envoy's request limit and `drainClose()` decide.
    pub fn after_this_request(&self) -> bool {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_requests.is_some_and(|m| n >= m)
            || self
                .health_failed
                .as_ref()
                .is_some_and(|f| f.load(Ordering::Relaxed))
    }
}

/// What one connection watches besides its own requests.
pub struct Conn<'a> {
    pub proxy: &'a Arc<HttpProxy<HcmProxy>>,
    pub settings: &'a HttpConnSettings,
    /// The listener's drain (an update, a removal, `/drain_listeners`).
    pub drain: &'a watch::Receiver<bool>,
    pub closing: Arc<Closing>,
}

impl Conn<'_> {
    /// HTTP/1: one request after another until the client leaves or the
    /// connection sits idle for `idle_timeout`; a drain or [`Closing`]
    /// ends it with `Connection: close`.
    pub async fn http1(&self, stream: pingora_core::protocols::Stream) {
        let mut session = ServerSession::new_http1(stream);
        loop {
            // The wait for the next request; pingora's keep-alive timeout
            // is whole seconds, and 0 is "never".
            session.set_keepalive(if *self.drain.borrow() {
                None
            } else {
                Some(self.settings.idle_timeout.map_or(0, |d| d.as_secs().max(1)))
            });
            let Some(reused) = self.proxy.process_new_http(session, self.drain).await else {
                return;
            };
            let (stream, persistent) = reused.consume();
            session = ServerSession::new_http1(stream);
            if let Some(p) = persistent {
                p.apply_to_session(&mut session);
            }
        }
    }

    /// HTTP/2: the listener's settings, then one task per stream. A drain
    /// or the request limit sends GOAWAY and lets open streams finish; an
    /// idle connection (no open stream for `idle_timeout`) gets GOAWAY and
    /// is closed.
    pub async fn http2(&self, stream: pingora_core::protocols::Stream) {
        let digest = Arc::new(Digest {
            ssl_digest: stream.get_ssl_digest(),
            timing_digest: stream.get_timing_digest(),
            proxy_digest: stream.get_proxy_digest(),
            socket_digest: stream.get_socket_digest(),
        });
        let mut conn = match h2server::handshake(stream, Some(h2_options(&self.settings.h2))).await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP/2 handshake failed");
                return;
            }
        };
        let active = Arc::new(Active::default());
        let mut drain = self.drain.clone();
        let mut closing = false;
        let mut rejected = 0usize;
        loop {
            let next = if closing {
                h2server::HttpSession::from_h2_conn(&mut conn, digest.clone()).await
            } else {
                tokio::select! {
                    biased;
                    _ = async { drain.wait_for(|d| *d).await.is_ok() } => {
                        conn.graceful_shutdown();
                        closing = true;
                        continue;
                    }
                    // Cancel-safe: polled again on the next turn.
                    next = h2server::HttpSession::from_h2_conn(&mut conn, digest.clone()) => next,
                    _ = active.idle_for(self.settings.idle_timeout.unwrap_or_default()),
                        if self.settings.idle_timeout.is_some() =>
                    {
                        conn.graceful_shutdown();
                        let flush = async {
                            while let Ok(Some(_)) =
                                h2server::HttpSession::from_h2_conn(&mut conn, digest.clone()).await
                            {}
                        };
                        let _ = tokio::time::timeout(GOAWAY_FLUSH, flush).await;
                        return;
                    }
                }
            };
            let session = match next {
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/2 connection ended");
                    return;
                }
                Ok(None) => return,
                Ok(Some(H2Accept::Rejected)) => {
                    rejected += 1;
                    if rejected > MAX_REJECTED_STREAMS {
                        return;
                    }
                    continue;
                }
                Ok(Some(H2Accept::Session(s))) => s,
            };
            let guard = active.start();
            let (proxy, drain) = (self.proxy.clone(), self.drain.clone());
            tokio::spawn(async move {
                let _guard = guard;
                proxy
                    .process_new_http(ServerSession::new_http2(session), &drain)
                    .await;
            });
            if !closing && self.closing.after_this_request() {
                conn.graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// pingora's bounded defaults (header list size) with the listener's
/// stream limit and windows.
fn h2_options(s: &H2Settings) -> h2server::H2Options {
    let mut o = h2server::default_h2_options();
    o.max_concurrent_streams(s.max_concurrent_streams)
        .initial_window_size(s.initial_stream_window_size)
        .initial_connection_window_size(s.initial_connection_window_size);
    o
}

/// The streams in flight on one HTTP/2 connection.
#[derive(Default)]
struct Active {
    count: AtomicUsize,
    idle: Notify,
}

struct Guard(Arc<Active>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Active {
    fn start(self: &Arc<Self>) -> Guard {
        self.count.fetch_add(1, Ordering::AcqRel);
        Guard(self.clone())
    }

    /// Resolves once no stream has been open for `d`. Dropped (and so
    /// restarted) whenever a new stream arrives.
    async fn idle_for(&self, d: Duration) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                break;
            }
            notified.await;
        }
        tokio::time::sleep(d).await;
    }
}
