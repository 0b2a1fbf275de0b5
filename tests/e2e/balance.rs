//! Native load balancing: algorithms, stickiness, retries, ejection and the
//! admin view, against real backends on 127.0.0.1.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Response, StatusCode};

use crate::common::backend::{echo_response, full};
use crate::common::{client, free_addr, within, Backend, Cfg, H1Conn, Proxy};

/// A config with one upstream `app` given as raw TOML, a catch-all route
/// and the admin listener.
fn config(upstream: &str) -> String {
    Cfg::new()
        .admin()
        .route(None, "/", "app")
        .extra(&format!("[[upstream]]\nname = \"app\"\n{upstream}"))
        .toml()
}

/// `n` sequential GETs on one kept-alive connection; backend id → count.
async fn spread(p: &Proxy, n: usize, path: &str) -> HashMap<String, usize> {
    let mut conn: H1Conn = H1Conn::connect(p.addr()).await;
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = within(
            10,
            path,
            conn.send(client::build(Method::GET, path, &[], Bytes::new())),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        *counts.entry(r.backend()).or_default() += 1;
    }
    counts
}

async fn upstreams(p: &Proxy) -> serde_json::Value {
    let r = within(10, "/upstreams", p.admin_get("/upstreams")).await;
    serde_json::from_str(&r.text()).unwrap()
}

#[tokio::test]
async fn smooth_weighted_round_robin_is_exact() {
    let (a, b, c) = (
        Backend::echo("a").await,
        Backend::echo("b").await,
        Backend::echo("c").await,
    );
    let p = Proxy::start(&config(&format!(
        "endpoints = [{{ addr = \"{}\", weight = 3 }}, \"{}\", {{ addr = \"{}\", weight = 2 }}]\n",
        a.addr(),
        b.addr(),
        c.addr()
    )));
    let counts = spread(&p, 60, "/").await;
    assert_eq!(
        (counts["a"], counts["b"], counts["c"]),
        (30, 10, 20),
        "{counts:?}"
    );
    let v = upstreams(&p).await;
    let eps = &v["upstreams"][0]["endpoints"];
    assert_eq!(eps[0]["weight"], 3, "{v}");
    assert_eq!(eps[0]["requests"], 30, "{v}");
    assert_eq!(eps[0]["healthy"], true, "{v}");
}

#[tokio::test]
async fn random_and_least_request_spread_within_bounds() {
    let (a, b) = (Backend::echo("a").await, Backend::echo("b").await);
    for balance in ["random", "least_request"] {
        let p = Proxy::start(&config(&format!(
            "balance = \"{balance}\"\nendpoints = [\"{}\", \"{}\"]\n",
            a.addr(),
            b.addr()
        )));
        let counts = spread(&p, 400, "/").await;
        // Sequential requests: least_request sees equal loads and picks at
        // random too. Binomial(400, 0.5): ±70 is beyond 7 sigma.
        for id in ["a", "b"] {
            let n = counts.get(id).copied().unwrap_or(0);
            assert!((130..=270).contains(&n), "{balance}: {counts:?}");
        }
    }
}

#[tokio::test]
async fn slow_backend_gets_less_traffic_under_least_request_and_ewma() {
    let fast = Backend::echo("fast").await;
    let slow = Backend::slow("slow", Duration::from_millis(40)).await;
    for balance in ["least_request", "ewma"] {
        let p = Proxy::start(&config(&format!(
            "balance = \"{balance}\"\nendpoints = [\"{}\", \"{}\"]\n",
            fast.addr(),
            slow.addr()
        )));
        let (f0, s0) = (fast.requests(), slow.requests());
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let addr = p.addr();
                tokio::spawn(async move {
                    let mut conn: H1Conn = H1Conn::connect(addr).await;
                    for _ in 0..40 {
                        let r = conn
                            .send(client::build(Method::GET, "/", &[], Bytes::new()))
                            .await;
                        assert_eq!(r.status, StatusCode::OK);
                    }
                })
            })
            .collect();
        for c in clients {
            within(60, "load", c).await.unwrap();
        }
        let (f, s) = (fast.requests() - f0, slow.requests() - s0);
        println!("{balance}: fast {f}, slow {s}");
        assert!(s * 4 < f, "{balance}: slow got {s}, fast {f}");
    }
}

#[tokio::test]
async fn consistent_hash_is_sticky_and_an_added_endpoint_takes_few_keys() {
    let bs = [
        Backend::echo("a").await,
        Backend::echo("b").await,
        Backend::echo("c").await,
        Backend::echo("d").await,
    ];
    let eps = |n: usize| {
        bs[..n]
            .iter()
            .map(|b| format!("\"{}\"", b.addr()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let p = Proxy::start(&config(&format!(
        "balance = \"consistent_hash\"\nhash_key = \"header:x-user\"\nendpoints = [{}]\n",
        eps(3)
    )));
    let mut conn: H1Conn = H1Conn::connect(p.addr()).await;
    let mut placed = Vec::new();
    for user in 0..200 {
        let u = format!("user-{user}");
        let mut seen = std::collections::BTreeSet::new();
        let times = if user < 5 { 50 } else { 1 };
        for _ in 0..times {
            let r = conn
                .send(client::build(
                    Method::GET,
                    "/",
                    &[("x-user", &u)],
                    Bytes::new(),
                ))
                .await;
            seen.insert(r.backend());
        }
        assert_eq!(seen.len(), 1, "{u} moved between {seen:?}");
        placed.push(seen.into_iter().next().unwrap());
    }
    // Add the fourth endpoint by editing the config; wait for it to serve.
    let text = std::fs::read_to_string(p.config_path()).unwrap();
    std::fs::write(p.config_path(), text.replace(&eps(3), &eps(4))).unwrap();
    let started = Instant::now();
    while upstreams(&p).await["upstreams"][0]["endpoints"]
        .as_array()
        .unwrap()
        .len()
        < 4
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "reload never happened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut moved = 0;
    for (user, before) in placed.iter().enumerate() {
        let u = format!("user-{user}");
        let r = conn
            .send(client::build(
                Method::GET,
                "/",
                &[("x-user", &u)],
                Bytes::new(),
            ))
            .await;
        if &r.backend() != before {
            assert_eq!(r.backend(), "d", "{u} moved to an old endpoint");
            moved += 1;
        }
    }
    println!("consistent_hash: {moved}/200 keys moved to the added endpoint");
    assert!(
        (15..=90).contains(&moved),
        "{moved}/200 keys moved (ideal 50)"
    );
}

#[tokio::test]
async fn a_503_is_retried_elsewhere_for_get_but_not_for_post() {
    let bad = Backend::serve("bad", |_req| async {
        let mut r = Response::new(full("busy"));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r
    })
    .await;
    let good = Backend::serve("good", |req| echo_response("good".into(), req)).await;
    let p = Proxy::start(&config(&format!(
        "endpoints = [\"{}\", \"{}\"]\n[upstream.health]\nmax_failures = 0\n",
        bad.addr(),
        good.addr()
    )));
    for _ in 0..10 {
        let r = within(10, "GET", p.get("/", &[])).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.backend(), "good");
    }
    assert_eq!(
        bad.requests(),
        5,
        "round robin sent half the first tries to bad"
    );
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = within(10, "POST", p.request(Method::POST, "/", &[], "x")).await;
        statuses.push(r.status.as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 503).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(bad.requests(), 10, "each POST went to one endpoint only");
}

#[tokio::test]
async fn a_dead_endpoint_fails_no_get_and_is_ejected() {
    let a = Backend::echo("a").await;
    let b = Backend::echo("b").await;
    let dead = free_addr(); // nothing listens: every connect is refused
    let p = Proxy::start(&config(&format!(
        "endpoints = [\"{}\", \"{dead}\", \"{}\"]\n[upstream.health]\nmax_failures = 3\nejection_ms = 60000\n",
        a.addr(),
        b.addr()
    )));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let addr = p.addr();
            tokio::spawn(async move {
                let mut conn: H1Conn = H1Conn::connect(addr).await;
                let mut failed = 0;
                for _ in 0..50 {
                    let r = conn
                        .send(client::build(Method::GET, "/", &[], Bytes::new()))
                        .await;
                    failed += usize::from(r.status != StatusCode::OK);
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for c in clients {
        failed += within(60, "load", c).await.unwrap();
    }
    assert_eq!(failed, 0, "idempotent GETs failed");
    let v = upstreams(&p).await;
    let ep = &v["upstreams"][0]["endpoints"][1];
    assert_eq!(ep["ejected"], true, "{v}");
    assert_eq!(ep["healthy"], false, "{v}");
    assert!(ep["ejections"].as_u64().unwrap() >= 1, "{v}");
    assert!(ep["failures"].as_u64().unwrap() >= 3, "{v}");
    let metrics = within(10, "/metrics", p.admin_get("/metrics")).await.text();
    assert!(
        metrics.contains(&format!("sluicegate_upstream_requests_total{{upstream=\"app\",endpoint=\"{dead}\",status=\"error\"}}")),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_active_check_takes_a_failing_endpoint_out_and_back() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let sick = Arc::new(AtomicBool::new(true));
    let flag = sick.clone();
    let a = Backend::serve("a", move |req| {
        let sick = flag.load(Ordering::SeqCst);
        async move {
            if req.uri().path() == "/healthz" && sick {
                let mut r = Response::new(full("sick"));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return r;
            }
            echo_response("a".into(), req).await
        }
    })
    .await;
    let b = Backend::echo("b").await;
    let p = Proxy::start(&config(&format!(
        "endpoints = [\"{}\", \"{}\"]\n[upstream.health]\npath = \"/healthz\"\ninterval_ms = 50\ntimeout_ms = 500\nhealthy_threshold = 2\nunhealthy_threshold = 2\n",
        a.addr(),
        b.addr()
    )));
    let state = |v: serde_json::Value| v["upstreams"][0]["endpoints"][0]["active_healthy"].clone();
    let started = Instant::now();
    while state(upstreams(&p).await) != false {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never marked down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counts = spread(&p, 20, "/").await;
    assert_eq!(counts.get("b"), Some(&20), "{counts:?}");
    sick.store(false, Ordering::SeqCst);
    while state(upstreams(&p).await) != true {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never marked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counts = spread(&p, 20, "/").await;
    assert_eq!(counts.get("a"), Some(&10), "{counts:?}");
}

/// An echo backend (2 ms per request) whose listener and open connections
/// all close when the returned sender says so.
async fn killable(id: &'static str) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    killable_at(id, "127.0.0.1:0".parse().unwrap()).await
}

/// [`killable`] on a given address (to bring a killed backend back).
async fn killable_at(
    id: &'static str,
    bind: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut stop = rx.clone();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                s = listener.accept() => match s { Ok((s, _)) => s, Err(_) => continue },
                _ = stop.changed() => return,
            };
            let mut stop = rx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let mut r = echo_response(id.into(), req).await;
                    r.headers_mut()
                        .insert("x-backend", http::HeaderValue::from_static(id));
                    Ok::<_, std::convert::Infallible>(r)
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.changed() => {}
                }
            });
        }
    });
    (addr, tx)
}

#[tokio::test]
async fn a_backend_killed_under_load_fails_no_get_is_ejected_and_readmitted() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (a, b) = (Backend::echo("a").await, Backend::echo("b").await);
    let (victim, kill) = killable("victim").await;
    let p = Proxy::start(&config(&format!(
        "endpoints = [\"{}\", \"{victim}\", \"{}\"]\n[upstream.health]\nmax_failures = 3\nejection_ms = 1000\n",
        a.addr(),
        b.addr()
    )));
    let running = Arc::new(AtomicBool::new(true));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, running) = (p.addr(), running.clone());
            tokio::spawn(async move {
                let mut conn: H1Conn = H1Conn::connect(addr).await;
                let (mut n, mut failed) = (0, Vec::new());
                while running.load(Ordering::Relaxed) {
                    let r = conn
                        .send(client::build(Method::GET, "/", &[], Bytes::new()))
                        .await;
                    n += 1;
                    if r.status != StatusCode::OK {
                        failed.push(format!("{} {}", r.status, r.text()));
                    }
                }
                (n, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = kill.send(true);
    let killed = Instant::now();
    let ejected_after = loop {
        let v = upstreams(&p).await;
        if v["upstreams"][0]["endpoints"][1]["ejected"] == true {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "not ejected within 1 s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Bring it back on the same address: once its ejection ends it takes
    // traffic again, with the load still running.
    let (_, _revive) = killable_at("victim", victim).await;
    let revived = Instant::now();
    let before = upstreams(&p).await["upstreams"][0]["endpoints"][1]["requests"]
        .as_u64()
        .unwrap();
    let readmitted_after = loop {
        let v = upstreams(&p).await;
        let ep = &v["upstreams"][0]["endpoints"][1];
        if ep["requests"].as_u64().unwrap() > before + 10 && ep["healthy"] == true {
            break revived.elapsed();
        }
        assert!(
            revived.elapsed() < Duration::from_secs(10),
            "not readmitted: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    running.store(false, Ordering::Relaxed);
    let (mut total, mut failed) = (0, Vec::new());
    for c in clients {
        let (n, f) = within(30, "load", c).await.unwrap();
        total += n;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} of {total} GETs failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let v = upstreams(&p).await;
    let ep = &v["upstreams"][0]["endpoints"][1];
    assert!(ep["ejections"].as_u64().unwrap() >= 1, "{v}");
    println!(
        "killed under load: {total} GETs, 0 failed; ejected after {ejected_after:?}, \
         readmitted {readmitted_after:?} after it came back; victim {ep}"
    );
}
