//! Contract 0.2 end to end (issue 22): the real binary, real sockets and
//! the compiled `v2-probe`, `add-header-v2` and 0.1 `add-header` filters.
//! A chain mixing 0.1 and 0.2, per-request locals under concurrency (pooled
//! and `isolation = "request"`), the request id, byte-exact header values,
//! a streamed body through the chunk phase in bounded memory, and labelled
//! metrics with the series cap.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;

use crate::common::backend::full;
use crate::common::{client, pattern, wasm, within, Backend, Cfg, Proxy, Resp};

/// A proxy with the admin listener, `filters` installed as `(name, built)`,
/// `filters_toml` after `[filters]`, and `edit` applied to the whole config.
fn start(
    cfg: Cfg,
    filters: &[(&str, &str)],
    filters_toml: &str,
    edit: impl Fn(String) -> String,
) -> Proxy {
    let toml = cfg
        .admin()
        .extra(&format!(
            "[filters]\ndir = \"@DIR@/filters\"\n{filters_toml}"
        ))
        .toml();
    let mut b = Proxy::builder(&edit(toml));
    for (name, built) in filters {
        b = b.file(&format!("filters/{name}.wasm"), wasm(built));
    }
    b.start()
}

fn with_access_log(toml: String) -> String {
    toml.replacen(
        "[proxy]\n",
        "[proxy.access_log]\nformat = \"common\"\n\n[proxy]\n",
        1,
    )
}

async fn get(p: &Proxy, path: &str, headers: &[(&str, &str)]) -> Resp {
    within(
        15,
        path,
        client::request(p.addr(), Method::GET, path, headers, Bytes::new()),
    )
    .await
}

async fn metrics_page(p: &Proxy) -> String {
    within(
        10,
        "/metrics",
        client::request(p.admin_addr(), Method::GET, "/metrics", &[], Bytes::new()),
    )
    .await
    .text()
}

fn is_generated_id(v: &str) -> bool {
    v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn a_chain_mixing_01_and_02_filters_runs_both() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(
            None,
            "/",
            "app",
            &["add-header", "v2-probe", "add-header-v2"],
        );
    let p = start(
        cfg,
        &[
            ("add-header", "add-header"),
            ("v2-probe", "v2-probe"),
            ("add-header-v2", "add-header-v2"),
        ],
        "[filters.config.add-header]\nrequest_headers = { \"x-added-v1\" = \"one\" }\n\
         response_headers = { \"x-resp-v1\" = \"one\" }\n\
         [filters.config.add-header-v2]\nrequest_headers = { \"x-added-v2\" = \"two\" }\n\
         response_headers = { \"x-resp-v2\" = \"two\" }\n",
        |t| t,
    );
    let r = get(&p, "/mixed", &[("x-token", "tok-1")]).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}\n{}", p.output());
    let e = r.echo();
    assert_eq!(e.one("x-added-v1"), "one", "the 0.1 filter's request edit");
    assert_eq!(e.one("x-added-v2"), "two", "the 0.2 filter's request edit");
    assert_eq!(e.one("x-v2-err"), "invalid-name", "a typed field error");
    assert_eq!(
        r.header("x-resp-v1").as_deref(),
        Some("one"),
        "0.1 response phase"
    );
    assert_eq!(
        r.header("x-resp-v2").as_deref(),
        Some("two"),
        "0.2 deferred edit"
    );
    assert_eq!(
        r.header("x-v2-token").as_deref(),
        Some("tok-1"),
        "a local, request to response"
    );
    let rid = r
        .header("x-v2-rid")
        .expect("request id in the response phase");
    assert_eq!(r.header("x-v2-local-rid").as_deref(), Some(rid.as_str()));
    assert_eq!(e.one("x-request-id"), rid, "the id went upstream");
    assert_eq!(
        r.header("x-v2-endpoint").as_deref(),
        Some(app.addr().to_string().as_str()),
        "upstream-info names the endpoint that answered"
    );
}

async fn locals_under_concurrency(policy: &str) {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["v2-probe"]);
    let p = start(cfg, &[("v2-probe", "v2-probe")], policy, |t| t);
    let addr = p.addr();
    let mut tasks = Vec::new();
    for i in 0..200 {
        tasks.push(tokio::spawn(async move {
            let token = format!("token-{i}-{}", i * 7919);
            let r = client::request(
                addr,
                Method::GET,
                &format!("/c/{i}"),
                &[("x-token", &token)],
                Bytes::new(),
            )
            .await;
            (i, token, r)
        }));
    }
    let mut rids = HashSet::new();
    within(60, "200 concurrent requests", async {
        for t in tasks {
            let (i, token, r) = t.await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "request {i}: {r:?}");
            assert_eq!(
                r.header("x-v2-token").as_deref(),
                Some(token.as_str()),
                "request {i} saw another's local"
            );
            let rid = r.header("x-v2-rid").unwrap();
            assert_eq!(
                r.header("x-v2-local-rid").as_deref(),
                Some(rid.as_str()),
                "request {i}"
            );
            assert!(rids.insert(rid), "request ids are distinct");
        }
    })
    .await;
    assert_eq!(rids.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locals_carry_from_request_to_response_under_200_concurrent_requests_pooled() {
    locals_under_concurrency("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locals_carry_from_request_to_response_under_200_concurrent_requests_isolated() {
    locals_under_concurrency("[filters.policy.v2-probe]\nisolation = \"request\"\n").await;
}

#[tokio::test]
async fn request_id_is_kept_replaced_or_generated_and_logged() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["v2-probe"]);
    let p = start(cfg, &[("v2-probe", "v2-probe")], "", with_access_log);

    let kept = get(&p, "/kept", &[("x-request-id", "client-id_42.ok")]).await;
    assert_eq!(kept.status, StatusCode::OK);
    assert_eq!(
        kept.echo().one("x-request-id"),
        "client-id_42.ok",
        "a valid id is kept upstream"
    );
    assert_eq!(
        kept.header("x-v2-rid").as_deref(),
        Some("client-id_42.ok"),
        "and the filter sees it"
    );

    let replaced = get(&p, "/replaced", &[("x-request-id", "bad id \"quoted\"")]).await;
    let upstream_id = replaced.echo().one("x-request-id").to_string();
    assert!(
        is_generated_id(&upstream_id),
        "an invalid id is replaced: {upstream_id}"
    );
    assert_eq!(
        replaced.header("x-v2-rid").as_deref(),
        Some(upstream_id.as_str())
    );

    let made = get(&p, "/made", &[]).await;
    let made_id = made.echo().one("x-request-id").to_string();
    assert!(
        is_generated_id(&made_id),
        "a missing id is generated: {made_id}"
    );
    assert_ne!(made_id, upstream_id);
    assert_eq!(made.header("x-v2-rid").as_deref(), Some(made_id.as_str()));

    p.wait_output(&format!("rid={made_id}"), 5).await;
    let out = p.stdout_text();
    let line = |path: &str| {
        out.lines()
            .find(|l| l.contains(&format!("GET {path} ")))
            .unwrap_or_else(|| panic!("no access line for {path}:\n{out}"))
            .to_string()
    };
    assert!(
        line("/kept").contains(" rid=client-id_42.ok"),
        "{}",
        line("/kept")
    );
    assert!(
        line("/replaced").contains(&format!(" rid={upstream_id}")),
        "{}",
        line("/replaced")
    );
    assert!(
        line("/made").contains(&format!(" rid={made_id}")),
        "{}",
        line("/made")
    );
}

/// Upstream sees the raw bytes of `x-v2-copied` (hex in the body); the
/// client reads the deferred copy in the raw response head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_header_bytes_pass_through_a_02_filter_byte_exact() {
    let app = Backend::serve("app", |req| async move {
        let hex = |v: &[u8]| v.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let copied = req.headers().get("x-v2-copied").map(|v| hex(v.as_bytes()));
        let orig = req.headers().get("x-v2-copy").map(|v| hex(v.as_bytes()));
        http::Response::new(full(format!(
            "{}|{}",
            orig.unwrap_or_default(),
            copied.unwrap_or_default()
        )))
    })
    .await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["v2-probe"]);
    let p = start(cfg, &[("v2-probe", "v2-probe")], "", |t| t);
    let value: &[u8] = b"caf\xe9 \xff\xfe\x80 end";
    let addr = p.addr();
    let raw = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req =
            b"GET /bytes HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nx-v2-copy: ".to_vec();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n\r\n");
        s.write_all(&req).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(raw.starts_with(b"HTTP/1.1 200"), "{text}");
    let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        text.contains(&format!("{hex}|{hex}")),
        "upstream got the bytes and the filter's copy: {text}"
    );
    let mut want = b"x-v2-copied: ".to_vec();
    want.extend_from_slice(value);
    want.extend_from_slice(b"\r\n");
    assert!(
        raw.windows(want.len()).any(|w| w == want.as_slice()),
        "the deferred copy reaches the client byte-exact: {text}"
    );
}

fn vm_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// 1 GiB through the response chunk phase (upper-casing every chunk), the
/// bytes checked against the pattern; the proxy's peak RSS stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_filter_rewrites_a_1_gib_stream_in_bounded_memory() {
    let total: u64 = std::env::var("SLUICEGATE_V2_STREAM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
        << 20;
    let app = Backend::download("big", total).await;
    let cfg = Cfg::new()
        .upstream("big", &[app.addr()])
        .route_with_filters(None, "/", "big", &["v2-chunks"]);
    let p = start(
        cfg,
        &[("v2-chunks", "v2-probe")],
        "[filters.config.v2-chunks]\nchunks = true\n",
        |t| t,
    );
    let before = vm_kib(p.pid(), "VmHWM:");
    let started = Instant::now();
    let addr = p.addr();
    let got = within(300, "the 1 GiB stream", async move {
        let mut conn = client::H1Conn::connect(addr).await;
        let resp = conn
            .send_streaming(client::build(Method::GET, "/big", &[], Bytes::new()))
            .await
            .expect("response head");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut off = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("body frame");
            if let Ok(data) = frame.into_data() {
                let mut want = pattern(off, data.len());
                want.make_ascii_uppercase();
                assert!(
                    data[..] == want[..],
                    "bytes at {off} are the upper-cased pattern"
                );
                off += data.len() as u64;
            }
        }
        off
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(got, total, "every byte came through");
    let peak = vm_kib(p.pid(), "VmHWM:");
    eprintln!(
        "chunk phase: {} MiB in {secs:.1} s ({:.0} MiB/s); proxy VmHWM {} KiB before, {} KiB after",
        total >> 20,
        (total >> 20) as f64 / secs,
        before,
        peak
    );
    assert!(
        peak < before + 64 * 1024,
        "peak RSS grew by {} KiB streaming {} MiB",
        peak - before,
        total >> 20
    );
}

/// Lines of `/metrics` for a metric name that carry every `labels` pair.
fn metric_lines<'a>(page: &'a str, name: &str, labels: &[&str]) -> Vec<&'a str> {
    page.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .collect()
}

fn line_value(line: &str) -> f64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn an_on_log_histogram_is_exported_with_labels_and_the_series_cap_counts() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["v2-probe"]);
    let p = start(
        cfg,
        &[("v2-probe", "v2-probe")],
        "[filters.policy.v2-probe]\nmax_metrics = 4\n",
        |t| t,
    );
    // requests{route}, inflight and, in on-log, duration_us{status}: 3 series.
    assert_eq!(get(&p, "/first", &[]).await.status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut page = metrics_page(&p).await;
    while metric_lines(
        &page,
        "sluicegate_filter_histogram",
        &["name=\"duration_us\""],
    )
    .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "no on-log histogram in /metrics:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        page = metrics_page(&p).await;
    }
    // by_label{v=l0} is the 4th series; l1..l9 are past the cap.
    for i in 0..10 {
        let label = format!("l{i}");
        assert_eq!(
            get(&p, "/l", &[("x-v2-label", &label)]).await.status,
            StatusCode::OK
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let page = metrics_page(&p).await;
    let hist = metric_lines(
        &page,
        "sluicegate_filter_histogram",
        &[
            "filter=\"v2-probe\"",
            "name=\"duration_us\"",
            "status=\"200\"",
        ],
    );
    assert!(!hist.is_empty(), "histogram with its labels:\n{page}");
    let count = metric_lines(
        &page,
        "sluicegate_filter_histogram_count",
        &["name=\"duration_us\"", "status=\"200\""],
    );
    assert!(
        count.iter().any(|l| line_value(l) == 11.0),
        "11 requests logged: {count:?}\n{page}"
    );
    let reqs = metric_lines(
        &page,
        "sluicegate_filter_counter_total",
        &["name=\"requests\"", "route="],
    );
    assert!(
        reqs.iter().any(|l| line_value(l) == 11.0),
        "labelled counter: {reqs:?}"
    );
    let gauge = metric_lines(&page, "sluicegate_filter_gauge", &["name=\"inflight\""]);
    assert!(
        gauge.iter().any(|l| line_value(l) == 0.0),
        "the gauge up and down again: {gauge:?}"
    );
    let l0 = metric_lines(
        &page,
        "sluicegate_filter_counter_total",
        &["name=\"by_label\"", "v=\"l0\""],
    );
    assert_eq!(l0.len(), 1, "the series within the cap: {page}");
    assert!(
        metric_lines(&page, "sluicegate_filter_counter_total", &["v=\"l1\""]).is_empty(),
        "past the cap: dropped"
    );
    let dropped = metric_lines(
        &page,
        "sluicegate_filter_metrics_dropped_total",
        &["filter=\"v2-probe\"", "reason=\"cardinality\""],
    );
    assert_eq!(dropped.len(), 1, "{page}");
    assert_eq!(line_value(dropped[0]), 9.0, "nine samples past the cap");
}

/// A filter that writes to stderr from a synchronous call on a worker
/// (WASI's `blocking-write-and-flush`): the line reaches the proxy's log
/// under the filter's name, the request is served, and no worker thread
/// goes down (wasmtime-wasi's own blocking methods would `block_on` the
/// worker's runtime and panic; see `filter::stdio::nonblocking`).
#[tokio::test]
async fn a_filter_printing_to_stderr_is_logged_and_the_worker_serves_on() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route_with_filters(None, "/", "app", &["v2-probe"]);
    let p = start(cfg, &[("v2-probe", "v2-probe")], "", |t| t);
    for i in 0..20 {
        let line = format!("hello-{i}");
        let r = get(&p, "/", &[("x-v2-print", &line)]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", p.stderr_text());
    }
    p.wait_output("v2-probe says hello-19", 10).await;
    let log = p.stderr_text();
    assert!(log.contains("v2-probe says hello-0"), "{log}");
    assert!(!log.contains("thread 'sluicegate"), "{log}");
}
