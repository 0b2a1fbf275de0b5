//! Strict HTTP/1.1 framing, below hyper: every request head on a client
//! connection is read whole and checked before hyper sees a byte of it,
//! and request bodies are followed (by `Content-Length` or chunk by chunk)
//! so the next head is found and checked too.
//!
//! hyper already refuses most malformed requests with `400`. What it
//! accepts and a strict proxy must not (RFC 9112 §6.3, §11.2):
//! `Content-Length` together with `Transfer-Encoding` (hyper lets chunked
//! win), repeated `Content-Length` lines with equal values (hyper merges
//! them), bare LF line ends (hyper accepts them), and more than one `Host`.
//! Such a head is replaced by one hyper must reject (`\x01 / HTTP/1.1`), so
//! the client gets hyper's own `400` and the connection is closed; nothing
//! of it reaches the proxy, let alone an upstream. A malformed chunk line
//! or trailer is replaced by an invalid chunk size, which fails the body
//! stream: hyper closes the connection and the proxy answers `400`.
//!
//! HTTP/2 (the prior-knowledge preface) and upgraded connections are passed
//! through untouched.

//!
//! Reads go straight into hyper's buffer and are checked there: bytes are
//! copied into the reader's own inbox only when a head arrives in pieces.
//!
//! **Parking.** hyper keeps a read and a write buffer (8 KB each) for the
//! whole life of an HTTP/1.1 connection. Like nginx, which frees its
//! buffers on idle keep-alive connections, a connection idle at a request
//! boundary for [`StrictH1::with_park`]'s time (nothing unread, nothing
//! unsent, no request or response in flight) is *parked*: hyper is shown
//! an end of stream, closes its side cleanly and drops its buffers, while
//! the socket stays open ([`Parkable`] hands it back). The server waits
//! for the client's next bytes with no buffer at all, then serves them with
//! a new hyper connection.

mod framing;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

pub use framing::Reason;
use framing::{Framer, Rejection, State};

use crate::ticker::Ticker;

/// How much room a read into the inbox asks for.
const READ_CHUNK: usize = 16 * 1024;

/// The strict reader around a client stream. Writes pass straight through.
pub struct StrictH1<T> {
    inner: T,
    framer: Framer,
    /// Read from the client, not examined yet (a head that came in pieces).
    inbox: BytesMut,
    /// Examined and released, not yet handed to hyper.
    out: BytesMut,
    eof: bool,
    client: SocketAddr,
    /// The slowloris guard: a started head must be complete within this.
    /// (hyper's own header timer never sees a partial head: it is held here.)
    head_timeout: Duration,
    head_deadline: Option<Pin<Box<Sleep>>>,
    park: Option<Park>,
}

/// When to park an idle connection (see the module docs).
struct Park {
    after: Duration,
    /// Requests in flight on this connection, until their response bodies end.
    inflight: Arc<AtomicUsize>,
    timer: Option<Ticker>,
    /// Reads that brought bytes, and their count when the timer was armed:
    /// no clock is read on the data path.
    reads: u64,
    armed_at: u64,
    /// No write since the last completed flush: hyper holds nothing unsent.
    flushed: bool,
    /// hyper was shown the end of stream: the connection is to be parked.
    parked: bool,
}

impl Park {
    /// Called while at rest (a request boundary, nothing buffered): has the
    /// connection been quiet for the whole time? About `after` to twice it.
    fn due(&mut self, cx: &mut Context<'_>) -> bool {
        let Park {
            after,
            inflight,
            timer,
            reads,
            armed_at,
            flushed,
            ..
        } = self;
        // This runs at every request boundary: the ticker is polled only
        // when it has fired (see `Ticker`).
        let timer = timer.get_or_insert_with(|| {
            *armed_at = *reads;
            Ticker::new(*after)
        });
        timer.poll_ticks(cx, || {
            if *reads == *armed_at && *flushed && inflight.load(Ordering::Acquire) == 0 {
                return true;
            }
            *armed_at = *reads;
            false
        })
    }
}

impl<T> StrictH1<T> {
    /// Guard `inner`. `max_head` and `max_headers` are hyper's limits: a
    /// head past them is handed over as it is, for hyper's `431`.
    pub fn new(
        inner: T,
        max_head: usize,
        max_headers: usize,
        head_timeout: Duration,
        client: SocketAddr,
    ) -> StrictH1<T> {
        StrictH1 {
            inner,
            framer: Framer::new(max_head, max_headers),
            inbox: BytesMut::new(),
            out: BytesMut::new(),
            eof: false,
            client,
            head_timeout,
            head_deadline: None,
            park: None,
        }
    }

    /// Park the connection once it has been idle `after` at a request
    /// boundary with no request in flight (`inflight` counts them, until
    /// their response bodies end).
    pub fn with_park(mut self, after: Duration, inflight: Arc<AtomicUsize>) -> StrictH1<T> {
        self.park = Some(Park {
            after,
            inflight,
            timer: None,
            reads: 0,
            armed_at: 0,
            flushed: true,
            parked: false,
        });
        self
    }

    /// Has hyper been shown the end of stream for parking?
    pub fn parked(&self) -> bool {
        self.park.as_ref().is_some_and(|p| p.parked)
    }

    /// Ready to serve again after parking.
    pub fn unpark(&mut self) {
        if let Some(p) = self.park.as_mut() {
            p.parked = false;
            p.flushed = true;
        }
    }

    /// The stream inside (the server polls a parked connection's
    /// readiness and idle timer through it).
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Hand the examined bytes at the front of the inbox to hyper's side.
    fn release(&mut self, n: usize) {
        let chunk = self.inbox.split_to(n);
        if self.out.is_empty() {
            self.out = chunk;
        } else {
            self.out.extend_from_slice(&chunk);
        }
    }

    fn reject(&mut self, (reason, replacement): Rejection) {
        tracing::info!(client = %self.client, reason, "request rejected: malformed or ambiguous HTTP/1.1 framing");
        super::count_rejection(reason);
        self.inbox.clear();
        self.out.extend_from_slice(replacement);
    }

    /// Examine what can be decided in the inbox now.
    fn process(&mut self) {
        let (ok, rejection) = self.framer.scan(&self.inbox);
        self.release(ok);
        if let Some(r) = rejection {
            self.reject(r);
        }
        if self.inbox.is_empty() {
            // Give the read room back: the next reads go to hyper's buffer.
            self.inbox = BytesMut::new();
        }
    }

    fn count_read(&mut self) {
        if let Some(p) = self.park.as_mut() {
            p.reads += 1;
        }
    }
}

impl<T: AsyncRead + Unpin> StrictH1<T> {
    /// The common case: nothing held here. Read into hyper's buffer and
    /// check the new bytes in place; keep only what cannot be decided yet.
    fn poll_read_direct(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<Option<()>>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => {
                if let Some(p) = self.park.as_mut() {
                    if self.framer.state == State::Head && p.due(cx) {
                        // At rest and quiet: show hyper the end of stream
                        // (it closes its side and drops its buffers).
                        p.parked = true;
                        p.timer = None;
                        self.head_deadline = None;
                        return Poll::Ready(Ok(Some(())));
                    }
                }
                return Poll::Pending;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        let n = buf.filled().len() - before;
        if n == 0 {
            self.eof = true;
            return Poll::Ready(Ok(Some(())));
        }
        self.count_read();
        let (ok, rejection) = self.framer.scan(&buf.filled()[before..]);
        if ok == n {
            return Poll::Ready(Ok(Some(())));
        }
        match rejection {
            Some(r) => self.reject(r),
            None => self.inbox.extend_from_slice(&buf.filled()[before + ok..]),
        }
        buf.set_filled(before + ok);
        // Nothing checked yet (a head in pieces): not an end of stream.
        Poll::Ready(Ok((ok > 0).then_some(())))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StrictH1<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                if this.out.is_empty() {
                    this.out = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof || this.framer.state == State::Rejected || this.parked() {
                return Poll::Ready(Ok(()));
            }
            if this.inbox.is_empty() {
                if this.framer.state == State::Passthrough {
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                match this.poll_read_direct(cx, buf) {
                    Poll::Ready(Ok(None)) => continue,
                    Poll::Ready(r) => return Poll::Ready(r.map(|_| ())),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // A head came in pieces: gather it in the inbox.
            if this.inbox.capacity() - this.inbox.len() < READ_CHUNK / 2 {
                this.inbox.reserve(READ_CHUNK);
            }
            let read =
                tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.inbox);
            let Poll::Ready(read) = read else {
                // Waiting inside a head: the head deadline runs.
                if this.framer.state == State::Head {
                    let timeout = this.head_timeout;
                    let deadline = this
                        .head_deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if deadline.as_mut().poll(cx).is_ready() {
                        super::count_rejection("head_timeout");
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request head not received within header_read_ms",
                        )));
                    }
                }
                return Poll::Pending;
            };
            if read? == 0 {
                // The client closed: hand over what is left as it is (hyper
                // sees a truncated message).
                this.eof = true;
                let n = this.inbox.len();
                this.release(n);
                continue;
            }
            this.count_read();
            this.process();
            if this.framer.state != State::Head || this.inbox.is_empty() {
                this.head_deadline = None;
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StrictH1<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(p) = self.park.as_mut() {
            p.flushed = false;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(p) = self.park.as_mut() {
            p.flushed = false;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if let (Poll::Ready(Ok(())), Some(p)) = (&r, self.park.as_mut()) {
            p.flushed = true;
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.parked() {
            // hyper closing after the parking end of stream: the socket stays.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where a parked connection comes back when hyper drops it. The reader
/// is boxed, so the slot (alive for the connection's whole life) and the
/// task that waits on a parked connection each keep a pointer, not a
/// reader's worth of bytes (about 350).
pub type ParkSlot<T> = Arc<Mutex<Option<Box<StrictH1<T>>>>>;

/// The stream hyper owns: a [`StrictH1`] that, parked, goes back to its
/// [`ParkSlot`] when hyper drops it, instead of closing.
pub struct Parkable<T> {
    io: Option<Box<StrictH1<T>>>,
    slot: ParkSlot<T>,
}

impl<T> Parkable<T> {
    /// Give `io` to hyper; parked, it comes back to `slot`.
    pub fn new(io: Box<StrictH1<T>>, slot: ParkSlot<T>) -> Parkable<T> {
        Parkable { io: Some(io), slot }
    }
}

impl<T: Unpin> Parkable<T> {
    fn io(&mut self) -> io::Result<Pin<&mut StrictH1<T>>> {
        match self.io.as_mut() {
            Some(io) => Ok(Pin::new(&mut **io)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl<T> Drop for Parkable<T> {
    fn drop(&mut self) {
        if let Some(io) = self.io.take().filter(|io| io.parked()) {
            if let Ok(mut slot) = self.slot.lock() {
                *slot = Some(io);
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Parkable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io()?.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Parkable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io()?.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::framing::REJECTED_HEAD;
    use super::*;

    fn strict<T>(io: T) -> StrictH1<T> {
        StrictH1::new(
            io,
            8192,
            100,
            Duration::from_secs(5),
            "127.0.0.1:1".parse().unwrap(),
        )
    }

    async fn run(input: &[u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(input).await.unwrap();
        drop(a);
        let mut guard = strict(b);
        let mut out = Vec::new();
        guard.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn pipelined_requests_pass_and_the_bad_one_is_replaced() {
        let good = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(run(good).await, good.to_vec());
        let mut smuggle = good.to_vec();
        smuggle.extend_from_slice(
            b"GET /d HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        );
        let mut want = good.to_vec();
        want.extend_from_slice(REJECTED_HEAD);
        assert_eq!(run(&smuggle).await, want);
        // A bad chunk line fails the body.
        let bad = b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n-1\r\n";
        let out = run(bad).await;
        assert!(
            out.ends_with(b"hello\r\nzz\r\n"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        // The h2 preface is passed through.
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00";
        assert_eq!(run(h2).await, h2.to_vec());
    }

    /// The same byte streams arriving a few bytes at a time: heads in
    /// pieces go through the inbox, and the result is the same.
    #[tokio::test]
    async fn heads_in_pieces_give_the_same_result() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let good: &[u8] = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
GET /c HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut smuggle = good.to_vec();
        smuggle.extend_from_slice(
            b"GET /d HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\nGET /e HTTP/1.1\r\n\r\n",
        );
        let mut want = good.to_vec();
        want.extend_from_slice(REJECTED_HEAD);
        for piece in [1, 3, 7, 40] {
            for (input, want) in [
                (good.to_vec(), good.to_vec()),
                (smuggle.clone(), want.clone()),
            ] {
                let (mut a, b) = tokio::io::duplex(piece);
                let writer = tokio::spawn(async move {
                    for chunk in input.chunks(piece) {
                        if a.write_all(chunk).await.is_err() {
                            break;
                        }
                    }
                });
                let mut guard = strict(b);
                let mut out = Vec::new();
                guard.read_to_end(&mut out).await.unwrap();
                assert_eq!(out, want, "pieces of {piece}");
                writer.abort();
            }
        }
    }

    /// Idle at a request boundary for the park time with nothing in flight:
    /// the reader shows an end of stream and says it is parked; unparked,
    /// it reads on. A request in flight holds parking off.
    #[tokio::test]
    async fn an_idle_connection_parks_and_resumes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut a, b) = tokio::io::duplex(1024);
        let inflight = Arc::new(AtomicUsize::new(0));
        let mut guard = strict(b).with_park(Duration::from_millis(40), inflight.clone());
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        a.write_all(req).await.unwrap();
        let mut buf = [0u8; 256];
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], req);
        // In flight: no parking, the read just waits.
        inflight.fetch_add(1, Ordering::Relaxed);
        let waited = tokio::time::timeout(Duration::from_millis(200), guard.read(&mut buf)).await;
        assert!(waited.is_err(), "parked with a request in flight");
        assert!(!guard.parked());
        inflight.fetch_sub(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(n, 0, "a parked reader shows the end of stream");
        assert!(guard.parked());
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
        // Shutdown is a no-op while parked: the peer sees no end of stream.
        guard.shutdown().await.unwrap();
        guard.unpark();
        a.write_all(req).await.unwrap();
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], req);
    }
}
