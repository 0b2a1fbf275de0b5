//! A client's own conditional and range requests answered from the store:
//! `304` for `If-None-Match` / `If-Modified-Since`, `206` for one or
//! several ranges, `If-Range`, `416`; a range miss fetching and storing the
//! whole object.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;

use super::*;
use crate::common::pattern;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_get_304_from_the_store() {
    let lm = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3600));
    let o = Origin::start(
        Script::new("max-age=600")
            .header("etag", "\"v1\"")
            .header("last-modified", &lm),
    )
    .await;
    let p = proxy(&o, "true", "");
    // A miss with a matching If-None-Match: the origin is asked for the
    // whole response (stored), the client gets its 304.
    let a = get(&p, "/c", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(a.status, StatusCode::NOT_MODIFIED, "{a:?}");
    assert!(a.body.is_empty());
    assert_eq!(a.header("etag").as_deref(), Some("\"v1\""));
    assert!(status(&a).contains("stored"), "{}", status(&a));
    assert!(
        !o.last().headers.contains_key("if-none-match"),
        "the origin was asked unconditionally"
    );
    let full = within(10, "stored", async {
        loop {
            let r = get(&p, "/c", &[]).await;
            if status(&r).starts_with("sluicegate; hit") {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(full.text().starts_with("body n=1"), "{}", full.text());
    for (k, v, want) in [
        ("if-none-match", "\"v1\"", 304),
        ("if-none-match", "W/\"v1\", \"v0\"", 304),
        ("if-none-match", "*", 304),
        ("if-none-match", "\"v2\"", 200),
        ("if-modified-since", lm.as_str(), 304),
        (
            "if-modified-since",
            &httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(7200)),
            200,
        ),
    ] {
        let r = get(&p, "/c", &[(k, v)]).await;
        assert_eq!(r.status.as_u16(), want, "{k}: {v}");
        assert!(status(&r).starts_with("sluicegate; hit"), "{}", status(&r));
        if want == 304 {
            assert!(
                r.body.is_empty() && r.header("content-type").is_none(),
                "{r:?}"
            );
        } else {
            assert_eq!(r.body, full.body);
        }
    }
    assert_eq!(o.requests(), 1, "every answer came from the store");
}

/// A 10,000-byte pattern object with validators.
async fn object_origin(len: usize) -> Origin {
    let mut script = Script::new("max-age=600")
        .header("etag", "\"obj\"")
        .header("content-type", "application/octet-stream");
    script.big = Some((len, false));
    Origin::start(script).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_answered_from_the_store() {
    let o = object_origin(10_000).await;
    let p = proxy(&o, "true", "");
    let whole = pattern(0, 10_000);
    // A range miss: the origin sends (and the store keeps) the whole
    // object; the client gets its range.
    let a = get(&p, "/obj", &[("range", "bytes=100-199")]).await;
    assert_eq!(a.status, StatusCode::PARTIAL_CONTENT, "{a:?}");
    assert_eq!(&a.body[..], &whole[100..200]);
    assert_eq!(
        a.header("content-range").as_deref(),
        Some("bytes 100-199/10000")
    );
    assert!(
        !o.last().headers.contains_key("range"),
        "the whole object was fetched"
    );
    within(10, "stored", async {
        while cache_stats(&p).await["entries"] != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Hits: single, suffix, open-ended.
    for (range, from, to) in [
        ("bytes=0-0", 0, 1),
        ("bytes=-500", 9_500, 10_000),
        ("bytes=9990-", 9_990, 10_000),
        ("bytes=5000-20000", 5_000, 10_000),
    ] {
        let r = get(&p, "/obj", &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert!(status(&r).starts_with("sluicegate; hit"), "{}", status(&r));
        assert_eq!(&r.body[..], &whole[from..to], "{range}");
        let want = format!("bytes {from}-{}/10000", to - 1);
        assert_eq!(r.header("content-range").as_deref(), Some(want.as_str()));
    }
    // Several ranges: multipart/byteranges.
    let m = get(&p, "/obj", &[("range", "bytes=0-9, 20-29")]).await;
    assert_eq!(m.status, StatusCode::PARTIAL_CONTENT);
    let ct = m.header("content-type").unwrap();
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("{ct}"));
    let text = m.body.clone();
    let parts: Vec<&[u8]> = split(&text, format!("--{boundary}").as_bytes());
    assert_eq!(parts.len(), 4, "preamble, two parts, epilogue");
    for (part, (from, to)) in parts[1..3].iter().zip([(0, 10), (20, 30)]) {
        let head_end = part.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = std::str::from_utf8(&part[..head_end]).unwrap();
        assert!(
            head.contains(&format!("Content-Range: bytes {from}-{}/10000", to - 1)),
            "{head}"
        );
        assert!(
            head.contains("Content-Type: application/octet-stream"),
            "{head}"
        );
        let data = &part[head_end + 4..part.len() - 2];
        assert_eq!(data, &whole[from..to]);
    }
    // None satisfiable: 416.
    let r = get(&p, "/obj", &[("range", "bytes=10000-")]).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("content-range").as_deref(), Some("bytes */10000"));
    // If-Range: a matching strong ETag gives the range, another the whole.
    let r = get(
        &p,
        "/obj",
        &[("range", "bytes=0-9"), ("if-range", "\"obj\"")],
    )
    .await;
    assert_eq!((r.status, r.body.len()), (StatusCode::PARTIAL_CONTENT, 10));
    let r = get(
        &p,
        "/obj",
        &[("range", "bytes=0-9"), ("if-range", "\"old\"")],
    )
    .await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 10_000));
    // A Range the cache does not understand is ignored: the whole 200.
    let r = get(&p, "/obj", &[("range", "lines=1-2")]).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 10_000));
    assert_eq!(
        o.requests(),
        1,
        "every range came from the one stored object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_an_object_over_the_size_cap_is_still_served() {
    let o = object_origin(64 * 1024).await;
    let p = proxy(&o, "true", "[cache]\nmax_object_bytes = 16384\n");
    let whole = pattern(0, 64 * 1024);
    for _ in 0..2 {
        let r = get(&p, "/big", &[("range", "bytes=40000-40999")]).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(&r.body[..], &whole[40_000..41_000]);
        assert!(status(&r).contains("detail=too-big"), "{}", status(&r));
    }
    assert_eq!(o.requests(), 2, "not stored: each range went to the origin");
    assert_eq!(cache_stats(&p).await["entries"], 0);
}

/// `haystack` split on `sep`.
fn split<'a>(haystack: &'a Bytes, sep: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest: &[u8] = haystack;
    while let Some(i) = rest.windows(sep.len()).position(|w| w == sep) {
        out.push(&rest[..i]);
        rest = &rest[i + sep.len()..];
    }
    out.push(rest);
    out
}
