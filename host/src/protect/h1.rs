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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface's first line.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// A request line hyper rejects with `400` (a control byte as the method).
const REJECTED_HEAD: &[u8] = b"\x01 / HTTP/1.1\r\n\r\n";
/// A chunk-size line hyper rejects, failing the body.
const REJECTED_CHUNK: &[u8] = b"zz\r\n";
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// Where the reader is in the byte stream of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before or inside a request head.
    Head,
    /// Inside a `Content-Length` body: bytes still to come.
    Body(u64),
    /// At a chunk-size line.
    ChunkSize,
    /// Inside chunk data: bytes still to come.
    ChunkData(u64),
    /// At the CRLF after chunk data.
    ChunkEnd,
    /// In the trailer section; bytes seen so far.
    Trailers(usize),
    /// HTTP/2, or after an upgrade: no longer HTTP/1 framing.
    Passthrough,
    /// A violation was found: nothing more is read.
    Rejected,
}

/// How the body of a checked head is framed.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    Upgrade,
}

/// Why a head was refused (also the `reason` label of
/// `sluicegate_rejected_total`).
pub type Reason = &'static str;

/// The strict reader around a client stream. Writes pass straight through.
pub struct StrictH1<T> {
    inner: T,
    state: State,
    /// Read from the client, not examined yet.
    inbox: BytesMut,
    /// Examined and released, not yet handed to hyper.
    out: BytesMut,
    eof: bool,
    max_head: usize,
    max_headers: usize,
    client: SocketAddr,
    /// The slowloris guard: a started head must be complete within this.
    /// (hyper's own header timer never sees a partial head: it is held here.)
    head_timeout: Duration,
    head_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
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
            state: State::Head,
            inbox: BytesMut::new(),
            out: BytesMut::new(),
            eof: false,
            max_head,
            max_headers,
            client,
            head_timeout,
            head_deadline: None,
        }
    }

    /// Move `n` examined bytes from the inbox to hyper's side.
    fn release(&mut self, n: usize) {
        let chunk = self.inbox.split_to(n);
        if self.out.is_empty() {
            self.out = chunk;
        } else {
            self.out.extend_from_slice(&chunk);
        }
    }

    fn reject(&mut self, reason: Reason, replacement: &[u8]) {
        tracing::info!(client = %self.client, reason, "request rejected: malformed or ambiguous HTTP/1.1 framing");
        super::count_rejection(reason);
        self.inbox.clear();
        self.out.extend_from_slice(replacement);
        self.state = State::Rejected;
    }

    /// Examine as much of the inbox as can be decided now.
    fn process(&mut self) {
        loop {
            let progressed = match self.state {
                State::Head => self.step_head(),
                State::Body(left) => {
                    let n = (left.min(self.inbox.len() as u64)) as usize;
                    self.release(n);
                    self.state = if left == n as u64 {
                        State::Head
                    } else {
                        State::Body(left - n as u64)
                    };
                    n > 0
                }
                State::ChunkSize => self.step_chunk_size(),
                State::ChunkData(left) => {
                    let n = (left.min(self.inbox.len() as u64)) as usize;
                    self.release(n);
                    self.state = if left == n as u64 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left - n as u64)
                    };
                    n > 0
                }
                State::ChunkEnd => {
                    if self.inbox.len() < 2 {
                        false
                    } else if &self.inbox[..2] == b"\r\n" {
                        self.release(2);
                        self.state = State::ChunkSize;
                        true
                    } else {
                        self.reject("bad_chunk_end", REJECTED_CHUNK);
                        false
                    }
                }
                State::Trailers(seen) => self.step_trailer(seen),
                State::Passthrough => {
                    let n = self.inbox.len();
                    self.release(n);
                    false
                }
                State::Rejected => {
                    self.inbox.clear();
                    false
                }
            };
            if !progressed || self.inbox.is_empty() {
                return;
            }
        }
    }

    fn step_head(&mut self) -> bool {
        // Empty lines before a request line are allowed (RFC 9112 §2.2).
        let blank = self
            .inbox
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        if blank > 0 {
            self.release(blank);
        }
        if self.inbox.is_empty() {
            return false;
        }
        let n = self.inbox.len().min(H2_PREFACE.len());
        if self.inbox[..n] == H2_PREFACE[..n] {
            if n == H2_PREFACE.len() {
                self.state = State::Passthrough;
                return true;
            }
            return false;
        }
        let Some(end) = head_end(&self.inbox) else {
            if self.inbox.len() > self.max_head {
                // hyper answers 431 and closes.
                self.state = State::Passthrough;
                return true;
            }
            return false;
        };
        match check_head(&self.inbox[..end], self.max_headers) {
            Ok(framing) => {
                self.release(end);
                self.state = match framing {
                    Framing::None | Framing::Length(0) => State::Head,
                    Framing::Length(n) => State::Body(n),
                    Framing::Chunked => State::ChunkSize,
                    Framing::Upgrade => State::Passthrough,
                };
                true
            }
            Err(None) => {
                // Past hyper's header count: it answers 431 itself.
                self.state = State::Passthrough;
                true
            }
            Err(Some(reason)) => {
                self.reject(reason, REJECTED_HEAD);
                false
            }
        }
    }

    fn step_chunk_size(&mut self) -> bool {
        let Some(nl) = self.inbox.iter().position(|&b| b == b'\n') else {
            if self.inbox.len() > MAX_CHUNK_LINE {
                self.reject("bad_chunk_size", REJECTED_CHUNK);
            }
            return false;
        };
        match chunk_size(&self.inbox[..=nl]) {
            Some(size) => {
                self.release(nl + 1);
                self.state = if size == 0 {
                    State::Trailers(0)
                } else {
                    State::ChunkData(size)
                };
                true
            }
            None => {
                self.reject("bad_chunk_size", REJECTED_CHUNK);
                false
            }
        }
    }

    fn step_trailer(&mut self, seen: usize) -> bool {
        let Some(nl) = self.inbox.iter().position(|&b| b == b'\n') else {
            if seen + self.inbox.len() > self.max_head {
                self.reject("bad_trailer", REJECTED_CHUNK);
            }
            return false;
        };
        let line = &self.inbox[..=nl];
        let ok = nl >= 1
            && line[nl - 1] == b'\r'
            && !line[..nl - 1].contains(&b'\r')
            && (nl == 1 || check_field_line(&line[..nl - 1]).is_ok());
        if !ok || seen + nl + 1 > self.max_head {
            self.reject("bad_trailer", REJECTED_CHUNK);
            return false;
        }
        let last = nl == 1;
        self.release(nl + 1);
        self.state = if last {
            State::Head
        } else {
            State::Trailers(seen + nl + 1)
        };
        true
    }
}

/// The length of the head (through its blank line), by either line ending,
/// so a head ended with bare LFs is found and refused.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + p;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            Some(_) => i = nl + 1,
            None => return None,
        }
    }
    None
}

/// Is `b` a token character (RFC 9110 §5.6.2)?
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field line `name: value` (without its CRLF).
fn check_field_line(line: &[u8]) -> Result<(&[u8], &[u8]), Reason> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err("obs_fold");
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or("bad_header_name")?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| tchar(b)) {
        return Err("bad_header_name");
    }
    let value = trim_ows(&line[colon + 1..]);
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err("bad_header_value");
    }
    Ok((name, value))
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Check one whole head; its body framing. `Err(None)`: too many header
/// fields (hyper's `431`); `Err(Some(reason))`: refuse with `400`.
fn check_head(head: &[u8], max_headers: usize) -> Result<Framing, Option<Reason>> {
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'\r' if head.get(i + 1) != Some(&b'\n') => return Err(Some("bare_cr")),
            b'\n' if i == 0 || head[i - 1] != b'\r' => return Err(Some("bare_lf")),
            0 => return Err(Some("nul_byte")),
            _ => {}
        }
    }
    // Every line ends with CRLF now; drop the final blank line.
    let body = &head[..head.len() - 4];
    let mut lines = body
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().ok_or(Some("bad_request_line"))?;
    let (method, http10) = check_request_line(request_line).map_err(Some)?;
    let (mut lengths, mut encodings, mut hosts, mut count) = (Vec::new(), 0usize, 0usize, 0usize);
    let (mut chunked, mut upgrade, mut conn_upgrade) = (false, false, false);
    for line in lines {
        let (name, value) = check_field_line(line).map_err(Some)?;
        count += 1;
        if count > max_headers {
            return Err(None);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths.push(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encodings += 1;
            chunked = value.eq_ignore_ascii_case(b"chunked");
            if !chunked {
                return Err(Some("unsupported_transfer_encoding"));
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            conn_upgrade |= value
                .split(|&b| b == b',')
                .any(|t| trim_ows(t).eq_ignore_ascii_case(b"upgrade"));
        }
    }
    if hosts > 1 {
        return Err(Some("duplicate_host"));
    }
    if encodings > 1 {
        return Err(Some("duplicate_transfer_encoding"));
    }
    if encodings > 0 && http10 {
        return Err(Some("transfer_encoding_in_http10"));
    }
    if encodings > 0 && !lengths.is_empty() {
        return Err(Some("content_length_with_transfer_encoding"));
    }
    if lengths.len() > 1 {
        return Err(Some("duplicate_content_length"));
    }
    let length = match lengths.first() {
        Some(v) => Some(parse_length(v).ok_or(Some("bad_content_length"))?),
        None => None,
    };
    if method == b"CONNECT" || (upgrade && conn_upgrade) {
        return Ok(Framing::Upgrade);
    }
    Ok(match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::None,
    })
}

/// `METHOD SP target SP HTTP/1.x`, single spaces; the method, and whether
/// it is HTTP/1.0.
fn check_request_line(line: &[u8]) -> Result<(&[u8], bool), Reason> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("bad_request_line");
    };
    if method.is_empty() || !method.iter().all(|&b| tchar(b)) {
        return Err("bad_method");
    }
    if target.is_empty() || target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err("bad_request_target");
    }
    match version {
        b"HTTP/1.1" => Ok((method, false)),
        b"HTTP/1.0" => Ok((method, true)),
        _ => Err("bad_http_version"),
    }
}

/// `1*DIGIT`, no sign, no list, no overflow.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A chunk-size line through its LF: `1*HEXDIG [ext] CRLF`; the size.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    if line.contains(&b'\r') || line.contains(&b'\n') {
        return None;
    }
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = trim_ows(&line[digits..]);
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    if rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

/// How much room a read asks for in the inbox.
const READ_CHUNK: usize = 16 * 1024;

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
                return Poll::Ready(Ok(()));
            }
            if this.eof || this.state == State::Rejected {
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Passthrough && this.inbox.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // Read straight into the inbox's spare room: no zeroed scratch
            // buffer and no extra copy per read (the profile showed both).
            if this.inbox.capacity() - this.inbox.len() < READ_CHUNK / 2 {
                this.inbox.reserve(READ_CHUNK);
            }
            let read =
                tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.inbox);
            let Poll::Ready(read) = read else {
                // Waiting inside a head: the head deadline runs.
                if this.state == State::Head && !this.inbox.is_empty() {
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
            this.process();
            if this.state != State::Head || this.inbox.is_empty() {
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
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(head: &[u8]) -> Result<Framing, Option<Reason>> {
        check_head(head, 100)
    }

    #[test]
    fn good_heads_pass_with_their_framing() {
        assert_eq!(
            framing(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Framing::None)
        );
        assert_eq!(
            framing(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n"),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing(b"POST /x HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing(b"GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            Ok(Framing::Upgrade)
        );
    }

    #[test]
    fn ambiguous_heads_are_refused() {
        let cases: &[(&[u8], Reason)] = &[
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "content_length_with_transfer_encoding"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", "duplicate_content_length"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n", "bad_content_length"),
            (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", "bad_content_length"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported_transfer_encoding"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "duplicate_transfer_encoding"),
            (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "obs_fold"),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare_lf"),
            (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", "bare_cr"),
            (b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n", "bad_header_name"),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "bad_header_name"),
            (b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", "bad_header_value"),
            (b"GET  / HTTP/1.1\r\n\r\n", "bad_request_line"),
            (b"GET / HTTP/1.2\r\n\r\n", "bad_http_version"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "duplicate_host"),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "transfer_encoding_in_http10"),
        ];
        for (head, reason) in cases {
            assert_eq!(
                framing(head),
                Err(Some(*reason)),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        assert_eq!(
            check_head(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n", 1),
            Err(None)
        );
    }

    #[test]
    fn head_end_finds_either_line_ending() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nrest"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
    }

    #[test]
    fn chunk_lines() {
        assert_eq!(chunk_size(b"1a\r\n"), Some(26));
        assert_eq!(chunk_size(b"0;ext=1\r\n"), Some(0));
        assert_eq!(chunk_size(b"ff ; x\r\n"), Some(255));
        assert_eq!(chunk_size(b"-1\r\n"), None);
        assert_eq!(chunk_size(b"1 2\r\n"), None);
        assert_eq!(chunk_size(b"1a\n"), None);
        assert_eq!(chunk_size(b"fffffffffffffffff\r\n"), None);
        assert_eq!(chunk_size(b"0x10\r\n"), None);
    }

    async fn run(input: &[u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(input).await.unwrap();
        drop(a);
        let mut guard = StrictH1::new(
            b,
            8192,
            100,
            Duration::from_secs(5),
            "127.0.0.1:1".parse().unwrap(),
        );
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
}
