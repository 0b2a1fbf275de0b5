//! Trust boundaries for untrusted filters, tried as an attacker would: a
//! planted artifact cache, a filter that routes outside its grant, reads
//! credentials, writes forwarding headers, answers when it may not, fills
//! KV past its quota, or fails half-way; and `check --filters`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::common::start_with_filters as start;
use crate::common::{client, metric_value, wasm, within, Backend, Cfg, Proxy, Resp, TempDir, BIN};

async fn get(p: &Proxy, path: &str, headers: &[(&str, &str)]) -> Resp {
    within(
        10,
        path,
        client::request(p.addr(), Method::GET, path, headers, Bytes::new()),
    )
    .await
}

async fn metric(p: &Proxy, name: &str) -> f64 {
    let text = p.admin_get("/metrics").await.text();
    metric_value(&text, name)
}

// ---- the artifact cache -------------------------------------------------

/// The cached artifact files of `dir` (`*.cwasm`).
fn artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "cwasm"));
    v.sort();
    v
}

/// Wait until `dir` holds `n` artifacts (they are written off the load
/// path).
async fn wait_artifacts(dir: &Path, n: usize) -> Vec<PathBuf> {
    within(20, "artifacts written", async {
        loop {
            let a = artifacts(dir);
            if a.len() >= n {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// The artifact of the component with these bytes.
fn artifact_of(dir: &Path, component: &[u8]) -> PathBuf {
    let hash = hex_sha256(component);
    artifacts(dir)
        .into_iter()
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&hash))
        })
        .unwrap_or_else(|| panic!("no artifact for {hash} in {}", dir.display()))
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A proxy with add-header on `/a` and probe on `/p`, caching artifacts in
/// `cache`.
fn cached_proxy(app: &Backend, cache: &Path) -> Proxy {
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/a", "app", &["add-header"])
        .route_with_filters(None, "/p", "app", &["probe"]);
    start(
        cfg,
        &["add-header", "probe"],
        &format!(
            "cache_dir = {:?}\n[filters.config.add-header]\nrequest_headers = {{ \"x-added\" = \"yes\" }}\n",
            cache.display().to_string()
        ),
    )
}

/// add-header still serves correctly: its header reaches the upstream.
async fn serves_correctly(p: &Proxy) {
    let r = get(p, "/a", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.echo().one("x-added"), "yes", "add-header ran as itself");
}

#[tokio::test]
async fn planted_artifacts_are_refused_and_the_filter_compiles_in_memory() {
    let app = Backend::echo("app").await;
    let scratch = TempDir::new("cache");
    let cache = scratch.path().join("cache");
    {
        let p = cached_proxy(&app, &cache);
        serves_correctly(&p).await;
        wait_artifacts(&cache, 2).await;
    }
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the cache directory is private");
    let add_header = artifact_of(&cache, &wasm("add-header"));
    let probe = artifact_of(&cache, &wasm("probe"));
    assert_eq!(
        std::fs::metadata(&add_header).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // 1. The right name, the wrong bytes.
    let mut bytes = std::fs::read(&add_header).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&add_header, &bytes).unwrap();
    {
        let p = cached_proxy(&app, &cache);
        serves_correctly(&p).await;
        let log = p.wait_output("refusing a cached filter artifact", 10).await;
        assert!(log.contains("bad MAC"), "{log}");
        assert!(metric(&p, "sluicegate_filter_artifacts_refused_total").await >= 1.0);
    }

    // 2. Another component's valid artifact under this one's name.
    wait_artifacts(&cache, 2).await;
    std::fs::copy(&probe, &add_header).unwrap();
    {
        let p = cached_proxy(&app, &cache);
        serves_correctly(&p).await;
        let log = p.wait_output("refusing a cached filter artifact", 10).await;
        assert!(log.contains("bad MAC"), "{log}");
    }

    // 3. A valid artifact that others could have written (mode 0666).
    within(20, "artifact rewritten", async {
        loop {
            // The proxy above replaced the refused file with a good one.
            let b = std::fs::read(&add_header).unwrap_or_default();
            if b != std::fs::read(&probe).unwrap_or_default() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    std::fs::set_permissions(&add_header, std::fs::Permissions::from_mode(0o666)).unwrap();
    {
        let p = cached_proxy(&app, &cache);
        serves_correctly(&p).await;
        let log = p.wait_output("refusing a cached filter artifact", 10).await;
        assert!(log.contains("world-writable"), "{log}");
    }

    // 4. An artifact owned by another user.
    std::fs::set_permissions(&add_header, std::fs::Permissions::from_mode(0o600)).unwrap();
    let chowned = std::process::Command::new("chown")
        .arg("nobody")
        .arg(&add_header)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if chowned {
        let p = cached_proxy(&app, &cache);
        serves_correctly(&p).await;
        let log = p.wait_output("refusing a cached filter artifact", 10).await;
        assert!(log.contains("owned by uid"), "{log}");
    }
}

#[tokio::test]
async fn a_cache_directory_of_another_user_is_refused() {
    let app = Backend::echo("app").await;
    let scratch = TempDir::new("cache-other");
    let cache = scratch.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let p = cached_proxy(&app, &cache);
    serves_correctly(&p).await;
    let log = p
        .wait_output("refusing the filter artifact cache", 10)
        .await;
    assert!(log.contains("world-writable"), "{log}");
    assert!(artifacts(&cache).is_empty(), "nothing written there");
    drop(p);

    let chowned = std::process::Command::new("chown")
        .arg("nobody")
        .arg(&cache)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    if chowned {
        let p = cached_proxy(&app, &cache);
        serves_correctly(&p).await;
        let log = p
            .wait_output("refusing the filter artifact cache", 10)
            .await;
        assert!(log.contains("owned by uid"), "{log}");
    }
}

// ---- the manifest ---------------------------------------------------------

#[tokio::test]
async fn routing_outside_the_grant_takes_the_filters_on_error() {
    let app = Backend::echo("app").await;
    let admin = Backend::echo("admin").await;
    let canary = Backend::echo("canary").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("admin", &[admin.addr()])
        .upstream("canary", &[canary.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let toml = "[filters.policy.probe]\nupstreams = [\"canary\"]\n";
    let p = start(cfg.clone(), &["probe"], toml);
    let r = get(&p, "/", &[("x-probe-action", "route=canary")]).await;
    assert_eq!(r.backend(), "canary", "a granted upstream");
    let r = get(&p, "/", &[("x-probe-action", "route=admin")]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "fail_closed");
    assert_eq!(admin.requests(), 0, "the forbidden upstream saw nothing");
    let log = p.wait_output("which its policy does not grant", 5).await;
    assert!(log.contains("\"admin\""), "{log}");
    let denied = p.admin_get("/metrics").await.text();
    assert!(
        denied.contains("sluicegate_filter_denied_total{filter=\"probe\",what=\"route\"}"),
        "counted"
    );
    drop(p);

    // Under fail_open the filter is skipped: the route's own upstream.
    let p = start(
        cfg.clone(),
        &["probe"],
        "[filters.policy.probe]\nupstreams = [\"canary\"]\non_error = \"fail_open\"\n",
    );
    let r = get(&p, "/", &[("x-probe-action", "route=admin")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.backend(), "app");
    assert!(
        !r.echo().has("x-probe-method"),
        "the skipped filter's edits are gone too"
    );
    assert_eq!(admin.requests(), 0);
    drop(p);

    // No grant at all: no routing. "*": anywhere.
    let p = start(cfg.clone(), &["probe"], "");
    let r = get(&p, "/", &[("x-probe-action", "route=canary")]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    drop(p);
    let p = start(
        cfg,
        &["probe"],
        "[filters.policy.probe]\nupstreams = [\"*\"]\n",
    );
    let r = get(&p, "/", &[("x-probe-action", "route=admin")]).await;
    assert_eq!(r.backend(), "admin");
    let status: serde_json::Value =
        serde_json::from_str(&p.admin_get("/filters").await.text()).unwrap();
    let probe = &status["filters"][0];
    assert_eq!(probe["grants"]["upstreams"], "any", "{probe}");
}

#[tokio::test]
async fn hidden_headers_never_reach_the_filter_but_reach_the_upstream() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(
        cfg,
        &["probe"],
        "[filters.policy.probe]\nhide_headers = [\"authorization\", \"cookie\"]\n",
    );
    let r = get(
        &p,
        "/",
        &[
            ("authorization", "Bearer s3cret"),
            ("cookie", "sid=1"),
            ("x-probe-all", "authorization"),
        ],
    )
    .await;
    let e = r.echo();
    assert_eq!(e.one("x-probe-all-values"), "", "header-all sees nothing");
    let names = e.one("x-probe-names");
    assert!(
        !names.contains("authorization") && !names.contains("cookie"),
        "header-names hides them: {names}"
    );
    assert!(names.contains("x-probe-all"), "{names}");
    assert_eq!(
        e.one("authorization"),
        "Bearer s3cret",
        "the upstream gets it"
    );
    assert_eq!(e.one("cookie"), "sid=1");
    let status: serde_json::Value =
        serde_json::from_str(&p.admin_get("/filters").await.text()).unwrap();
    assert_eq!(
        status["filters"][0]["grants"]["hide_headers"],
        serde_json::json!(["authorization", "cookie"])
    );
}

#[tokio::test]
async fn protected_headers_cannot_be_written_by_default() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(cfg.clone(), &["probe"], "");
    let r = get(&p, "/", &[("x-probe-append", "x-forwarded-for=6.6.6.6")]).await;
    let e = r.echo();
    assert!(
        e.one("x-probe-error").contains("protected"),
        "the filter is told: {:?}",
        e.all("x-probe-error")
    );
    assert!(
        !e.one("x-forwarded-for").contains("6.6.6.6"),
        "the upstream sees only the proxy's: {}",
        e.one("x-forwarded-for")
    );
    let r = get(&p, "/", &[("x-probe-remove", "host")]).await;
    assert!(r.echo().has("host"), "host cannot be removed");
    drop(p);

    // Granted by clearing the list.
    let p = start(
        cfg,
        &["probe"],
        "[filters.policy.probe]\nprotect_headers = []\n",
    );
    let r = get(&p, "/", &[("x-probe-append", "x-forwarded-for=6.6.6.6")]).await;
    assert!(r.echo().one("x-forwarded-for").contains("6.6.6.6"));
}

#[tokio::test]
async fn a_filter_that_may_not_respond_is_refused_and_kv_quotas_hold() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(
        cfg,
        &["probe"],
        "[filters.policy.probe]\nmay_respond = false\nkv_max_entries = 1\n",
    );
    let r = get(&p, "/", &[("x-probe-action", "respond")]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.header("x-probe-local").is_none());
    // The first key fits; its round trip's second key does not.
    let r = get(&p, "/", &[("x-probe-kv", "a")]).await;
    let e = r.echo();
    assert_eq!(e.one("x-probe-count"), "1");
    assert!(
        e.one("x-probe-kv-ok").starts_with("false"),
        "quota of 1 entry"
    );
    let r = get(&p, "/", &[("x-probe-kv", "b")]).await;
    assert!(
        r.echo().one("x-probe-count").contains("full"),
        "{:?}",
        r.echo().one("x-probe-count")
    );
}

#[tokio::test]
async fn a_filter_that_traps_after_editing_leaves_no_trace_under_fail_open() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["probe"]);
    let p = start(
        cfg,
        &["probe"],
        "[filters.policy.probe]\non_error = \"fail_open\"\n",
    );
    let r = get(
        &p,
        "/",
        &[
            ("x-probe-trap", "request"),
            ("x-probe-append", "x-half=done"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "the upstream answers: {r:?}");
    let e = r.echo();
    assert!(
        !e.has("x-probe-method"),
        "no edit of the trapped call survives"
    );
    assert!(!e.has("x-half"), "no appended header either");
    assert!(
        r.header("x-probe-response").is_some(),
        "the response phase still runs"
    );

    let r = get(&p, "/", &[("x-probe-trap", "response")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.echo().has("x-probe-method"),
        "the request phase's edits stand"
    );
    assert!(
        r.header("x-probe-response").is_none() && r.header("x-probe-status-seen").is_none(),
        "the trapped response phase left nothing"
    );
}

// ---- check --filters ------------------------------------------------------

fn check(config: &Path) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["check", "--filters", "--config"])
        .arg(config)
        .output()
        .expect("run sluicegate check")
}

#[test]
fn check_filters_names_the_broken_filter_and_passes_the_demo() {
    let dir = TempDir::new("check");
    let filters = dir.path().join("filters");
    std::fs::create_dir_all(&filters).unwrap();
    std::fs::write(filters.join("good.wasm"), wasm("add-header")).unwrap();
    std::fs::write(filters.join("broken.wasm"), b"\0asm not really").unwrap();
    std::fs::write(filters.join("badinit.wasm"), wasm("bad-init")).unwrap();
    let toml = format!(
        "[proxy]\nlisten = [\"127.0.0.1:1\"]\n[[upstream]]\nname = \"app\"\nendpoints = [\"127.0.0.1:2\"]\n[[route]]\nupstream = \"app\"\nfilters = [\"good\", \"broken\", \"badinit\", \"absent\"]\n[filters]\ndir = {:?}\n",
        filters.display().to_string()
    );
    let config = dir.path().join("c.toml");
    std::fs::write(&config, toml).unwrap();
    let out = check(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("broken.wasm") && err.contains("not a valid filter component"),
        "{err}"
    );
    assert!(
        err.contains("badinit.wasm") && err.contains("init failed"),
        "{err}"
    );
    assert!(err.contains("\"absent\""), "{err}");
    assert!(!err.contains("good.wasm"), "{err}");

    // The demo's config, with its filter directory.
    let demo = include_str!("../../host/src/demo.toml");
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/filters");
    let config = dir.path().join("demo.toml");
    std::fs::write(
        &config,
        demo.replacen("dir = \"target/filters\"", &format!("dir = {built:?}"), 1),
    )
    .unwrap();
    let out = check(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_demo_starts_with_only_the_examples_and_no_error() {
    // The demo's fixed ports (8080, 9001, 9002, 9901): skip if a demo or
    // anything else already holds them on this machine.
    let taken = [
        "127.0.0.1:8080",
        "127.0.0.1:9001",
        "127.0.0.1:9002",
        "127.0.0.1:9901",
    ]
    .iter()
    .any(|a| std::net::TcpListener::bind(a).is_err());
    if taken {
        eprintln!("demo ports in use: skipped");
        return;
    }
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/filters");
    let mut child = std::process::Command::new(BIN)
        .args(["demo", "--filters", built])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the demo");
    let admin: std::net::SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let filters = within(60, "the demo's admin API", async {
        loop {
            if let Ok(s) = tokio::net::TcpStream::connect(admin).await {
                drop(s);
                let r = client::request(admin, Method::GET, "/filters", &[], Bytes::new()).await;
                let v: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
                let names: Vec<String> = v["filters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| format!("{}={}", f["name"].as_str().unwrap(), f["state"]))
                    .collect();
                return names;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let r = get_at("127.0.0.1:8080".parse().unwrap(), "/hello").await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(r.status, StatusCode::OK, "{log}");
    assert!(
        !log.contains("ERROR"),
        "the demo's first start logs no ERROR:\n{log}"
    );
    assert!(
        filters
            .iter()
            .all(|f| !f.starts_with("hostile") && !f.starts_with("probe")),
        "only the examples: {filters:?}"
    );
    assert!(
        filters.iter().all(|f| f.ends_with("=\"active\"")),
        "{filters:?}"
    );
}

async fn get_at(addr: std::net::SocketAddr, path: &str) -> Resp {
    within(
        10,
        path,
        client::request(addr, Method::GET, path, &[], Bytes::new()),
    )
    .await
}
