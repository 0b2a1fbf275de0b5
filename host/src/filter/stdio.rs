//! A filter's stdout and stderr, routed into the proxy's log.
//!
//! Guests built from other languages (componentize-py, componentize-js, C
//! with wasi-libc) write to WASI stdout/stderr: a Python `print`, an
//! uncaught exception's traceback, a JavaScript `console.log`, a C
//! `fprintf(stderr, ..)`. Each complete line becomes one log event tagged
//! with the filter's name and the stream (`stdout` at info, `stderr` at
//! warn; blank lines are dropped). Lines are cut at [`MAX_LOG_LINE`](super::host_api::MAX_LOG_LINE)
//! bytes; a partial last line is logged when the stream is dropped (when
//! the instance is discarded).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::host_api::MAX_LOG_LINE;

/// Most bytes one `check-write` permits (the usual WASI stream permit).
const PERMIT: usize = 64 * 1024;

/// Which standard stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// Logged at info.
    Stdout,
    /// Logged at warn.
    Stderr,
}

impl Stdio {
    fn as_str(self) -> &'static str {
        match self {
            Stdio::Stdout => "stdout",
            Stdio::Stderr => "stderr",
        }
    }
}

/// A WASI stdout/stderr of one filter instance that writes to the log.
#[derive(Debug, Clone)]
pub struct LogStdio {
    filter: Arc<str>,
    stream: Stdio,
}

impl LogStdio {
    /// The `stream` of the filter `filter`.
    pub fn new(filter: Arc<str>, stream: Stdio) -> LogStdio {
        LogStdio { filter, stream }
    }

    fn writer(&self) -> LineWriter {
        LineWriter {
            filter: self.filter.clone(),
            stream: self.stream,
            buf: Vec::new(),
        }
    }
}

impl IsTerminal for LogStdio {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStdio {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.writer())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.writer())
    }
}

/// Splits written bytes into lines and logs each one.
#[derive(Debug)]
pub struct LineWriter {
    filter: Arc<str>,
    stream: Stdio,
    buf: Vec<u8>,
}

impl LineWriter {
    /// Take `bytes`, logging every line they complete.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = MAX_LOG_LINE.saturating_sub(self.buf.len()).max(1);
            match bytes.iter().position(|&b| b == b'\n') {
                Some(nl) if nl <= room => {
                    self.buf.extend_from_slice(&bytes[..nl]);
                    self.emit();
                    bytes = &bytes[nl + 1..];
                }
                _ => {
                    let take = room.min(bytes.len());
                    self.buf.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.buf.len() >= MAX_LOG_LINE {
                        self.emit();
                    }
                }
            }
        }
    }

    fn emit(&mut self) {
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            // Blank lines (e.g. between a traceback and what follows) are noise.
            self.buf.clear();
            return;
        }
        let line = String::from_utf8_lossy(&self.buf);
        let filter = &*self.filter;
        let stream = self.stream.as_str();
        match self.stream {
            Stdio::Stdout => tracing::info!(filter, stream, "{line}"),
            Stdio::Stderr => tracing::warn!(filter, stream, "{line}"),
        }
        self.buf.clear();
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.emit();
        }
    }
}

impl OutputStream for LineWriter {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        // Lines are logged as they complete; a partial line waits for its end.
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineWriter {
    async fn ready(&mut self) {}
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `wasi:io` for filters without ever blocking a thread.
///
/// wasmtime-wasi's synchronous bindings run every *blocking* stream and
/// poll method (`blocking-write-and-flush`, `blocking-flush`, a stream's
/// drop, `pollable.block`, ...) through `block_on` on the current tokio
/// runtime. A filter call runs on a worker's runtime thread (or, async, on
/// a fiber polled by one), where `block_on` panics: a guest that printed a
/// line (Rust's `eprintln!`, the panic message before a trap, Python's
/// `print`) brought the worker thread down. Every stream a filter has is
/// one of ours ([`LogStdio`], an empty stdin) and never waits, so these
/// methods are shadowed by versions that poll the same futures once and
/// report a stream that would wait as closed (a pollable that would wait,
/// e.g. a timer, as ready: a guest that spins on one runs into its CPU
/// deadline).
pub mod nonblocking {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
    use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
    use wasmtime_wasi_io::bindings::wasi::io::poll as apoll;
    use wasmtime_wasi_io::bindings::wasi::io::streams as astreams;
    use wasmtime_wasi_io::poll::DynPollable;
    use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream, StreamError};

    use crate::filter::host_api::HostState;

    type StreamResult<T> = Result<T, StreamError>;

    /// The store's resource table, seen through the shadowing methods.
    pub struct Io<'a>(&'a mut ResourceTable);

    struct IoData;
    impl HasData for IoData {
        type Data<'a> = Io<'a>;
    }

    /// Poll `f` once; `None` if it would wait.
    fn now<F: Future>(f: F) -> Option<F::Output> {
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    fn stream<T>(f: impl Future<Output = StreamResult<T>>) -> StreamResult<T> {
        now(f).unwrap_or(Err(StreamError::Closed))
    }

    /// Shadow the blocking `wasi:io` methods of `linker` (after
    /// `add_to_linker_sync`).
    pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
        linker.allow_shadowing(true);
        streams::add_to_linker::<HostState, IoData>(linker, |s| Io(&mut s.table))?;
        poll::add_to_linker::<HostState, IoData>(linker, |s| Io(&mut s.table))?;
        linker.allow_shadowing(false);
        Ok(())
    }

    impl streams::Host for Io<'_> {
        fn convert_stream_error(
            &mut self,
            err: StreamError,
        ) -> wasmtime::Result<streams::StreamError> {
            Ok(astreams::Host::convert_stream_error(self.0, err)?.into())
        }
    }

    impl streams::HostOutputStream for Io<'_> {
        fn drop(&mut self, s: Resource<DynOutputStream>) -> wasmtime::Result<()> {
            match now(astreams::HostOutputStream::drop(self.0, s)) {
                Some(r) => r,
                None => Ok(()),
            }
        }
        fn check_write(&mut self, s: Resource<DynOutputStream>) -> StreamResult<u64> {
            astreams::HostOutputStream::check_write(self.0, s)
        }
        fn write(&mut self, s: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
            astreams::HostOutputStream::write(self.0, s, bytes)
        }
        fn blocking_write_and_flush(
            &mut self,
            s: Resource<DynOutputStream>,
            bytes: Vec<u8>,
        ) -> StreamResult<()> {
            stream(astreams::HostOutputStream::blocking_write_and_flush(
                self.0, s, bytes,
            ))
        }
        fn flush(&mut self, s: Resource<DynOutputStream>) -> StreamResult<()> {
            astreams::HostOutputStream::flush(self.0, s)
        }
        fn blocking_flush(&mut self, s: Resource<DynOutputStream>) -> StreamResult<()> {
            stream(astreams::HostOutputStream::blocking_flush(self.0, s))
        }
        fn subscribe(
            &mut self,
            s: Resource<DynOutputStream>,
        ) -> wasmtime::Result<Resource<DynPollable>> {
            astreams::HostOutputStream::subscribe(self.0, s)
        }
        fn write_zeroes(&mut self, s: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
            astreams::HostOutputStream::write_zeroes(self.0, s, len)
        }
        fn blocking_write_zeroes_and_flush(
            &mut self,
            s: Resource<DynOutputStream>,
            len: u64,
        ) -> StreamResult<()> {
            stream(astreams::HostOutputStream::blocking_write_zeroes_and_flush(
                self.0, s, len,
            ))
        }
        fn splice(
            &mut self,
            dst: Resource<DynOutputStream>,
            src: Resource<DynInputStream>,
            len: u64,
        ) -> StreamResult<u64> {
            astreams::HostOutputStream::splice(self.0, dst, src, len)
        }
        fn blocking_splice(
            &mut self,
            dst: Resource<DynOutputStream>,
            src: Resource<DynInputStream>,
            len: u64,
        ) -> StreamResult<u64> {
            stream(astreams::HostOutputStream::blocking_splice(
                self.0, dst, src, len,
            ))
        }
    }

    impl streams::HostInputStream for Io<'_> {
        fn drop(&mut self, s: Resource<DynInputStream>) -> wasmtime::Result<()> {
            match now(astreams::HostInputStream::drop(self.0, s)) {
                Some(r) => r,
                None => Ok(()),
            }
        }
        fn read(&mut self, s: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
            astreams::HostInputStream::read(self.0, s, len)
        }
        fn blocking_read(
            &mut self,
            s: Resource<DynInputStream>,
            len: u64,
        ) -> StreamResult<Vec<u8>> {
            stream(astreams::HostInputStream::blocking_read(self.0, s, len))
        }
        fn skip(&mut self, s: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
            astreams::HostInputStream::skip(self.0, s, len)
        }
        fn blocking_skip(&mut self, s: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
            stream(astreams::HostInputStream::blocking_skip(self.0, s, len))
        }
        fn subscribe(
            &mut self,
            s: Resource<DynInputStream>,
        ) -> wasmtime::Result<Resource<DynPollable>> {
            astreams::HostInputStream::subscribe(self.0, s)
        }
    }

    impl poll::Host for Io<'_> {
        fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
            let n = pollables.len() as u32;
            match now(apoll::Host::poll(self.0, pollables)) {
                Some(r) => r,
                // Nothing is ready and nothing may wait: report them all.
                None => Ok((0..n).collect()),
            }
        }
    }

    impl poll::HostPollable for Io<'_> {
        fn block(&mut self, p: Resource<DynPollable>) -> wasmtime::Result<()> {
            now(apoll::HostPollable::block(self.0, p)).unwrap_or(Ok(()))
        }
        fn ready(&mut self, p: Resource<DynPollable>) -> wasmtime::Result<bool> {
            now(apoll::HostPollable::ready(self.0, p)).unwrap_or(Ok(false))
        }
        fn drop(&mut self, p: Resource<DynPollable>) -> wasmtime::Result<()> {
            apoll::HostPollable::drop(self.0, p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> LineWriter {
        LogStdio::new(Arc::from("t"), Stdio::Stdout).writer()
    }

    #[test]
    fn keeps_partial_lines_until_their_end() {
        let mut w = writer();
        w.push(b"hel");
        assert_eq!(w.buf, b"hel");
        w.push(b"lo\nwor");
        assert_eq!(w.buf, b"wor", "the completed line was logged");
        w.push(b"ld\n\n");
        assert!(w.buf.is_empty());
    }

    #[test]
    fn cuts_long_lines() {
        let mut w = writer();
        w.push(&vec![b'x'; MAX_LOG_LINE * 2 + 10]);
        assert_eq!(w.buf.len(), 10, "two full lines were logged");
        w.push(&[b'y'; 5]);
        assert_eq!(w.buf.len(), 15);
    }
}
