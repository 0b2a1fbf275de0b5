//! Operations end to end: the admin API (token, `/config` redaction,
//! `POST /reload`, `/stats`), Prometheus metrics, the access log in both
//! formats, and the HTML status page rendered by headless Chromium.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::common::{client, within, Backend, Cfg, H1Conn, Proxy, Resp};

/// An admin request with optional bearer token.
async fn admin(p: &Proxy, method: Method, path: &str, token: Option<&str>) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    within(
        10,
        path,
        client::request(p.admin_addr(), method, path, &headers, Bytes::new()),
    )
    .await
}

fn json(resp: &Resp) -> serde_json::Value {
    serde_json::from_slice(&resp.body).unwrap_or_else(|e| panic!("not JSON ({e}): {resp:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_everything_but_the_probes() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .admin()
        .upstream("app", &[app.addr()])
        .route(None, "/", "app")
        .toml()
        .replacen("[proxy]\n", "[proxy]\nadmin_token = \"let-me-in\"\n", 1);
    let p = Proxy::start(&cfg);
    for open in ["/healthz", "/readyz", "/", "/status"] {
        assert_eq!(
            admin(&p, Method::GET, open, None).await.status,
            StatusCode::OK,
            "{open}"
        );
    }
    for guarded in ["/metrics", "/config", "/filters", "/upstreams", "/stats"] {
        let resp = admin(&p, Method::GET, guarded, None).await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{guarded}");
        assert!(resp
            .header("www-authenticate")
            .unwrap()
            .starts_with("Bearer"));
        let resp = admin(&p, Method::GET, guarded, Some("let-me-out")).await;
        assert_eq!(
            resp.status,
            StatusCode::UNAUTHORIZED,
            "{guarded} with a wrong token"
        );
        let resp = admin(&p, Method::GET, guarded, Some("let-me-in")).await;
        assert_eq!(resp.status, StatusCode::OK, "{guarded}: {resp:?}");
    }
    let resp = admin(&p, Method::POST, "/reload", None).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    let resp = admin(&p, Method::GET, "/reload", Some("let-me-in")).await;
    assert_eq!(resp.status, StatusCode::METHOD_NOT_ALLOWED);
    let resp = admin(&p, Method::POST, "/reload", Some("let-me-in")).await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(json(&resp)["reloaded"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_endpoint_shows_the_running_config_with_secrets_redacted() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .admin()
        .upstream("app", &[app.addr()])
        .route(None, "/", "app")
        .extra(
            "[filters.config.auth]\nkeys = [\"key-one-supersecret\"]\nheader = \"x-api-user\"\n\
             [filters.config.other]\nupstream_password = \"hunter2\"\nclient = { secret = \"s3\", id = \"visible-id\" }\n",
        )
        .toml()
        .replacen("[proxy]\n", "[proxy]\nadmin_token = \"tok-abc\"\n", 1);
    let p = Proxy::start(&cfg);
    let resp = admin(&p, Method::GET, "/config", Some("tok-abc")).await;
    assert_eq!(resp.status, StatusCode::OK);
    let text = resp.text();
    for secret in ["key-one-supersecret", "hunter2", "\"s3\"", "tok-abc"] {
        assert!(!text.contains(secret), "{secret} leaked in /config: {text}");
    }
    let v = json(&resp);
    let c = &v["config"];
    assert_eq!(c["proxy"]["admin_token"], "[redacted]");
    assert_eq!(c["filters"]["config"]["auth"]["keys"], "[redacted]");
    assert_eq!(c["filters"]["config"]["auth"]["header"], "x-api-user");
    assert_eq!(
        c["filters"]["config"]["other"]["client"]["id"],
        "visible-id"
    );
    assert_eq!(c["upstream"][0]["name"], "app");
    assert_eq!(c["upstream"][0]["endpoints"][0], app.addr().to_string());
    assert!(
        v["source"].as_str().unwrap().ends_with("sluicegate.toml"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_applies_a_good_config_and_reports_a_bad_one() {
    let one = Backend::echo("one").await;
    let two = Backend::echo("two").await;
    let base = Cfg::new()
        .admin()
        .upstream("app", &[one.addr()])
        .route(None, "/", "app");
    let p = Proxy::start(&base.toml());
    assert_eq!(p.get("/", &[]).await.backend(), "one");
    let running = std::fs::read_to_string(p.config_path()).unwrap();

    // A config naming an unknown upstream: refused with file, line and key,
    // and the running config keeps serving.
    let bad = running.replace("upstream = \"app\"", "upstream = \"nope\"");
    std::fs::write(p.config_path(), &bad).unwrap();
    let resp = admin(&p, Method::POST, "/reload", None).await;
    assert_eq!(resp.status, StatusCode::UNPROCESSABLE_ENTITY, "{resp:?}");
    let err = json(&resp)["error"].as_str().unwrap().to_string();
    assert!(
        err.contains("route[0].upstream") && err.contains("nope"),
        "{err}"
    );
    assert_eq!(p.get("/", &[]).await.backend(), "one");

    let good = running.replace(&one.addr().to_string(), &two.addr().to_string());
    std::fs::write(p.config_path(), &good).unwrap();
    let resp = admin(&p, Method::POST, "/reload", None).await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(p.get("/", &[]).await.backend(), "two");
    let config = json(&admin(&p, Method::GET, "/config", None).await);
    assert_eq!(
        config["config"]["upstream"][0]["endpoints"][0],
        two.addr().to_string()
    );
}

/// The value of the first metric line starting with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_routes_upstreams_connections_endpoints_and_reloads() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .admin()
        .upstream("app", &[app.addr()])
        .upstream_raw("down", &["127.0.0.1:1"])
        .route(None, "/", "app")
        .route(None, "/down", "down")
        .toml();
    let p = Proxy::start(&cfg);
    for _ in 0..3 {
        assert_eq!(p.get("/ok", &[]).await.status, StatusCode::OK);
    }
    assert_eq!(p.get("/down", &[]).await.status, StatusCode::BAD_GATEWAY);
    // An idle keep-alive connection is open while we scrape.
    let mut conn: H1Conn = H1Conn::connect(p.addr()).await;
    let r = conn
        .send(client::build(Method::GET, "/held", &[], Bytes::new()))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let resp = admin(&p, Method::POST, "/reload", None).await;
    assert_eq!(resp.status, StatusCode::OK);

    let text = admin(&p, Method::GET, "/metrics", None).await.text();
    let get =
        |prefix: &str| metric(&text, prefix).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
    assert_eq!(
        get("sluicegate_requests_total{route=\"*/\",status=\"2xx\"}"),
        4.0
    );
    assert_eq!(
        get("sluicegate_requests_total{route=\"*/down\",status=\"5xx\"}"),
        1.0
    );
    assert_eq!(get("sluicegate_request_seconds_count{route=\"*/\"}"), 4.0);
    assert!(
        text.contains("sluicegate_request_seconds_bucket{route=\"*/\",le=\""),
        "{text}"
    );
    let ep = app.addr().to_string();
    assert_eq!(
        get(&format!("sluicegate_upstream_requests_total{{upstream=\"app\",endpoint=\"{ep}\",status=\"2xx\"}}")),
        4.0
    );
    assert_eq!(
        get("sluicegate_upstream_response_seconds_count{upstream=\"app\"}"),
        4.0
    );
    assert!(get("sluicegate_open_connections") >= 1.0, "{text}");
    assert_eq!(
        get(&format!(
            "sluicegate_endpoint_healthy{{upstream=\"app\",endpoint=\"{ep}\"}}"
        )),
        1.0
    );
    assert_eq!(get("sluicegate_reloads_total{kind=\"config\"}"), 1.0);
    assert!(
        text.contains("# TYPE sluicegate_request_seconds histogram"),
        "{text}"
    );

    let stats = json(&admin(&p, Method::GET, "/stats", None).await);
    assert_eq!(stats["requests"], 5, "{stats}");
    assert_eq!(stats["responses"]["5xx"], 1, "{stats}");
    assert!(stats["open_connections"].as_u64().unwrap() >= 1, "{stats}");
    drop(conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_common_lines_to_stdout() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(None, "/api", "app")
        .toml()
        .replacen(
            "[proxy]\n",
            "[proxy.access_log]\nformat = \"common\"\n\n[proxy]\n",
            1,
        );
    let p = Proxy::start(&cfg);
    let resp = p
        .get(
            "/api/items?id=7",
            &[
                ("user-agent", "e2e \"quoted\" agent"),
                ("referer", "http://r.test/"),
            ],
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        p.get("/nothing-here", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    p.wait_output("\"GET /nothing-here HTTP/1.1\" 404", 5).await;
    let out = p.stdout_text();
    let line = out
        .lines()
        .find(|l| l.contains("/api/items"))
        .unwrap_or_else(|| panic!("no access line in stdout:\n{out}"));
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains("+0000] \"GET /api/items?id=7 HTTP/1.1\" 200 "),
        "{line}"
    );
    assert!(
        line.contains(
            "\"http://r.test/\" \"e2e \\\"quoted\\\" agent\" route=*/api upstream=app ms="
        ),
        "{line}"
    );
    let miss = out.lines().find(|l| l.contains("/nothing-here")).unwrap();
    assert!(miss.contains("route=none upstream=-"), "{miss}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_json_lines_to_a_file() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(Some("shop.test"), "/", "app")
        .toml()
        .replacen(
            "[proxy]\n",
            "[proxy.access_log]\nformat = \"json\"\npath = \"logs/access.log\"\n\n[proxy]\n",
            1,
        );
    let p = Proxy::builder(&cfg).file("logs/.keep", "").start();
    for i in 0..5 {
        let resp = p
            .request(
                Method::POST,
                &format!("/cart/{i}"),
                &[("host", "shop.test")],
                "abc",
            )
            .await;
        assert_eq!(resp.status, StatusCode::OK);
    }
    let path = p.dir().join("logs/access.log");
    let lines = within(5, "5 access log lines", async {
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() >= 5 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for (i, line) in lines.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(v["method"], "POST");
        assert_eq!(v["uri"], format!("/cart/{i}"));
        assert_eq!(v["host"], "shop.test");
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream"], "app");
        assert_eq!(v["route"], "shop.test/");
        assert_eq!(v["client"], "127.0.0.1");
        assert!(v["bytes"].as_u64().unwrap() > 0, "{line}");
        assert!(v["duration_ms"].as_f64().unwrap() >= 0.0, "{line}");
        assert!(v["time"].as_str().unwrap().ends_with('Z'), "{line}");
    }
    // Nothing on stdout: the log went to the file only.
    assert!(!p.stdout_text().contains("/cart/"), "{}", p.stdout_text());
}

/// The headless Chromium binary (`scripts/test.sh` installs Debian's).
fn chromium() -> String {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if found {
            return name.to_string();
        }
    }
    panic!("no chromium on PATH: install Debian's `chromium` (scripts/test.sh does)");
}

/// Load `url` in headless Chromium, let the page's script run, and return
/// the DOM; also write a screenshot to `png` when given.
pub(crate) async fn render(url: &str, png: Option<&std::path::Path>) -> String {
    let browser = chromium();
    let profile = crate::common::TempDir::new("chromium");
    let mut args = vec![
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--no-first-run".into(),
        // No background connections: this machine's closed network refuses
        // them, and waiting on them slows the render.
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        "--disable-quic".into(),
        format!("--user-data-dir={}", profile.path().display()),
        "--virtual-time-budget=5000".into(),
        "--window-size=1100,760".into(),
    ];
    match png {
        Some(p) => args.push(format!("--screenshot={}", p.display())),
        None => args.push("--dump-dom".into()),
    }
    args.push(url.to_string());
    let out = tokio::process::Command::new(&browser)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(90, "chromium to render the status page", out)
        .await
        .expect("run chromium");
    assert!(
        out.status.success(),
        "{browser} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id` in a dumped DOM (first occurrence).
pub(crate) fn text_of(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the DOM:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').map_or(rest.len(), |i| i + 1);
    rest[start..].split('<').next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_filters_upstreams_and_counters_in_chromium() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .admin()
        .upstream("app", &[app.addr()])
        .upstream_raw("down", &["127.0.0.1:1"])
        .route_with_filters(None, "/", "app", &["add-header"])
        .route(None, "/down", "down")
        .extra("[filters]\ndir = \"@DIR@/filters\"\n")
        .toml()
        .replacen("[proxy]\n", "[proxy]\nadmin_token = \"page-token\"\n", 1);
    let wasm = std::fs::read(format!(
        "{}/../target/filters/add-header.wasm",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("target/filters/add-header.wasm (run scripts/build-filters.sh)");
    let p = Proxy::builder(&cfg)
        .file("filters/add-header.wasm", wasm)
        .start();
    for _ in 0..7 {
        assert_eq!(p.get("/", &[]).await.status, StatusCode::OK);
    }
    // Three failures eject nothing yet (max_failures 5), but show in the row.
    for _ in 0..3 {
        assert_eq!(p.get("/down", &[]).await.status, StatusCode::BAD_GATEWAY);
    }
    let admin = p.admin_addr();

    let dom = render(&format!("http://{admin}/#token=page-token"), None).await;
    assert_eq!(text_of(&dom, "state"), "ready", "{dom}");
    assert_eq!(text_of(&dom, "requests"), "10", "{dom}");
    assert_eq!(text_of(&dom, "r2xx"), "7", "{dom}");
    assert_eq!(text_of(&dom, "r5xx"), "3", "{dom}");
    assert!(
        dom.contains("<td>add-header</td><td class=\"ok\">active</td>"),
        "filter row missing:\n{dom}"
    );
    let row = format!(
        "<td>app</td><td>round_robin</td><td>{}</td><td>1</td><td class=\"ok\">healthy</td><td>0</td><td>7</td><td>0</td>",
        app.addr()
    );
    assert!(dom.contains(&row), "endpoint row missing ({row}):\n{dom}");
    assert!(
        dom.contains("<td>down</td><td>round_robin</td><td>127.0.0.1:1</td>"),
        "{dom}"
    );
    assert_eq!(text_of(&dom, "error"), "", "{dom}");

    // Without the token the page loads but its data does not.
    let dom = render(&format!("http://{admin}/status"), None).await;
    // The message does not depend on which of the page's three calls
    // answers first (an earlier version named that call, and flaked).
    assert!(
        dom.contains("cannot refresh: the admin API needs its token: open this page as /#token=&lt;admin_token&gt; (HTTP 401)"),
        "{dom}"
    );

    // A wrong token is told apart from a missing one.
    let dom = render(&format!("http://{admin}/#token=wrong"), None).await;
    assert!(
        dom.contains("cannot refresh: the admin token in the address was refused (HTTP 401)"),
        "{dom}"
    );

    // A screenshot renders (docs/img/admin.png is made this way).
    let dir = crate::common::TempDir::new("shot");
    let png = dir.path().join("admin.png");
    render(&format!("http://{admin}/#token=page-token"), Some(&png)).await;
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "{} bytes",
        bytes.len()
    );
    if let Ok(dest) = std::env::var("SLUICEGATE_SCREENSHOT") {
        std::fs::copy(&png, dest).expect("copy the screenshot");
    }
}
