//! Arbitrary bytes, split at arbitrary points, through the strict HTTP/1.1
//! reader: it never panics, and what it hands hyper is the client's bytes
//! in order — all of them, or a prefix followed by exactly one
//! replacement that hyper must refuse.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sluicegate_fuzz::protect::h1::StrictH1;
use tokio::io::{AsyncRead, ReadBuf};

#[derive(Arbitrary, Debug)]
struct Input {
    bytes: Vec<u8>,
    cuts: Vec<u8>,
    max_head: u16,
    max_headers: u8,
}

/// Hands out `bytes` in pieces of the given sizes, then EOF.
struct Pieces {
    bytes: Vec<u8>,
    at: usize,
    cuts: Vec<u8>,
    n: usize,
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let cut = self
            .cuts
            .get(self.n)
            .map(|&c| c as usize + 1)
            .unwrap_or(usize::MAX);
        self.n += 1;
        let n = cut.min(self.bytes.len() - self.at).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.bytes[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|input: Input| {
    let src = Pieces {
        bytes: input.bytes.clone(),
        at: 0,
        cuts: input.cuts,
        n: 0,
    };
    let max_head = usize::from(input.max_head).max(64);
    let mut guard = StrictH1::new(
        src,
        max_head,
        usize::from(input.max_headers).max(1),
        std::time::Duration::from_secs(10),
        "127.0.0.1:1".parse().unwrap(),
    );
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut chunk = [0u8; 1024];
    for _ in 0..100_000 {
        let mut rb = ReadBuf::new(&mut chunk);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => break,
            Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
            other => panic!("{other:?}"),
        }
    }
    if out == input.bytes {
        return;
    }
    let replaced = [&b"\x01 / HTTP/1.1\r\n\r\n"[..], b"zz\r\n"]
        .iter()
        .any(|r| out.ends_with(r) && input.bytes.starts_with(&out[..out.len() - r.len()]));
    assert!(
        replaced,
        "output is neither the input nor a prefix plus a replacement"
    );
});
