//! Bodies stream through the proxy in constant memory: a few hundred MiB
//! each way, generated on the fly, counted and checksummed on the other
//! side, while the proxy's resident memory stays small.

use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;

use crate::common::backend::PatternBody;
use crate::common::*;

/// Bytes moved each way.
const TOTAL: u64 = 256 * 1024 * 1024;
/// The proxy's resident memory must stay under this while streaming.
const RSS_LIMIT_KIB: u64 = 100 * 1024;

fn expected_checksum() -> &'static str {
    static SUM: OnceLock<String> = OnceLock::new();
    SUM.get_or_init(|| pattern_checksum(TOTAL))
}

fn streaming_proxy(backend: &Backend) -> Proxy {
    Proxy::start(
        &Cfg::new()
            .upstream("app", &[backend.addr()])
            .route(None, "/", "app")
            .toml(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_in_constant_memory() {
    let backend = Backend::download("dl", TOTAL).await;
    let proxy = streaming_proxy(&backend);
    let expected = tokio::task::spawn_blocking(expected_checksum)
        .await
        .unwrap();
    let rss = RssSampler::start(proxy.pid());
    let started = Instant::now();
    let (len, sum) = within(180, "256 MiB download", async {
        let mut conn: H1Conn = H1Conn::connect(proxy.addr()).await;
        let resp = conn
            .send_streaming(client::build(Method::GET, "/big", &[], Bytes::new()))
            .await
            .expect("response head");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers().get("x-backend").unwrap(), "dl");
        let mut body = resp.into_body();
        let (mut len, mut sum) = (0u64, Fnv::new());
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.expect("body frame").data_ref() {
                len += data.len() as u64;
                sum.update(data);
            }
        }
        (len, sum.hex())
    })
    .await;
    let took = started.elapsed();
    let peak = rss.stop();
    eprintln!(
        "download: {} MiB in {took:?}, proxy peak RSS {} KiB",
        TOTAL >> 20,
        peak
    );
    assert_eq!(len, TOTAL, "bytes received");
    assert_eq!(sum, expected, "checksum of the received stream");
    assert!(peak > 0, "could not read the proxy's RSS");
    assert!(
        peak < RSS_LIMIT_KIB,
        "proxy RSS peaked at {peak} KiB while streaming (limit {RSS_LIMIT_KIB} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunked_upload_streams_in_constant_memory() {
    let sink = Backend::sink("sink").await;
    let proxy = streaming_proxy(&sink);
    let expected = tokio::task::spawn_blocking(expected_checksum)
        .await
        .unwrap();
    let rss = RssSampler::start(proxy.pid());
    let started = Instant::now();
    let resp = within(180, "256 MiB chunked upload", async {
        let mut conn: H1Conn<PatternBody> = H1Conn::connect(proxy.addr()).await;
        let req = Request::builder()
            .method(Method::POST)
            .uri("/upload")
            .header("host", "localhost")
            .body(PatternBody::new(TOTAL))
            .unwrap();
        conn.send(req).await
    })
    .await;
    let took = started.elapsed();
    let peak = rss.stop();
    eprintln!(
        "upload: {} MiB in {took:?}, proxy peak RSS {} KiB",
        TOTAL >> 20,
        peak
    );
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    let echo = resp.echo();
    assert_eq!(echo.method, "POST");
    assert_eq!(echo.body_len, TOTAL, "bytes the upstream received");
    assert_eq!(
        echo.body_hash, expected,
        "checksum of what the upstream received"
    );
    assert!(peak > 0, "could not read the proxy's RSS");
    assert!(
        peak < RSS_LIMIT_KIB,
        "proxy RSS peaked at {peak} KiB while streaming (limit {RSS_LIMIT_KIB} KiB)"
    );
}
