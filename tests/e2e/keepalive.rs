//! Idle HTTP/1.1 keep-alive connections are parked: after
//! `keepalive_park_ms` at a request boundary the proxy drops hyper's
//! buffers and waits on the bare socket; the next request is served as if
//! nothing happened. Parking must never cut a response, break pipelining,
//! outlive the idle timeout or hold up a shutdown.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::backend::{BoxError, RespBody};
use crate::common::*;

fn parking_proxy(backend: &Backend, idle_ms: u64) -> Proxy {
    Proxy::start(
        &Cfg::new()
            .admin()
            .upstream("app", &[backend.addr()])
            .route(None, "/", "app")
            .timeout("keepalive_park_ms", 20)
            .timeout("idle_ms", idle_ms)
            .toml(),
    )
}

async fn parked_total(p: &Proxy) -> u64 {
    let page = within(10, "metrics", p.admin_get("/metrics")).await.text();
    metric_value(&page, "sluicegate_connections_parked_total") as u64
}

/// Read `n` whole responses off `s`: their statuses and bodies (the echo
/// backend's body names the path it saw).
async fn read_responses(s: &mut TcpStream, n: usize) -> Vec<(u16, String)> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    while out.len() < n {
        if let Some((status, body, used)) = split_response(&buf) {
            out.push((status, String::from_utf8_lossy(&body).into_owned()));
            buf.drain(..used);
            continue;
        }
        let got = within(10, "response bytes", s.read(&mut chunk))
            .await
            .expect("read");
        assert!(
            got > 0,
            "the proxy closed the connection after {} responses",
            out.len()
        );
        buf.extend_from_slice(&chunk[..got]);
    }
    out
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n")
}

#[tokio::test]
async fn an_idle_connection_is_parked_and_serves_its_next_requests() {
    let app = Backend::echo("app").await;
    let mut p = parking_proxy(&app, 60_000);
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    let before = parked_total(&p).await;

    s.write_all(get("/one").as_bytes()).await.unwrap();
    let r = read_responses(&mut s, 1).await;
    assert_eq!(r[0].0, 200);
    assert!(r[0].1.contains("/one"), "{}", r[0].1);
    // Idle well past the park time: parked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        parked_total(&p).await > before,
        "the idle connection was not parked"
    );
    // The same socket serves the next request.
    s.write_all(get("/two").as_bytes()).await.unwrap();
    let r = read_responses(&mut s, 1).await;
    assert_eq!(r[0].0, 200);
    assert!(r[0].1.contains("/two"), "{}", r[0].1);
    // Parked again, then three pipelined requests in one write, one of
    // them split over two writes: all answered, in order.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pipelined = format!("{}{}GET /fi", get("/three"), get("/four"));
    s.write_all(pipelined.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"ve HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let r = read_responses(&mut s, 3).await;
    for ((status, body), path) in r.iter().zip(["/three", "/four", "/five"]) {
        assert_eq!(*status, 200);
        assert!(body.contains(path), "{path}: {body}");
    }
    assert_eq!(app.requests(), 5);

    // A parked connection does not hold up a shutdown.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(5)).await;
    assert!(
        status.is_some(),
        "the proxy did not exit with a parked connection open"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );
    let mut rest = [0u8; 16];
    let n = within(5, "close", s.read(&mut rest)).await.unwrap_or(0);
    assert_eq!(n, 0, "the parked connection is closed on shutdown");
}

/// A response whose body pauses longer than the park time between chunks
/// is never cut: parking waits for the response to end.
#[tokio::test]
async fn a_response_that_pauses_between_chunks_is_not_cut() {
    let app = Backend::serve("app", |_req| async {
        let chunks = stream::unfold(0u32, |i| async move {
            if i == 5 {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            let frame: Result<Frame<Bytes>, BoxError> =
                Ok(Frame::data(Bytes::from(format!("chunk{i};"))));
            Some((frame, i + 1))
        });
        let body: RespBody = BodyExt::boxed(StreamBody::new(chunks));
        Response::new(body)
    })
    .await;
    let p = parking_proxy(&app, 60_000);
    let mut conn: H1Conn = H1Conn::connect(p.addr()).await;
    for round in 0..2 {
        let resp = within(
            10,
            "paused response",
            conn.send(client::build(Method::GET, "/stream", &[], Bytes::new())),
        )
        .await;
        assert_eq!(resp.status, StatusCode::OK, "round {round}");
        assert_eq!(
            resp.text(),
            "chunk0;chunk1;chunk2;chunk3;chunk4;",
            "round {round}"
        );
        // Idle past the park time before the next round.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!conn.is_closed());
    assert!(parked_total(&p).await >= 1);
}

/// Parked, a connection still closes after the idle timeout.
#[tokio::test]
async fn a_parked_connection_still_meets_the_idle_timeout() {
    let app = Backend::echo("app").await;
    let p = parking_proxy(&app, 400);
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    s.write_all(get("/").as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut s, 1).await[0].0, 200);
    let started = Instant::now();
    let mut rest = [0u8; 16];
    let n = within(5, "idle close", s.read(&mut rest))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(2_000),
        "closed after {waited:?} (idle_ms 400)"
    );
}
