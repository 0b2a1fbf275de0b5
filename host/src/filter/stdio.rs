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
