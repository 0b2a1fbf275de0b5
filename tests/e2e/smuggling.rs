//! Request smuggling: every ambiguous or malformed HTTP/1.1 framing is
//! refused with `400` and the connection closed, and nothing reaches the
//! upstream; well-formed framing reaches it normalised. Raw sockets, so the
//! exact bytes are under the test's control.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::backend::full;
use crate::common::{within, Backend, Cfg, Proxy};

/// A backend that counts request heads that arrive and requests whose body
/// arrived whole, and echoes the framing headers it saw.
struct Counting {
    backend: Backend,
    complete: Arc<AtomicUsize>,
}

impl Counting {
    async fn start() -> Counting {
        let complete = Arc::new(AtomicUsize::new(0));
        let done = complete.clone();
        let backend = Backend::serve("origin", move |req| {
            let done = done.clone();
            async move {
                let (parts, body) = req.into_parts();
                let framing = format!(
                    "cl={:?} te={:?}",
                    parts
                        .headers
                        .get_all("content-length")
                        .iter()
                        .collect::<Vec<_>>(),
                    parts
                        .headers
                        .get_all("transfer-encoding")
                        .iter()
                        .collect::<Vec<_>>(),
                );
                match body.collect().await {
                    Ok(b) => {
                        done.fetch_add(1, Ordering::SeqCst);
                        http::Response::new(full(format!("{framing} len={}", b.to_bytes().len())))
                    }
                    Err(e) => http::Response::new(full(format!("broken body: {e}"))),
                }
            }
        })
        .await;
        Counting { backend, complete }
    }

    fn heads(&self) -> usize {
        self.backend.requests()
    }

    fn complete(&self) -> usize {
        self.complete.load(Ordering::SeqCst)
    }
}

fn proxy(origin: &Counting) -> Proxy {
    Proxy::start(
        &Cfg::new()
            .upstream("app", &[origin.backend.addr()])
            .route(None, "/", "app")
            .toml(),
    )
}

/// What came back on a raw connection: everything read until the proxy
/// closed it (or 5 s passed).
struct Exchange {
    bytes: Vec<u8>,
    closed: bool,
}

impl Exchange {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Status codes of every response, in order.
    fn statuses(&self) -> Vec<u16> {
        self.text()
            .match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| self.text().get(i + 9..i + 12)?.parse().ok())
            .collect()
    }
}

/// Write `bytes` and read until the proxy closes the connection.
async fn exchange(p: &Proxy, bytes: &[u8]) -> Exchange {
    let mut s = TcpStream::connect(p.addr()).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let closed = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or(false);
    Exchange { bytes: out, closed }
}

/// Each case: refused with 400, connection closed, nothing upstream.
async fn assert_refused(cases: &[(&str, &[u8])], body_level: bool) {
    let origin = Counting::start().await;
    let p = proxy(&origin);
    for (what, bytes) in cases {
        let x = within(10, what, exchange(&p, bytes)).await;
        assert_eq!(x.statuses().first(), Some(&400), "{what}: {:?}", x.text());
        assert!(
            x.closed,
            "{what}: the connection must be closed: {:?}",
            x.text()
        );
        assert!(
            !x.text().contains("origin"),
            "{what}: the origin answered: {:?}",
            x.text()
        );
    }
    // Let any stray request arrive before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        origin.complete(),
        0,
        "no complete request reached the origin"
    );
    if !body_level {
        assert_eq!(origin.heads(), 0, "no request head reached the origin");
    }
    // The proxy still serves well-formed requests.
    let x = exchange(
        &p,
        b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(x.statuses(), vec![200], "{}", x.text());
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    assert_refused(
        &[
            ("CL.TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED"),
            ("TE.CL", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n"),
            ("CL.TE, zero length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ],
        false,
    )
    .await;
}

#[tokio::test]
async fn duplicate_or_invalid_content_length_is_refused() {
    assert_refused(
        &[
            ("equal duplicates", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
            ("conflicting", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
            ("list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello"),
            ("sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello"),
            ("negative", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
            ("not a number", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n"),
            ("hex", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello"),
            ("overflow", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            ("empty", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n"),
        ],
        false,
    )
    .await;
}

#[tokio::test]
async fn transfer_encoding_other_than_chunked_is_refused() {
    assert_refused(
        &[
            ("gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"),
            ("gzip, chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
            ("chunked, identity", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
            ("xchunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
            ("two lines", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            ("vertical tab", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n"),
            ("HTTP/1.0", b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ],
        false,
    )
    .await;
}

#[tokio::test]
async fn obs_fold_bare_cr_and_bare_lf_are_refused() {
    assert_refused(
        &[
            (
                "obs-fold",
                b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n",
            ),
            (
                "folded TE",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
            ),
            (
                "bare CR in a value",
                b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\rX-B: 2\r\n\r\n",
            ),
            (
                "bare LF line end",
                b"GET / HTTP/1.1\r\nHost: a\nX-A: 1\r\n\r\n",
            ),
            ("bare LF head", b"GET / HTTP/1.1\nHost: a\n\n"),
            (
                "bare LF hiding a header",
                b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
        ],
        false,
    )
    .await;
}

#[tokio::test]
async fn invalid_header_names_and_values_are_refused() {
    assert_refused(
        &[
            (
                "space before colon",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            ),
            (
                "space in name",
                b"GET / HTTP/1.1\r\nHost: a\r\nX A: 1\r\n\r\n",
            ),
            ("no colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-A\r\n\r\n"),
            ("empty name", b"GET / HTTP/1.1\r\nHost: a\r\n: 1\r\n\r\n"),
            (
                "non-token name",
                b"GET / HTTP/1.1\r\nHost: a\r\nX[A]: 1\r\n\r\n",
            ),
            (
                "NUL in value",
                b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n",
            ),
            (
                "control byte in value",
                b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x012\r\n\r\n",
            ),
            (
                "DEL in value",
                b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x7f2\r\n\r\n",
            ),
            ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ],
        false,
    )
    .await;
}

#[tokio::test]
async fn request_line_oddities_are_refused() {
    assert_refused(
        &[
            ("two spaces", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n"),
            ("tab", b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n"),
            ("space in target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n"),
            ("extra word", b"GET / HTTP/1.1 x\r\nHost: a\r\n\r\n"),
            ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"),
            ("lower-case version", b"GET / http/1.1\r\nHost: a\r\n\r\n"),
            ("HTTP/0.9 style", b"GET /\r\n\r\n"),
            ("method with a slash", b"G/ET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        ],
        false,
    )
    .await;
}

#[tokio::test]
async fn invalid_chunks_are_refused_and_never_complete_upstream() {
    assert_refused(
        &[
            ("negative size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n"),
            ("0x prefix", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
            ("overflow", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nx\r\n0\r\n\r\n"),
            ("two numbers", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 5\r\nhello\r\n0\r\n\r\n"),
            ("not hex", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\ng\r\nhello\r\n0\r\n\r\n"),
            ("bare LF after size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
            ("data longer than size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n"),
            ("folded trailer", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n 2\r\n\r\n"),
        ],
        true,
    )
    .await;
}

#[tokio::test]
async fn what_goes_upstream_is_normalised() {
    let origin = Counting::start().await;
    let p = proxy(&origin);
    // Content-Length: one header upstream, no Transfer-Encoding.
    let x = exchange(
        &p,
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(x.text().contains("cl=[\"5\"] te=[] len=5"), "{}", x.text());
    // Chunked with extensions and a trailer: chunked upstream, no length.
    let x = exchange(
        &p,
        b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2;ext=1\r\nhe\r\n3\r\nllo\r\n0\r\nX-T: 1\r\n\r\n",
    )
    .await;
    assert!(
        x.text().contains("cl=[] te=[\"chunked\"] len=5"),
        "{}",
        x.text()
    );
    // Three pipelined requests on one connection, all well formed, served in order.
    let x = exchange(
        &p,
        b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi\
POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n\
GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(x.statuses(), vec![200, 200, 200], "{}", x.text());
    assert_eq!(origin.complete(), 5);
    // A well-formed request pipelined before a smuggling attempt is served;
    // the attempt is refused and closes the connection.
    let x = exchange(
        &p,
        b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /evil HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(x.statuses(), vec![200, 400], "{}", x.text());
    assert!(x.closed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        origin.complete(),
        6,
        "only the good request reached the origin"
    );
}
