//! Downstream writes gathered until the connection's task has nothing left
//! to do, then sent in one system call: Envoy's connection write buffer,
//! which it flushes once per event-loop iteration.
//!
//! Why: pingora's HTTP/1 server writes a response's head and its body with
//! two `write`s, and over a plain socket (our own accept loop builds it
//! without pingora's write buffer) each is a `sendto`. That is two packets
//! and two wake-ups of the client per small response; a third of the
//! proxy's system calls under keep-alive load.
//!
//! The contract, which [`flush_when_idle`] keeps: bytes a write accepted
//! are on the socket before the task parks. A head whose body has not
//! arrived yet still leaves at once (an event stream's client sees its
//! headers as Envoy sends them); only writes made in the same turn of the
//! task are joined. A `flush` sends everything at once, as before.
//!
//! Over TLS the gathering sits above the TLS layer: the head and body
//! become one record and one `sendto`.
//!
//! HTTP/2 ([`SendAt::LoopEnd`]) waits longer: until the worker has run
//! every task that was ready, as Envoy flushes a connection once per
//! dispatcher iteration. One HTTP/2 connection carries many streams, each
//! answered by its own task; every answer wakes the connection's task,
//! and h2 flushes after what it finds ready. Sent on that flush, the
//! responses whose upstreams became readable in the same poll left in as
//! many `writev`s (about ten responses each under `h2load -m32` on a
//! multi-threaded runtime, where Envoy sends some thirty per write).

use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::SslDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora_core::protocols::{Stream, ALPN};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes larger than this go to the socket without a copy; gathered
/// writes are sent once they would pass it.
const GATHER_MAX: usize = 16 * 1024;

/// How long the bytes left when a connection ends may wait for the client
/// to take them: Envoy's `delayed_close_timeout` default.
const LAST_SEND: Duration = Duration::from_secs(1);

/// A buffer kept between turns up to this size; a larger one is freed so an
/// idle keep-alive connection holds little memory.
const KEEP_IDLE: usize = 4 * 1024;

/// The socket and the bytes gathered for it, shared by the stream pingora
/// reads and writes ([`Corked`]) and the task that sends what is left when
/// it parks ([`flush_when_idle`]). Both run in one task, so the lock is
/// never contended; it is there because pingora's streams must be `Sync`.
#[derive(Debug)]
pub struct Gathered {
    inner: Mutex<Inner>,
    send: SendAt,
}

/// When a connection's gathered writes go to the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendAt {
    /// When the connection's task parks, and on every `flush` (HTTP/1:
    /// each response is its own connection's).
    Park,
    /// When the task parks and the worker has nothing else ready to run
    /// (HTTP/2: one connection answers the streams of many tasks). A
    /// `flush` then only marks the bytes as due; they leave at the end of
    /// the worker's turn, before it waits for I/O.
    LoopEnd,
}

#[derive(Debug)]
struct Inner {
    io: Stream,
    out: Vec<u8>,
    /// A send that failed after its write had been accepted: the next
    /// write or flush reports it.
    failed: Option<io::ErrorKind>,
}

impl Inner {
    /// Sends everything gathered; Pending when the socket is full (the
    /// task is woken when it drains).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        let mut sent = 0;
        let result = loop {
            if sent == self.out.len() {
                break Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.out[sent..]) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
        };
        match &result {
            Poll::Ready(Ok(())) => self.out.clear(),
            Poll::Ready(Err(e)) => {
                self.failed = Some(e.kind());
                self.out.clear();
            }
            Poll::Pending => {
                self.out.drain(..sent);
            }
        }
        result
    }
}

impl Gathered {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding it cannot leave the bytes half-moved in a
        // way a later send would make worse.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_gathered(&self) -> bool {
        !self.lock().out.is_empty()
    }

    /// Sends what was gathered, then frees a large buffer: the task is
    /// about to wait.
    fn poll_send_idle(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.lock();
        let r = inner.poll_send(cx);
        if inner.out.is_empty() && inner.out.capacity() > KEEP_IDLE {
            inner.out = Vec::new();
        }
        r
    }
}

/// A downstream HTTP stream, plain or TLS, whose writes are gathered
/// (see the module docs). The digests and TLS facts are read once here:
/// they are settled before the stream is wrapped and never change after.
/// What nothing reads once a connection is past its handshake is not
/// carried: the live TLS session ([`Ssl::get_ssl`]; Legate takes its peer
/// certificate and SNI before wrapping) and peeking (used only by pingora's
/// own h2c sniffing, which Legate does itself on the raw socket).
#[derive(Debug)]
pub struct Corked {
    shared: Arc<Gathered>,
    id: UniqueIDType,
    proxy_digest: Option<Arc<ProxyDigest>>,
    socket_digest: Option<Arc<SocketDigest>>,
    timing_digest: Vec<Option<TimingDigest>>,
    ssl_digest: Option<Arc<SslDigest>>,
    alpn: Option<ALPN>,
}

impl Corked {
    /// The stream for pingora, and the handle [`flush_when_idle`] sends
    /// with.
    pub fn new(io: Stream, send: SendAt) -> (Self, Arc<Gathered>) {
        let corked = Self {
            id: io.id(),
            proxy_digest: io.get_proxy_digest(),
            socket_digest: io.get_socket_digest(),
            timing_digest: io.get_timing_digest(),
            ssl_digest: io.get_ssl_digest(),
            alpn: io.selected_alpn_proto(),
            shared: Arc::new(Gathered {
                inner: Mutex::new(Inner {
                    io,
                    out: Vec::new(),
                    failed: None,
                }),
                send,
            }),
        };
        let shared = corked.shared.clone();
        (corked, shared)
    }
}

/// Runs a connection's future so that what its writes gathered is sent
/// whenever it parks, and once more when it ends.
///
/// "Parks" means it returned Pending without having woken itself: a future
/// that woke itself (a message to its other half, an exhausted cooperative
/// budget) is polled again at once, and its next writes join these. A
/// send that fails is reported by the stream's next write or flush.
///
/// With [`SendAt::LoopEnd`] the send waits, after the task parks, for the
/// worker's deferred wake-up (the one `tokio::task::yield_now` uses): it
/// comes once the worker has run what was ready and polled its I/O driver
/// without waiting. Writes of the turns in between join the same send.
pub async fn flush_when_idle<F: Future>(shared: Arc<Gathered>, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let flag = Arc::new(SelfWake::default());
    let waker = Waker::from(flag.clone());
    // LoopEnd: the deferred wake-up's flag, one per connection, and
    // whether one is asked for and not yet taken.
    let at_end = (shared.send == SendAt::LoopEnd).then(|| Arc::new(SelfWake::default()));
    let mut due = false;
    let out = poll_fn(|cx| {
        flag.follow(cx.waker());
        flag.woken.store(false, Ordering::Relaxed);
        let mut inner_cx = Context::from_waker(&waker);
        let r = fut.as_mut().poll(&mut inner_cx);
        if r.is_pending() && !flag.woken.load(Ordering::Relaxed) {
            if let Some(at_end) = at_end.as_ref().filter(|_| shared.has_gathered()) {
                if !due {
                    at_end.follow(cx.waker());
                    at_end.woken.store(false, Ordering::Relaxed);
                    defer_wake(Waker::from(at_end.clone()));
                    due = true;
                    return r;
                }
                if !at_end.woken.load(Ordering::Relaxed) {
                    return r;
                }
            }
            due = false;
            // Pending here registers the task for the socket's write
            // readiness; an error is kept for the stream to report.
            let _ = shared.poll_send_idle(&mut inner_cx);
        }
        r
    })
    .await;
    // What is left goes out if the client takes it within Envoy's default
    // delayed-close timeout; a client that stopped reading does not keep
    // the socket open.
    let _ = tokio::time::timeout(LAST_SEND, poll_fn(|cx| shared.poll_send_idle(cx))).await;
    out
}

/// Wakes `waker` once the current worker has run every task that was
/// ready and polled its I/O driver: tokio's deferred wake-up, reached
/// through the one public door to it, `yield_now`. Outside a runtime it
/// wakes at once.
fn defer_wake(waker: Waker) {
    let mut yielded = std::pin::pin!(tokio::task::yield_now());
    // The first poll files the waker and returns Pending; the future holds
    // nothing after that, so it is dropped.
    let _ = yielded.as_mut().poll(&mut Context::from_waker(&waker));
}

/// The task's waker, noting that it was woken.
#[derive(Default)]
struct SelfWake {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl SelfWake {
    fn follow(&self, w: &Waker) {
        let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if !task.as_ref().is_some_and(|t| t.will_wake(w)) {
            *task = Some(w.clone());
        }
    }
}

impl Wake for SelfWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Relaxed);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = task.as_ref() {
            w.wake_by_ref();
        }
    }
}

impl AsyncRead for Corked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.shared.lock().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Corked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut inner = self.shared.lock();
        if !inner.out.is_empty() && inner.out.len() + buf.len() > GATHER_MAX {
            ready!(inner.poll_send(cx))?;
        }
        if let Some(kind) = inner.failed {
            return Poll::Ready(Err(kind.into()));
        }
        if inner.out.is_empty() && buf.len() >= GATHER_MAX {
            return Pin::new(&mut inner.io).poll_write(cx, buf);
        }
        inner.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.shared.lock();
        if self.shared.send == SendAt::LoopEnd {
            // Due at the end of the worker's turn (flush_when_idle).
            return match inner.failed {
                Some(kind) => Poll::Ready(Err(kind.into())),
                None => Poll::Ready(Ok(())),
            };
        }
        ready!(inner.poll_send(cx))?;
        Pin::new(&mut inner.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.shared.lock();
        ready!(inner.poll_send(cx))?;
        Pin::new(&mut inner.io).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl Shutdown for Corked {
    /// `poll_shutdown`'s: what was gathered, then the FIN.
    async fn shutdown(&mut self) {
        if let Err(e) = tokio::io::AsyncWriteExt::shutdown(self).await {
            tracing::debug!(error = %e, "downstream shutdown failed");
        }
    }
}

impl UniqueID for Corked {
    fn id(&self) -> UniqueIDType {
        self.id
    }
}

impl Ssl for Corked {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.ssl_digest.clone()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.alpn.clone()
    }
}

/// Peeking is not offered (see [`Corked`]): `try_peek` says so.
impl Peek for Corked {}

impl GetTimingDigest for Corked {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.timing_digest.clone()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.shared.lock().io.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.shared.lock().io.get_write_pending_time()
    }
}

impl GetProxyDigest for Corked {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.proxy_digest.clone()
    }
}

impl GetSocketDigest for Corked {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.socket_digest.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_core::protocols::l4::stream::Stream as L4Stream;
    use std::os::fd::RawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Data segments the socket has sent (`tcpi_data_segs_out`, at byte
    /// 156 of Linux's `struct tcp_info`): one per send of a small write
    /// with Nagle off. No safe binding reads it (nix and socket2 have
    /// none), hence the one unsafe call, in a test.
    #[allow(unsafe_code)]
    fn data_segs_out(fd: RawFd) -> u32 {
        let mut buf = [0u8; 256];
        let mut len = buf.len() as nix::libc::socklen_t;
        // SAFETY: the buffer outlives the call and len is its size.
        let rc = unsafe {
            nix::libc::getsockopt(
                fd,
                nix::libc::IPPROTO_TCP,
                nix::libc::TCP_INFO,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt(TCP_INFO)");
        assert!(len >= 160, "tcp_info too short for data_segs_out");
        u32::from_ne_bytes(buf[156..160].try_into().unwrap())
    }

    /// A connected pair: the server's end as pingora's plain stream.
    async fn pair() -> (L4Stream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        server.set_nodelay(true).unwrap();
        (server.into(), client)
    }

    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n";

    async fn read_exactly(c: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
            .await
            .expect("bytes within 5 s")
            .unwrap();
        got
    }

    #[tokio::test]
    async fn a_head_and_body_written_in_one_turn_leave_in_one_segment() {
        // Without gathering, the same two writes are two segments: what
        // the gathering is for.
        let (mut plain, mut c) = pair().await;
        let before = data_segs_out(plain.id());
        plain.write_all(HEAD).await.unwrap();
        plain.write_all(b"ok").await.unwrap();
        plain.flush().await.unwrap();
        read_exactly(&mut c, HEAD.len() + 2).await;
        assert_eq!(data_segs_out(plain.id()) - before, 2);

        let (s, mut c) = pair().await;
        let (mut s, shared) = Corked::new(Box::new(s), SendAt::Park);
        let fd = s.id();
        let before = data_segs_out(fd);
        // pingora's shape: the upstream half hands the response to the
        // downstream half over a channel, in the same task. The head is
        // written in one turn and the body in the next; the task woke
        // itself in between, so that was no wait, and the two still leave
        // together.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<&[u8]>(4);
        let head_written = tokio::sync::Notify::new();
        flush_when_idle(shared, async {
            let upstream = async {
                tx.send(HEAD).await.unwrap();
                head_written.notified().await;
                tx.send(b"ok").await.unwrap();
                drop(tx);
            };
            let downstream = async {
                while let Some(b) = rx.recv().await {
                    s.write_all(b).await.unwrap();
                    head_written.notify_one();
                }
                s.flush().await.unwrap();
            };
            tokio::join!(upstream, downstream);
        })
        .await;
        let got = read_exactly(&mut c, HEAD.len() + 2).await;
        assert_eq!(&got[..HEAD.len()], HEAD);
        assert_eq!(&got[HEAD.len()..], b"ok");
        assert_eq!(data_segs_out(fd) - before, 1);
    }

    /// An HTTP/2 connection's shape: its task writes what other tasks (the
    /// streams) hand it, each hand-off waking it. `streams` tasks, all
    /// ready at once, each hand over one frame; the data segments the
    /// connection then sends.
    async fn segments_for_streams_ready_together(send: SendAt, streams: usize) -> u32 {
        const FRAME: &[u8] = b"frame";
        let (s, mut c) = pair().await;
        let (mut s, shared) = Corked::new(Box::new(s), send);
        let fd = s.id();
        let before = data_segs_out(fd);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<&[u8]>();
        let conn = tokio::spawn(flush_when_idle(shared, async move {
            while let Some(b) = rx.recv().await {
                s.write_all(b).await.unwrap();
                s.flush().await.unwrap();
            }
        }));
        // Held so the connection outlives the count.
        let _open = tx.clone();
        // Spawned from a task on the worker, so they sit in its local queue
        // together, as streams woken by one poll of the I/O driver do.
        tokio::spawn(async move {
            for _ in 0..streams {
                let tx = tx.clone();
                tokio::spawn(async move { tx.send(FRAME).unwrap() });
            }
        })
        .await
        .unwrap();
        read_exactly(&mut c, FRAME.len() * streams).await;
        let segments = data_segs_out(fd) - before;
        conn.abort();
        segments
    }

    // On a single-threaded runtime, as each worker runs (`workers.rs`).
    #[tokio::test]
    async fn frames_handed_over_in_one_turn_of_the_worker_leave_together() {
        // The control: sent on every flush, each frame is its own segment.
        let when_parked = segments_for_streams_ready_together(SendAt::Park, 16).await;
        assert!(when_parked >= 8, "{when_parked} segments for 16 frames");
        let at_loop_end = segments_for_streams_ready_together(SendAt::LoopEnd, 16).await;
        assert!(at_loop_end <= 2, "{at_loop_end} segments for 16 frames");
    }

    #[tokio::test]
    async fn a_head_whose_body_is_late_leaves_when_the_task_waits() {
        // In both modes: at LoopEnd nothing else runs, so the worker's end
        // of turn alone sends it.
        for send in [SendAt::Park, SendAt::LoopEnd] {
            let (s, mut c) = pair().await;
            let (mut s, shared) = Corked::new(Box::new(s), send);
            let server = tokio::spawn(flush_when_idle(shared, async move {
                s.write_all(HEAD).await.unwrap();
                // No flush: the body is "still upstream".
                tokio::time::sleep(Duration::from_secs(30)).await;
            }));
            assert_eq!(read_exactly(&mut c, HEAD.len()).await, HEAD, "{send:?}");
            server.abort();
        }

        // The control: the same stream run without flush_when_idle holds
        // the head, so the test above would fail without it.
        let (s, mut c) = pair().await;
        let (mut s, _shared) = Corked::new(Box::new(s), SendAt::Park);
        let server = tokio::spawn(async move {
            s.write_all(HEAD).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let mut one = [0u8; 1];
        let held = tokio::time::timeout(Duration::from_millis(300), c.read(&mut one)).await;
        assert!(held.is_err(), "the head left without flush_when_idle");
        server.abort();
    }

    #[tokio::test]
    async fn large_and_small_writes_arrive_whole_and_in_order() {
        let (s, mut c) = pair().await;
        let (mut s, shared) = Corked::new(Box::new(s), SendAt::Park);
        let big: Vec<u8> = (0..3 * GATHER_MAX as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut want = Vec::new();
        for part in [&b"a"[..], &big, b"bc", &big[..GATHER_MAX - 1], b"d"] {
            want.extend_from_slice(part);
        }
        let sent = want.clone();
        let server = tokio::spawn(flush_when_idle(shared, async move {
            s.write_all(b"a").await.unwrap();
            s.write_all(&big).await.unwrap();
            s.write_all(b"bc").await.unwrap();
            s.write_all(&big[..GATHER_MAX - 1]).await.unwrap();
            s.write_all(b"d").await.unwrap();
            // No flush: the end of the connection's future sends the rest.
        }));
        assert_eq!(read_exactly(&mut c, sent.len()).await, want);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_send_that_fails_is_reported_by_the_next_flush() {
        let (s, c) = pair().await;
        let (mut s, shared) = Corked::new(Box::new(s), SendAt::Park);
        // The peer goes away with a reset: sends fail with EPIPE/ECONNRESET.
        let c = c.into_std().unwrap();
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = flush_when_idle(shared, async {
            for _ in 0..64 {
                s.write_all(&[0; 1024]).await?;
                s.flush().await?;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok::<_, io::Error>(())
        })
        .await;
        assert!(r.is_err(), "writes to a reset peer kept succeeding");
    }
}
