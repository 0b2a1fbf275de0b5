//! HTTP/2 to upstreams (`protocol = "h2"` over TLS with ALPN, `"h2c"` with
//! prior knowledge), on hyper's `client::conn::http2`.
//!
//! One process-wide pool keeps, per endpoint, a few multiplexed
//! connections (`[upstream.http2] max_connections_per_endpoint`). A request
//! takes the least loaded connection that still has room: fewer streams
//! than `max_concurrent_streams` and than the endpoint's own
//! `SETTINGS_MAX_CONCURRENT_STREAMS`. When every connection is full,
//! another is opened (one connect at a time per endpoint; the others wait
//! for it); at the cap, the least loaded connection takes the stream anyway
//! and h2 queues it until the endpoint allows it, so the endpoint's limit
//! is never exceeded.
//!
//! **GOAWAY.** Streams already accepted by the endpoint finish on the old
//! connection; hyper then closes the connection's sender, and the next
//! request opens a new connection. A request the old connection never
//! wrote (hyper hands it back), a stream above the GOAWAY's last stream id
//! and a stream reset with `REFUSED_STREAM` were never processed by the
//! endpoint (RFC 9113 §6.8, §8.7), so they are sent again on a fresh
//! connection: up to [`SAME_ENDPOINT_TRIES`] times here, then
//! `UpstreamClient::forward` may try another endpoint as after a failed
//! connect. The request body is kept for that while it is at most
//! [`REPLAY_BODY_MAX`] ([`Replayable`]); a longer body streams and is never
//! sent twice.
//!
//! The connection's driver runs in a task on the runtime of the worker that
//! opened it; requests from every worker share it.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::{error_chain, Failed};
use crate::body::{BoxError, ProxyBody};
use crate::config::Http2Config;
use crate::tls::UpstreamTls;

/// Largest request body kept so that a refused stream can be sent again.
pub const REPLAY_BODY_MAX: usize = 64 * 1024;
/// Fresh connections to the same endpoint a refused request is sent on.
pub const SAME_ENDPOINT_TRIES: usize = 3;

/// Where one request goes: an endpoint and how to reach it.
pub struct Target<'a> {
    /// `host:port` to connect to.
    pub addr: &'a Arc<str>,
    /// The endpoint's host, for SNI when `[upstream.tls] sni` is not set.
    pub host: &'a str,
    /// `Some` for `protocol = "h2"`.
    pub tls: Option<&'a Arc<UpstreamTls>>,
    /// `[upstream.http2]`.
    pub settings: &'a Http2Config,
    /// `[proxy.timeouts] connect_ms`.
    pub connect_timeout: Duration,
}

/// The process's HTTP/2 connections, by endpoint.
pub struct H2Pool {
    endpoints: Mutex<FxHashMap<PoolKey, Endpoint>>,
}

/// An endpoint address and the TLS version (0: plain h2c).
type PoolKey = (Arc<str>, u64);

#[derive(Default)]
struct Endpoint {
    conns: Vec<Arc<Conn>>,
    /// A connect is under way (one at a time per endpoint).
    connecting: bool,
    /// Woken when a connect ends, well or not.
    connected: Arc<Notify>,
}

/// One multiplexed connection.
struct Conn {
    sender: http2::SendRequest<ProxyBody>,
    /// Streams open on it (reserved by a request until its response body ends).
    active: AtomicUsize,
    /// The endpoint's `SETTINGS_MAX_CONCURRENT_STREAMS`, as the driver last saw it.
    peer_max: Arc<AtomicUsize>,
    /// Set when a request on it came back unsent or refused: never picked again.
    dead: AtomicBool,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.dead.load(Ordering::Relaxed) && !self.sender.is_closed()
    }

    fn room(&self, ours: usize) -> bool {
        let limit = ours.min(self.peer_max.load(Ordering::Relaxed).max(1));
        self.active.load(Ordering::Relaxed) < limit
    }
}

/// A stream reserved on a connection: counts against the connection's
/// streams until dropped (kept with the response body).
pub struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn reserve(conn: &Arc<Conn>) -> StreamGuard {
    conn.active.fetch_add(1, Ordering::Relaxed);
    StreamGuard(conn.clone())
}

/// What a checkout found.
enum Checkout {
    Stream(StreamGuard),
    Connect(Arc<Notify>),
    Wait(Arc<Notify>),
}

impl H2Pool {
    /// The process-wide pool.
    pub fn global() -> &'static H2Pool {
        static POOL: OnceLock<H2Pool> = OnceLock::new();
        POOL.get_or_init(|| H2Pool {
            endpoints: Mutex::default(),
        })
    }

    /// Send `req` (absolute URI, `:authority` set) to the target, on a
    /// stream of a pooled connection. `replay` makes the request body again
    /// when a stream was refused. Returns the response head and the stream
    /// reservation, which the response body must keep.
    pub(super) async fn send(
        &self,
        target: &Target<'_>,
        mut req: Request<ProxyBody>,
        replay: &Replayable,
    ) -> Result<(Response<Incoming>, StreamGuard), Failed> {
        let key: PoolKey = (target.addr.clone(), target.tls.map_or(0, |t| t.id));
        let mut tries = 0;
        loop {
            tries += 1;
            let guard = self.checkout(&key, target).await?;
            let mut sender = guard.0.sender.clone();
            let head = (tries < SAME_ENDPOINT_TRIES).then(|| clone_head(&req));
            let err = match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, guard)),
                Err(e) => e,
            };
            guard.0.dead.store(true, Ordering::Relaxed);
            let mut err = err;
            let unsent = err.take_message();
            let error = err.into_error();
            let refused = refused(&error);
            let reason = error_chain(&error);
            let Some(head) = head else {
                return Err(match (unsent.is_some(), refused) {
                    (true, _) | (_, true) => Failed::Refused(reason),
                    _ => Failed::Broken(reason),
                });
            };
            req = match (unsent, refused) {
                // Never written: the same request, body untouched.
                (Some(unsent), _) => unsent,
                // Refused: the endpoint never processed it; a new body.
                (None, true) => match replay.reader() {
                    Some(body) => Request::from_parts(head, body),
                    None => return Err(Failed::Refused(reason)),
                },
                (None, false) => return Err(Failed::Broken(reason)),
            };
            metrics::counter!("sluicegate_upstream_h2_resent_total").increment(1);
            tracing::debug!(endpoint = %target.addr, error = %reason, "stream not processed by the upstream; sending on another connection");
        }
    }

    /// A stream on a connection to the target, opening one if needed.
    async fn checkout(&self, key: &PoolKey, target: &Target<'_>) -> Result<StreamGuard, Failed> {
        loop {
            let found = {
                let mut map = self.endpoints.lock();
                let ep = map.entry(key.clone()).or_default();
                pick(ep, target.settings)
            };
            match found {
                Checkout::Stream(g) => return Ok(g),
                Checkout::Wait(notify) => {
                    // Enabled before the lock was dropped? No: re-check
                    // after enabling, so a wake between is not missed.
                    let notified = notify.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let still = {
                        let map = self.endpoints.lock();
                        map.get(key).is_some_and(|e| e.connecting)
                    };
                    if still {
                        let _ = tokio::time::timeout(target.connect_timeout, notified).await;
                    }
                }
                Checkout::Connect(notify) => {
                    // Ends the connect (well, badly or cancelled) for the waiters.
                    let _connecting = Connecting {
                        pool: self,
                        key,
                        notify,
                    };
                    // Boxed: rare, and large (TLS handshake).
                    let conn = Arc::new(Box::pin(connect(target)).await?);
                    let guard = reserve(&conn);
                    self.endpoints
                        .lock()
                        .entry(key.clone())
                        .or_default()
                        .conns
                        .push(conn);
                    return Ok(guard);
                }
            }
        }
    }

    /// Open connections to `addr` (for tests and the admin view).
    pub fn connections(&self, addr: &str) -> usize {
        let map = self.endpoints.lock();
        map.iter()
            .filter(|((a, _), _)| &**a == addr)
            .map(|(_, e)| e.conns.iter().filter(|c| c.usable()).count())
            .sum()
    }
}

/// A connect under way; dropped, it lets the endpoint's waiters go on.
struct Connecting<'a> {
    pool: &'a H2Pool,
    key: &'a PoolKey,
    notify: Arc<Notify>,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        if let Some(ep) = self.pool.endpoints.lock().get_mut(self.key) {
            ep.connecting = false;
        }
        self.notify.notify_waiters();
    }
}

/// A fresh connection of its own to the target, outside the pool (the
/// active gRPC health check: a check must see the endpoint as a new
/// client would). It closes once the sender is dropped.
pub async fn open(target: &Target<'_>) -> Result<http2::SendRequest<ProxyBody>, String> {
    match connect(target).await {
        Ok(conn) => Ok(conn.sender.clone()),
        Err(Failed::Connect(e) | Failed::Broken(e) | Failed::Refused(e)) => Err(e),
    }
}

/// The choice for one request, under the endpoint's lock.
fn pick(ep: &mut Endpoint, settings: &Http2Config) -> Checkout {
    ep.conns.retain(|c| c.usable());
    let ours = settings.max_concurrent_streams as usize;
    let least = ep
        .conns
        .iter()
        .filter(|c| c.room(ours))
        .min_by_key(|c| c.active.load(Ordering::Relaxed));
    if let Some(c) = least {
        return Checkout::Stream(reserve(c));
    }
    if ep.connecting {
        return Checkout::Wait(ep.connected.clone());
    }
    if ep.conns.len() < settings.max_connections_per_endpoint {
        ep.connecting = true;
        return Checkout::Connect(ep.connected.clone());
    }
    // Every connection is full and no more may be opened: the least loaded
    // one takes it; h2 holds the stream until the endpoint allows it.
    match ep
        .conns
        .iter()
        .min_by_key(|c| c.active.load(Ordering::Relaxed))
    {
        Some(c) => Checkout::Stream(reserve(c)),
        None => {
            ep.connecting = true;
            Checkout::Connect(ep.connected.clone())
        }
    }
}

/// Did the endpoint refuse the stream without processing it: reset with
/// `REFUSED_STREAM`, or above the last stream id of a graceful GOAWAY?
fn refused(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2e) = err.downcast_ref::<::h2::Error>() {
            let reason = h2e.reason();
            return h2e.is_remote()
                && ((h2e.is_reset() && reason == Some(::h2::Reason::REFUSED_STREAM))
                    || (h2e.is_go_away() && reason == Some(::h2::Reason::NO_ERROR)));
        }
        cur = err.source();
    }
    false
}

/// Open one connection: TCP, TLS with ALPN `h2` for `protocol = "h2"`,
/// then the HTTP/2 handshake; its driver is spawned.
async fn connect(target: &Target<'_>) -> Result<Conn, Failed> {
    let stream = match tokio::time::timeout(
        target.connect_timeout,
        TcpStream::connect(&**target.addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(Failed::Connect(e.to_string())),
        Err(_) => {
            return Err(Failed::Connect(format!(
                "timed out after {} ms",
                target.connect_timeout.as_millis()
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    match target.tls {
        None => handshake(TokioIo::new(stream), target).await,
        Some(tls) => {
            let name = match &tls.sni {
                Some(n) => n.clone(),
                None => rustls::pki_types::ServerName::try_from(target.host.to_string())
                    .map_err(|_| Failed::Connect(format!("{:?} is not a TLS name", target.host)))?,
            };
            let connector = tokio_rustls::TlsConnector::from(tls.h2_config());
            let tls_stream =
                tokio::time::timeout(target.connect_timeout, connector.connect(name, stream))
                    .await
                    .map_err(|_| Failed::Connect("TLS handshake timed out".into()))?
                    .map_err(|e| Failed::Connect(format!("TLS handshake: {e}")))?;
            let alpn = tls_stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            if alpn.as_deref() != Some(b"h2") {
                return Err(Failed::Connect(
                    "the upstream did not negotiate HTTP/2 (ALPN h2); use protocol = \"http1\""
                        .into(),
                ));
            }
            handshake(TokioIo::new(tls_stream), target).await
        }
    }
}

/// The HTTP/2 handshake on `io`; spawns the connection's driver.
async fn handshake<T>(io: T, target: &Target<'_>) -> Result<Conn, Failed>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new());
    if target.settings.keepalive_ms > 0 {
        let every = Duration::from_millis(target.settings.keepalive_ms);
        b.keep_alive_interval(every).keep_alive_timeout(every);
    }
    let handshake = b.handshake::<T, ProxyBody>(io);
    let (sender, conn) = tokio::time::timeout(target.connect_timeout, handshake)
        .await
        .map_err(|_| Failed::Connect("HTTP/2 handshake timed out".into()))?
        .map_err(|e| Failed::Connect(format!("HTTP/2 handshake: {}", error_chain(&e))))?;
    let peer_max = Arc::new(AtomicUsize::new(conn.current_max_send_streams()));
    let seen = peer_max.clone();
    let addr = target.addr.clone();
    let mut conn = Box::pin(conn);
    tokio::spawn(async move {
        let done = std::future::poll_fn(|cx| {
            let polled = conn.as_mut().poll(cx);
            seen.store(conn.current_max_send_streams(), Ordering::Relaxed);
            polled
        })
        .await;
        if let Err(e) = done {
            tracing::debug!(endpoint = %addr, error = %error_chain(&e), "HTTP/2 upstream connection closed");
        }
    });
    metrics::counter!("sluicegate_upstream_h2_connections_opened_total").increment(1);
    Ok(Conn {
        sender,
        active: AtomicUsize::new(0),
        peer_max,
        dead: AtomicBool::new(false),
    })
}

/// A request head without its extensions.
fn clone_head(req: &Request<ProxyBody>) -> http::request::Parts {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = req.method().clone();
    parts.uri = req.uri().clone();
    parts.version = req.version();
    parts.headers = req.headers().clone();
    parts
}

/// A request body that can be read again from the start while what was
/// read of it is at most [`REPLAY_BODY_MAX`]: each [`Replayable::reader`]
/// replays the kept bytes, then goes on reading the client's body. A
/// reader made later supersedes the earlier ones (they fail), so the
/// client's bytes are never split between two streams.
#[derive(Clone)]
pub struct Replayable {
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    source: ProxyBody,
    kept: Vec<Bytes>,
    kept_len: usize,
    /// More than [`REPLAY_BODY_MAX`] was read: nothing can be replayed.
    overflowed: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// The body had no bytes at all.
    empty: bool,
    hint: SizeHint,
    /// The newest reader's number.
    generation: u64,
}

impl Replayable {
    /// Keep what is read of `body`.
    pub fn new(body: ProxyBody) -> Replayable {
        let empty = body.is_end_stream();
        let hint = body.size_hint();
        Replayable {
            shared: Arc::new(Mutex::new(Shared {
                source: body,
                kept: Vec::new(),
                kept_len: 0,
                overflowed: false,
                trailers: None,
                ended: empty,
                empty,
                hint,
                generation: 0,
            })),
        }
    }

    /// A body that reads from the start, or `None` once too much was read.
    pub fn reader(&self) -> Option<ProxyBody> {
        let mut s = self.shared.lock();
        if s.overflowed {
            return None;
        }
        s.generation += 1;
        let reader = Reader {
            shared: self.shared.clone(),
            generation: s.generation,
            next: 0,
            trailers_sent: false,
        };
        Some(crate::body::boxed(reader))
    }

    /// Could another reader still be made?
    pub fn can_replay(&self) -> bool {
        !self.shared.lock().overflowed
    }
}

struct Reader {
    shared: Arc<Mutex<Shared>>,
    generation: u64,
    /// The next kept chunk to give.
    next: usize,
    trailers_sent: bool,
}

/// The error of a reader a newer one replaced.
#[derive(Debug, thiserror::Error)]
#[error("request body superseded by a retry")]
struct Superseded;

impl Body for Reader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut s = this.shared.lock();
        if s.generation != this.generation {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        if let Some(chunk) = s.kept.get(this.next) {
            let chunk = chunk.clone();
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if s.ended {
            return match (&s.trailers, this.trailers_sent) {
                (Some(t), false) => {
                    this.trailers_sent = true;
                    Poll::Ready(Some(Ok(Frame::trailers(t.clone()))))
                }
                _ => Poll::Ready(None),
            };
        }
        let s = &mut *s;
        // Empty data frames are skipped: the client's empty END_STREAM
        // frame comes out of hyper as one, and an HTTP/2 upstream counts
        // empty non-final DATA frames as abuse (h2 answers a hundred of
        // them on a connection with GOAWAY ENHANCE_YOUR_CALM).
        let frame = loop {
            match Pin::new(&mut s.source).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(|d| d.is_empty()) => {}
                other => break other,
            }
        };
        match frame {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.overflowed = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if !s.overflowed {
                        s.kept_len += data.len();
                        if s.kept_len > REPLAY_BODY_MAX {
                            s.overflowed = true;
                            s.kept.clear();
                        } else {
                            s.kept.push(data.clone());
                            this.next = s.kept.len();
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(t) => {
                        s.ended = true;
                        s.trailers = Some(t.clone());
                        this.trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(t))))
                    }
                    Err(_) => Poll::Ready(None),
                },
            },
        }
    }

    /// True once this reader has given everything and the client's body
    /// is done, so that the last DATA frame carries END_STREAM (no empty
    /// frame after it).
    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock();
        if s.empty {
            return true;
        }
        if s.generation != self.generation || self.next < s.kept.len() {
            return false;
        }
        if s.ended {
            return s.trailers.is_none() || self.trailers_sent;
        }
        s.source.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.shared.lock().hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn frames(chunks: &[&'static str], trailers: bool) -> ProxyBody {
        let mut v: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-sum", http::HeaderValue::from_static("7"));
            v.push(Ok(Frame::trailers(t)));
        }
        crate::body::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            v,
        )))
    }

    #[tokio::test]
    async fn a_replayed_body_is_the_same_body() {
        let r = Replayable::new(frames(&["ab", "cd"], true));
        let mut first = r.reader().unwrap();
        // Read half of it, then retry.
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        let second = r.reader().unwrap();
        assert!(first.frame().await.unwrap().is_err(), "superseded");
        let got = second.collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["x-sum"], "7");
        assert_eq!(got.to_bytes(), "abcd");
        let third = r.reader().unwrap().collect().await.unwrap();
        assert_eq!(third.trailers().unwrap()["x-sum"], "7");
        assert_eq!(third.to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn empty_frames_are_skipped_and_the_end_is_known() {
        let r = Replayable::new(frames(&["msg", "", ""], false));
        let mut b = r.reader().unwrap();
        let f = b.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "msg");
        assert!(
            b.frame().await.is_none(),
            "the empty frames are not passed on"
        );
        assert!(b.is_end_stream());
        let again = r.reader().unwrap();
        assert!(
            !again.is_end_stream(),
            "a new reader has the kept bytes to give"
        );
    }

    #[tokio::test]
    async fn a_long_body_is_never_replayed() {
        let big: &'static str = Box::leak("x".repeat(REPLAY_BODY_MAX + 1).into_boxed_str());
        let r = Replayable::new(frames(&[big, "tail"], false));
        let body = r.reader().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), REPLAY_BODY_MAX + 5);
        assert!(r.reader().is_none());
        assert!(!r.can_replay());
    }
}
