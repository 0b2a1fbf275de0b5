//! A fleet: three real `sluicegate` processes sharing one real
//! `redis-server` (a fresh one per test, on a free loopback port): a
//! global route rate limit, filter KV (increment and compare-and-swap
//! from every replica), Redis killed and restarted under load, and a
//! cache purge fanned out to every replica.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Response};

use crate::common::backend::{full, RespBody};
use crate::common::redis_server::RedisServer;
use crate::common::{client, wasm, within, Backend, Cfg, H1Conn, Proxy};

/// A config with one route on `upstream` = `backend`, the admin listener,
/// `[redis]` at `redis`, and `extra` TOML.
fn fleet_config(backend: SocketAddr, redis: &RedisServer, route: &str, extra: &str) -> String {
    Cfg::new()
        .admin()
        .upstream("app", &[backend])
        .extra(route)
        .extra(&format!(
            "[redis]\nurl = \"{}\"\ntimeout_ms = 50\n{extra}",
            redis.url()
        ))
        .toml()
}

/// Three proxies on `config`, with the `kv-counter` filter installed.
fn three(config: &str) -> Vec<Proxy> {
    (0..3)
        .map(|_| {
            Proxy::builder(config)
                .file("filters/kv-counter.wasm", wasm("kv-counter"))
                .start()
        })
        .collect()
}

/// Poll `/stats` until Redis is `up` (≤ 10 s).
async fn wait_redis_state(p: &Proxy, state: &str) {
    within(10, &format!("redis {state} in /stats"), async {
        loop {
            let stats: serde_json::Value =
                serde_json::from_str(&p.admin_get("/stats").await.text()).unwrap();
            if stats["dependencies"]["redis"]["state"] == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

async fn echo() -> Backend {
    Backend::echo("app").await
}

/// Send a GET to `path` on one keep-alive connection `count` times, one
/// every `every`; the (time since `t0`, status) of each answer.
async fn paced(
    addr: SocketAddr,
    path: &'static str,
    count: usize,
    every: Duration,
    t0: Instant,
) -> Vec<(Duration, u16)> {
    let mut conn: H1Conn = H1Conn::connect(addr).await;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        tick.tick().await;
        let resp = conn
            .send(client::build(Method::GET, path, &[], Bytes::new()))
            .await;
        out.push((t0.elapsed(), resp.status.as_u16()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_rate_limit_holds_across_three_replicas() {
    let redis = RedisServer::start();
    let backend = echo().await;
    let route = "[[route]]\npath_prefix = \"/\"\nupstream = \"app\"\nrate_limit = { rps = 200, burst = 20, key = \"route\", backend = \"redis\" }\n";
    let config = fleet_config(backend.addr(), &redis, route, "");
    let proxies = three(&config);
    for p in &proxies {
        wait_redis_state(p, "up").await;
    }
    // ~600 rps offered: 3 proxies × 4 connections × one request per 20 ms,
    // for 3.5 s; the first half second (the burst) is not counted.
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for p in &proxies {
        for _ in 0..4 {
            tasks.push(tokio::spawn(paced(
                p.addr(),
                "/",
                175,
                Duration::from_millis(20),
                t0,
            )));
        }
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(within(30, "paced load", t).await.unwrap());
    }
    let (from, to) = (
        Duration::from_millis(500),
        answers.iter().map(|a| a.0).max().unwrap(),
    );
    let window = (to - from).as_secs_f64();
    let in_window: Vec<_> = answers.iter().filter(|a| a.0 >= from).collect();
    let offered = in_window.len() as f64 / window;
    let passed = in_window.iter().filter(|a| a.1 == 200).count() as f64 / window;
    let limited = in_window.iter().filter(|a| a.1 == 429).count();
    assert_eq!(
        in_window.len(),
        limited + in_window.iter().filter(|a| a.1 == 200).count(),
        "only 200 and 429 answers"
    );
    eprintln!("offered {offered:.0} rps, passed {passed:.0} rps over {window:.2} s");
    assert!(offered > 450.0, "offered only {offered:.0} rps");
    assert!(
        (180.0..=220.0).contains(&passed),
        "passed {passed:.0} rps, want 200 ± 10 %"
    );
    // A 429 carries Retry-After, as the local limit's does.
    let resp = proxies[0].get("/", &[]).await;
    if resp.status == 429 {
        assert_eq!(resp.header("retry-after").as_deref(), Some("1"));
    }
}

/// `requests` GETs with `header: key` spread over `proxies`, `conc` at a
/// time per proxy; every `x-kv-value` answered.
async fn counts(
    proxies: &[Proxy],
    header: &'static str,
    per_proxy: usize,
    conc: usize,
) -> Vec<i64> {
    let mut tasks = Vec::new();
    for p in proxies {
        for _ in 0..conc {
            let addr = p.addr();
            tasks.push(tokio::spawn(async move {
                let mut conn: H1Conn = H1Conn::connect(addr).await;
                let mut values = Vec::new();
                for _ in 0..per_proxy / conc {
                    let req = client::build(Method::GET, "/kv", &[(header, "n")], Bytes::new());
                    let resp = conn.send(req).await;
                    assert_eq!(resp.status, 200);
                    match resp.header("x-kv-value") {
                        Some(v) => values.push(v.parse::<i64>().unwrap()),
                        None => panic!("no value: {:?}", resp.header("x-kv-error")),
                    }
                }
                values
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(within(60, "kv requests", t).await.unwrap());
    }
    all
}

const KV_ROUTE: &str =
    "[[route]]\npath_prefix = \"/kv\"\nupstream = \"app\"\nfilters = [\"kv-counter\"]\n";
const KV_FILTERS: &str =
    "[filters]\ndir = \"@DIR@/filters\"\ntimeout_ms = 2000\n[filters.kv]\nbackend = \"redis\"\ntimeout_ms = 500\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_and_swaps_from_three_replicas_are_unique_and_total_exactly() {
    let redis = RedisServer::start();
    let backend = echo().await;
    let config = fleet_config(backend.addr(), &redis, KV_ROUTE, KV_FILTERS);
    let proxies = three(&config);
    for p in &proxies {
        wait_redis_state(p, "up").await;
    }

    // Atomic increments: 3 × 100, 5 connections per proxy at once.
    let mut values = counts(&proxies, "x-kv-incr", 100, 5).await;
    values.sort_unstable();
    assert_eq!(values, (1..=300).collect::<Vec<_>>(), "unique and complete");
    assert_eq!(
        redis.get("sluicegate:kv:{kv-counter}:n").as_deref(),
        Some("300")
    );

    // Read + compare-and-swap loops racing on one key: no lost update.
    redis.command(&["DEL", "sluicegate:kv:{kv-counter}:n"]);
    let values: BTreeSet<i64> = counts(&proxies, "x-kv-cas", 40, 4)
        .await
        .into_iter()
        .collect();
    assert_eq!(values, (1..=120).collect(), "every swap won once");
    assert_eq!(
        redis.get("sluicegate:kv:{kv-counter}:n").as_deref(),
        Some("120")
    );
    // The namespace's index knows the key (entry bound).
    assert_eq!(
        redis.command(&["ZCARD", "sluicegate:kvidx:{kv-counter}"]),
        ":1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_follows_each_policy_within_its_timeout_and_recovers() {
    let mut redis = RedisServer::start();
    let backend = echo().await;
    let routes = format!(
        "{KV_ROUTE}\n[[route]]\npath_prefix = \"/open\"\nupstream = \"app\"\nrate_limit = {{ rps = 1000, key = \"route\", backend = \"redis\" }}\n\n[[route]]\npath_prefix = \"/closed\"\nupstream = \"app\"\nrate_limit = {{ rps = 1000, key = \"route\", backend = \"redis\", on_redis_error = \"deny\" }}\n"
    );
    // Replica 0: KV fails open; replica 1: KV fails closed (the filter's
    // on_error is fail_closed: 5xx).
    let open = fleet_config(backend.addr(), &redis, &routes, KV_FILTERS);
    let closed = open.replace(
        "[filters.kv]\n",
        "[filters.kv]\non_error = \"fail_closed\"\n",
    );
    let proxies = [&open, &closed].map(|c| {
        Proxy::builder(c)
            .file("filters/kv-counter.wasm", wasm("kv-counter"))
            .start()
    });
    for p in &proxies {
        wait_redis_state(p, "up").await;
        assert_eq!(p.get("/open", &[]).await.status, 200);
        assert_eq!(p.get("/closed", &[]).await.status, 200);
    }
    let incr = [("x-kv-incr", "k")];
    assert_eq!(
        proxies[0]
            .get("/kv", &incr)
            .await
            .header("x-kv-value")
            .as_deref(),
        Some("1")
    );

    redis.kill();
    // Every request answers within a bound well under a second (the
    // Redis deadline is 50 ms for limits, 500 ms for KV), by its policy.
    let bounded = |limit_ms: u64| {
        move |t: Instant| {
            let ms = t.elapsed().as_millis() as u64;
            assert!(ms < limit_ms, "a request took {ms} ms with Redis down");
        }
    };
    for round in 0..10 {
        for (i, p) in proxies.iter().enumerate() {
            let t = Instant::now();
            assert_eq!(
                p.get("/open", &[]).await.status,
                200,
                "allow, round {round}"
            );
            bounded(300)(t);
            let t = Instant::now();
            let resp = p.get("/closed", &[]).await;
            bounded(300)(t);
            assert_eq!(resp.status, 503, "deny, round {round}");
            assert_eq!(resp.header("retry-after").as_deref(), Some("1"));
            let t = Instant::now();
            let resp = p.get("/kv", &incr).await;
            bounded(1500)(t);
            if i == 0 {
                assert_eq!(resp.status, 200);
                let e = resp.header("x-kv-error").unwrap_or_default();
                assert!(e.contains("unavailable"), "fail_open: {e:?}");
            } else {
                assert!(
                    resp.status.is_server_error(),
                    "fail_closed: {}",
                    resp.status
                );
            }
        }
    }
    for p in &proxies {
        wait_redis_state(p, "down").await;
        assert_eq!(p.admin_get("/healthz").await.status, 200);
        let ready = p.admin_get("/readyz").await;
        assert_eq!(ready.status, 200);
        assert!(ready.text().contains("degraded"), "{}", ready.text());
        let metrics = p.admin_get("/metrics").await.text();
        let errors: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("sluicegate_redis_errors_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(errors > 0.0, "redis errors counted:\n{metrics}");
    }

    // Redis back (empty): everything works again, no proxy restarted.
    redis.restart();
    for p in &proxies {
        within(15, "the deny route admits again", async {
            while p.get("/closed", &[]).await.status != 200 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        wait_redis_state(p, "up").await;
    }
    // The fail-closed replica's filter was quarantined by its failures; it
    // counts again once the quarantine ends (its first success is 1).
    within(15, "the fail-closed replica's KV works again", async {
        loop {
            let resp = proxies[1].get("/kv", &incr).await;
            if let Some(v) = resp.header("x-kv-value") {
                assert_eq!(v, "1");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let a = proxies[0].get("/kv", &incr).await;
    assert_eq!(
        a.header("x-kv-value").as_deref(),
        Some("2"),
        "{:?}",
        a.header("x-kv-error")
    );
    for p in &proxies {
        assert_eq!(p.admin_get("/readyz").await.text().trim(), "ready");
        assert!(!p.output().contains("panicked"), "{}", p.output());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_on_one_replica_empties_the_key_on_all_three() {
    let redis = RedisServer::start();
    let origin = Backend::serve("origin", |_req| async move {
        let mut r: Response<RespBody> = Response::new(full("cached body"));
        r.headers_mut().insert(
            "cache-control",
            http::HeaderValue::from_static("max-age=600"),
        );
        r
    })
    .await;
    let route = "[[route]]\npath_prefix = \"/\"\nupstream = \"app\"\ncache = true\n";
    let config = fleet_config(origin.addr(), &redis, route, "purge = true\n");
    let proxies = three(&config);
    let entries = |v: &str| -> u64 {
        serde_json::from_str::<serde_json::Value>(v).unwrap()["entries"]
            .as_u64()
            .unwrap()
    };
    for p in &proxies {
        wait_redis_state(p, "up").await;
        within(10, "purge subscription", async {
            loop {
                let stats: serde_json::Value =
                    serde_json::from_str(&p.admin_get("/stats").await.text()).unwrap();
                if stats["dependencies"]["redis"]["purge_subscribed"] == true {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert_eq!(p.get("/item", &[]).await.status, 200);
        assert_eq!(p.get("/other", &[]).await.status, 200);
        assert_eq!(entries(&p.admin_get("/cache").await.text()), 2);
    }

    let resp = client::request(
        proxies[0].admin_addr(),
        Method::POST,
        "/cache/purge",
        &[("content-type", "application/json")],
        Bytes::from_static(br#"{"url": "/item"}"#),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("sluicegate-fleet-purge").as_deref(),
        Some("published")
    );
    for p in &proxies {
        within(5, "the purge reaches every replica", async {
            while entries(&p.admin_get("/cache").await.text()) != 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        // The purged key is fetched again; the other is still a hit.
        let item = p.get("/item", &[]).await;
        assert!(
            item.header("cache-status")
                .unwrap_or_default()
                .contains("fwd="),
            "{:?}",
            item.header("cache-status")
        );
        let other = p.get("/other", &[]).await;
        assert!(
            other
                .header("cache-status")
                .unwrap_or_default()
                .contains("hit"),
            "{:?}",
            other.header("cache-status")
        );
    }
}

/// Issue 25: a tag purge (`{"tags": [...]}`) on one replica reaches the
/// others through Redis and removes the tagged entries there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_on_one_replica_reaches_the_others() {
    let redis = RedisServer::start();
    let origin = Backend::serve("origin", |req| {
        let tag = if req.uri().path().starts_with("/video") {
            "video all"
        } else {
            "page all"
        };
        async move {
            let mut r: Response<RespBody> = Response::new(full("cached body"));
            r.headers_mut().insert(
                "cache-control",
                http::HeaderValue::from_static("max-age=600"),
            );
            r.headers_mut()
                .insert("surrogate-key", http::HeaderValue::from_static(tag));
            r
        }
    })
    .await;
    let route = "[[route]]\npath_prefix = \"/\"\nupstream = \"app\"\ncache = true\n";
    let config = fleet_config(origin.addr(), &redis, route, "purge = true\n");
    let proxies = three(&config);
    let entries = |v: &str| -> u64 {
        serde_json::from_str::<serde_json::Value>(v).unwrap()["entries"]
            .as_u64()
            .unwrap()
    };
    for p in &proxies {
        wait_redis_state(p, "up").await;
        within(10, "purge subscription", async {
            loop {
                let stats: serde_json::Value =
                    serde_json::from_str(&p.admin_get("/stats").await.text()).unwrap();
                if stats["dependencies"]["redis"]["purge_subscribed"] == true {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        for path in ["/video/1", "/video/2", "/page"] {
            assert_eq!(p.get(path, &[]).await.status, 200);
        }
        assert_eq!(entries(&p.admin_get("/cache").await.text()), 3);
    }
    let before = origin.requests();
    let resp = client::request(
        proxies[1].admin_addr(),
        Method::POST,
        "/cache/purge",
        &[("content-type", "application/json")],
        Bytes::from_static(br#"{"tags": ["video"]}"#),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("sluicegate-fleet-purge").as_deref(),
        Some("published")
    );
    for p in &proxies {
        within(5, "the tag purge reaches every replica", async {
            while entries(&p.admin_get("/cache").await.text()) != 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let page = p.get("/page", &[]).await;
        assert!(
            page.header("cache-status")
                .unwrap_or_default()
                .contains("hit"),
            "{:?}",
            page.header("cache-status")
        );
    }
    // Each replica fetches the two tagged URLs again, and only those.
    for p in &proxies {
        for path in ["/video/1", "/video/2"] {
            let r = p.get(path, &[]).await;
            assert!(
                r.header("cache-status")
                    .unwrap_or_default()
                    .contains("fwd="),
                "{:?}",
                r.header("cache-status")
            );
        }
    }
    assert_eq!(origin.requests(), before + 6);
}
