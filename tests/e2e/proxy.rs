//! The core proxy: routing, header rules, balancing, pooling, h2c,
//! WebSocket, admin and CLI basics.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode, Version};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// A proxy with one catch-all route to `backend`.
fn proxy_to(backend: &Backend) -> Proxy {
    Proxy::start(
        &Cfg::new()
            .upstream("app", &[backend.addr()])
            .route(None, "/", "app")
            .toml(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_longest_prefix() {
    let (a, b, c, d) = (
        Backend::echo("a").await,
        Backend::echo("b").await,
        Backend::echo("c").await,
        Backend::echo("d").await,
    );
    let cfg = Cfg::new()
        .upstream("a", &[a.addr()])
        .upstream("b", &[b.addr()])
        .upstream("c", &[c.addr()])
        .upstream("d", &[d.addr()])
        // Declared shortest first: order in the file must not matter.
        .route(None, "/", "d")
        .route(None, "/api", "c")
        .route(Some("example.com"), "/api", "a")
        .route(Some("example.com"), "/api/v2", "b")
        .toml();
    let proxy = Proxy::start(&cfg);
    let cases = [
        ("example.com", "/api/x", "a"),
        ("example.com", "/api", "a"),
        ("example.com", "/api/v2/users?id=1", "b"),
        ("example.com", "/api/v2", "b"),
        ("EXAMPLE.com:8080", "/api/v2/x", "b"),
        ("example.com", "/apiary", "d"),
        ("example.com", "/other", "d"),
        ("other.test", "/api/v2/x", "c"),
        ("other.test", "/api", "c"),
        ("other.test", "/", "d"),
        ("other.test", "/x/y", "d"),
    ];
    for (host, path, want) in cases {
        let resp = proxy.get(path, &[("host", host)]).await;
        assert_eq!(resp.status, StatusCode::OK, "{host}{path}: {resp:?}");
        assert_eq!(
            resp.backend(),
            want,
            "{host}{path} went to the wrong upstream"
        );
        assert_eq!(resp.echo().uri, path, "path and query forwarded unchanged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_routes_beat_hostless_ones() {
    let (host, any) = (Backend::echo("host").await, Backend::echo("any").await);
    let cfg = Cfg::new()
        .upstream("host", &[host.addr()])
        .upstream("any", &[any.addr()])
        .route(None, "/deep/er/path", "any")
        .route(Some("example.com"), "/", "host")
        .toml();
    let proxy = Proxy::start(&cfg);
    let resp = proxy
        .get("/deep/er/path/x", &[("host", "example.com")])
        .await;
    assert_eq!(
        resp.backend(),
        "host",
        "a route with a host beats a host-less one"
    );
    let resp = proxy.get("/deep/er/path/x", &[("host", "else.test")]).await;
    assert_eq!(resp.backend(), "any");
    let resp = proxy.get("/x", &[("host", "else.test")]).await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_are_removed() {
    let app = Backend::echo("app").await;
    let proxy = proxy_to(&app);
    let resp = proxy
        .get(
            "/",
            &[
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "named in connection"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("trailer", "x-checksum"),
                ("upgrade", "foo/1"),
                ("proxy-connection", "keep-alive"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("proxy-authenticate", "Basic"),
                ("x-keep", "end-to-end"),
            ],
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    let echo = resp.echo();
    for gone in [
        "x-secret",
        "keep-alive",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
    ] {
        assert!(
            !echo.has(gone),
            "{gone} reached the upstream: {:?}",
            echo.headers
        );
    }
    assert_only_own_connection_tokens(&echo.all("connection"));
    assert_eq!(echo.one("x-keep"), "end-to-end");
    // Trailers pass end to end (issue 26): `TE: trailers` is kept as the
    // proxy's own, and `Trailer` is not hop-by-hop (RFC 9110 §6.6.2).
    assert_eq!(echo.one("te"), "trailers");
    assert_eq!(echo.one("trailer"), "x-checksum");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_removed() {
    let app = Backend::echo("app").await;
    let proxy = proxy_to(&app);
    let set = [
        "connection: x-resp-secret",
        "x-resp-secret: 1",
        "keep-alive: timeout=5",
        "proxy-authenticate: Basic realm=x",
        "proxy-connection: keep-alive",
        "trailer: x-t",
        "upgrade: foo/1",
        "x-resp-keep: 1",
    ];
    let headers: Vec<(&str, &str)> = set.iter().map(|s| ("x-echo-set", *s)).collect();
    let resp = proxy.get("/", &headers).await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    for gone in [
        "x-resp-secret",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(
            !resp.headers.contains_key(gone),
            "{gone} reached the client: {:?}",
            resp.headers
        );
    }
    let conn: Vec<String> = resp
        .headers
        .get_all("connection")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_only_own_connection_tokens(&conn.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(resp.header("x-resp-keep").as_deref(), Some("1"));
    // `Trailer` announces the response's trailers: it passes.
    assert_eq!(resp.header("trailer").as_deref(), Some("x-t"));
}

/// A `Connection` header may remain only with the hop's own tokens.
fn assert_only_own_connection_tokens(values: &[&str]) {
    for v in values {
        for token in v.split(',').map(|t| t.trim().to_ascii_lowercase()) {
            assert!(
                token == "keep-alive" || token == "close",
                "Connection token {token:?} was forwarded: {values:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_via_are_added() {
    let app = Backend::echo("app").await;
    let proxy = proxy_to(&app);

    // A first hop: nothing to append to.
    let resp = proxy.get("/", &[("host", "shop.example:8080")]).await;
    let echo = resp.echo();
    assert_eq!(echo.one("x-forwarded-for"), "127.0.0.1");
    assert_eq!(echo.one("x-forwarded-proto"), "http");
    assert_eq!(echo.one("x-forwarded-host"), "shop.example:8080");
    assert_eq!(echo.one("via"), "1.1 sluicegate");
    assert_eq!(
        resp.header("via").as_deref(),
        Some("1.1 sluicegate"),
        "Via on the response"
    );

    // Behind another proxy: XFF and Via are appended to, XFP/XFH are ours.
    let resp = proxy
        .get(
            "/",
            &[
                ("host", "shop.example"),
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "spoofed.example"),
                ("via", "1.0 fred"),
                ("x-echo-set", "via: 1.1 backend-cache"),
            ],
        )
        .await;
    let echo = resp.echo();
    assert_eq!(echo.one("x-forwarded-for"), "1.2.3.4, 127.0.0.1");
    assert_eq!(echo.one("x-forwarded-proto"), "http");
    assert_eq!(echo.one("x-forwarded-host"), "shop.example");
    assert_eq!(echo.one("via"), "1.0 fred, 1.1 sluicegate");
    assert_eq!(
        resp.header("via").as_deref(),
        Some("1.1 backend-cache, 1.1 sluicegate")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_is_preserved() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(Some("example.com"), "/", "app")
        .toml();
    let proxy = Proxy::start(&cfg);
    let resp = proxy
        .get("/p/a%20th?q=1&r=two", &[("host", "Example.COM:8443")])
        .await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "case-insensitive host match without port: {resp:?}"
    );
    let echo = resp.echo();
    assert_eq!(
        echo.one("host"),
        "Example.COM:8443",
        "Host is passed as the client sent it"
    );
    assert_eq!(echo.uri, "/p/a%20th?q=1&r=two");
    assert_eq!(echo.method, "GET");
    // Method and body pass too.
    let resp = proxy
        .request(
            Method::PUT,
            "/put",
            &[("host", "example.com")],
            Bytes::from_static(b"hello body"),
        )
        .await;
    let echo = resp.echo();
    assert_eq!(echo.method, "PUT");
    assert_eq!(echo.body_len, 10);
    assert_eq!(echo.body_hash, Fnv::of(b"hello body"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_over_two_endpoints() {
    let (a, b) = (Backend::echo("a").await, Backend::echo("b").await);
    let cfg = Cfg::new()
        .upstream("app", &[a.addr(), b.addr()])
        .route(None, "/", "app")
        .toml();
    let proxy = Proxy::start(&cfg);
    let mut seen = Vec::new();
    for _ in 0..10 {
        let resp = proxy.get("/", &[]).await;
        assert_eq!(resp.status, StatusCode::OK);
        seen.push(resp.backend());
    }
    assert_eq!(seen.iter().filter(|b| *b == "a").count(), 5, "{seen:?}");
    assert_eq!(seen.iter().filter(|b| *b == "b").count(), 5, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "sequential requests alternate: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled() {
    let app = Backend::echo("app").await;
    let proxy = proxy_to(&app);
    // 30 sequential requests, each on a new client connection.
    for _ in 0..30 {
        assert_eq!(proxy.get("/", &[]).await.status, StatusCode::OK);
    }
    assert_eq!(app.requests(), 30);
    assert!(
        app.accepts() <= 3,
        "30 sequential requests opened {} upstream connections",
        app.accepts()
    );

    // 8 concurrent clients × 10 requests on their own keep-alive connections.
    let addr = proxy.addr();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn: H1Conn = H1Conn::connect(addr).await;
                for _ in 0..10 {
                    let req = client::build(Method::GET, "/", &[], Bytes::new());
                    assert_eq!(conn.send(req).await.status, StatusCode::OK);
                }
            })
        })
        .collect();
    within(60, "concurrent clients", async {
        for w in workers {
            w.await.unwrap();
        }
    })
    .await;
    assert_eq!(app.requests(), 110);
    assert!(
        app.accepts() <= 3 + 10,
        "110 requests opened {} upstream connections",
        app.accepts()
    );
}

/// An upstream that closes idle keep-alive connections sooner than the
/// proxy's pool lets them go loses no request: not even a POST with a
/// body, which the retry policy never replays (retries are off here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_idle_connections_loses_no_request() {
    let app = Backend::closes_when_idle("app", Duration::from_millis(10)).await;
    let addr = app.addr();
    let proxy = Proxy::start(
        &Cfg::new()
            .admin()
            .route(None, "/", "app")
            .extra(&format!(
                "[[upstream]]\nname = \"app\"\nendpoints = [\"{addr}\"]\nretries = 0\n"
            ))
            .toml(),
    );
    for i in 0..10 {
        let body = "x".repeat(100 + i);
        let resp = within(10, "POST", proxy.request(Method::POST, "/", &[], body)).await;
        assert_eq!(resp.status, StatusCode::OK, "request {i}: {}", resp.text());
        assert_eq!(resp.text(), format!("got {}", 100 + i));
        // Long enough for the upstream to close the pooled connection.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    // Back to back on one client connection: the pooled upstream
    // connection is reused while the upstream keeps it.
    let mut conn: H1Conn = H1Conn::connect(proxy.addr()).await;
    for _ in 0..10 {
        let req = client::build(Method::GET, "/", &[], Bytes::new());
        assert_eq!(conn.send(req).await.status, StatusCode::OK);
    }
    assert_eq!(app.requests(), 20);
    let metrics = proxy.admin_get("/metrics").await.text();
    let opened = client::metric_value(&metrics, "sluicegate_upstream_connections_opened_total");
    assert_eq!(opened as usize, app.accepts(), "{metrics}");
    assert!(
        (11..=13).contains(&app.accepts()),
        "10 requests after idle gaps and 10 back to back opened {} connections",
        app.accepts()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge() {
    let (h2, other) = (Backend::echo("h2").await, Backend::echo("other").await);
    let cfg = Cfg::new()
        .upstream("h2", &[h2.addr()])
        .upstream("other", &[other.addr()])
        .route(Some("h2.example"), "/", "h2")
        .route(None, "/", "other")
        .toml();
    let proxy = Proxy::start(&cfg);
    let conn = within(10, "h2 handshake", H2Conn::connect(proxy.addr())).await;
    let resp = conn.get("h2.example", "/x?y=1", &[("x-keep", "1")]).await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.version, Version::HTTP_2);
    assert_eq!(resp.backend(), "h2", "routed by :authority");
    let echo = resp.echo();
    assert_eq!(echo.one("host"), "h2.example", "Host taken from :authority");
    assert_eq!(echo.one("x-forwarded-host"), "h2.example");
    assert_eq!(echo.one("via"), "2 sluicegate");
    assert_eq!(echo.one("x-keep"), "1");
    assert_eq!(echo.uri, "/x?y=1");
    assert!(
        resp.header("via")
            .unwrap_or_default()
            .ends_with("sluicegate"),
        "{resp:?}"
    );

    // Many concurrent streams on the one connection.
    let conn = std::sync::Arc::new(conn);
    let streams: Vec<_> = (0..20)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(
                async move { conn.get("elsewhere.example", &format!("/s/{i}"), &[]).await },
            )
        })
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        let resp = within(30, "h2 stream", s).await.unwrap();
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.backend(), "other");
        assert_eq!(resp.echo().uri, format!("/s/{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_passthrough() {
    let ws = Backend::websocket_echo("ws").await;
    let plain = Backend::echo("plain").await;
    let cfg = Cfg::new()
        .upstream("ws", &[ws.addr()])
        .upstream("plain", &[plain.addr()])
        .route(None, "/ws", "ws")
        .route(None, "/", "plain")
        .toml();
    let proxy = Proxy::start(&cfg);
    let stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut socket, resp) = within(10, "websocket handshake through the proxy", async {
        tokio_tungstenite::client_async("ws://localhost/ws", stream)
            .await
            .expect("websocket handshake")
    })
    .await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    within(30, "websocket conversation", async {
        // Server to client first.
        let greeting = socket.next().await.expect("greeting").expect("greeting ok");
        assert_eq!(greeting, Message::text("welcome ws"));
        socket.send(Message::text("hello")).await.unwrap();
        assert_eq!(next_data(&mut socket).await, Message::text("hello"));
        let big = Bytes::from(pattern(0, 200_000));
        socket.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(next_data(&mut socket).await, Message::binary(big));
        for i in 0..50 {
            socket.send(Message::text(format!("m{i}"))).await.unwrap();
        }
        for i in 0..50 {
            assert_eq!(next_data(&mut socket).await, Message::text(format!("m{i}")));
        }
        socket.close(None).await.unwrap();
    })
    .await;
    let seen = ws.seen_headers();
    let get = |n: &str| {
        seen.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    assert_eq!(get("upgrade").as_deref(), Some("websocket"), "{seen:?}");
    assert!(
        get("connection").unwrap_or_default().contains("upgrade"),
        "{seen:?}"
    );
    assert_eq!(
        get("x-forwarded-for").as_deref(),
        Some("127.0.0.1"),
        "went through the proxy: {seen:?}"
    );
    // And the proxy still serves plain HTTP.
    assert_eq!(proxy.get("/", &[]).await.backend(), "plain");
}

/// The next text or binary message (pings and pongs skipped).
async fn next_data<S>(socket: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let msg = socket
            .next()
            .await
            .expect("stream ended")
            .expect("websocket error");
        if msg.is_text() || msg.is_binary() {
            return msg;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_healthz_and_metrics() {
    let app = Backend::echo("app").await;
    let proxy = Proxy::start(
        &Cfg::new()
            .admin()
            .upstream("app", &[app.addr()])
            .route(None, "/", "app")
            .toml(),
    );
    let health = proxy.admin_get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.text().trim(), "ok");
    for _ in 0..3 {
        assert_eq!(proxy.get("/", &[]).await.status, StatusCode::OK);
    }
    let metrics = proxy.admin_get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    let ctype = metrics.header("content-type").unwrap_or_default();
    assert!(
        ctype.starts_with("text/plain"),
        "metrics content-type {ctype:?}"
    );
    let text = metrics.text();
    assert!(
        text.contains("# TYPE "),
        "Prometheus text format expected:\n{text}"
    );
    assert!(
        text.contains("sluicegate_"),
        "no sluicegate_ metric:\n{text}"
    );
    // The admin port is not the proxy: proxied paths are not served there.
    assert_eq!(proxy.admin_get("/").await.header("x-backend"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_version_and_help() {
    let out = run_cli(&["--version"], 10).await;
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("sluicegate") && text.contains(env!("CARGO_PKG_VERSION")),
        "{}",
        describe(&out)
    );

    let out = run_cli(&["--help"], 10).await;
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("run") && text.contains("check"),
        "--help lists the subcommands:\n{}",
        describe(&out)
    );

    let out = run_cli(&["run", "--help"], 10).await;
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--config") && text.contains("--log-format"),
        "{}",
        describe(&out)
    );

    let out = run_cli(&["no-such-subcommand"], 10).await;
    assert!(
        !out.status.success(),
        "an unknown subcommand fails: {}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(Some("only.example"), "/", "app")
        .toml();
    let proxy = Proxy::builder(&cfg).arg("--log-format").arg("json").start();
    assert_eq!(
        proxy.get("/", &[("host", "only.example")]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        proxy.get("/", &[("host", "nowhere.example")]).await.status,
        StatusCode::NOT_FOUND
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = format!("{}\n{}", proxy.stdout_text(), proxy.stderr_text());
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines at all");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.is_object(), "{line}");
    }
}
