//! Outbound calls from filters and periodic ticks (issue 23), with the
//! real binary, real upstreams and the compiled `callout-probe` fixture
//! (raw `callout-filter` bindings): grants, limits and budgets, the CPU
//! deadline that does not count waiting, failures (a dead upstream, a hot
//! reload and a trap with calls in flight, a client gone mid-call), ticks
//! that refresh KV and stop with their version, and a thousand requests
//! waiting on callouts beside a plain route.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::common::backend::full;
use crate::common::killable::Killable;
use crate::common::{client, wasm, within, Backend, Cfg, Proxy, Resp};

/// A proxy whose `[filters]` dir holds `filters` as `(name, built)`, with
/// `filters_toml` after `[filters]`.
fn start(cfg: Cfg, filters: &[(&str, &str)], filters_toml: &str) -> Proxy {
    let toml = cfg
        .admin()
        .extra(&format!(
            "[filters]\ndir = \"@DIR@/filters\"\n{filters_toml}"
        ))
        .toml();
    let mut b = Proxy::builder(&toml);
    for (name, built) in filters {
        b = b.file(&format!("filters/{name}.wasm"), wasm(built));
    }
    b.start()
}

async fn get(p: &Proxy, path: &str, headers: &[(&str, &str)]) -> Resp {
    within(
        20,
        path,
        client::request(p.addr(), Method::GET, path, headers, Bytes::new()),
    )
    .await
}

fn result(r: &Resp) -> String {
    r.header("x-call-result").unwrap_or_default()
}

async fn filters_json(p: &Proxy) -> serde_json::Value {
    let r = within(10, "/filters", p.admin_get("/filters")).await;
    serde_json::from_slice(&r.body).expect("/filters is JSON")
}

fn filter<'a>(all: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    all["filters"]
        .as_array()
        .and_then(|a| a.iter().find(|f| f["name"] == name))
        .unwrap_or_else(|| panic!("no filter {name} in {all}"))
}

#[tokio::test]
async fn a_granted_callout_works_and_one_outside_the_grant_sends_nothing() {
    let app = Backend::echo("app").await;
    let authz = Backend::echo("authz").await;
    let secret = Backend::echo("secret").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("authz", &[authz.addr()])
        .upstream("secret", &[secret.addr()])
        .route_with_filters(None, "/any", "app", &["any"])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(
        cfg,
        &[("probe", "callout-probe"), ("any", "callout-probe")],
        "[filters.config.probe]\nmarker = \"m1\"\n[filters.policy.probe]\ncallouts = [\"authz\"]\n\
         [filters.policy.any]\ncallouts = [\"*\"]\n",
    );

    let r = get(
        &p,
        "/x",
        &[("x-call", "authz"), ("x-call-path", "/check?a=1")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", p.stderr_text());
    assert_eq!(result(&r), "ok:200");
    let echo = r.echo();
    assert_eq!(
        echo.uri, "/check?a=1",
        "the callout's path reached the upstream"
    );
    assert_eq!(echo.one("x-from-filter"), "m1");
    assert_eq!(
        echo.one("host"),
        "authz",
        "host defaults to the upstream's name"
    );
    assert_eq!(authz.requests(), 1);

    // Outside the grant: refused before anything is sent.
    let r = get(&p, "/x", &[("x-call", "secret")]).await;
    assert_eq!(result(&r), "err:not-allowed");
    let r = get(&p, "/x", &[("x-call", "nope")]).await;
    assert_eq!(result(&r), "err:not-allowed", "the grant is checked first");
    // `"*"` grants every upstream of the config, and only those.
    let r = get(&p, "/any", &[("x-call", "secret")]).await;
    assert_eq!(result(&r), "ok:200");
    let r = get(&p, "/any", &[("x-call", "nope")]).await;
    assert_eq!(result(&r), "err:unknown-upstream");
    assert_eq!(secret.requests(), 1, "only the granted call reached secret");

    // A request without `x-call` goes on to the upstream, filtered.
    let r = get(&p, "/plain", &[]).await;
    assert_eq!(r.backend(), "app");
    assert_eq!(r.echo().one("x-marker"), "m1");

    // Counted per filter, upstream and outcome.
    let page = within(10, "/metrics", p.admin_get("/metrics")).await.text();
    for (series, want) in [
        (
            "sluicegate_filter_callouts_total{filter=\"probe\",upstream=\"authz\",result=\"ok\"}",
            1.0,
        ),
        (
            "sluicegate_filter_callouts_total{filter=\"probe\",upstream=\"secret\",result=\"not_allowed\"}",
            1.0,
        ),
        (
            "sluicegate_filter_callouts_total{filter=\"any\",upstream=\"nope\",result=\"unknown_upstream\"}",
            1.0,
        ),
    ] {
        assert_eq!(client::metric_value(&page, series), want, "{series}\n{page}");
    }
    assert!(
        page.contains("sluicegate_filter_callout_seconds"),
        "callouts are timed\n{page}"
    );
}

#[tokio::test]
async fn a_component_that_imports_callouts_without_a_grant_is_refused_at_load() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(cfg, &[("probe", "callout-probe")], "");
    let all = filters_json(&p).await;
    let f = filter(&all, "probe");
    assert_eq!(f["state"], "failed", "{f}");
    let err = f["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("probe.wasm")
            && err.contains("upstream-client")
            && err.contains("callouts = ["),
        "the error names the file and the reason: {err}"
    );
    // Fail closed (the default): the route answers 500, the proxy serves on.
    let r = get(&p, "/", &[]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(app.requests(), 0);
}

#[tokio::test]
async fn timeouts_budgets_and_response_caps_bound_callouts() {
    let app = Backend::echo("app").await;
    let fast = Backend::echo("fast").await;
    let slow = Backend::slow("slow", Duration::from_millis(2_000)).await;
    let paced = Backend::slow("paced", Duration::from_millis(250)).await;
    let big = Backend::serve("big", |_req| async {
        http::Response::new(full(vec![b'x'; 1000]))
    })
    .await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("fast", &[fast.addr()])
        .upstream("slow", &[slow.addr()])
        .upstream("paced", &[paced.addr()])
        .upstream("big", &[big.addr()])
        .route_with_filters(None, "/wall", "app", &["walled"])
        .route_with_filters(None, "/capped", "app", &["capped"])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(
        cfg,
        &[
            ("probe", "callout-probe"),
            ("walled", "callout-probe"),
            ("capped", "callout-probe"),
        ],
        "[filters.policy.probe]\ncallouts = [\"*\"]\ncallout_timeout_ms = 200\ncallout_max_calls = 3\n\
         [filters.policy.capped]\ncallouts = [\"big\"]\ncallout_max_response_bytes = 100\n\
         [filters.policy.walled]\ncallouts = [\"*\"]\ncallout_timeout_ms = 1000\ncallout_max_wall_ms = 400\n",
    );

    // A slow upstream hits the call's timeout, not the client's patience.
    let t = Instant::now();
    let r = get(&p, "/", &[("x-call", "slow")]).await;
    assert_eq!(result(&r), "err:timeout");
    assert!(
        t.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        t.elapsed()
    );
    // The filter may ask for less than the policy, never more.
    let r = get(&p, "/", &[("x-call", "paced"), ("x-call-timeout", "50")]).await;
    assert_eq!(result(&r), "err:timeout");
    let r = get(&p, "/", &[("x-call", "paced"), ("x-call-timeout", "60000")]).await;
    assert_eq!(
        result(&r),
        "err:timeout",
        "capped at callout_timeout_ms = 200"
    );

    // Three calls per request; the rest are refused unsent.
    let before = fast.requests();
    let r = get(&p, "/", &[("x-call", "fast"), ("x-call-count", "5")]).await;
    assert_eq!(
        result(&r),
        "ok:200,ok:200,ok:200,err:budget-exhausted,err:budget-exhausted"
    );
    assert_eq!(fast.requests() - before, 3);
    // The budget is per request: the next one has its own.
    let r = get(&p, "/", &[("x-call", "fast"), ("x-call-count", "2")]).await;
    assert_eq!(result(&r), "ok:200,ok:200");

    // Waiting time: 400 ms per request. The first 250 ms call fits, the
    // second is cut at what is left (150 ms), the third is refused.
    let before = paced.requests();
    let r = get(&p, "/wall", &[("x-call", "paced"), ("x-call-count", "3")]).await;
    assert_eq!(result(&r), "ok:200,err:timeout,err:budget-exhausted");
    assert_eq!(paced.requests() - before, 2);

    // A response body past callout_max_response_bytes.
    let r = get(&p, "/capped", &[("x-call", "big")]).await;
    assert_eq!(result(&r), "err:too-large");
}

#[tokio::test]
async fn waiting_on_a_callout_is_not_cpu_but_computing_still_is() {
    let app = Backend::echo("app").await;
    let slow = Backend::slow("slow", Duration::from_millis(600)).await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("slow", &[slow.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(
        cfg,
        &[("probe", "callout-probe")],
        "[filters.policy.probe]\ncallouts = [\"slow\"]\ntimeout_ms = 20\ncallout_timeout_ms = 5000\n",
    );
    // 600 ms of waiting under a 20 ms CPU deadline.
    let r = get(&p, "/", &[("x-call", "slow")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", p.stderr_text());
    assert_eq!(result(&r), "ok:200");
    // 200 ms of computing before the call is cut at the deadline: fail
    // closed, and the upstream is never asked.
    let before = slow.requests();
    let r = get(&p, "/", &[("x-call", "slow"), ("x-spin-ms", "200")]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(slow.requests(), before);
    let page = within(10, "/metrics", p.admin_get("/metrics")).await.text();
    assert!(
        page.lines()
            .any(|l| l.starts_with("sluicegate_filter_failures_total") && l.contains("timeout")),
        "the timeout is counted\n{page}"
    );
}

#[tokio::test]
async fn a_dead_auth_service_fails_fast_and_plain_routes_keep_serving() {
    let app = Backend::echo("app").await;
    let authz = Killable::serve(|_req| async { http::Response::new(full("allow")) }).await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("authz", &[authz.addr()])
        .route(None, "/plain", "app")
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(
        cfg,
        &[("probe", "callout-probe")],
        "[filters.policy.probe]\ncallouts = [\"authz\"]\ncallout_timeout_ms = 500\n",
    );
    let r = get(&p, "/", &[("x-call", "authz")]).await;
    assert_eq!(result(&r), "ok:200");

    // Kill the service mid-run: every call after answers `unavailable`
    // (or, while the pool's connection dies, at worst a timeout), none
    // hangs, and the plain route serves throughout.
    authz.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        let t = Instant::now();
        let r = get(&p, "/", &[("x-call", "authz")]).await;
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        *outcomes.entry(result(&r)).or_default() += 1;
        let plain = get(&p, "/plain", &[]).await;
        assert_eq!(plain.status, StatusCode::OK);
        assert_eq!(plain.backend(), "app");
    }
    assert!(
        outcomes
            .keys()
            .all(|k| k == "err:unavailable" || k == "err:timeout"),
        "{outcomes:?}"
    );
    assert!(
        outcomes.get("err:unavailable").copied().unwrap_or(0) >= 35,
        "{outcomes:?}"
    );
}

#[tokio::test]
async fn a_hot_reload_with_callouts_in_flight_lets_them_finish_on_their_version() {
    let app = Backend::echo("app").await;
    let slow = Backend::slow("slow", Duration::from_millis(1_000)).await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("slow", &[slow.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(
        cfg,
        &[("probe", "callout-probe")],
        "[filters.config.probe]\nmarker = \"A\"\n[filters.policy.probe]\ncallouts = [\"slow\"]\ncallout_timeout_ms = 5000\n",
    );
    let addr = p.addr();
    let inflight: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                client::request(addr, Method::GET, "/", &[("x-call", "slow")], Bytes::new()).await
            })
        })
        .collect();
    slow.wait_requests(20, 10).await;
    // A new config for the filter: a new version goes live now.
    let text = std::fs::read_to_string(p.config_path()).unwrap();
    std::fs::write(
        p.config_path(),
        text.replace("marker = \"A\"", "marker = \"B\""),
    )
    .unwrap();
    let t = Instant::now();
    loop {
        let r = get(&p, "/", &[]).await;
        if r.echo().one("x-marker") == "B" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "reload never took");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for h in inflight {
        let r = within(10, "in-flight callout", h).await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(result(&r), "ok:200");
        assert_eq!(
            r.header("x-marker").as_deref(),
            Some("A"),
            "finished on its version"
        );
        assert_eq!(r.echo().one("x-from-filter"), "A");
    }
    let r = get(&p, "/", &[("x-call", "slow")]).await;
    assert_eq!(r.header("x-marker").as_deref(), Some("B"));
}

#[tokio::test]
async fn a_trap_or_a_client_gone_with_a_call_pending_loses_nothing_else() {
    let app = Backend::echo("app").await;
    let slow = Backend::slow("slow", Duration::from_millis(300)).await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("slow", &[slow.addr()])
        .route_with_filters(None, "/open", "app", &["open"])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(
        cfg,
        &[("probe", "callout-probe"), ("open", "callout-probe")],
        "[filters.policy.probe]\ncallouts = [\"slow\"]\n\
         [filters.policy.open]\ncallouts = [\"slow\"]\non_error = \"fail_open\"\n",
    );
    // The guest traps when its call returns: fail closed answers 500,
    // fail open skips the filter and the upstream answers.
    let r = get(&p, "/", &[("x-call", "slow"), ("x-trap-after-call", "1")]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let r = get(
        &p,
        "/open",
        &[("x-call", "slow"), ("x-trap-after-call", "1")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.backend(), "app");

    // Clients that leave while their filter waits on a callout: the call
    // and its instance are dropped with the request.
    for _ in 0..10 {
        let addr = p.addr();
        let h = tokio::spawn(async move {
            client::request(addr, Method::GET, "/", &[("x-call", "slow")], Bytes::new()).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        h.abort();
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..5 {
        let r = get(&p, "/", &[("x-call", "slow")]).await;
        assert_eq!(result(&r), "ok:200");
    }
    let all = filters_json(&p).await;
    assert_eq!(filter(&all, "probe")["state"], "active");
    // The guest's own panic message is logged; no host thread panicked.
    assert!(
        !p.stderr_text().contains("thread 'sluicegate"),
        "{}",
        p.stderr_text()
    );
}

#[tokio::test]
async fn ticks_refresh_kv_with_callouts_and_stop_when_the_version_is_replaced() {
    let app = Backend::echo("app").await;
    let paths = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = paths.clone();
    let keys = Backend::serve("keys", move |req| {
        let n = {
            let mut p = seen.lock().unwrap();
            p.push(req.uri().path().to_string());
            p.len()
        };
        async move { http::Response::new(full(format!("keys-{n}"))) }
    })
    .await;
    let count = |path: &str| paths.lock().unwrap().iter().filter(|p| *p == path).count();
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("keys", &[keys.addr()])
        .route_with_filters(None, "/", "app", &["ticker"]);
    let p = start(
        cfg,
        &[("ticker", "callout-probe"), ("fast", "callout-probe")],
        "[filters.config.ticker]\ntick_ms = 100\ntick_upstream = \"keys\"\ntick_path = \"/jwks\"\n\
         [filters.policy.ticker]\ncallouts = [\"keys\"]\n\
         [filters.config.fast]\ntick_ms = 20\n[filters.policy.fast]\ncallouts = [\"keys\"]\n",
    );
    // Ticks call out and write KV, which every instance reads.
    let t = Instant::now();
    let value = loop {
        let r = get(&p, "/", &[("x-read-tick", "1")]).await;
        let v = r.text();
        if v.split(':').next().and_then(|n| n.parse::<u32>().ok()) >= Some(3) {
            break v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "ticks never ran: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(value.contains(":keys-"), "{value}");
    // request-tick is refused outside init, and below 100 ms.
    let r = get(&p, "/", &[("x-tick-outside-init", "1")]).await;
    assert_eq!(r.header("x-tick-refused").as_deref(), Some("true"));
    let all = filters_json(&p).await;
    let f = filter(&all, "fast");
    assert_eq!(f["state"], "failed");
    assert!(
        f["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("below the minimum of 100 ms")),
        "{f}"
    );

    // A new version (its config changed): the old one's ticks stop, the
    // new one's start.
    let text = std::fs::read_to_string(p.config_path()).unwrap();
    std::fs::write(
        p.config_path(),
        text.replace("tick_path = \"/jwks\"", "tick_path = \"/v2\""),
    )
    .unwrap();
    let t = Instant::now();
    while count("/v2") < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the new version never ticked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old = count("/jwks");
    assert!(old >= 3);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(count("/jwks"), old, "no tick of the replaced version");
    assert!(count("/v2") >= 5, "the new version ticks every 100 ms");

    // The file deleted: the filter is gone, and so are its ticks.
    std::fs::remove_file(p.dir().join("filters/ticker.wasm")).unwrap();
    let t = Instant::now();
    loop {
        let all = filters_json(&p).await;
        let gone = all["filters"]
            .as_array()
            .is_some_and(|a| !a.iter().any(|f| f["name"] == "ticker"));
        if gone {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the filter was never removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled = keys.requests();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(keys.requests(), settled, "no tick after the file went");
}
