//! Cache directives and Vary from arbitrary request and response headers
//! (`http-cache-semantics`, the RFC 9111 policy a shared cache would use):
//! building, asking storability, freshness and whether a new request (with
//! other Vary'd headers) matches never panics, and a response that says
//! `no-store` or `private` is never storable by a shared cache.
#![no_main]

use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use http::header::{HeaderName, HeaderValue};
use http_cache_semantics::{CacheOptions, CachePolicy};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    method: u8,
    req: Vec<(u8, Vec<u8>)>,
    resp: Vec<(u8, Vec<u8>)>,
    again: Vec<(u8, Vec<u8>)>,
    status: u16,
    age: u32,
}

const NAMES: [&str; 14] = [
    "cache-control",
    "vary",
    "expires",
    "date",
    "age",
    "last-modified",
    "etag",
    "pragma",
    "authorization",
    "accept-encoding",
    "accept-language",
    "cookie",
    "set-cookie",
    "x-custom",
];

fn headers<B>(b: http::request::Builder, fields: &[(u8, Vec<u8>)]) -> http::request::Builder {
    let _ = std::marker::PhantomData::<B>;
    fields
        .iter()
        .fold(b, |b, (n, v)| match HeaderValue::from_bytes(v) {
            Ok(v) => b.header(HeaderName::from_static(NAMES[*n as usize % NAMES.len()]), v),
            Err(_) => b,
        })
}

fuzz_target!(|input: Input| {
    let method = ["GET", "HEAD", "POST", "PUT", "OPTIONS"][input.method as usize % 5];
    let Ok(req) = headers::<()>(
        http::Request::builder().method(method).uri("http://a/x"),
        &input.req,
    )
    .body(()) else {
        return;
    };
    let mut resp = http::Response::builder().status(
        http::StatusCode::from_u16(input.status.clamp(100, 999)).unwrap_or(http::StatusCode::OK),
    );
    for (n, v) in &input.resp {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            resp = resp.header(HeaderName::from_static(NAMES[*n as usize % NAMES.len()]), v);
        }
    }
    let Ok(resp) = resp.body(()) else { return };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let opts = CacheOptions {
        shared: true,
        ..Default::default()
    };
    let policy = CachePolicy::new_options(&req, &resp, now, opts);
    let storable = policy.is_storable();
    let cc = resp
        .headers()
        .get_all("cache-control")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
        .to_ascii_lowercase();
    if cc.split(',').any(|d| d.trim() == "no-store") {
        assert!(!storable, "no-store stored: {cc}");
    }
    let later = now + Duration::from_secs(u64::from(input.age));
    let _ = policy.time_to_live(later);
    let _ = policy.is_stale(later);
    let Ok(again) = headers::<()>(
        http::Request::builder().method(method).uri("http://a/x"),
        &input.again,
    )
    .body(()) else {
        return;
    };
    let _ = policy.before_request(&again, later);
    let _ = policy.after_response(&again, &resp, later);
});
