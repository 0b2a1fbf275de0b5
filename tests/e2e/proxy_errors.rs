//! Failure handling: no route, broken and slow upstreams, slow and idle
//! clients, graceful shutdown. After every failure the proxy must go on
//! serving.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// A proxy-made error: this status, `text/plain`, a short non-empty body.
fn assert_plain_error(resp: &Resp, status: StatusCode) {
    assert_eq!(resp.status, status, "{resp:?}");
    let ctype = resp.header("content-type").unwrap_or_default();
    assert!(
        ctype.starts_with("text/plain"),
        "content-type {ctype:?} in {resp:?}"
    );
    assert!(!resp.text().trim().is_empty(), "empty body: {resp:?}");
    assert!(resp.body.len() < 1024, "not a short body: {resp:?}");
}

/// The `good` route still answers.
async fn assert_still_serving(proxy: &Proxy) {
    let resp = proxy.get("/good", &[]).await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "proxy stopped serving: {resp:?}"
    );
    assert_eq!(resp.backend(), "good");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404() {
    let good = Backend::echo("good").await;
    let cfg = Cfg::new()
        .upstream("good", &[good.addr()])
        .route(Some("only.example"), "/", "good")
        .route(None, "/good", "good")
        .toml();
    let proxy = Proxy::start(&cfg);
    assert_plain_error(
        &proxy.get("/", &[("host", "other.example")]).await,
        StatusCode::NOT_FOUND,
    );
    assert_plain_error(
        &proxy.get("/goodness", &[("host", "other.example")]).await,
        StatusCode::NOT_FOUND,
    );
    assert_eq!(good.requests(), 0);
    assert_eq!(
        proxy.get("/", &[("host", "only.example")]).await.status,
        StatusCode::OK
    );
    assert_still_serving(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_is_502() {
    let good = Backend::echo("good").await;
    let dead = free_addr();
    let cfg = Cfg::new()
        .upstream("good", &[good.addr()])
        .upstream("dead", &[dead])
        .route(None, "/good", "good")
        .route(None, "/", "dead")
        .toml();
    let proxy = Proxy::start(&cfg);
    let started = Instant::now();
    assert_plain_error(&proxy.get("/x", &[]).await, StatusCode::BAD_GATEWAY);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a refused connect fails fast"
    );
    let post = proxy
        .request(Method::POST, "/x", &[], Bytes::from_static(b"payload"))
        .await;
    assert_plain_error(&post, StatusCode::BAD_GATEWAY);
    assert_still_serving(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_before_the_response_is_502() {
    let good = Backend::echo("good").await;
    let close = Backend::broken("close", Broken::CloseBeforeHead).await;
    let half = Backend::broken("half", Broken::MidHead).await;
    let cfg = Cfg::new()
        .upstream("good", &[good.addr()])
        .upstream("close", &[close.addr()])
        .upstream("half", &[half.addr()])
        .route(None, "/good", "good")
        .route(None, "/close", "close")
        .route(None, "/half", "half")
        .toml();
    let proxy = Proxy::start(&cfg);
    for _ in 0..2 {
        assert_plain_error(&proxy.get("/close", &[]).await, StatusCode::BAD_GATEWAY);
        assert_still_serving(&proxy).await;
        assert_plain_error(&proxy.get("/half", &[]).await, StatusCode::BAD_GATEWAY);
        assert_still_serving(&proxy).await;
    }
    assert!(
        close.requests() >= 2 && half.requests() >= 2,
        "the broken backends were reached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_breaking_mid_body_is_not_hidden() {
    let good = Backend::echo("good").await;
    let broken = Backend::broken("broken", Broken::MidBody).await;
    let cfg = Cfg::new()
        .upstream("good", &[good.addr()])
        .upstream("broken", &[broken.addr()])
        .route(None, "/good", "good")
        .route(None, "/", "broken")
        .toml();
    let proxy = Proxy::start(&cfg);
    within(20, "mid-body break", async {
        let mut conn: H1Conn = H1Conn::connect(proxy.addr()).await;
        let req = client::build(Method::GET, "/x", &[], Bytes::new());
        match conn.send_streaming(req).await {
            Err(_) => {}
            Ok(resp) if resp.status() == StatusCode::BAD_GATEWAY => {}
            Ok(resp) => {
                // The head was already sent: the client must see the body fail,
                // never a short body that looks complete.
                let body = resp.into_body().collect().await;
                assert!(
                    body.is_err(),
                    "truncated upstream body reached the client as complete ({} bytes)",
                    body.unwrap().to_bytes().len()
                );
            }
        }
    })
    .await;
    assert_still_serving(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504() {
    let good = Backend::echo("good").await;
    let slow = Backend::slow("slow", Duration::from_secs(5)).await;
    let cfg = Cfg::new()
        .timeout("upstream_response_ms", 400)
        .upstream("good", &[good.addr()])
        .upstream("slow", &[slow.addr()])
        .route(None, "/good", "good")
        .route(None, "/", "slow")
        .toml();
    let proxy = Proxy::start(&cfg);
    let started = Instant::now();
    let resp = proxy.get("/slow", &[]).await;
    let took = started.elapsed();
    assert_plain_error(&resp, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        took >= Duration::from_millis(350),
        "504 after {took:?}, before upstream_response_ms"
    );
    assert!(
        took < Duration::from_millis(3000),
        "504 after {took:?}, far past upstream_response_ms"
    );
    assert_eq!(slow.requests(), 1);
    assert_still_serving(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_client_is_disconnected() {
    let good = Backend::echo("good").await;
    let cfg = Cfg::new()
        .timeout("header_read_ms", 500)
        .upstream("good", &[good.addr()])
        .route(None, "/", "good")
        .toml();
    let proxy = Proxy::start(&cfg);
    let stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let started = Instant::now();
    wr.write_all(b"GET /good HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    // Trickle one byte every 100 ms, never finishing the head.
    let closed_after = within(10, "slowloris connection to be closed", async {
        let mut buf = [0u8; 1024];
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                r = rd.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return started.elapsed(),
                    Ok(_) => {} // e.g. a 408 before closing
                },
                _ = tick.tick() => {
                    if wr.write_all(b"a").await.is_err() {
                        return started.elapsed();
                    }
                }
            }
        }
    })
    .await;
    assert!(
        closed_after >= Duration::from_millis(400),
        "closed after {closed_after:?}, before header_read_ms"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "closed only after {closed_after:?}"
    );
    assert_eq!(
        good.requests(),
        0,
        "the partial request never reached the upstream"
    );
    // A well-behaved client is unaffected.
    assert_eq!(proxy.get("/good", &[]).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connection_is_closed() {
    let good = Backend::echo("good").await;
    let cfg = Cfg::new()
        .timeout("idle_ms", 500)
        .upstream("good", &[good.addr()])
        .route(None, "/", "good")
        .toml();
    let proxy = Proxy::start(&cfg);
    let mut conn: H1Conn = H1Conn::connect(proxy.addr()).await;
    let resp = within(
        10,
        "request",
        conn.send(client::build(Method::GET, "/", &[], Bytes::new())),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    let idle_since = Instant::now();
    within(10, "idle connection to be closed", async {
        while !conn.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let after = idle_since.elapsed();
    assert!(
        after >= Duration::from_millis(400),
        "closed after {after:?} idle, before idle_ms"
    );
    assert_eq!(proxy.get("/", &[]).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight_requests() {
    let slow = Backend::slow("slow", Duration::from_millis(1000)).await;
    let drain_ms = 5000;
    let cfg = Cfg::new()
        .timeout("drain_ms", drain_ms)
        .upstream("slow", &[slow.addr()])
        .route(None, "/", "slow")
        .toml();
    let mut proxy = Proxy::start(&cfg);
    let addr = proxy.addr();
    let in_flight = tokio::spawn(async move {
        client::request(addr, Method::GET, "/slow", &[], Bytes::new()).await
    });
    slow.wait_requests(1, 10).await;

    let term = Instant::now();
    proxy.signal("TERM");
    // New connections are refused while the slow request is still running.
    within(5, "listener to close after SIGTERM", async {
        loop {
            match TcpStream::connect(addr).await {
                // Refused, or reset when it landed in the backlog of a
                // worker's SO_REUSEPORT listener as it closed.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    break
                }
                Err(e) => panic!("unexpected connect error {e}"),
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(
        !in_flight.is_finished(),
        "listener closed only after the in-flight request finished ({:?})",
        term.elapsed()
    );
    assert!(
        proxy.try_exit().is_none(),
        "the proxy exited before draining"
    );

    let resp = within(10, "in-flight request to complete", in_flight)
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.backend(), "slow");

    let status = proxy
        .wait_exit(Duration::from_millis(drain_ms + 3000))
        .await
        .unwrap_or_else(|| {
            panic!(
                "still running {:?} after SIGTERM\n{}",
                term.elapsed(),
                proxy.output()
            )
        });
    assert!(status.success(), "exit status {status}\n{}", proxy.output());
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_after_drain_ms() {
    let slow = Backend::slow("slow", Duration::from_secs(30)).await;
    let drain_ms = 500;
    let cfg = Cfg::new()
        .timeout("drain_ms", drain_ms)
        .upstream("slow", &[slow.addr()])
        .route(None, "/", "slow")
        .toml();
    let mut proxy = Proxy::start(&cfg);
    let addr = proxy.addr();
    let in_flight = tokio::spawn(async move {
        let mut conn: H1Conn = H1Conn::connect(addr).await;
        conn.send_streaming(client::build(Method::GET, "/", &[], Bytes::new()))
            .await
            .map(|r| r.status())
    });
    slow.wait_requests(1, 10).await;
    let term = Instant::now();
    proxy.signal("TERM");
    let exited = proxy
        .wait_exit(Duration::from_millis(drain_ms + 3000))
        .await;
    assert!(
        exited.is_some(),
        "still running {:?} after SIGTERM with drain_ms = {drain_ms}",
        term.elapsed()
    );
    // The abandoned request ended (error or a proxy-made status), not hung.
    let outcome = within(5, "abandoned request to end", in_flight)
        .await
        .unwrap();
    assert!(
        outcome.as_ref().map_or(true, |s| *s != StatusCode::OK),
        "{outcome:?}"
    );
}
