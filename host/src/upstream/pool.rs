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
//! replayed here (the retry policy in `forward` decides). A sweep every
//! [`SWEEP`] drops idle connections that were closed or idle for longer
//! than [`IDLE_TIMEOUT`].
//!
//! TLS upstreams and upgrade (WebSocket) requests still go through
//! hyper-util's client (see `UpstreamClient::forward`).

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::net::TcpStream;

use super::{error_chain, Failed};
use crate::body::ProxyBody;

/// How long a pooled connection may sit idle (as hyper-util's pool).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often idle connections are checked for closure and age.
pub const SWEEP: Duration = Duration::from_secs(2);

/// hyper's future for one upstream connection.
type Driver = http1::Connection<TokioIo<TcpStream>, ProxyBody>;

/// One upstream connection: the request sender and hyper's connection
/// future, which does the I/O whenever it is polled.
pub struct Conn {
    sender: http1::SendRequest<ProxyBody>,
    /// `None` once the connection future has finished (the connection is
    /// closed). Boxed: hyper's connection state is most of a kilobyte, and
    /// a `Conn` moves several times per request (checkout, the request
    /// future, the lease, check-in).
    driver: Option<Pin<Box<Driver>>>,
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
    sweeping: AtomicBool,
}

struct Idle {
    conn: Conn,
    /// When the request that last used it started (no clock read to
    /// check a connection in).
    since: Instant,
}

impl Pool {
    /// A pool keeping up to `max_idle` idle connections per endpoint.
    pub fn new(max_idle: usize, connect_timeout: Duration) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                idle: Mutex::default(),
                max_idle,
                connect_timeout,
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
            let mut sent = pin!(conn.sender.try_send_request(req));
            let result = std::future::poll_fn(|cx| {
                conn.drive(cx);
                sent.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(resp) => return Ok((resp, conn)),
                Err(mut e) => match e.take_message() {
                    // Not a byte of it was written: the pooled connection
                    // had been closed. Safe to send on a fresh one.
                    Some(unsent) if reused => {
                        metrics::counter!("sluicegate_upstream_stale_connections_total")
                            .increment(1);
                        tracing::debug!(endpoint = %addr, error = %e.error(), "pooled connection was closed; replaying on a new one");
                        req = unsent;
                    }
                    _ => return Err(Failed::Broken(error_chain(&e.into_error()))),
                },
            }
        }
    }

    /// The most recently used idle connection to `addr` that is still open.
    fn checkout(&self, addr: &str) -> Option<Conn> {
        let mut idle = self.inner.idle.lock();
        let list = idle.get_mut(addr)?;
        while let Some(mut entry) = list.pop() {
            if entry.conn.settle() {
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
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failed::Connect(e.to_string()))?;
        metrics::counter!("sluicegate_upstream_connections_opened_total").increment(1);
        Ok(Conn {
            sender,
            driver: Some(Box::pin(driver)),
        })
    }

    /// Put `conn` back once its response has ended (`since`: when that
    /// request started), unless it closed or the endpoint has enough idle.
    fn checkin(&self, addr: Arc<str>, mut conn: Conn, since: Instant) {
        if !conn.settle() {
            return;
        }
        self.start_sweeping();
        let mut idle = self.inner.idle.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < self.inner.max_idle {
            list.push(Idle { conn, since });
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

/// Every [`SWEEP`], drop idle connections the upstream closed or that sat
/// idle past [`IDLE_TIMEOUT`]; ends with the pool.
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
            list.retain_mut(|e| now.duration_since(e.since) < IDLE_TIMEOUT && e.conn.settle());
            !list.is_empty()
        });
    }
}

/// A connection lent to a response body: polled as the body is read, and
/// returned to the pool when the body has ended. Dropped early (the client
/// went away mid-body), the connection is closed.
pub struct Lease {
    conn: Option<Conn>,
    pool: Pool,
    addr: Arc<str>,
    since: Instant,
    ended: bool,
}

impl Lease {
    /// Lend `conn` (to `addr`, for a request started at `since`).
    pub fn new(conn: Conn, pool: Pool, addr: Arc<str>, since: Instant) -> Lease {
        Lease {
            conn: Some(conn),
            pool,
            addr,
            since,
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
            self.pool.checkin(self.addr.clone(), conn, self.since);
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
        let mut lease = Lease::new(conn, pool.clone(), addr.clone(), Instant::now());
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
        let pool = Pool::new(8, Duration::from_secs(1));
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
        let pool = Pool::new(8, Duration::from_secs(1));
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
        let pool = Pool::new(8, Duration::from_secs(1));
        let (_resp, conn) = pool.send(&addr, get()).await.expect("response");
        drop(Lease::new(conn, pool.clone(), addr.clone(), Instant::now()));
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn connection_close_is_honoured() {
        let (addr, accepts) = backend(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            100,
        )
        .await;
        let pool = Pool::new(8, Duration::from_secs(1));
        for _ in 0..3 {
            assert_eq!(roundtrip(&pool, &addr).await, b"ok");
            assert_eq!(pool.idle_count(), 0);
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn refused_connections_are_connect_errors() {
        let addr: Arc<str> = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string().into()
        };
        let pool = Pool::new(8, Duration::from_secs(1));
        assert!(matches!(
            pool.send(&addr, get()).await,
            Err(Failed::Connect(_))
        ));
    }
}
