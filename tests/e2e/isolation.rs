//! One tenant's filter must not starve the others: while a computing (or
//! looping) filter is hammered on one route, a plain route keeps serving
//! with bounded latency, the filter's version runs on the compute pool,
//! and its CPU share sheds what it cannot afford. Generous bounds here;
//! the exact figures are the benchmark's (`bench/isolation.py`).
//!
//! Ignored in the parallel run: they load both cores on purpose, which
//! would skew the timing of the tests beside them. scripts/test.sh runs
//! them alone, with the soak tests.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::common::start_with_filters as start;
use crate::common::{client, Backend, Cfg, H1Conn, Proxy};

/// Hammer `path` with `conns` keep-alive clients sending `headers` until
/// `stop`; returns (200s, 503s, others).
fn hammer(
    p: &Proxy,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    conns: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize, usize)> {
    let addr = p.addr();
    tokio::spawn(async move {
        let counts = Arc::new([
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        ]);
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (stop, counts) = (stop.clone(), counts.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn = H1Conn::connect(addr).await;
                while !stop.load(Ordering::Relaxed) {
                    let req = client::build(http::Method::GET, path, headers, Default::default());
                    let Ok(Ok(resp)) =
                        tokio::time::timeout(Duration::from_secs(10), conn.send_streaming(req))
                            .await
                    else {
                        break;
                    };
                    let i = match resp.status() {
                        StatusCode::OK => 0,
                        StatusCode::SERVICE_UNAVAILABLE => 1,
                        _ => 2,
                    };
                    counts[i].fetch_add(1, Ordering::Relaxed);
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                    if conn.is_closed() {
                        conn = H1Conn::connect(addr).await;
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let c = |i: usize| counts[i].load(Ordering::Relaxed);
        (c(0), c(1), c(2))
    })
}

/// Sequential plain requests for `secs` on one connection: every latency.
async fn measure_plain(p: &Proxy, secs: u64) -> Vec<Duration> {
    let mut conn = H1Conn::connect(p.addr()).await;
    let mut lat = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let t = Instant::now();
        let r = conn
            .send(client::build(
                http::Method::GET,
                "/plain",
                &[],
                Default::default(),
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

fn p99(lat: &[Duration]) -> Duration {
    lat[(lat.len() * 99 / 100).min(lat.len() - 1)]
}

async fn filter_status(p: &Proxy, name: &str) -> serde_json::Value {
    let all: serde_json::Value =
        serde_json::from_str(&p.admin_get("/filters").await.text()).unwrap();
    all["filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .cloned()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "loads both cores: run alone (scripts/test.sh does)"]
async fn a_plain_route_keeps_serving_while_a_computing_filter_is_hammered() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/heavy", "app", &["probe"])
        .route(None, "/plain", "app");
    let p = start(
        cfg,
        &["probe"],
        "[filters.policy.probe]\ntimeout_ms = 50\nmax_cpu_percent = 20\ncpu_queue_ms = 0\n",
    );
    let alone = measure_plain(&p, 1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let heavy = hammer(&p, "/heavy", &[("x-probe-spin-ms", "5")], 20, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let loaded = measure_plain(&p, 3).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, shed, other) = heavy.await.unwrap();

    eprintln!(
        "plain alone: {} req, p99 {:?}; under load: {} req, p99 {:?}; heavy: {ok} ok, {shed} shed, {other} other",
        alone.len(),
        p99(&alone),
        loaded.len(),
        p99(&loaded)
    );
    let probe = filter_status(&p, "probe").await;
    eprintln!("probe: {probe}");
    assert_eq!(
        probe["slow"], true,
        "the computing filter runs on the compute pool"
    );
    assert!(ok > 0, "the filtered route is served too");
    assert!(shed > 0, "past its share its calls are shed with 503");
    // Counted per call: a shed request's response phase is shed too.
    assert!(
        probe["shed"].as_u64().unwrap() as usize >= shed,
        "and counted"
    );
    assert_eq!(other, 0, "no other failure");
    // Before the compute pool, one connection's plain requests waited
    // behind every filter call queued on its worker (p99 75 ms at 10
    // connections). Generous bounds: the figures belong to the bench.
    assert!(
        p99(&loaded) < Duration::from_millis(50),
        "plain p99 under load {:?}",
        p99(&loaded)
    );
    assert!(
        loaded.len() > 300,
        "plain throughput {} in 3 s",
        loaded.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "loads both cores: run alone (scripts/test.sh does)"]
async fn a_looping_filter_is_cut_at_its_deadline_without_holding_a_worker() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/heavy", "app", &["hostile-loop"])
        .route(None, "/plain", "app");
    let p = start(
        cfg,
        &["hostile-loop"],
        "[filters.policy.hostile-loop]\ntimeout_ms = 20\n",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let heavy = hammer(&p, "/heavy", &[], 10, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let loaded = measure_plain(&p, 2).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, shed, other) = heavy.await.unwrap();
    eprintln!(
        "plain under a looping filter: {} req, p99 {:?}; heavy: {ok} ok, {shed} shed, {other} 500",
        loaded.len(),
        p99(&loaded)
    );
    assert_eq!(ok, 0, "the loop never finishes");
    assert!(other > 0, "its calls time out: 500 (fail_closed)");
    assert!(
        p99(&loaded) < Duration::from_millis(50),
        "plain p99 {:?}",
        p99(&loaded)
    );
    let f = filter_status(&p, "hostile-loop").await;
    assert_eq!(f["slow"], true, "{f}");
}
