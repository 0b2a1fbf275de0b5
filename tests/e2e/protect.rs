//! Native abuse protection end to end: per-IP connection limits, route rate
//! limits, header and body limits, the keep-alive request limit, HTTP/2
//! stream limits and rapid reset (CVE-2023-44487), and origin hiding.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::backend::full;
use crate::common::{client, within, Backend, Cfg, H1Conn, H2Conn, Proxy};

fn with_limits(cfg: Cfg, limits: &str) -> String {
    cfg.toml().replacen(
        "\n[[upstream]]",
        &format!("\n[proxy.limits]\n{limits}\n\n[[upstream]]"),
        1,
    )
}

#[tokio::test]
async fn connections_per_ip_are_limited_and_released_on_close() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(None, "/", "app");
    let p = Proxy::start(&with_limits(cfg, "max_connections_per_ip = 3"));
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut c: H1Conn = H1Conn::connect(p.addr()).await;
        let r = c
            .send(client::build(Method::GET, "/", &[], Bytes::new()))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        open.push(c);
    }
    // The fourth is closed at once, before a byte is read.
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = within(5, "the fourth connection is closed", s.read(&mut buf)).await;
    assert!(matches!(n, Ok(0) | Err(_)), "got {n:?}");
    // Closing one frees its slot.
    drop(open.pop());
    let r = within(5, "a slot is free again", async {
        loop {
            let mut s = TcpStream::connect(p.addr()).await.unwrap();
            let _ = s
                .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            if out.starts_with(b"HTTP/1.1 200") {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(r.starts_with(b"HTTP/1.1 200"));
    // The three still-open connections keep working.
    for c in &mut open {
        let r = c
            .send(client::build(Method::GET, "/", &[], Bytes::new()))
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn route_rate_limit_is_a_token_bucket_with_retry_after() {
    let app = Backend::echo("app").await;
    let toml = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(None, "/", "app")
        .toml()
        + "\n[[route]]\npath_prefix = \"/limited\"\nupstream = \"app\"\nrate_limit = { rps = 1, burst = 3 }\n"
        + "\n[[route]]\npath_prefix = \"/per-user\"\nupstream = \"app\"\nrate_limit = { rps = 1, burst = 2, key = \"header:x-user\" }\n";
    let p = Proxy::start(&toml);
    let mut codes = Vec::new();
    let mut retry_after = None;
    for _ in 0..5 {
        let r = p.get("/limited", &[]).await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            retry_after = r.header("retry-after");
        }
        codes.push(r.status.as_u16());
    }
    assert_eq!(codes, vec![200, 200, 200, 429, 429]);
    let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&secs), "Retry-After {secs}");
    // Other routes are not limited.
    for _ in 0..10 {
        assert_eq!(p.get("/", &[]).await.status, StatusCode::OK);
    }
    // Each user has a bucket of their own.
    let codes: Vec<u16> =
        futures_util::future::join_all((0..3).map(|_| p.get("/per-user", &[("x-user", "ann")])))
            .await
            .iter()
            .map(|r| r.status.as_u16())
            .collect();
    assert_eq!(codes.iter().filter(|&&c| c == 429).count(), 1, "{codes:?}");
    assert_eq!(
        p.get("/per-user", &[("x-user", "bob")]).await.status,
        StatusCode::OK
    );
    // The bucket refills: after its Retry-After the route serves again.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    assert_eq!(p.get("/limited", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_heads_and_too_many_headers_are_431() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(None, "/", "app");
    let p = Proxy::start(&with_limits(
        cfg,
        "max_header_bytes = 16384\nmax_headers = 50",
    ));
    let raw = |head: String| {
        let addr = p.addr();
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(head.as_bytes()).await;
            let mut out = Vec::new();
            let _ = within(5, "the proxy answers and closes", s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let r = raw(big).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    let many: String = (0..60).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw(format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    let some: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw(format!(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{some}\r\n"
    ))
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(
        app.requests(),
        1,
        "only the acceptable head reached the origin"
    );
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_early_or_while_streaming() {
    let app = Backend::sink("app").await;
    let toml = with_limits(
        Cfg::new()
            .upstream("app", &[app.addr()])
            .route(None, "/", "app"),
        "max_body_bytes = 1000",
    )
        + "\n[[route]]\npath_prefix = \"/small\"\nupstream = \"app\"\nmax_body_bytes = 100\n";
    let p = Proxy::start(&toml);
    // Under the limits: passes.
    let r = p.request(Method::POST, "/", &[], vec![b'x'; 1000]).await;
    assert_eq!((r.status, r.echo().body_len), (StatusCode::OK, 1000));
    let r = p
        .request(Method::POST, "/small", &[], vec![b'x'; 100])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // Announced too large: refused before anything goes upstream.
    let before = app.requests();
    let r = p.request(Method::POST, "/", &[], vec![b'x'; 1001]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let r = p
        .request(Method::POST, "/small", &[], vec![b'x'; 101])
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.requests(), before, "nothing went upstream");
    // Chunked, no length announced: cut off while streaming.
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    let mut req = b"POST /small HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"40\r\n");
        req.extend_from_slice(&[b'y'; 64]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    let _ = within(5, "413 and close", s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
}

#[tokio::test]
async fn keepalive_connections_close_after_max_requests() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(None, "/", "app");
    let p = Proxy::start(&with_limits(cfg, "max_requests_per_connection = 3"));
    let mut c: H1Conn = H1Conn::connect(p.addr()).await;
    for i in 1..=3 {
        let r = c
            .send(client::build(Method::GET, "/", &[], Bytes::new()))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let close = r.header("connection").as_deref() == Some("close");
        assert_eq!(close, i == 3, "request {i}: {:?}", r.headers);
    }
    within(5, "the connection closes", async {
        while !c.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(app.requests(), 3);
}

#[tokio::test]
async fn responses_never_reveal_the_origin_address() {
    let origin = Backend::serve("origin", |req| async move {
        let me = req.headers().get("x-origin").cloned().unwrap();
        let me = me.to_str().unwrap().to_string();
        let mut resp = http::Response::new(full("moved"));
        *resp.status_mut() = StatusCode::FOUND;
        let h = resp.headers_mut();
        h.insert("location", format!("http://{me}/next?a=1").parse().unwrap());
        h.insert(
            "content-location",
            format!("http://{me}/doc").parse().unwrap(),
        );
        h.insert(
            "refresh",
            format!("3; url=http://{me}/later").parse().unwrap(),
        );
        h.insert("server", "Apache/2.4.1 (internal build 7)".parse().unwrap());
        h.insert("x-powered-by", "PHP/5.1".parse().unwrap());
        resp
    })
    .await;
    let addr = origin.addr().to_string();
    let dead = crate::common::free_addr().to_string();
    let toml = Cfg::new()
        .upstream("app", &[origin.addr()])
        .upstream_raw("dead", &[&dead])
        .route(None, "/", "app")
        .route(None, "/dead", "dead")
        .toml()
        .replacen(
            "\n[[upstream]]",
            "hide_response_headers = [\"server\", \"x-powered-by\"]\n\n[[upstream]]",
            1,
        );
    let p = Proxy::start(&toml);
    let r = p
        .get("/", &[("host", "www.example.com"), ("x-origin", &addr)])
        .await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(
        r.header("location").as_deref(),
        Some("http://www.example.com/next?a=1")
    );
    assert_eq!(
        r.header("content-location").as_deref(),
        Some("http://www.example.com/doc")
    );
    assert_eq!(
        r.header("refresh").as_deref(),
        Some("3; url=http://www.example.com/later")
    );
    assert!(!r.headers.contains_key("server") && !r.headers.contains_key("x-powered-by"));
    let all = format!("{:?} {}", r.headers, r.text());
    assert!(!all.contains(&addr), "{all}");
    // h2: the authority is the public host.
    let h2 = H2Conn::connect(p.addr()).await;
    let r = h2.get("site.test:8443", "/", &[("x-origin", &addr)]).await;
    assert_eq!(
        r.header("location").as_deref(),
        Some("http://site.test:8443/next?a=1")
    );
    // Errors do not name the endpoint either.
    let r = p.get("/dead", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let port = dead.rsplit(':').next().unwrap();
    let all = format!("{:?} {}", r.headers, r.text());
    assert!(!all.contains(port) && !all.contains("127.0.0.1"), "{all}");
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Frames read from `s` until it closes or `secs` pass: (type, flags, stream, payload).
async fn read_frames(s: &mut TcpStream, secs: u64) -> (Vec<(u8, u8, u32, Vec<u8>)>, bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let closed = tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    let mut frames = Vec::new();
    let mut at = 0;
    while buf.len() >= at + 9 {
        let len = (buf[at] as usize) << 16 | (buf[at + 1] as usize) << 8 | buf[at + 2] as usize;
        if buf.len() < at + 9 + len {
            break;
        }
        let stream =
            u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]]) & 0x7fff_ffff;
        frames.push((
            buf[at + 3],
            buf[at + 4],
            stream,
            buf[at + 9..at + 9 + len].to_vec(),
        ));
        at += 9 + len;
    }
    (frames, closed)
}

#[tokio::test]
async fn h2_rapid_reset_closes_the_abusive_connection_and_the_proxy_stays_healthy() {
    let app = Backend::slow("app", Duration::from_millis(200)).await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(None, "/", "app");
    let p = Proxy::start(&with_limits(
        cfg,
        "h2_max_concurrent_streams = 64\nh2_max_pending_reset_streams = 20",
    ));
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    // Preface, empty SETTINGS, then 2,000 streams each opened and reset at once.
    let mut attack = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    attack.extend(frame(0x4, 0, 0, &[]));
    // :method GET, :scheme http, :path /, :authority localhost (literal, not indexed).
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 9];
    block.extend_from_slice(b"localhost");
    for i in 0..2000u32 {
        let id = 1 + 2 * i;
        attack.extend(frame(0x1, 0x5, id, &block));
        attack.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
    }
    let _ = s.write_all(&attack).await;
    let (frames, closed) = read_frames(&mut s, 10).await;
    assert!(closed, "the abusive connection is closed");
    // The server advertised the stream limit.
    let settings = frames
        .iter()
        .find(|f| f.0 == 0x4 && f.1 & 1 == 0)
        .expect("server SETTINGS");
    let advertised = settings
        .3
        .chunks(6)
        .find(|s| s[..2] == [0, 3])
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    assert_eq!(advertised, Some(64));
    // GOAWAY with ENHANCE_YOUR_CALM (0xb).
    let goaway = frames.iter().find(|f| f.0 == 0x7).expect("GOAWAY");
    let code = u32::from_be_bytes([goaway.3[4], goaway.3[5], goaway.3[6], goaway.3[7]]);
    assert_eq!(code, 0xb, "GOAWAY error code");
    // Few of the 2,000 streams cost an upstream request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        app.requests() < 200,
        "{} requests reached the origin",
        app.requests()
    );
    // The proxy is healthy: a well-behaved h2 client is served.
    let h2 = H2Conn::connect(p.addr()).await;
    let r = h2.get("localhost", "/", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
}
