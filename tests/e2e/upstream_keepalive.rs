//! The upstream keep-alive pool against origins that close idle
//! connections: a request the origin's idle close raced is sent again (even
//! a PUT with a body), the origin's `Keep-Alive: timeout` is honoured, and
//! `[proxy.timeouts] upstream_idle_ms` bounds how long a connection idles.
//! The 1,000-PUT version of the first test is `soak::puts_around_an_idle_close_1000`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// One endpoint, no retries of the proxy's own (`retries = 0`): what the
/// pool does alone. `extra`: more TOML (e.g. `[proxy.timeouts]`).
fn pool_proxy(origin: &Backend, extra: &str) -> Proxy {
    let addr = origin.addr();
    Proxy::start(
        &Cfg::new()
            .admin()
            .route(None, "/", "app")
            .extra(&format!(
                "[[upstream]]\nname = \"app\"\nendpoints = [\"{addr}\"]\nretries = 0\n{extra}"
            ))
            .toml(),
    )
}

/// `n` PUTs with bodies on one kept-alive client connection, spaced
/// 0.9–1.1 s apart (a fixed spread), against an origin that closes
/// connections idle for 1 s: none may fail, and none reaches it twice.
pub async fn puts_around_an_idle_close(n: usize) {
    let app = Backend::closes_when_idle("app", Duration::from_secs(1)).await;
    let p = pool_proxy(&app, "");
    let mut conn: H1Conn = H1Conn::connect(p.addr()).await;
    for i in 0..n {
        let body = "x".repeat(100 + i % 50);
        let req = client::build(Method::PUT, "/doc", &[], Bytes::from(body.clone()));
        let resp = within(10, "PUT", conn.send(req)).await;
        assert_eq!(resp.status, StatusCode::OK, "PUT {i}: {}", resp.text());
        assert_eq!(resp.text(), format!("got {}", body.len()), "PUT {i}");
        // 900..=1100 ms, spread evenly over the run.
        let gap = 900 + (i * 67) % 201;
        tokio::time::sleep(Duration::from_millis(gap as u64)).await;
    }
    assert_eq!(
        app.requests(),
        n,
        "each PUT reached the origin exactly once"
    );
    let metrics = within(10, "metrics", p.admin_get("/metrics")).await.text();
    let retried = metric_value(&metrics, "sluicegate_upstream_reused_retries_total");
    let replayed = metric_value(&metrics, "sluicegate_upstream_stale_connections_total");
    eprintln!("{n} PUTs: {retried} sent again after an idle close, {replayed} replayed unsent");
}

/// 40 PUTs (about 40 s); 1,000 in the `soak::` group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_around_the_origins_idle_close_never_fail() {
    puts_around_an_idle_close(40).await;
}

/// Answers the first request of each connection, then reads the next and
/// closes without a byte: every reuse loses its request to the "idle close".
async fn closes_on_second_request() -> Backend {
    Backend::raw("racy", |mut stream, requests, _| async move {
        let mut buf = vec![0u8; 16 * 1024];
        for i in 0..2 {
            let mut got = Vec::new();
            let end = loop {
                if let Some(e) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    break e + 4;
                }
                match stream.read(&mut buf).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            };
            if i == 1 {
                return; // closed, the request unanswered
            }
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while got.len() < end + len {
                match stream.read(&mut buf).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            requests.fetch_add(1, Ordering::SeqCst);
            let body = format!("got {len}");
            let out = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(out.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_lost_on_a_reused_connection_is_sent_again_and_counted() {
    let app = closes_on_second_request().await;
    let p = pool_proxy(&app, "");
    let mut conn: H1Conn = H1Conn::connect(p.addr()).await;
    for (i, method) in [
        Method::PUT,
        Method::POST,
        Method::PUT,
        Method::GET,
        Method::DELETE,
    ]
    .into_iter()
    .enumerate()
    {
        let body = if method == Method::GET {
            String::new()
        } else {
            "y".repeat(1000 + i)
        };
        let len = body.len();
        let req = client::build(method.clone(), "/r", &[], Bytes::from(body));
        let resp = within(10, "request", conn.send(req)).await;
        assert_eq!(resp.status, StatusCode::OK, "{method} {i}: {}", resp.text());
        assert_eq!(resp.text(), format!("got {len}"));
    }
    assert_eq!(app.requests(), 5, "each answered once");
    assert_eq!(
        app.accepts(),
        5,
        "each reuse lost its request: a new connection"
    );
    let metrics = within(10, "metrics", p.admin_get("/metrics")).await.text();
    assert_eq!(
        metric_value(&metrics, "sluicegate_upstream_reused_retries_total"),
        4.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origins_keep_alive_timeout_and_the_idle_limit_are_honoured() {
    // The origin keeps connections 5 s but announces timeout=1: the pool
    // keeps them half a second.
    let app = Backend::closes_when_idle_announcing("app", Duration::from_secs(5), Some(1)).await;
    let p = pool_proxy(&app, "");
    let mut conn: H1Conn = H1Conn::connect(p.addr()).await;
    gets(&mut conn, &[0, 100, 100]).await;
    assert_eq!(app.accepts(), 1, "reused within the announced timeout");
    gets(&mut conn, &[800, 800]).await;
    assert_eq!(app.accepts(), 3, "not reused past half of timeout=1");
    // Without an announcement, `upstream_idle_ms` bounds the idle time.
    let quiet = Backend::closes_when_idle("quiet", Duration::from_secs(5)).await;
    let p = pool_proxy(&quiet, "[proxy.timeouts]\nupstream_idle_ms = 300\n");
    let mut conn: H1Conn = H1Conn::connect(p.addr()).await;
    gets(&mut conn, &[0, 100, 600, 600]).await;
    assert_eq!(
        quiet.accepts(),
        3,
        "reused once, then idle past 300 ms twice"
    );
}

/// A `GET /` on `conn` after each pause (ms).
async fn gets(conn: &mut H1Conn, pauses: &[u64]) {
    for &pause in pauses {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let req = client::build(Method::GET, "/", &[], Bytes::new());
        assert_eq!(
            within(10, "GET", conn.send(req)).await.status,
            StatusCode::OK
        );
    }
}
