//! Filters written in other languages, end to end: the Python, JavaScript and
//! C example filters (`scripts/build-lang-filters.sh`) loaded by the real
//! proxy with real backends, and `sluicegate filter test` run on them and on
//! the templates.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use hyper_util::rt::TokioIo;

use crate::common::{client, within, Backend, Cfg, Proxy, Resp, TempDir, BIN};

/// Compiling an 18 MB Python or 12 MB JavaScript component takes seconds
/// on a busy 2-core machine the first time (later starts map the cached
/// artifact).
const START: Duration = Duration::from_secs(120);

fn artifact(dir: &str, name: &str) -> PathBuf {
    let path = PathBuf::from(format!(
        "{}/../target/{dir}/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    ));
    assert!(
        path.is_file(),
        "{}: missing (run scripts/build-lang-filters.sh --templates)",
        path.display()
    );
    path
}

fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(artifact("filters", name)).expect("read filter")
}

/// A proxy with `filters` in its filter dir and `filters_toml` appended to
/// `[filters]`. Interpreted guests get room: 10 ms is a tight first call
/// on a loaded machine, and their heaps are larger than a Rust filter's.
fn start(cfg: Cfg, filters: &[&str], filters_toml: &str) -> Proxy {
    let toml = cfg
        .admin()
        .extra(&format!(
            "[filters]\ndir = \"@DIR@/filters\"\ntimeout_ms = 1000\nmemory_mb = 128\ncompile_timeout_ms = 600000\n{filters_toml}"
        ))
        .toml();
    let mut b = Proxy::builder(&toml).start_timeout(START);
    for f in filters {
        b = b.file(&format!("filters/{f}.wasm"), wasm(f));
    }
    b.start()
}

async fn send(p: &Proxy, method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    within(
        30,
        path,
        client::request(
            p.addr(),
            method,
            path,
            headers,
            Bytes::from(body.to_string()),
        ),
    )
    .await
}

/// One GET from the source address `from` (any 127.0.0.0/8 address works
/// on loopback), so the proxy sees that client address.
async fn get_from(from: Ipv4Addr, to: SocketAddr, path: &str) -> Resp {
    within(30, "request from another loopback address", async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(IpAddr::V4(from), 0))
            .expect("bind the source address");
        let stream = socket.connect(to).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .expect("http1 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = client::build(Method::GET, path, &[], Bytes::new());
        let resp = sender.send_request(req).await.expect("response");
        Resp::collect(resp).await.expect("body")
    })
    .await
}

#[tokio::test]
async fn python_router_sends_each_tenant_to_its_upstream() {
    let main = Backend::echo("main").await;
    let beta = Backend::echo("beta").await;
    let gold = Backend::echo("gold").await;
    let cfg = Cfg::new()
        .upstream("main", &[main.addr()])
        .upstream("beta-pool", &[beta.addr()])
        .upstream("gold-pool", &[gold.addr()])
        .route_with_filters(None, "/app", "main", &["py-router"])
        .route(None, "/plain", "main");
    let p = start(
        cfg,
        &["py-router"],
        "[filters.config.py-router]\nheader = \"x-tenant\"\nroutes = { beta = \"beta-pool\", gold = \"gold-pool\" }\n[filters.policy.py-router]\nupstreams = [\"beta-pool\", \"gold-pool\"]\n",
    );
    // The filter's print() in init reaches the proxy's log, tagged.
    let log = p.wait_output("py-router: routing on x-tenant", 10).await;
    assert!(log.contains("stdout"), "stdout is tagged: {log}");

    for (tenant, backend, upstream) in
        [("beta", "beta", "beta-pool"), ("gold", "gold", "gold-pool")]
    {
        let r = send(&p, Method::GET, "/app/x", &[("x-tenant", tenant)], "").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.backend(), backend, "x-tenant: {tenant}");
        let e = r.echo();
        assert_eq!(
            e.one("x-sluicegate-route"),
            upstream,
            "the upstream sees the decision"
        );
        assert_eq!(
            r.header("x-routed-to").as_deref(),
            Some(upstream),
            "response phase ran"
        );
    }
    for headers in [&[("x-tenant", "nobody")][..], &[][..]] {
        let r = send(&p, Method::GET, "/app/x", headers, "").await;
        assert_eq!(
            r.backend(),
            "main",
            "unknown or absent tenant keeps the route's upstream"
        );
        assert_eq!(r.header("x-routed-to"), None);
        assert!(!r.echo().has("x-sluicegate-route"));
    }
    let r = send(&p, Method::GET, "/plain", &[("x-tenant", "beta")], "").await;
    assert_eq!(
        r.backend(),
        "main",
        "a route without the filter is not rerouted"
    );
    assert_eq!(beta.requests(), 1);
    assert_eq!(gold.requests(), 1);

    // Many requests reuse warm instances rather than starting Python anew.
    for i in 0..40 {
        let tenant = if i % 2 == 0 { "beta" } else { "gold" };
        let r = send(&p, Method::GET, "/app/y", &[("x-tenant", tenant)], "").await;
        assert_eq!(r.backend(), tenant);
    }
    let metrics = p.admin_get("/metrics").await.text();
    let routed = metrics
        .lines()
        .find(|l| {
            l.starts_with("sluicegate_filter_counter_total")
                && l.contains("filter=\"py-router\"")
                && l.contains("name=\"routed\"")
        })
        .unwrap_or_else(|| panic!("no routed counter in\n{metrics}"));
    assert!(routed.ends_with(" 42"), "{routed}");
}

#[tokio::test]
async fn python_router_with_a_bad_config_never_goes_live() {
    let main = Backend::echo("main").await;
    let cfg = Cfg::new()
        .upstream("main", &[main.addr()])
        .route_with_filters(None, "/", "main", &["py-router"]);
    let p = start(
        cfg,
        &["py-router"],
        "[filters.config.py-router]\nroutes = { beta = \"no such/name\" }\n",
    );
    let log = p.wait_output("filter \"py-router\"", 60).await;
    assert!(log.contains("is not a valid upstream name"), "{log}");
    let r = send(&p, Method::GET, "/", &[], "").await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "fails closed");
    assert_eq!(main.requests(), 0);
}

#[tokio::test]
async fn javascript_validator_answers_400_to_bad_json_and_passes_good_json() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/api", "app", &["js-validate"])
        .route(None, "/raw", "app");
    let p = start(
        cfg,
        &["js-validate"],
        "[filters.config.js-validate]\nrequired = [\"name\"]\nmax_bytes = 64\n",
    );
    let json = [("content-type", "application/json")];

    let good = r#"{"name": "ada", "n": 1}"#;
    let r = send(&p, Method::POST, "/api/users", &json, good).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.backend(), "app");
    assert_eq!(
        r.echo().body_len,
        good.len() as u64,
        "the body reaches the upstream whole"
    );

    let seen = app.requests();
    for (body, status, needle) in [
        ("{\"name\": ", 400, "invalid JSON"),
        ("[1, 2]", 400, "must be a JSON object"),
        ("{\"n\": 1}", 400, "missing required field \"name\""),
        (
            "{\"name\": \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}",
            413,
            "the limit is 64",
        ),
    ] {
        let r = send(&p, Method::POST, "/api/users", &json, body).await;
        assert_eq!(r.status.as_u16(), status, "{body}: {r:?}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        let err: serde_json::Value = serde_json::from_slice(&r.body).expect("a JSON error");
        assert!(
            err["error"].as_str().is_some_and(|e| e.contains(needle)),
            "{body}: {err}"
        );
    }
    assert_eq!(
        app.requests(),
        seen,
        "refused bodies never reach the upstream"
    );

    let r = send(&p, Method::PUT, "/api/users/1", &json, "not json").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "PUT is checked too");
    let r = send(&p, Method::GET, "/api/users", &[], "").await;
    assert_eq!(r.status, StatusCode::OK, "GET is not checked");
    let r = send(&p, Method::POST, "/raw", &json, "not json").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a route without the filter is not checked"
    );

    let metrics = p.admin_get("/metrics").await.text();
    let count = |name: &str| {
        metrics
            .lines()
            .find(|l| {
                l.contains("filter=\"js-validate\"") && l.contains(&format!("name=\"{name}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(count("valid"), Some(1), "{metrics}");
    assert_eq!(count("invalid"), Some(5), "{metrics}");
}

#[tokio::test]
async fn c_blocklist_answers_403_to_blocked_addresses_only() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/guarded", "app", &["c-blocklist"])
        .route(None, "/open", "app");
    let p = start(
        cfg,
        &["c-blocklist"],
        "[filters.config.c-blocklist]\nblocked = [\"127.0.0.2/32\", \"127.0.1.0/24\", \"10.0.0.0/8\", \"2001:db8::/32\"]\n",
    );
    let blocked = Ipv4Addr::new(127, 0, 0, 2);
    let in_range = Ipv4Addr::new(127, 0, 1, 77);
    let allowed = Ipv4Addr::new(127, 0, 0, 3);

    for from in [blocked, in_range] {
        let r = get_from(from, p.addr(), "/guarded").await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{from}: {r:?}");
        assert!(r.text().contains("forbidden"), "{}", r.text());
    }
    assert_eq!(
        app.requests(),
        0,
        "blocked clients never reach the upstream"
    );
    for from in [allowed, Ipv4Addr::LOCALHOST] {
        let r = get_from(from, p.addr(), "/guarded").await;
        assert_eq!(r.status, StatusCode::OK, "{from} is not blocked: {r:?}");
        assert_eq!(r.backend(), "app");
    }
    let r = get_from(blocked, p.addr(), "/open").await;
    assert_eq!(r.status, StatusCode::OK, "other routes are unaffected");
    assert_eq!(app.requests(), 3);
}

#[tokio::test]
async fn c_blocklist_refuses_a_malformed_network_by_name() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["c-blocklist"]);
    let p = start(
        cfg,
        &["c-blocklist"],
        "[filters.config.c-blocklist]\nblocked = [\"10.0.0.0/33\"]\n",
    );
    let log = p.wait_output("filter \"c-blocklist\"", 30).await;
    assert!(log.contains("10.0.0.0/33"), "the bad entry is named: {log}");
    assert_eq!(
        send(&p, Method::GET, "/", &[], "").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

#[tokio::test]
async fn three_languages_in_one_chain() {
    let main = Backend::echo("main").await;
    let beta = Backend::echo("beta").await;
    let cfg = Cfg::new()
        .upstream("main", &[main.addr()])
        .upstream("beta-pool", &[beta.addr()])
        .route_with_filters(
            None,
            "/",
            "main",
            &["c-blocklist", "py-router", "js-validate"],
        );
    let p = start(
        cfg,
        &["c-blocklist", "py-router", "js-validate"],
        "[filters.config.c-blocklist]\nblocked = [\"127.0.0.2\"]\n\
         [filters.config.py-router]\nheader = \"x-tenant\"\nroutes = { beta = \"beta-pool\" }\n\
         [filters.policy.py-router]\nupstreams = [\"beta-pool\"]\n",
    );
    let r = send(&p, Method::POST, "/", &[("x-tenant", "beta")], "{\"a\": 1}").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.backend(), "beta");
    let r = send(&p, Method::POST, "/", &[("x-tenant", "beta")], "{oops").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = get_from(Ipv4Addr::new(127, 0, 0, 2), p.addr(), "/").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(beta.requests(), 1);
    assert_eq!(main.requests(), 0);
}

/// `sluicegate filter test ARGS...`: its exit status and stdout + stderr.
fn filter_test(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("filter")
        .arg("test")
        .args(args)
        .output()
        .expect("run sluicegate filter test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn filter_test_runs_each_language_offline() {
    let dir = TempDir::new("filter-test");
    let py_cfg = dir.write(
        "router.toml",
        "header = \"x-tenant\"\nroutes = { beta = \"beta-pool\" }\n",
    );
    let py = artifact("filters", "py-router");
    let (ok, out) = filter_test(&[
        py.to_str().unwrap(),
        "--config",
        py_cfg.to_str().unwrap(),
        "--request",
        "GET /app?x=1",
        "-H",
        "x-tenant: beta",
        "--response",
        "204",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("action: route to upstream \"beta-pool\""),
        "{out}"
    );
    assert!(out.contains("request: GET /app?x=1"), "{out}");
    assert!(
        out.contains("x-sluicegate-route: beta-pool"),
        "modified head: {out}"
    );
    assert!(out.contains("response: 204"), "{out}");
    assert!(
        out.contains("x-routed-to: beta-pool"),
        "response phase: {out}"
    );

    let js_cfg = dir.write("validate.toml", "required = [\"name\"]\n");
    let js = artifact("filters", "js-validate");
    let js_args = |body: &'static str| {
        vec![
            js.to_str().unwrap().to_string(),
            "--config".into(),
            js_cfg.to_str().unwrap().to_string(),
            "--request".into(),
            "POST /users".into(),
            "--body".into(),
            body.into(),
        ]
    };
    let args = js_args("{\"age\": 3}");
    let (ok, out) = filter_test(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{out}");
    assert!(out.contains("request body action: respond"), "{out}");
    assert!(out.contains("status 400"), "{out}");
    assert!(out.contains("missing required field"), "{out}");
    let args = js_args("{\"name\": \"ada\"}");
    let (ok, out) = filter_test(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{out}");
    assert!(out.contains("request body action: continue"), "{out}");

    let c_cfg = dir.write("blocklist.toml", "blocked = [\"192.0.2.0/24\"]\n");
    let c = artifact("filters", "c-blocklist");
    for (client, expect) in [
        ("192.0.2.9:5000", "status 403"),
        ("198.51.100.1:5000", "action: continue"),
    ] {
        let (ok, out) = filter_test(&[
            c.to_str().unwrap(),
            "--config",
            c_cfg.to_str().unwrap(),
            "--client",
            client,
        ]);
        assert!(ok, "{out}");
        assert!(out.contains(expect), "{client}: {out}");
    }

    // A config the filter refuses: a non-zero exit naming the reason.
    let bad = dir.write("bad.toml", "blocked = [\"not-an-address\"]\n");
    let (ok, out) = filter_test(&[c.to_str().unwrap(), "--config", bad.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("not-an-address"), "{out}");
}

#[test]
fn templates_build_and_run() {
    for (lang, expect) in [
        ("python", "python"),
        ("javascript", "javascript"),
        ("c", "c"),
    ] {
        let wasm = artifact("lang-templates", lang);
        let (ok, out) = filter_test(&[
            wasm.to_str().unwrap(),
            "--request",
            "GET /",
            "--response",
            "200",
        ]);
        assert!(ok, "{lang}: {out}");
        assert!(
            out.contains("x-hello: world"),
            "{lang} sets the request header: {out}"
        );
        assert!(
            out.contains(&format!("x-filter: {expect}")),
            "{lang} response phase: {out}"
        );
    }
}
