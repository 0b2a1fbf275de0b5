//! Graceful drain on SIGTERM, in order: `/readyz` fails first (while the
//! listeners still accept, for `drain_delay_ms`), then the listeners close,
//! then in-flight requests finish within `drain_ms` and the process exits 0.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::net::TcpStream;

use crate::common::{client, within, Backend, Cfg, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_then_stops_accepting_then_drains() {
    let slow = Backend::slow("slow", Duration::from_millis(2500)).await;
    let fast = Backend::echo("fast").await;
    let delay_ms = 1000;
    let cfg = Cfg::new()
        .admin()
        .timeout("drain_ms", 8000)
        .timeout("drain_delay_ms", delay_ms)
        .upstream("slow", &[slow.addr()])
        .upstream("fast", &[fast.addr()])
        .route(None, "/slow", "slow")
        .route(None, "/", "fast")
        .toml();
    let mut proxy = Proxy::start(&cfg);
    let (addr, admin) = (proxy.addr(), proxy.admin_addr());
    assert_eq!(proxy.admin_get("/readyz").await.status, StatusCode::OK);
    let in_flight = tokio::spawn(async move {
        let resp = client::request(addr, Method::GET, "/slow", &[], Bytes::new()).await;
        (resp, Instant::now())
    });
    slow.wait_requests(1, 10).await;

    let term = Instant::now();
    proxy.signal("TERM");
    // 1. Readiness fails...
    let not_ready = within(3, "/readyz to fail after SIGTERM", async {
        loop {
            let r = client::request(admin, Method::GET, "/readyz", &[], Bytes::new()).await;
            if r.status == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(r.text().trim(), "draining");
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // ...while new connections are still accepted and served.
    let resp = client::request(addr, Method::GET, "/", &[], Bytes::new()).await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.backend(), "fast");
    assert!(
        not_ready.duration_since(term) < Duration::from_millis(delay_ms),
        "readiness failed only after {:?}",
        not_ready.duration_since(term)
    );

    // 2. Then the listeners close (after drain_delay_ms).
    let closed = within(5, "listener to close", async {
        loop {
            match TcpStream::connect(addr).await {
                Err(_) => return Instant::now(),
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(
        closed.duration_since(term) >= Duration::from_millis(delay_ms - 100),
        "listeners closed {:?} after SIGTERM, before drain_delay_ms",
        closed.duration_since(term)
    );
    assert!(
        !in_flight.is_finished(),
        "the in-flight request ended before the listeners closed"
    );
    // The admin listener stays up for the probes while draining.
    assert_eq!(
        client::request(admin, Method::GET, "/healthz", &[], Bytes::new())
            .await
            .status,
        StatusCode::OK
    );

    // 3. The in-flight request completes, then the process exits cleanly.
    let (resp, done) = within(10, "in-flight request", in_flight).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.backend(), "slow");
    assert!(
        not_ready < closed && closed < done,
        "order: not ready, closed, done"
    );
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("still running after the drain\n{}", proxy.output()));
    assert!(status.success(), "exit {status}\n{}", proxy.output());
    let log = proxy.output();
    let a = log
        .find("still accepting for drain_delay_ms")
        .expect("delay logged");
    let b = log
        .find("listeners closed, draining")
        .expect("close logged");
    assert!(a < b, "{log}");
}
