//! The keep-alive pool of plain-HTTP/1.1 upstream connections, one per
//! worker.
//!
//! hyper-util's pooled client drives each upstream connection in a task of
//! its own. Every request then costs a pool checkout under a lock keyed by
//! a SipHash of the URI's scheme and authority, an mpsc send to the
//! connection task and a oneshot back, a task switch each way, and a task
//! spawned to put the connection back once the response is done.
//!
//! This pool is the nginx shape instead. A connection belongs to whoever
//! holds it:
//! - the request that checked it out polls it next to the response future,
//!   in the request's own task;
//! - the response body ([`Lease`]) polls it while the body streams;
//! - once the body has ended, the lease puts it back here.
//!
//! An idle connection is polled by nobody until it is checked out again.
//! So checkout first polls it once, which notices an upstream that closed
//! it while it sat idle (hyper reads the end of stream and its connection
//! future finishes). If the upstream closed it just as the request was
//! written, hyper returns the unsent request, and [`Pool::send`] replays
//! it on a fresh connection; a request hyper began to write is never
//! replayed here (the retry policy in `forward` decides). A request
//! hyper wrote on a *reused* connection that then closed before a single
//! byte of the answer came back (the upstream's idle close raced with the
//! request) is also replayed on a fresh connection, whatever its method:
//! the upstream closed an idle connection, so it never processed the request
//! (counted in `sluicegate_upstream_reused_retries_total`). Its body, if
//! any, must be small enough to keep ([`REPLAY_BODY_MAX`]).
//!
//! Idle connections are kept at most the pool's idle timeout
//! (`[proxy.timeouts] upstream_idle_ms`, default 4 s: below the idle
//! timeouts of common servers, Apache httpd's and Node.js's 5 s, nginx's
//! 60–75 s, so the proxy, not the upstream, is normally the side that closes), or less
//! when the upstream announced a shorter `Keep-Alive: timeout=N` (see
//! [`keep_alive_limit`]). A checkout never hands out a connection past its
//! deadline, and a sweep every [`SWEEP`] drops closed and expired ones.
//!
//! TLS upstreams and upgrade (WebSocket) requests still go through
//! hyper-util's client (see `UpstreamClient::forward`).

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{error_chain, Failed};
use crate::body::{self, ProxyBody};

/// Largest request body kept so that a request on a reused connection can
/// be sent again (see the module doc); a larger body streams and is never
/// replayed.
pub const REPLAY_BODY_MAX: u64 = 64 * 1024;
/// How often idle connections are checked for closure and age.
pub const SWEEP: Duration = Duration::from_secs(2);

/// hyper's future for one upstream connection.
type Driver = http1::Connection<TokioIo<Counted>, ProxyBody>;

/// A TCP stream that counts the bytes read from it, so the pool can tell a
/// connection that closed before any byte of the answer arrived.
struct Counted {
    stream: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            this.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// One upstream connection: the request sender and hyper's connection
/// future, which does the I/O whenever it is polled.
pub struct Conn {
    sender: http1::SendRequest<ProxyBody>,
    /// `None` once the connection future has finished (the connection is
    /// closed). Boxed: hyper's connection state is most of a kilobyte, and
    /// a `Conn` moves several times per request (checkout, the request
    /// future, the lease, check-in).
    driver: Option<Pin<Box<Driver>>>,
    /// Bytes read from the socket so far.
    read: Arc<AtomicU64>,
    /// How long it may sit idle: the pool's limit, or less when the
    /// upstream's last `Keep-Alive: timeout` said so.
    idle_limit: Duration,
}

impl Conn {
    /// Let the connection do its I/O, waking `cx` when it can do more.
    /// False once it is closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(driver) = self.driver.as_mut() else {
            return false;
        };
        match driver.as_mut().poll(cx) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "upstream connection closed");
                }
                self.driver = None;
                false
            }
        }
    }

    /// Poll once without a task to wake: processes whatever already
    /// arrived (the end of a response, the upstream's close). True if the
    /// connection is open and takes a new request.
    fn settle(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx) && self.sender.is_ready()
    }
}

/// Idle connections of one worker, by endpoint address.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    /// Keyed by endpoint address with FxHash: the keys are the operator's
    /// own endpoint list, not client input, so no SipHash is needed.
    idle: Mutex<FxHashMap<Arc<str>, Vec<Idle>>>,
    max_idle: usize,
    connect_timeout: Duration,
    idle_timeout: Duration,
    sweeping: AtomicBool,
}

struct Idle {
    conn: Conn,
    /// Past this it is closed, never handed out.
    until: Instant,
}

impl Pool {
    /// A pool keeping up to `max_idle` idle connections per endpoint, each
    /// at most `idle_timeout`.
    pub fn new(max_idle: usize, connect_timeout: Duration, idle_timeout: Duration) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                idle: Mutex::default(),
                max_idle,
                connect_timeout,
                idle_timeout,
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Send `req` (origin-form URI, `Host` set) to `addr` on a pooled
    /// connection, or a new one. Returns the response head and the
    /// connection, which the response body must keep polling.
    pub async fn send(
        &self,
        addr: &Arc<str>,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Conn), Failed> {
        loop {
            let (mut conn, reused) = match self.checkout(addr) {
                Some(conn) => (conn, true),
                // Boxed: the connect and handshake futures are rarely
                // needed but large, and every request's future (copied as
                // it is built and awaited) would otherwise carry their size.
                None => (Box::pin(self.connect(addr)).await?, false),
            };
            // On a reused connection, keep what it takes to send the
            // request again should the upstream have closed it meanwhile.
            // (A body-less head is cloned; only a body is read, boxed.)
            let replay = match reused {
                false => None,
                true if http_body::Body::is_end_stream(req.body()) => Some(Replay {
                    parts: clone_head(&req),
                    body: None,
                }),
                true => Box::pin(Replay::keep_body(&mut req)).await,
            };
            let read_before = conn.read.load(Ordering::Relaxed);
            let mut sent = pin!(conn.sender.try_send_request(req));
            let result = std::future::poll_fn(|cx| {
                conn.drive(cx);
                sent.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(resp) => {
                    conn.idle_limit = keep_alive_limit(resp.headers(), self.inner.idle_timeout);
                    return Ok((resp, conn));
                }
                Err(mut e) => match (e.take_message(), replay) {
                    // Not a byte of it was written: the pooled connection
                    // had been closed. Safe to send on a fresh one.
                    (Some(unsent), _) if reused => {
                        metrics::counter!("sluicegate_upstream_stale_connections_total")
                            .increment(1);
                        tracing::debug!(endpoint = %addr, error = %e.error(), "pooled connection was closed; replaying on a new one");
                        req = unsent;
                    }
                    // Written, but the connection closed before a byte of
                    // the answer: the upstream closed it as idle, so it
                    // never processed the request. Send it again.
                    (_, Some(again)) if conn.read.load(Ordering::Relaxed) == read_before => {
                        metrics::counter!("sluicegate_upstream_reused_retries_total").increment(1);
                        tracing::debug!(endpoint = %addr, error = %e.error(), "reused connection closed before any response byte; sending again on a new one");
                        req = again.request();
                    }
                    _ => return Err(Failed::Broken(error_chain(&e.into_error()))),
                },
            }
        }
    }

    /// The most recently used idle connection to `addr` that is still open.
    fn checkout(&self, addr: &str) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.inner.idle.lock();
        let list = idle.get_mut(addr)?;
        while let Some(mut entry) = list.pop() {
            if now < entry.until && entry.conn.settle() {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Open a connection to `addr`.
    async fn connect(&self, addr: &str) -> Result<Conn, Failed> {
        let stream = match tokio::time::timeout(
            self.inner.connect_timeout,
            TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(Failed::Connect(e.to_string())),
            Err(_) => {
                return Err(Failed::Connect(format!(
                    "timed out after {} ms",
                    self.inner.connect_timeout.as_millis()
                )))
            }
        };
        // Small requests and responses go out at once (as nginx's
        // tcp_nodelay); a failure here only costs latency.
        let _ = stream.set_nodelay(true);
        let read = Arc::new(AtomicU64::new(0));
        let counted = Counted {
            stream,
            read: read.clone(),
        };
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(counted))
            .await
            .map_err(|e| Failed::Connect(e.to_string()))?;
        metrics::counter!("sluicegate_upstream_connections_opened_total").increment(1);
        Ok(Conn {
            sender,
            driver: Some(Box::pin(driver)),
            read,
            idle_limit: self.inner.idle_timeout,
        })
    }

    /// Put `conn` back once its response has ended, unless it closed, may
    /// not idle at all, or the endpoint has enough idle.
    fn checkin(&self, addr: Arc<str>, mut conn: Conn) {
        if conn.idle_limit.is_zero() || !conn.settle() {
            return;
        }
        self.start_sweeping();
        let until = Instant::now() + conn.idle_limit;
        let mut idle = self.inner.idle.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < self.inner.max_idle {
            list.push(Idle { conn, until });
        }
    }

    /// Start the sweep task on this worker's runtime, once.
    fn start_sweeping(&self) {
        if self.inner.sweeping.load(Ordering::Relaxed)
            || self.inner.sweeping.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.inner.sweeping.store(false, Ordering::Relaxed);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        rt.spawn(sweep(weak));
    }

    /// Idle connections in the pool (for tests and the sweep).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.inner.idle.lock().values().map(Vec::len).sum()
    }
}

/// Every [`SWEEP`], drop idle connections the upstream closed or that are
/// past their idle deadline; ends with the pool.
async fn sweep(pool: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut idle = inner.idle.lock();
        idle.retain(|_, list| {
            list.retain_mut(|e| now < e.until && e.conn.settle());
            !list.is_empty()
        });
    }
}

/// What it takes to send a request again: its head, and its body when it
/// had a small one (read into memory for that).
struct Replay {
    parts: http::request::Parts,
    body: Option<Bytes>,
}

impl Replay {
    /// Make `req` (which has a body) replayable if its body has a known
    /// length up to [`REPLAY_BODY_MAX`]: read it now and put it back in
    /// `req` as a buffer. `None` for a larger or unknown-length body, which
    /// streams as it comes and is never sent twice.
    async fn keep_body(req: &mut Request<ProxyBody>) -> Option<Replay> {
        let hint = http_body::Body::size_hint(req.body());
        if hint.exact().is_none_or(|n| n > REPLAY_BODY_MAX) {
            return None;
        }
        let mut taken = std::mem::replace(req.body_mut(), body::empty());
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = taken.frame().await {
            let data = match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                Err(e) => {
                    // The client's body broke: the request fails upstream
                    // as a broken body would have.
                    *req.body_mut() = body::boxed(FailedBody(Some(e.to_string())));
                    return None;
                }
            };
            if buf.len() + data.len() > REPLAY_BODY_MAX as usize {
                // Longer than it said: send what was read and the rest.
                use futures_util::StreamExt;
                let read = std::mem::take(&mut buf).freeze();
                let first: [Result<http_body::Frame<Bytes>, crate::body::BoxError>; 2] = [
                    Ok(http_body::Frame::data(read)),
                    Ok(http_body::Frame::data(data)),
                ];
                let rest = http_body_util::BodyStream::new(taken);
                let stream = futures_util::stream::iter(first).chain(rest);
                *req.body_mut() = body::boxed(http_body_util::StreamBody::new(stream));
                return None;
            }
            buf.extend_from_slice(&data);
        }
        let bytes = buf.freeze();
        *req.body_mut() = body::full(bytes.clone());
        Some(Replay {
            parts: clone_head(req),
            body: Some(bytes),
        })
    }

    /// The request to send again.
    fn request(self) -> Request<ProxyBody> {
        let body = match self.body {
            Some(b) => body::full(b),
            None => body::empty(),
        };
        Request::from_parts(self.parts, body)
    }
}

/// A request body that fails at once with the error its reading met.
struct FailedBody(Option<String>);

impl http_body::Body for FailedBody {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|e| Err(e.into())))
    }
}

/// A request head without its extensions (the upstream request has none
/// the pool reads).
fn clone_head(req: &Request<ProxyBody>) -> http::request::Parts {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = req.method().clone();
    parts.uri = req.uri().clone();
    parts.version = req.version();
    parts.headers = req.headers().clone();
    parts
}

/// How long a connection may idle after a response with these headers:
/// `limit`, or less when `Keep-Alive: timeout=N` announces that the upstream
/// closes sooner: then a second before it does (half of it when `N` is 1
/// or less), so the pool lets go first. `timeout=0` keeps nothing.
pub fn keep_alive_limit(headers: &http::HeaderMap, limit: Duration) -> Duration {
    let Some(value) = headers
        .get(http::header::HeaderName::from_static("keep-alive"))
        .and_then(|v| v.to_str().ok())
    else {
        return limit;
    };
    let announced = value.split(',').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("timeout") {
            return None;
        }
        v.trim().trim_matches('"').parse::<u64>().ok()
    });
    let Some(secs) = announced else {
        return limit;
    };
    let theirs = Duration::from_secs(secs);
    let margin = if secs >= 2 {
        Duration::from_secs(1)
    } else {
        theirs / 2
    };
    limit.min(theirs.saturating_sub(margin))
}

/// A connection lent to a response body: polled as the body is read, and
/// returned to the pool when the body has ended. Dropped early (the client
/// went away mid-body), the connection is closed.
pub struct Lease {
    conn: Option<Conn>,
    pool: Pool,
    addr: Arc<str>,
    ended: bool,
}

impl Lease {
    /// Lend `conn` (to `addr`).
    pub fn new(conn: Conn, pool: Pool, addr: Arc<str>) -> Lease {
        Lease {
            conn: Some(conn),
            pool,
            addr,
            ended: false,
        }
    }

    /// Do the connection's I/O (before polling the body it feeds).
    pub fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = self.conn.as_mut() {
            conn.drive(cx);
        }
    }

    /// The body has ended: the connection may go back to the pool.
    pub fn ended(&mut self) {
        self.ended = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let (true, Some(conn)) = (self.ended, self.conn.take()) {
            self.pool.checkin(self.addr.clone(), conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn get() -> Request<ProxyBody> {
        Request::builder()
            .uri("/")
            .header("host", "t")
            .body(crate::body::empty())
            .unwrap()
    }

    /// A backend answering every request with `reply`; closes a connection
    /// after `per_conn` requests. Counts accepted connections.
    async fn backend(reply: &'static [u8], per_conn: usize) -> (Arc<str>, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: Arc<str> = l.local_addr().unwrap().to_string().into();
        let accepts = Arc::new(AtomicUsize::new(0));
        let a = accepts.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..per_conn {
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = s.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepts)
    }

    async fn roundtrip(pool: &Pool, addr: &Arc<str>) -> Vec<u8> {
        let (resp, conn) = pool.send(addr, get()).await.expect("response");
        let mut lease = Lease::new(conn, pool.clone(), addr.clone());
        let mut body = resp.into_body();
        let mut out = Vec::new();
        loop {
            let frame = std::future::poll_fn(|cx| {
                lease.drive(cx);
                Pin::new(&mut body).poll_frame(cx)
            })
            .await;
            match frame {
                Some(f) => out.extend_from_slice(f.unwrap().data_ref().unwrap()),
                None => break,
            }
        }
        lease.ended();
        out
    }

    use http_body::Body as _;

    #[tokio::test]
    async fn connections_are_reused_after_the_body_ends() {
        let (addr, accepts) = backend(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 100).await;
        let pool = Pool::new(8, Duration::from_secs(1), Duration::from_secs(4));
        for _ in 0..5 {
            assert_eq!(roundtrip(&pool, &addr).await, b"ok");
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_reused() {
        // One request per connection, closed without `Connection: close`.
        let (addr, accepts) = backend(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 1).await;
        let pool = Pool::new(8, Duration::from_secs(1), Duration::from_secs(4));
        for _ in 0..4 {
            assert_eq!(roundtrip(&pool, &addr).await, b"ok");
            // Let the close arrive.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_body_dropped_early_closes_its_connection() {
        let (addr, _) = backend(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial",
            100,
        )
        .await;
        let pool = Pool::new(8, Duration::from_secs(1), Duration::from_secs(4));
        let (_resp, conn) = pool.send(&addr, get()).await.expect("response");
        drop(Lease::new(conn, pool.clone(), addr.clone()));
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn connection_close_is_honoured() {
        let (addr, accepts) = backend(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            100,
        )
        .await;
        let pool = Pool::new(8, Duration::from_secs(1), Duration::from_secs(4));
        for _ in 0..3 {
            assert_eq!(roundtrip(&pool, &addr).await, b"ok");
            assert_eq!(pool.idle_count(), 0);
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 3);
    }

    /// A backend that answers the first request of each connection, then
    /// reads the next one and closes without a byte (an idle close racing
    /// the request). Counts requests read.
    async fn closes_on_second_request() -> (Arc<str>, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: Arc<str> = l.local_addr().unwrap().to_string().into();
        let seen = Arc::new(AtomicUsize::new(0));
        let n = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let n = n.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for i in 0..2 {
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            let k = s.read(&mut buf).await.unwrap_or(0);
                            if k == 0 {
                                return;
                            }
                            got.extend_from_slice(&buf[..k]);
                        }
                        n.fetch_add(1, Ordering::SeqCst);
                        if i == 0 {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Dropped: closed with the second request unanswered.
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_request_lost_to_an_idle_close_is_sent_again() {
        let (addr, seen) = closes_on_second_request().await;
        let pool = Pool::new(8, Duration::from_secs(1), Duration::from_secs(4));
        for _ in 0..4 {
            assert_eq!(roundtrip(&pool, &addr).await, b"ok");
        }
        // Each reuse lost its request and sent it again on a new connection.
        assert_eq!(seen.load(Ordering::SeqCst), 4 + 3);
    }

    #[test]
    fn keep_alive_timeout_shortens_the_idle_limit() {
        let limit = Duration::from_secs(4);
        let h = |v: &'static str| {
            let mut m = http::HeaderMap::new();
            m.insert("keep-alive", http::HeaderValue::from_static(v));
            keep_alive_limit(&m, limit)
        };
        assert_eq!(keep_alive_limit(&http::HeaderMap::new(), limit), limit);
        assert_eq!(h("timeout=2, max=100"), Duration::from_secs(1));
        assert_eq!(h("max=5, Timeout=1"), Duration::from_millis(500));
        assert_eq!(h("timeout=60"), limit);
        assert_eq!(h("timeout=0"), Duration::ZERO);
        assert_eq!(h("timeout=soon"), limit);
    }

    #[tokio::test]
    async fn refused_connections_are_connect_errors() {
        let addr: Arc<str> = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string().into()
        };
        let pool = Pool::new(8, Duration::from_secs(1), Duration::from_secs(4));
        assert!(matches!(
            pool.send(&addr, get()).await,
            Err(Failed::Connect(_))
        ));
    }
}
