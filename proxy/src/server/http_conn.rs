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
use bytes::BytesMut;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp};
use pingora_core::protocols::http::v2::server::{self as h2server, H2Accept};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Digest;
use pingora_proxy::HttpProxy;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{watch, Notify};

/// Envoy answers a client that keeps sending malformed streams by closing
/// the connection; pingora's own loop allows 32.
const MAX_REJECTED_STREAMS: usize = 32;

/// How long an HTTP/2 connection closing on its idle timeout may take to
/// flush its GOAWAY before the socket is dropped.
const GOAWAY_FLUSH: Duration = Duration::from_secs(1);

/// The first read of a request: pingora's own initial header buffer size.
const FIRST_READ: usize = 4096;

/// Decides, request by request, that a connection ends after the current
/// one: the request limit, or `/healthcheck/fail` on listeners that drain
/// then (`drain_type: DEFAULT`). HTTP/1 asks in the connection manager's
/// `request_filter` (pingora settles keep-alive only once the request is
/// read); HTTP/2 asks as each stream is accepted.
#[derive(Debug)]
pub struct Closing {
    requests: AtomicU32,
    max_requests: Option<u32>,
    /// When `max_connection_duration` runs out.
    pub deadline: Option<tokio::time::Instant>,
    /// None on `MODIFY_ONLY` listeners.
    health_failed: Option<Arc<AtomicBool>>,
}

impl Closing {
    pub fn new(
        max_requests: Option<u32>,
        max_duration: Option<Duration>,
        health_failed: Option<Arc<AtomicBool>>,
    ) -> Self {
        Self {
            requests: AtomicU32::new(0),
            max_requests,
            deadline: max_duration.map(|d| tokio::time::Instant::now() + d),
            health_failed,
        }
    }

    pub fn expired(&self) -> bool {
        self.deadline
            .is_some_and(|d| tokio::time::Instant::now() >= d)
    }

    /// Counts one more request; true when the connection should close
    /// after it, as Envoy's request limit and `drainClose()` decide.
    pub fn after_this_request(&self) -> bool {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_requests.is_some_and(|m| n >= m)
            || self.expired()
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
    pub async fn http1(&self, mut stream: pingora_core::protocols::Stream) {
        let mut persistent: Option<HttpPersistentSettings> = None;
        loop {
            // Bytes of this request that came with the last (pipelining)
            // are pingora's to hand over; a wait on the socket could wait
            // for bytes the client has already sent.
            let first = if persistent.as_ref().is_some_and(carries_pipelined_bytes) {
                None
            } else {
                let Some(first) = self.next_request_bytes(&mut stream).await else {
                    return;
                };
                Some(first)
            };
            let mut session = ServerSession::new_http1(stream);
            if let Some(p) = persistent.take() {
                p.apply_to_session(&mut session);
            }
            if let (Some(first), ServerSession::H1(s)) = (first, &mut session) {
                s.set_pipelined_prefix(first);
            }
            // Pingora's wait for the rest of a request head that came in
            // pieces; its keep-alive timeout is whole seconds, and 0 is
            // "never".
            session.set_keepalive(if *self.drain.borrow() {
                None
            } else {
                Some(self.settings.idle_timeout.map_or(0, |d| d.as_secs().max(1)))
            });
            let Some(reused) = self.proxy.process_new_http(session, self.drain).await else {
                return;
            };
            (stream, persistent) = reused.consume();
        }
    }

    /// The wait for the next request, up to `idle_timeout`: its first bytes,
    /// or None when the client leaves or the connection idles out. Between
    /// requests a connection holds only its socket: no pingora session, no
    /// header buffer and no boxed request future sit with each idle
    /// keep-alive connection. The bytes are read here instead of by pingora
    /// (handed to it as the session's prefix), so it costs no extra read.
    async fn next_request_bytes(
        &self,
        stream: &mut pingora_core::protocols::Stream,
    ) -> Option<BytesMut> {
        let read = std::future::poll_fn(|cx| {
            // On the stack for the length of one poll, not in the
            // connection's future.
            let mut tmp = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_READ];
            let mut buf = ReadBuf::uninit(&mut tmp);
            match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    let mut first = BytesMut::with_capacity(FIRST_READ);
                    first.extend_from_slice(buf.filled());
                    Poll::Ready(Some(first))
                }
                // The client closed, or the socket failed.
                Poll::Ready(_) => Poll::Ready(None),
            }
        });
        // An idle connection past its max_connection_duration stays open
        // for its drain (the next request is answered and closes it), then
        // closes, as Envoy's does.
        let idle = self
            .settings
            .idle_timeout
            .map(|d| tokio::time::Instant::now() + d);
        let drained = self
            .closing
            .deadline
            .zip(self.settings.max_duration_drain)
            .map(|(d, drain)| d + drain);
        match [idle, drained].into_iter().flatten().min() {
            Some(t) => tokio::time::timeout_at(t, read).await.ok().flatten(),
            None => read.await,
        }
    }

    /// HTTP/2: the listener's settings, then each stream until the
    /// connection ends. A drain or the request limit sends GOAWAY and lets
    /// open streams finish; an idle connection (no open stream for
    /// `idle_timeout`) gets GOAWAY and is closed.
    ///
    /// The streams run inside the connection's task rather than each on a
    /// task of its own, as Envoy runs a connection's streams in its
    /// connection's callbacks: a wake-up of a stream polls that stream
    /// only, and a stream costs no task cell, no entry in the runtime's
    /// task list and no scheduling of its own (CPU per h2c request 0.95
    /// of one task per stream, `bench/ab.sh`). A stream that panics ends
    /// alone, as its own task would have.
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
        // connection_keepalive: ends when a PING goes unanswered.
        let keepalive = keepalive(conn.ping_pong(), self.settings.h2.keepalive.clone());
        tokio::pin!(keepalive);
        // The streams' drain, apart from the one this loop waits on: each
        // stream's future borrows it, so it is declared before them.
        let stream_drain = self.drain.clone();
        let mut streams = FuturesUnordered::new();
        let mut drain = self.drain.clone();
        let mut closing = false;
        let mut rejected = 0usize;
        loop {
            let next = if closing {
                tokio::select! {
                    biased;
                    Some(()) = streams.next(), if !streams.is_empty() => continue,
                    next = h2server::HttpSession::from_h2_conn(&mut conn, digest.clone()) => next,
                }
            } else {
                tokio::select! {
                    biased;
                    _ = async { drain.wait_for(|d| *d).await.is_ok() } => {
                        conn.graceful_shutdown();
                        closing = true;
                        continue;
                    }
                    // max_connection_duration: drained as a listener drain
                    // is (GOAWAY, open streams finish).
                    _ = tokio::time::sleep_until(self.closing.deadline.unwrap_or_else(tokio::time::Instant::now)),
                        if self.closing.deadline.is_some() =>
                    {
                        conn.graceful_shutdown();
                        closing = true;
                        continue;
                    }
                    Some(()) = streams.next(), if !streams.is_empty() => continue,
                    // Cancel-safe: polled again on the next turn.
                    next = h2server::HttpSession::from_h2_conn(&mut conn, digest.clone()) => next,
                    // The client stopped answering PINGs: closed, as Envoy
                    // closes it.
                    () = &mut keepalive => {
                        crate::stats::counter("http2.keepalive_timeout".into()).increment(1);
                        break;
                    }
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
                        break;
                    }
                }
            };
            let session = match next {
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/2 connection ended");
                    break;
                }
                Ok(None) => break,
                Ok(Some(H2Accept::Rejected)) => {
                    rejected += 1;
                    if rejected > MAX_REJECTED_STREAMS {
                        break;
                    }
                    continue;
                }
                Ok(Some(H2Accept::Session(s))) => s,
            };
            let guard = active.start();
            let request = self
                .proxy
                .process_new_http(ServerSession::new_http2(session), &stream_drain);
            streams.push(async move {
                let _guard = guard;
                if AssertUnwindSafe(request).catch_unwind().await.is_err() {
                    tracing::error!(
                        "an HTTP/2 stream panicked; the connection's other streams go on"
                    );
                }
            });
            if !closing && self.closing.after_this_request() {
                conn.graceful_shutdown();
                closing = true;
            }
        }
        // The connection is over: closed, broken, or given up on. Streams
        // still running end as they would have on tasks of their own: the
        // connection goes first, so a stream that needs it (to send, or
        // for flow-control window) gets an error rather than waiting on a
        // connection nothing polls.
        drop(conn);
        while streams.next().await.is_some() {}
    }
}

/// Whether pingora carries bytes of the next request over from the last
/// one (a pipelined request, read along with the one before it). Pingora
/// keeps them private in [`HttpPersistentSettings`]; its `Debug` output
/// names the field, and the formatting stops where the field's value
/// begins. A test below holds this to pingora's actual output.
fn carries_pipelined_bytes(p: &HttpPersistentSettings) -> bool {
    use std::fmt::Write;
    #[derive(Default)]
    struct Sniff {
        at_field: bool,
        some: bool,
    }
    impl Write for Sniff {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            if self.at_field {
                let value = s.trim_start_matches([':', ' ']);
                if value.is_empty() {
                    return Ok(());
                }
                self.some = value.starts_with("Some");
                return Err(std::fmt::Error);
            }
            self.at_field = s.ends_with("pipelined_prefix");
            Ok(())
        }
    }
    let mut sniff = Sniff::default();
    let _ = write!(sniff, "{p:?}");
    sniff.some
}

/// Reset streams that may wait to be accepted before the connection is
/// ended with ENHANCE_YOUR_CALM. The h2 crate's default (20) ends the
/// connection of a client that cancels a burst of 25 of its own requests,
/// which Envoy serves; a rapid-reset flood is still cut off here, and no
/// reset stream ever reaches an upstream (they are dropped unaccepted).
const MAX_PENDING_RESET_STREAMS: usize = 200;

/// pingora's bounded defaults (header list size) with the listener's
/// stream limit and windows.
/// Sends a PING every interval (plus up to `jitter_percent` of it at
/// random) and returns when one is not answered within the timeout; never
/// without a keepalive.
async fn keepalive(
    pings: Option<h2::PingPong>,
    settings: Option<crate::config::listener::H2Keepalive>,
) {
    let (Some(mut pings), Some(k)) = (pings, settings) else {
        return std::future::pending().await;
    };
    loop {
        let jitter = k
            .interval
            .mul_f64(k.jitter_percent / 100.0 * rand::random::<f64>());
        tokio::time::sleep(k.interval + jitter).await;
        let answered = tokio::time::timeout(k.timeout, pings.ping(h2::Ping::opaque())).await;
        if !matches!(answered, Ok(Ok(_))) {
            return;
        }
    }
}

fn h2_options(s: &H2Settings) -> h2server::H2Options {
    let mut o = h2server::default_h2_options();
    o.max_concurrent_streams(s.max_concurrent_streams)
        .initial_window_size(s.initial_stream_window_size)
        .initial_connection_window_size(s.initial_connection_window_size)
        .max_pending_accept_reset_streams(MAX_PENDING_RESET_STREAMS);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipelined_bytes_are_seen_in_pingoras_persistent_settings() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        let l4: pingora_core::protocols::l4::stream::Stream = s.into();
        let mut session = ServerSession::new_http1(Box::new(l4));
        session.set_keepalive(Some(3600));
        session.set_pipelining_enabled(true);
        let plain = HttpPersistentSettings::for_session(&session);
        assert!(!carries_pipelined_bytes(&plain));
        let mut with = HttpPersistentSettings::for_session(&session);
        with.set_pipelined_prefix(BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]));
        assert!(carries_pipelined_bytes(&with));
    }
}
