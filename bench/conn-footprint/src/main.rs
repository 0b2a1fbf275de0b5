//! What one idle keep-alive client connection keeps allocated on Sluicegate's plain HTTP/1.1 path.
//!
//!     bench-conn-footprint PORT [--variant NAME]
//!
//! A model of `host/src/server.rs`'s plain path, built without the host: the host's own strict
//! HTTP/1.1 reader and parking (`host/src/protect/h1/`) and its `Ticker` are compiled in by path,
//! unchanged; `serve_plain`, `IdleTimeout`, `UntilDone`, `InFlight` and the per-connection
//! captures of the accept loop are copied from server.rs (same fields, same order, same hyper
//! builder settings). What differs: the service answers `200 hello world` itself (no upstream),
//! and there are no metrics, access log or per-IP limiter (a `ConnGuard` is a few inline bytes).
//!
//! The copy models server.rs as of commit d85f11e. It does not follow server.rs by itself: when the
//! plain path's per-connection state changes there, copy it again here and name the new commit.
//!
//! The global allocator is mimalloc v2 (as the host) wrapped by a counter of live bytes and live
//! blocks per requested size. Commands on stdin, answers on stdout (one JSON object a line):
//!   `base`  remember the live allocations now;
//!   `dump`  live bytes, blocks and RSS now, and the sizes whose live count grew since `base`;
//!   `sizes` the size of each type involved (`size_of`).
//!
//! Variants (proposals, tried here before anyone touches the host): `default` is the host as it
//! is; `boxed-slot` parks into `Mutex<Option<Box<StrictH1>>>` instead of an inline
//! `Option<StrictH1>` (the slot otherwise holds a second, empty StrictH1's worth of bytes for the
//! connection's whole life); `no-park` turns parking off (keepalive_park_ms = 0: what hyper keeps).
use std::alloc::{GlobalAlloc, Layout};
use std::convert::Infallible;
use std::future::Future;
use std::io::BufRead;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

#[path = "../../../host/src/ticker.rs"]
mod ticker;

mod protect {
    /// The host counts rejections in a metric; nothing is rejected here.
    pub fn count_rejection(_reason: &'static str) {}
    #[path = "../../../../host/src/protect/h1/mod.rs"]
    pub mod h1;
}

use protect::h1::{Parkable, StrictH1};
use ticker::Ticker;

// ---------------------------------------------------------------------------------------------
// the counting allocator

const SIZES: usize = 1 << 17;
struct Counting;
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_BLOCKS: AtomicI64 = AtomicI64::new(0);
static BY_SIZE: [AtomicI64; SIZES] = [const { AtomicI64::new(0) }; SIZES];
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn count(size: usize, d: i64) {
    LIVE_BYTES.fetch_add(d * size as i64, Ordering::Relaxed);
    LIVE_BLOCKS.fetch_add(d, Ordering::Relaxed);
    BY_SIZE[size.min(SIZES - 1)].fetch_add(d, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = INNER.alloc(l);
        if !p.is_null() {
            count(l.size(), 1);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = INNER.alloc_zeroed(l);
        if !p.is_null() {
            count(l.size(), 1);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(l.size(), -1);
        INNER.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = INNER.realloc(p, l, new);
        if !q.is_null() {
            count(l.size(), -1);
            count(new, 1);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss_kb() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(-1)
}

fn control(sizes: String) {
    let mut base: Vec<i64> = vec![0; SIZES];
    let (mut base_bytes, mut base_blocks) = (0, 0);
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { return };
        match line.trim() {
            "base" => {
                for (b, c) in base.iter_mut().zip(BY_SIZE.iter()) {
                    *b = c.load(Ordering::Relaxed);
                }
                base_bytes = LIVE_BYTES.load(Ordering::Relaxed);
                base_blocks = LIVE_BLOCKS.load(Ordering::Relaxed);
                println!("{{\"base\":true}}");
            }
            "dump" => {
                let mut grown: Vec<(usize, i64)> = BY_SIZE
                    .iter()
                    .enumerate()
                    .map(|(s, c)| (s, c.load(Ordering::Relaxed) - base[s]))
                    .filter(|&(_, d)| d != 0)
                    .collect();
                grown.sort_by_key(|&(s, d)| -(s as i64 * d));
                let top: Vec<String> = grown
                    .iter()
                    .take(25)
                    .map(|(s, d)| format!("[{s},{d}]"))
                    .collect();
                println!(
                    "{{\"live_bytes\":{},\"live_blocks\":{},\"rss_kb\":{},\"grown_bytes\":{},\"grown_blocks\":{},\"by_size\":[{}]}}",
                    LIVE_BYTES.load(Ordering::Relaxed),
                    LIVE_BLOCKS.load(Ordering::Relaxed),
                    rss_kb(),
                    LIVE_BYTES.load(Ordering::Relaxed) - base_bytes,
                    LIVE_BLOCKS.load(Ordering::Relaxed) - base_blocks,
                    top.join(",")
                );
            }
            "sizes" => println!("{sizes}"),
            _ => println!("{{\"error\":\"unknown command\"}}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// copied from host/src/server.rs (plain HTTP/1.1 path)

fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(16 * 1024)
        .max_headers(100)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

type Body = Full<Bytes>;

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

struct IdleTimeout {
    inner: TcpStream,
    timer: Ticker,
    activity: u64,
    seen: u64,
    quiet: u32,
    inflight: Arc<AtomicUsize>,
}
const IDLE_TICKS: u32 = 4;
impl IdleTimeout {
    fn new(inner: TcpStream, idle: Duration, inflight: Arc<AtomicUsize>) -> IdleTimeout {
        let tick = (idle / IDLE_TICKS).max(Duration::from_millis(1));
        IdleTimeout { inner, timer: Ticker::new(tick), activity: 0, seen: 0, quiet: 0, inflight }
    }
    fn touch(&mut self) {
        self.activity = self.activity.wrapping_add(1);
    }
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let IdleTimeout { timer, activity, seen, quiet, inflight, .. } = self;
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
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
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
                    return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle timeout")));
                }
                Poll::Pending
            }
        }
    }
}
impl AsyncWrite for IdleTimeout {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
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

fn until_done<C: GracefulConnection>(conn: C, stop: CancellationToken) -> UntilDone<C> {
    UntilDone { conn: Box::pin(conn), stop: Box::pin(stop.cancelled_owned()), stopping: false }
}
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

/// `serve_plain` of server.rs, unchanged apart from the metric (and, for the `boxed-slot`
/// variant, where the parked reader is kept).
async fn serve_plain<S>(
    mut strict: StrictH1<IdleTimeout>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: S,
    stop: CancellationToken,
    parked_idle: Duration,
    boxed_slot: bool,
) where
    S: hyper::service::Service<hyper::Request<hyper::body::Incoming>, Response = hyper::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _ = boxed_slot;
    let slot: protect::h1::ParkSlot<IdleTimeout> = Arc::default();
    loop {
        let io = TokioIo::new(Parkable::new(strict, slot.clone()));
        let conn = builder.serve_connection_with_upgrades(io, service.clone()).into_owned();
        let _ = until_done(conn, stop.clone()).await;
        let parked = slot.lock().ok().and_then(|mut s| s.take());
        let Some(io) = parked else { return };
        strict = io;
        tokio::select! {
            ready = strict.get_ref().inner.readable() => {
                if ready.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(parked_idle) => return,
            _ = stop.cancelled() => return,
        }
        strict.unpark();
    }
}

/// The `boxed-slot` proposal: the parked reader waits in a `Box` moved through the slot, and the
/// task holds a `Box` too, so the future and the slot hold pointers instead of two StrictH1s.
async fn serve_plain_boxed<S>(
    strict: StrictH1<IdleTimeout>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: S,
    stop: CancellationToken,
    parked_idle: Duration,
) where
    S: hyper::service::Service<hyper::Request<hyper::body::Incoming>, Response = hyper::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // With the host's Parkable this needs `ParkSlot<T> = Arc<Mutex<Option<Box<StrictH1<T>>>>>`;
    // modelled here by keeping the strict reader boxed between connections.
    let mut strict = Box::new(strict);
    loop {
        let slot: protect::h1::ParkSlot<IdleTimeout> = Arc::default();
        let io = TokioIo::new(Parkable::new(*strict, slot.clone()));
        let conn = builder.serve_connection_with_upgrades(io, service.clone()).into_owned();
        let _ = until_done(conn, stop.clone()).await;
        let parked = slot.lock().ok().and_then(|mut s| s.take());
        drop(slot);
        let Some(io) = parked else { return };
        strict = Box::new(io);
        tokio::select! {
            ready = strict.get_ref().inner.readable() => {
                if ready.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(parked_idle) => return,
            _ = stop.cancelled() => return,
        }
        strict.unpark();
    }
}

#[derive(Clone, Copy)]
#[allow(dead_code)]
struct ConnInfo {
    client: std::net::SocketAddr,
    scheme: &'static str,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(1).and_then(|p| p.parse().ok()).expect("usage: bench-conn-footprint PORT [--variant NAME]");
    let variant = args.iter().position(|a| a == "--variant").and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| "default".into());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let sizes = format!(
        "{{\"StrictH1<IdleTimeout>\":{},\"IdleTimeout\":{},\"Ticker\":{},\"tokio::time::Sleep\":{},\"TcpStream\":{},\"Mutex<Option<StrictH1<IdleTimeout>>>\":{},\"variant\":\"{variant}\"}}",
        std::mem::size_of::<StrictH1<IdleTimeout>>(),
        std::mem::size_of::<IdleTimeout>(),
        std::mem::size_of::<Ticker>(),
        std::mem::size_of::<tokio::time::Sleep>(),
        std::mem::size_of::<TcpStream>(),
        std::mem::size_of::<Mutex<Option<StrictH1<IdleTimeout>>>>(),
    );
    let sizes2 = sizes.clone();
    std::thread::spawn(move || control(sizes2));
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let builder = Arc::new(connection_builder());
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let proxy = Arc::new(0u64); // stands for the shared Arc<Proxy>
        let (idle, park_ms) = (Duration::from_secs(60), if variant == "no-park" { 0 } else { 20 });
        let mut printed = false;
        eprintln!("footprint server on 127.0.0.1:{port}, variant {variant}");
        loop {
            let (stream, client) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            let proxy = proxy.clone();
            let conn_info = ConnInfo { client, scheme: "http" };
            let park_after = Duration::from_millis(park_ms).min(idle);
            let head_timeout = Duration::from_millis(10_000);
            let inflight = Arc::new(AtomicUsize::new(0));
            let stream = IdleTimeout::new(stream, idle, inflight.clone());
            let served = Arc::new(AtomicU64::new(0));
            let body_inflight = inflight.clone();
            let max = 0u64;
            let service = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                let proxy = proxy.clone();
                let guard = InFlight::new(body_inflight.clone());
                let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                let fut: Pin<Box<dyn Future<Output = Result<_, Infallible>> + Send>> = Box::pin(async move {
                    let _ = (proxy, conn_info, n, max);
                    let resp = hyper::Response::new(Full::new(Bytes::from_static(b"hello world\n")));
                    drop(guard);
                    Ok(resp)
                });
                fut
            });
            let mut strict = StrictH1::new(stream, 16 * 1024, 100, head_timeout, client);
            if park_after > Duration::ZERO {
                strict = strict.with_park(park_after, inflight);
            }
            let (builder, stop) = (builder.clone(), stop.clone());
            let parked_idle = idle.saturating_sub(park_after);
            if variant == "boxed-slot" {
                let fut = serve_plain_boxed(strict, builder, service, stop, parked_idle);
                if !printed {
                    eprintln!("serve_plain_boxed future: {} bytes", std::mem::size_of_val(&fut));
                    printed = true;
                }
                tasks.spawn(fut);
            } else {
                let fut = serve_plain(strict, builder, service, stop, parked_idle, false);
                if !printed {
                    eprintln!("serve_plain future: {} bytes", std::mem::size_of_val(&fut));
                    printed = true;
                }
                tasks.spawn(fut);
            }
        }
    });
}
