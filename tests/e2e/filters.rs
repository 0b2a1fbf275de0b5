//! The WebAssembly filter runtime end to end: every action and host import
//! (through the `probe` filter), both phases and their order, body phases,
//! the example filters, and the sandbox against hostile filters.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::common::{client, wasm, within, Backend, Cfg, Fnv, Proxy, Resp};

use crate::common::{start_with_filters as start, start_with_filters_as as start_as};

async fn get(p: &Proxy, path: &str, headers: &[(&str, &str)]) -> Resp {
    within(
        10,
        path,
        client::request(p.addr(), Method::GET, path, headers, Bytes::new()),
    )
    .await
}

async fn admin(p: &Proxy, path: &str) -> String {
    within(
        10,
        path,
        client::request(p.admin_addr(), Method::GET, path, &[], Bytes::new()),
    )
    .await
    .text()
}

/// `(name, state)` of every filter in `/filters`, in its order.
async fn filter_states(p: &Proxy) -> Vec<(String, String)> {
    let status: serde_json::Value = serde_json::from_str(&admin(p, "/filters").await).unwrap();
    status["filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn probe_sees_the_request_and_edits_it() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(cfg, &["probe"], "");
    let r = get(
        &p,
        "/start?q=1",
        &[
            ("x-probe-set-path", "/moved?z=2"),
            ("x-probe-remove", "x-secret"),
            ("x-secret", "s3cret"),
            ("x-probe-append", "x-multi=two"),
            ("x-multi", "one"),
            ("x-probe-all", "x-multi"),
            ("x-probe-time", "1"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let e = r.echo();
    assert_eq!(e.uri, "/moved?z=2", "set-path reaches the upstream");
    assert_eq!(e.one("x-probe-method"), "GET");
    assert_eq!(e.one("x-probe-path"), "/start?q=1");
    assert!(
        e.one("x-probe-client").starts_with("127.0.0.1:"),
        "client-addr"
    );
    assert_eq!(e.one("x-probe-scheme"), "http");
    assert!(!e.one("x-probe-authority").is_empty(), "authority");
    assert!(!e.has("x-secret"), "remove-header");
    assert_eq!(e.all("x-multi"), vec!["one", "two"], "append-header");
    assert_eq!(
        e.one("x-probe-all-values"),
        "one|two",
        "header-all after append"
    );
    assert!(
        e.one("x-probe-names").contains("x-probe-time"),
        "header-names"
    );
    let now: u64 = e.one("x-probe-now-ms").parse().unwrap();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        now <= wall && wall - now < 60_000,
        "now-ms is wall-clock time: {now} vs {wall}"
    );
    assert!(e.one("x-probe-mono-ns").parse::<u64>().is_ok());
    assert!(e.one("x-probe-random").parse::<u64>().is_ok());
    // Response phase: the probe's headers are on the response.
    assert_eq!(r.header("x-probe-response").as_deref(), Some("1"));
    assert_eq!(r.header("x-probe-status-seen").as_deref(), Some("200"));
    // log and metrics imports.
    p.wait_output("probe saw /start?q=1", 10).await;
    let metrics = admin(&p, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluicegate_filter_counter_total{")
                && l.contains("filter=\"probe\"")
                && l.contains("name=\"requests\"")),
        "counter import exported: {metrics}"
    );
}

#[tokio::test]
async fn probe_kv_is_shared_and_atomic() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(cfg, &["probe"], "");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = get(&p, "/", &[("x-probe-kv", "hits")]).await.echo();
        assert_eq!(
            e.one("x-probe-kv-ok"),
            "true",
            "set/get/cas/delete round trip"
        );
        seen.push(e.one("x-probe-count").parse::<i64>().unwrap());
    }
    assert_eq!(seen, vec![1, 2, 3]);
    // Concurrent increments from many instances lose nothing.
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let addr = p.addr();
        tasks.push(tokio::spawn(async move {
            client::request(
                addr,
                Method::GET,
                "/",
                &[("x-probe-kv", "race")],
                Bytes::new(),
            )
            .await
            .echo()
            .one("x-probe-count")
            .parse::<i64>()
            .unwrap()
        }));
    }
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(within(20, "kv race", t).await.unwrap());
    }
    counts.sort();
    assert_eq!(
        counts,
        (1..=40).collect::<Vec<i64>>(),
        "every increment is unique"
    );
}

#[tokio::test]
async fn probe_actions_respond_route_and_response_edits() {
    let app = Backend::echo("app").await;
    let other = Backend::echo("other").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("other", &[other.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(
        cfg,
        &["probe"],
        "[filters.policy.probe]\nupstreams = [\"*\"]\n",
    );

    let r = get(
        &p,
        "/",
        &[("x-probe-action", "respond"), ("x-probe-status", "418")],
    )
    .await;
    assert_eq!(r.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(r.header("x-probe-local").as_deref(), Some("yes"));
    assert_eq!(r.text(), "local response from probe\n");
    assert_eq!(
        r.header("x-probe-status-seen").as_deref(),
        Some("418"),
        "response phase sees local answers"
    );
    assert_eq!(
        app.requests() + other.requests(),
        0,
        "a local answer never reaches an upstream"
    );

    let r = get(&p, "/", &[("x-probe-action", "route=other")]).await;
    assert_eq!(r.backend(), "other", "route action picks the upstream");

    let r = get(&p, "/", &[("x-probe-action", "route=nowhere")]).await;
    assert_eq!(
        r.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "unknown upstream is the filter's error (fail_closed)"
    );
    assert!(
        r.text().contains("probe"),
        "the error names the filter: {}",
        r.text()
    );

    let r = get(&p, "/", &[("x-probe-resp-status", "203")]).await;
    assert_eq!(
        r.status,
        StatusCode::NON_AUTHORITATIVE_INFORMATION,
        "set-status"
    );
    let r = get(&p, "/", &[("x-probe-resp-action", "respond")]).await;
    assert_eq!(
        r.text(),
        "replaced by probe\n",
        "response phase may replace the response"
    );
    assert_eq!(r.header("x-backend"), None);
}

#[tokio::test]
async fn body_phases_buffer_and_replace_only_when_asked() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(cfg, &["probe"], "[filters.config.probe]\nbodies = true\n");
    let r = within(
        10,
        "post",
        client::request(
            p.addr(),
            Method::POST,
            "/",
            &[("x-probe-body", "upper")],
            Bytes::from_static(b"hello body"),
        ),
    )
    .await;
    let e = r.echo();
    assert_eq!(e.body_len, 10);
    assert_eq!(
        e.body_hash,
        Fnv::of(b"HELLO BODY"),
        "the upstream got the replaced body"
    );
    let r = within(
        10,
        "reject",
        client::request(
            p.addr(),
            Method::POST,
            "/",
            &[("x-probe-body", "reject")],
            Bytes::from_static(b"x"),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.text(), "rejected by probe\n");
    let r = get(&p, "/lower", &[("x-probe-resp-body", "upper")]).await;
    assert!(
        r.text().contains("\"/LOWER\""),
        "response body replaced: {}",
        r.text()
    );
    assert_eq!(
        r.header("content-length").unwrap(),
        r.body.len().to_string()
    );
    // Over the buffering limit: 413, nothing sent upstream.
    let big = Bytes::from(vec![b'a'; 2 * 1024 * 1024]);
    let before = app.requests();
    let r = within(
        10,
        "big",
        client::request(p.addr(), Method::POST, "/", &[], big),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.requests(), before);
}

#[tokio::test]
async fn request_phase_in_order_response_phase_reversed() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/ab", "app", &["add-header", "probe"])
        .route_with_filters(None, "/ba", "app", &["probe", "add-header"]);
    let filters = "[filters.config.add-header]\nrequest_headers = { \"x-from\" = \"sluicegate\" }\nresponse_headers = { \"x-hello\" = \"world\" }\n";
    let p = start(cfg, &["probe", "add-header"], filters);
    // add-header runs first on the request: probe sees its header.
    let r = get(&p, "/ab", &[("x-probe-resp-remove", "x-hello")]).await;
    assert!(r.echo().one("x-probe-names").contains("x-from"));
    // Response phase reversed: probe removes x-hello before add-header sets it.
    assert_eq!(r.header("x-hello").as_deref(), Some("world"));
    let r = get(&p, "/ba", &[("x-probe-resp-remove", "x-hello")]).await;
    assert!(
        !r.echo().one("x-probe-names").contains("x-from"),
        "probe ran before add-header"
    );
    assert_eq!(
        r.header("x-hello"),
        None,
        "probe's response phase ran after add-header's"
    );
}

#[tokio::test]
async fn example_filters_auth_rate_limit_canary_security() {
    let app = Backend::echo("app").await;
    let canary = Backend::echo("canary").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("canary", &[canary.addr()])
        .route_with_filters(None, "/", "app", &["security-headers", "canary"])
        .route_with_filters(None, "/private", "app", &["add-header", "auth"])
        .route_with_filters(None, "/limited", "app", &["rate-limit"]);
    let toml = r#"
[filters.config.add-header]
response_headers = { "x-hello" = "world" }
[filters.config.auth]
api_keys = ["k1"]
jwt_hs256_secret = "topsecret"
[filters.config.rate-limit]
requests = 3
window_ms = 60000
[filters.config.canary]
upstream = "canary"
weight_percent = 0
[filters.policy.canary]
upstreams = ["canary"]
[filters.config.security-headers]
cors_allow_origins = ["https://a.example"]
"#;
    let p = start(
        cfg,
        &[
            "security-headers",
            "canary",
            "add-header",
            "auth",
            "rate-limit",
        ],
        toml,
    );

    let r = get(&p, "/private/x", &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.header("www-authenticate").is_some());
    assert_eq!(
        r.header("x-hello").as_deref(),
        Some("world"),
        "earlier filters' response phase sees the 401"
    );
    assert_eq!(
        app.requests(),
        0,
        "a denied request never reaches the upstream"
    );
    let r = get(&p, "/private/x", &[("x-api-key", "k1")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.echo().one("x-auth-subject"), "api-key");
    assert!(!r.echo().has("x-api-key"), "the key is not forwarded");
    let token = jwt("topsecret", "alice", 3600);
    let r = get(
        &p,
        "/private/x",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.echo().one("x-auth-subject"), "alice");
    let expired = jwt("topsecret", "alice", -60);
    let r = get(
        &p,
        "/private/x",
        &[("authorization", &format!("Bearer {expired}"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "expired JWT");
    let forged = jwt("wrong", "alice", 3600);
    let r = get(
        &p,
        "/private/x",
        &[("authorization", &format!("Bearer {forged}"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "bad signature");

    let codes: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(get(&p, "/limited", &[]).await.status.as_u16());
        }
        v
    };
    assert_eq!(codes, vec![200, 200, 200, 429, 429]);
    let r = get(&p, "/limited", &[]).await;
    let retry: u64 = r
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));

    assert_eq!(
        get(&p, "/", &[]).await.backend(),
        "app",
        "weight 0 stays on app"
    );
    assert_eq!(get(&p, "/", &[("x-canary", "1")]).await.backend(), "canary");
    assert_eq!(
        get(&p, "/", &[("cookie", "canary=1")]).await.backend(),
        "canary"
    );

    let r = get(&p, "/", &[("origin", "https://a.example")]).await;
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://a.example")
    );
    let r = get(&p, "/", &[("origin", "https://evil.example")]).await;
    assert_eq!(r.header("access-control-allow-origin"), None);
    let before = app.requests();
    let r = within(
        10,
        "preflight",
        client::request(
            p.addr(),
            Method::OPTIONS,
            "/",
            &[
                ("origin", "https://a.example"),
                ("access-control-request-method", "PUT"),
            ],
            Bytes::new(),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(app.requests(), before, "preflight answered locally");
}

/// An HS256 JWT for `sub`, expiring `ttl` seconds from now.
fn jwt(secret: &str, sub: &str, ttl: i64) -> String {
    use base64::Engine;
    use hmac::Mac;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64.encode(format!(r#"{{"sub":"{sub}","exp":{}}}"#, now + ttl));
    let signing = format!("{header}.{claims}");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signing.as_bytes());
    format!("{signing}.{}", b64.encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn hostile_filters_are_contained_and_other_routes_keep_serving() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(None, "/ok", "app")
        .route_with_filters(None, "/loop", "app", &["hostile-loop"])
        .route_with_filters(None, "/memory", "app", &["hostile-memory"])
        .route_with_filters(None, "/trap-closed", "app", &["hostile-trap"])
        .route_with_filters(None, "/trap-open", "app", &["hostile-trap-open"])
        .route_with_filters(None, "/huge", "app", &["hostile-huge-header"]);
    let toml = "timeout_ms = 20\nmemory_mb = 16\n[filters.policy.hostile-trap-open]\non_error = \"fail_open\"\n[filters.policy.hostile-memory]\ntimeout_ms = 2000\n";
    let p = start_as(
        cfg,
        &[
            ("hostile-loop", "hostile-loop"),
            ("hostile-memory", "hostile-memory"),
            ("hostile-trap", "hostile-trap"),
            ("hostile-huge-header", "hostile-huge-header"),
            ("hostile-trap-open", "hostile-trap"),
        ],
        toml,
    );

    // Hammer the hostile routes while the plain route serves.
    let addr = p.addr();
    let attack = tokio::spawn(async move {
        let mut codes = Vec::new();
        for path in ["/loop", "/memory", "/trap-closed", "/loop", "/memory"] {
            codes.push(
                client::request(addr, Method::GET, path, &[], Bytes::new())
                    .await
                    .status
                    .as_u16(),
            );
        }
        codes
    });
    let mut ok = 0;
    for _ in 0..50 {
        if get(&p, "/ok", &[]).await.status == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 50, "the plain route kept serving");
    let codes = within(30, "hostile requests", attack).await.unwrap();
    assert_eq!(
        codes,
        vec![500; 5],
        "loop, memory bomb and trap all fail closed"
    );
    p.wait_output("timed out after 20 ms", 10).await;
    p.wait_output("exceeded its memory cap", 10).await;

    let r = get(&p, "/trap-open", &[]).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "fail_open skips the trapping filter"
    );
    assert_eq!(r.backend(), "app");

    let r = get(&p, "/huge", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let e = r.echo();
    assert!(
        e.headers.len() <= 100,
        "header count bounded: {}",
        e.headers.len()
    );
    assert!(
        e.headers.iter().all(|(_, v)| v.len() <= 16 * 1024),
        "no oversized header reached the upstream"
    );

    // The process is still healthy and its memory bounded.
    assert_eq!(admin(&p, "/healthz").await.trim(), "ok");
    let rss = crate::common::rss_kib(p.pid()).unwrap_or(0);
    assert!(rss < 400 * 1024, "RSS {rss} KiB after the memory bomb");
}

#[tokio::test]
async fn a_filter_that_keeps_failing_is_quarantined() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["hostile-trap"]);
    let p = start(cfg, &["hostile-trap"], "");
    for _ in 0..6 {
        assert_eq!(
            get(&p, "/", &[]).await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    let status: serde_json::Value = serde_json::from_str(&admin(&p, "/filters").await).unwrap();
    let f = &status["filters"][0];
    assert_eq!(f["name"], "hostile-trap");
    assert_eq!(f["state"], "quarantined", "{status}");
    assert!(
        f["last_error"].as_str().unwrap().contains("trap"),
        "{status}"
    );
    let metrics = admin(&p, "/metrics").await;
    assert!(
        metrics.contains("sluicegate_filter_failures_total{filter=\"hostile-trap\",kind=\"trap\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn filter_config_errors_name_the_filter_and_reason() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/bad", "app", &["bad-init"])
        .route_with_filters(None, "/auth", "app", &["auth"])
        .route(None, "/ok", "app");
    let p = start(
        cfg,
        &["bad-init", "auth"],
        "[filters.config.auth]\napi_keys = 5\n",
    );
    p.wait_output("bad-init refuses to start", 10).await;
    let log = p.wait_output("filter \"auth\"", 10).await;
    assert!(log.contains("filter \"bad-init\""), "{log}");
    assert_eq!(
        filter_states(&p).await,
        vec![
            ("auth".into(), "failed".into()),
            ("bad-init".into(), "failed".into())
        ]
    );
    assert_eq!(
        get(&p, "/bad", &[]).await.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "missing filter fails closed"
    );
    assert_eq!(
        get(&p, "/ok", &[]).await.status,
        StatusCode::OK,
        "the rest keeps serving"
    );
}

/// Making an instance and running `init` have their own deadline
/// (`init_timeout_ms`), not the per-call `timeout_ms`: a start-up slower
/// than a call's deadline loads; one that never ends is cut off, named and
/// refused, and the proxy keeps serving.
#[tokio::test]
async fn init_has_its_own_deadline_and_a_stuck_init_is_refused() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/slow", "app", &["slow-init"])
        .route_with_filters(None, "/stuck", "app", &["stuck-init"])
        .route(None, "/ok", "app");
    let toml = "timeout_ms = 10\n\
        [filters.config.slow-init]\ninit_spin_ms = 40\nrequest_spin = false\n\
        [filters.config.stuck-init]\ninit_spin_ms = 3600000\n\
        [filters.policy.stuck-init]\ninit_timeout_ms = 300\n";
    let started = std::time::Instant::now();
    let p = start_as(
        cfg,
        &[
            ("slow-init", "hostile-loop"),
            ("stuck-init", "hostile-loop"),
        ],
        toml,
    );
    let log = p
        .wait_output("instantiating and init timed out after 300 ms", 20)
        .await;
    assert!(
        log.contains("stuck-init"),
        "the failure names the filter: {log}"
    );

    let r = get(&p, "/slow", &[]).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a 40 ms init loads under the 10 ms call deadline: {r:?}"
    );
    assert_eq!(r.backend(), "app");
    assert_eq!(
        get(&p, "/stuck", &[]).await.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the refused filter fails closed"
    );
    assert_eq!(get(&p, "/ok", &[]).await.status, StatusCode::OK);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the stuck init was cut off, not waited out"
    );

    assert_eq!(
        filter_states(&p).await,
        vec![
            ("slow-init".into(), "active".into()),
            ("stuck-init".into(), "failed".into())
        ]
    );
}

#[tokio::test]
async fn garbage_in_the_filter_dir_is_rejected_with_the_file_named() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["add-header"]);
    let toml = cfg
        .admin()
        .extra("[filters]\ndir = \"@DIR@/filters\"\n")
        .toml();
    let p = Proxy::builder(&toml)
        .file("filters/add-header.wasm", wasm("add-header"))
        .file("filters/junk.wasm", b"this is not wasm".to_vec())
        .start();
    p.wait_output("junk.wasm", 10).await;
    assert_eq!(get(&p, "/", &[]).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn a_component_of_another_world_or_too_slow_to_compile_is_refused() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/empty", "app", &["empty"])
        .route_with_filters(None, "/slow", "app", &["slow"])
        .route(None, "/ok", "app");
    let toml = cfg
        .admin()
        .extra(
            "[filters]\ndir = \"@DIR@/filters\"\n[filters.policy.slow]\non_error = \"fail_open\"\n",
        )
        .toml();
    // A valid but empty component: it exports nothing of the filter world.
    let empty = b"\0asm\x0d\x00\x01\x00".to_vec();
    let p = Proxy::builder(&toml)
        .file("filters/empty.wasm", empty)
        .start();
    let log = p.wait_output("filter \"empty\"", 10).await;
    assert!(log.contains("empty.wasm"), "{log}");
    assert_eq!(
        get(&p, "/empty", &[]).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(get(&p, "/ok", &[]).await.status, StatusCode::OK);
    drop(p);

    let toml = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["add-header"])
        .admin()
        .extra("[filters]\ndir = \"@DIR@/filters\"\ncompile_timeout_ms = 0\ncache_dir = \"@DIR@/cache\"\n")
        .toml();
    let p = Proxy::builder(&toml)
        .file("filters/add-header.wasm", wasm("add-header"))
        .start();
    p.wait_output("compile_timeout_ms", 10).await;
    let status: serde_json::Value = serde_json::from_str(&admin(&p, "/filters").await).unwrap();
    assert_eq!(status["filters"][0]["state"], "failed", "{status}");
}
