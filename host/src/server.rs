//! Listeners and client connections: HTTP/1.1 and h2c (prior knowledge) on
//! the same port, timeouts against slow and idle clients, and graceful
//! shutdown (stop accepting, let in-flight requests finish, up to a deadline).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use crate::body::ProxyBody;
use crate::protect::{
    self,
    h1::{ParkSlot, Parkable, StrictH1},
};
use crate::proxy::{ConnInfo, Proxy};
use crate::ticker::Ticker;

/// Bind `workers` listening sockets on `addr`, one per worker thread
/// (SO_REUSEPORT: the kernel spreads connections over them; a deep
/// backlog), ready for a tokio runtime to adopt.
///
/// SO_REUSEPORT lets any socket of the same user join the group, so a
/// second proxy started on a port already served would silently take a
/// share of its clients instead of failing. A probe bound without it first
/// fails if anything is listening on `addr` already: a taken port stops the
/// start with `address already in use`, as it would without SO_REUSEPORT.
pub fn bind_workers(
    addr: SocketAddr,
    workers: usize,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        let probe = socket(addr, false)?;
        probe.bind(&addr.into()).map_err(|e| taken(addr, e))?;
    }
    (0..workers).map(|_| bind_std(addr, true)).collect()
}

/// Bind one listening socket on `addr`; with `shared`, in a SO_REUSEPORT
/// group (see [`bind_workers`]). The admin listener is not shared.
pub fn bind_std(addr: SocketAddr, shared: bool) -> anyhow::Result<std::net::TcpListener> {
    let socket = socket(addr, shared)?;
    socket.bind(&addr.into()).map_err(|e| taken(addr, e))?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// A non-blocking TCP socket for `addr` with SO_REUSEADDR (a restart need
/// not wait out TIME_WAIT), and SO_REUSEPORT when `shared`.
fn socket(addr: SocketAddr, shared: bool) -> anyhow::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// The error of a failed bind, naming the address.
fn taken(addr: SocketAddr, e: std::io::Error) -> anyhow::Error {
    anyhow::Error::from(e).context(format!("cannot listen on {addr}"))
}

/// Serve clients on `listener` until `shutdown` flips, then drain. With
/// `tls`, each connection first completes a TLS handshake (ALPN picks h2 or
/// HTTP/1.1; the connection builder serves either).
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    // Connection tasks: the drain waits for them.
    let tasks = TaskTracker::new();
    // Rebuilt when a reload brings a new config, so hyper's own limits
    // (`max_headers`, `max_header_bytes`, the `h2_*` keys) take effect for
    // new connections without a restart; open connections keep theirs.
    let mut built_for = proxy.snapshot.load().config.clone();
    let mut builder = Arc::new(connection_builder(&built_for));
    // Cancelled with `shutdown`: every connection task watches it.
    let stop = CancellationToken::new();
    let mut cap = protect::connection_cap(built_for.proxy.limits.max_connections);
    loop {
        // At the connection cap (a share of the fd limit), new clients wait
        // in the backlog: accepting them would starve upstream connections.
        if open.load(Ordering::Relaxed) >= cap {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => continue,
                _ = shutdown.changed() => break,
            }
        }
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, client) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (limits, timeouts, admitted) = {
                    let snap = proxy.snapshot.load();
                    if !Arc::ptr_eq(&snap.config, &built_for) {
                        built_for = snap.config.clone();
                        builder = Arc::new(connection_builder(&built_for));
                        cap = protect::connection_cap(built_for.proxy.limits.max_connections);
                    }
                    let limits = snap.config.proxy.limits.clone();
                    let admitted = snap.protection.conns.admit(client.ip(), limits.max_connections_per_ip);
                    (limits, snap.config.proxy.timeouts.clone(), admitted)
                };
                // Over the per-IP connection limit: closed at once.
                let Some(admitted) = admitted else { continue };
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                let scheme = if tls.is_some() { "https" } else { "http" };
                // SNI and ALPN, known once the handshake is done.
                let tls_info = tls.as_ref().map(|_| Arc::new(std::sync::OnceLock::new()));
                let conn_info = ConnInfo { client, scheme, tls: tls_info.clone() };
                let idle = Duration::from_millis(timeouts.idle_ms);
                let park_after = Duration::from_millis(timeouts.keepalive_park_ms).min(idle);
                let head_timeout = Duration::from_millis(timeouts.header_read_ms);
                let inflight = Arc::new(AtomicUsize::new(0));
                let stream = IdleTimeout::new(stream, idle, inflight.clone());
                // Every HTTP/1.1 head is checked strictly (request smuggling),
                // on the plain stream or inside TLS.
                let (max_head, max_headers) = (limits.max_header_bytes.max(8192), limits.max_headers);
                let served = Arc::new(AtomicU64::new(0));
                let body_inflight = inflight.clone();
                let max = limits.max_requests_per_connection;
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let proxy = proxy.clone();
                    let conn_info = conn_info.clone();
                    // Counted until the response body ends (idle timeout and
                    // parking must not strike a response that is streaming).
                    let guard = InFlight::new(body_inflight.clone());
                    let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                    let fut: Pin<Box<dyn Future<Output = Result<_, Infallible>> + Send>> = Box::pin(async move {
                        let version = req.version();
                        let mut resp = proxy.handle(req, conn_info).await;
                        protect::last_request(&mut resp, version, n, max);
                        Ok(resp.map(|body| InFlightBody { body, _guard: guard }))
                    });
                    fut
                });
                let (builder, stop) = (builder.clone(), stop.clone());
                open.fetch_add(1, Ordering::Relaxed);
                let open = open.clone();
                if let Some(acceptor) = &tls {
                    let acceptor = acceptor.clone();
                    tasks.spawn(async move {
                        if let Some(tls_stream) = crate::tls::handshake(&acceptor, stream, head_timeout, client).await {
                            if let Some(info) = &tls_info {
                                let (_, session) = tls_stream.get_ref();
                                let _ = info.set(crate::filter::exchange::TlsInfo {
                                    sni: session.server_name().map(str::to_string),
                                    alpn: session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
                                });
                            }
                            let strict = StrictH1::new(tls_stream, max_head, max_headers, head_timeout, client);
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(strict), service).into_owned();
                            if let Err(e) = until_done(conn, stop).await {
                                tracing::debug!(client = %client, error = %e, "TLS connection ended with an error");
                            }
                        }
                        drop(admitted);
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                    continue;
                }
                let mut strict = StrictH1::new(stream, max_head, max_headers, head_timeout, client);
                if park_after > Duration::ZERO {
                    strict = strict.with_park(park_after, inflight);
                }
                let strict = Box::new(strict);
                tasks.spawn(async move {
                    serve_plain(strict, builder, service, stop, client).await;
                    drop(admitted);
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    stop.cancel();
    let drain = Duration::from_millis(proxy.snapshot.load().config.proxy.timeouts.drain_ms);
    // Every connection task saw `shutdown` flip: active ones finish their
    // requests (`until_done`), parked ones close.
    tasks.close();
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        tracing::warn!(
            ms = drain.as_millis() as u64,
            "drain deadline passed; closing remaining connections"
        );
    }
}

fn connection_builder(cfg: &crate::config::Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The strict reader keeps `header_read_ms` (a started head must be
        // complete in time; hyper never sees a partial one), and idle or
        // silent connections are parked and closed by `IdleTimeout`.
        // hyper's own timer would only repeat that, at the price of a boxed
        // `Sleep` made, registered and dropped for every request.
        .header_read_timeout(None)
        .max_buf_size(cfg.proxy.limits.max_header_bytes.max(8192))
        .max_headers(cfg.proxy.limits.max_headers)
        .keep_alive(true);
    let limits = &cfg.proxy.limits;
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
        .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// Serve one plain HTTP/1.1 or h2c client connection. An HTTP/1.1
/// connection that goes idle is parked (see [`crate::protect::h1`]): hyper
/// and its buffers go away, the socket waits for the next request, which a
/// new hyper connection serves. A parked connection's task keeps only what
/// this future holds across the parked wait: the boxed reader, the
/// service's captures and a few pointers (the hyper side is built in a
/// block, so the generator reserves no room for it while parked).
async fn serve_plain<S>(
    mut strict: Box<StrictH1<IdleTimeout>>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: S,
    stop: CancellationToken,
    client: SocketAddr,
) where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<InFlightBody>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slot: ParkSlot<IdleTimeout> = Arc::default();
    loop {
        let done = {
            let io = TokioIo::new(Parkable::new(strict, slot.clone()));
            let conn = builder
                .serve_connection_with_upgrades(io, service.clone())
                .into_owned();
            until_done(conn, stop.clone())
        };
        if let Err(e) = done.await {
            tracing::debug!(client = %client, error = %e, "connection ended with an error");
        }
        let parked = slot.lock().ok().and_then(|mut s| s.take());
        let Some(io) = parked else { return };
        metrics::counter!("sluicegate_connections_parked_total").increment(1);
        strict = io;
        // Parked until the client sends again. The idle timeout is the
        // connection's own timer (`IdleTimeout`, counted from the last
        // byte), polled here as it is during reads: no second timer.
        let resumed = tokio::select! {
            resumed = std::future::poll_fn(|cx| strict.get_mut().poll_parked(cx)) => resumed,
            _ = stop.cancelled() => false,
        };
        if !resumed {
            return;
        }
        strict.unpark();
    }
}

/// Drive a connection to its end; when `stop` flips, shut it down
/// gracefully (in-flight requests finish, then it closes).
fn until_done<C: GracefulConnection>(conn: C, stop: CancellationToken) -> UntilDone<C> {
    UntilDone {
        conn: Box::pin(conn),
        stop: Box::pin(stop.cancelled_owned()),
        stopping: false,
    }
}

/// See [`until_done`]. (A plain future: an `async fn` here trips rustc's
/// higher-ranked `Send` check on hyper's connection types.)
struct UntilDone<C> {
    conn: Pin<Box<C>>,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    stopping: bool,
}

impl<C: GracefulConnection> Future for UntilDone<C> {
    type Output = Result<(), C::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if !this.stopping && this.stop.as_mut().poll(cx).is_ready() {
            this.stopping = true;
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.as_mut().poll(cx)
    }
}

/// A response body that holds its request's [`InFlight`] until it ends.
pub struct InFlightBody {
    body: ProxyBody,
    _guard: InFlight,
}

impl hyper::body::Body for InFlightBody {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Counts a request in flight on its connection for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: Arc<AtomicUsize>) -> InFlight {
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client stream that ends itself after `idle` with no bytes moving and
/// no request in flight: keep-alive connections do not live forever.
///
/// The data path reads no clock: a read or write that moves bytes bumps a
/// counter. A timer ticks every quarter of `idle` and counts the ticks in a
/// row that saw no activity and no request in flight; the fourth such tick
/// ends the connection. So a connection closes between `idle` and 1.25 ×
/// `idle` after its last byte, and the clock is read once per tick.
struct IdleTimeout {
    inner: TcpStream,
    timer: Ticker,
    /// Reads and writes that moved bytes.
    activity: u64,
    /// `activity` at the last tick, and quiet ticks since.
    seen: u64,
    quiet: u32,
    inflight: Arc<AtomicUsize>,
}

/// Quiet ticks that make a connection idle.
const IDLE_TICKS: u32 = 4;

impl IdleTimeout {
    fn new(inner: TcpStream, idle: Duration, inflight: Arc<AtomicUsize>) -> IdleTimeout {
        let tick = (idle / IDLE_TICKS).max(Duration::from_millis(1));
        IdleTimeout {
            inner,
            timer: Ticker::new(tick),
            activity: 0,
            seen: 0,
            quiet: 0,
            inflight,
        }
    }

    /// Bytes moved.
    fn touch(&mut self) {
        self.activity = self.activity.wrapping_add(1);
    }

    /// Parked: `true` once the client's next bytes (or its close) can be
    /// read, `false` if the socket fails or the idle timeout strikes first.
    fn poll_parked(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        match self.inner.poll_read_ready(cx) {
            Poll::Ready(ready) => Poll::Ready(ready.is_ok()),
            Poll::Pending if self.expired(cx) => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Has the connection been quiet for `IDLE_TICKS` ticks? Re-arms the
    /// timer otherwise.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let IdleTimeout {
            timer,
            activity,
            seen,
            quiet,
            inflight,
            ..
        } = self;
        timer.poll_ticks(cx, || {
            if *activity != *seen || inflight.load(Ordering::Relaxed) > 0 {
                *seen = *activity;
                *quiet = 0;
                false
            } else {
                *quiet += 1;
                *quiet >= IDLE_TICKS
            }
        })
    }
}

impl AsyncRead for IdleTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if self.expired(cx) {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "idle timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for IdleTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port another process holds, even one in a SO_REUSEPORT group of
    /// the same user, stops the start instead of being shared.
    #[test]
    fn a_port_already_listened_on_is_refused_not_shared() {
        let other = bind_std("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = other.local_addr().unwrap();
        let e = format!("{:#}", bind_workers(addr, 2).unwrap_err());
        assert!(
            e.contains(&format!("cannot listen on {addr}")) && e.contains("in use"),
            "{e}"
        );
        let e = format!("{:#}", bind_std(addr, false).unwrap_err());
        assert!(e.contains("in use"), "{e}");
        drop(other);

        // Free again: every worker gets its own socket on it.
        let ours = bind_workers(addr, 3).unwrap();
        assert_eq!(ours.len(), 3);
        for l in &ours {
            assert_eq!(l.local_addr().unwrap(), addr);
        }
    }
}
