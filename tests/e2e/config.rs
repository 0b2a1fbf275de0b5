//! `sluicegate check` and `run` on good and bad configuration files.
//!
//! A bad config must make both commands exit non-zero with a message on
//! stderr naming the file, the line (`line N`) and the offending key.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;

/// A valid config, one setting per line so each case below can break one
/// line and name it:
///
/// ```text
///  1 [proxy]
///  2 listen = ["127.0.0.1:PORT"]
///  3 workers = 1
///  4
///  5 [[upstream]]
///  6 name = "app"
///  7 endpoints = ["127.0.0.1:9001"]
///  8
///  9 [[route]]
/// 10 path_prefix = "/"
/// 11 upstream = "app"
/// ```
fn good(listen: SocketAddr) -> Vec<String> {
    [
        "[proxy]",
        &format!("listen = [\"{listen}\"]"),
        "workers = 1",
        "",
        "[[upstream]]",
        "name = \"app\"",
        "endpoints = [\"127.0.0.1:9001\"]",
        "",
        "[[route]]",
        "path_prefix = \"/\"",
        "upstream = \"app\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The good config with line `n` (1-based) replaced.
fn with_line(listen: SocketAddr, n: usize, text: &str) -> String {
    let mut lines = good(listen);
    lines[n - 1] = text.to_string();
    lines.join("\n") + "\n"
}

/// A broken config: its text, the line at fault and what stderr must name.
struct Bad {
    what: &'static str,
    text: String,
    line: usize,
    names: Vec<&'static str>,
}

fn bad_configs(listen: SocketAddr) -> Vec<Bad> {
    vec![
        Bad {
            what: "TOML syntax error",
            text: with_line(listen, 6, "name = = \"app\""),
            line: 6,
            names: vec!["name"],
        },
        Bad {
            what: "unknown key in [proxy]",
            text: with_line(listen, 3, "listen_typo = 1"),
            line: 3,
            names: vec!["listen_typo"],
        },
        Bad {
            what: "unknown key in [[route]]",
            text: with_line(listen, 10, "path_prefx = \"/\""),
            line: 10,
            names: vec!["path_prefx"],
        },
        Bad {
            what: "route naming an unknown upstream",
            text: with_line(listen, 11, "upstream = \"nope\""),
            line: 11,
            names: vec!["route", "upstream", "nope"],
        },
        Bad {
            what: "upstream with no endpoints",
            text: with_line(listen, 7, "endpoints = []"),
            line: 7,
            names: vec!["endpoints", "app"],
        },
        Bad {
            what: "bad endpoint address",
            text: with_line(listen, 7, "endpoints = [\"127.0.0.1:notaport\"]"),
            line: 7,
            names: vec!["endpoints", "127.0.0.1:notaport"],
        },
        Bad {
            what: "bad listen address",
            text: with_line(listen, 2, "listen = [\"not-an-address\"]"),
            line: 2,
            names: vec!["listen", "not-an-address"],
        },
        Bad {
            what: "bad admin address",
            text: with_line(listen, 3, "admin = \"localhost\""),
            line: 3,
            names: vec!["admin", "localhost"],
        },
    ]
}

/// Assert a failed command's stderr names the file, `line N` and each of `names`.
fn assert_names(
    out: &std::process::Output,
    what: &str,
    file: &str,
    line: Option<usize>,
    names: &[&str],
) {
    assert!(
        !out.status.success(),
        "{what}: should fail\n{}",
        describe(out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(file),
        "{what}: stderr does not name the file {file}\n{}",
        describe(out)
    );
    if let Some(n) = line {
        assert!(
            stderr.contains(&format!("line {n}")),
            "{what}: stderr does not say `line {n}`\n{}",
            describe(out)
        );
    }
    for name in names {
        assert!(
            stderr.contains(name),
            "{what}: stderr does not name {name:?}\n{}",
            describe(out)
        );
    }
}

async fn check_case(case: &Bad) {
    let dir = TempDir::new("config");
    let path = dir.write("bad.toml", &case.text);
    let path = path.to_str().unwrap();
    let out = run_cli(&["check", "--config", path], 15).await;
    assert_names(&out, case.what, path, Some(case.line), &case.names);
}

async fn check_named(what: &str) {
    let case = bad_configs(free_addr())
        .into_iter()
        .find(|c| c.what == what)
        .expect("known case");
    check_case(&case).await;
}

#[tokio::test]
async fn check_accepts_a_good_config() {
    let dir = TempDir::new("config");
    let listen = free_addr();
    let path = dir.write("good.toml", good(listen).join("\n") + "\n");
    let out = run_cli(&["check", "--config", path.to_str().unwrap()], 15).await;
    assert!(out.status.success(), "{}", describe(&out));
    // `check` does not serve.
    assert!(std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(300)).is_err());

    // The full example of the README is valid too.
    let full = format!(
        r#"[proxy]
listen = ["{listen}"]
admin  = "{admin}"
workers = 2
[proxy.timeouts]
connect_ms = 2000
header_read_ms = 10000
upstream_response_ms = 30000
idle_ms = 60000
drain_ms = 10000
[[upstream]]
name = "app"
endpoints = ["127.0.0.1:9001", "127.0.0.1:9002"]
[[upstream]]
name = "static"
endpoints = ["127.0.0.1:9003"]
[[route]]
host = "example.com"
path_prefix = "/api"
upstream = "app"
[[route]]
path_prefix = "/"
upstream = "static"
"#,
        admin = free_addr()
    );
    let path = dir.write("full.toml", full);
    let out = run_cli(&["check", "--config", path.to_str().unwrap()], 15).await;
    assert!(out.status.success(), "{}", describe(&out));
}

#[tokio::test]
async fn check_rejects_a_missing_file() {
    let dir = TempDir::new("config");
    let path = dir.path().join("does-not-exist.toml");
    let path = path.to_str().unwrap();
    let out = run_cli(&["check", "--config", path], 15).await;
    assert_names(&out, "missing file", path, None, &[]);
}

#[tokio::test]
async fn check_rejects_a_toml_syntax_error() {
    check_named("TOML syntax error").await;
}

#[tokio::test]
async fn check_rejects_an_unknown_proxy_key() {
    check_named("unknown key in [proxy]").await;
}

#[tokio::test]
async fn check_rejects_an_unknown_route_key() {
    check_named("unknown key in [[route]]").await;
}

#[tokio::test]
async fn check_rejects_a_route_to_an_unknown_upstream() {
    check_named("route naming an unknown upstream").await;
}

#[tokio::test]
async fn check_rejects_empty_endpoints() {
    check_named("upstream with no endpoints").await;
}

#[tokio::test]
async fn check_rejects_a_bad_endpoint_address() {
    check_named("bad endpoint address").await;
}

#[tokio::test]
async fn check_rejects_a_bad_listen_address() {
    check_named("bad listen address").await;
}

#[tokio::test]
async fn check_rejects_a_bad_admin_address() {
    check_named("bad admin address").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_bad_configs_without_serving() {
    let dir = TempDir::new("config");
    let listen = free_addr();
    let mut cases = bad_configs(listen);
    // A missing file too.
    cases.push(Bad {
        what: "missing file",
        text: String::new(),
        line: 0,
        names: vec![],
    });
    for (i, case) in cases.iter().enumerate() {
        let path = if case.what == "missing file" {
            dir.path().join("does-not-exist.toml")
        } else {
            dir.write(&format!("bad{i}.toml"), &case.text)
        };
        let path = path.to_str().unwrap();
        let out = run_cli(&["run", "--config", path], 15).await;
        assert!(
            !out.status.success(),
            "run with a {}: should fail\n{}",
            case.what,
            describe(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(path),
            "run with a {}: stderr does not name the file\n{}",
            case.what,
            describe(&out)
        );
        for name in &case.names {
            assert!(
                stderr.contains(name),
                "run with a {}: stderr does not name {name:?}\n{}",
                case.what,
                describe(&out)
            );
        }
        assert!(
            std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(300)).is_err(),
            "something serves on {listen} after a failed run"
        );
    }
}

/// A second proxy started on a port the first one serves fails to start,
/// naming the address, and the first keeps all of its clients: the
/// listeners' SO_REUSEPORT would otherwise let the second silently take a
/// share of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_on_a_taken_port_fails_and_the_first_keeps_serving() {
    let app = Backend::echo("app").await;
    let first = Proxy::start(
        &Cfg::new()
            .upstream("app", &[app.addr()])
            .route(None, "/", "app")
            .toml(),
    );
    let taken = first.addr();
    let dir = TempDir::new("config");
    let text = format!(
        "[proxy]\nlisten = [\"{taken}\"]\nworkers = 2\n\n[[upstream]]\nname = \"app\"\nendpoints = [\"{}\"]\n\n[[route]]\npath_prefix = \"/\"\nupstream = \"app\"\n",
        app.addr()
    );
    let path = dir.write("second.toml", text);
    let out = run_cli(&["run", "--config", path.to_str().unwrap()], 15).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {taken}")) && stderr.contains("in use"),
        "{}",
        describe(&out)
    );
    for _ in 0..20 {
        let r = first.get("/", &[]).await;
        assert_eq!(r.status.as_u16(), 200, "{r:?}");
        assert_eq!(r.backend(), "app");
    }
}
