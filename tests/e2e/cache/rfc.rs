//! Where the cache reads responses more strictly than `http-cache-semantics`
//! (case-insensitive directives, `Age`, `Expires`, statuses, a `304`
//! without validators, extension methods, interim responses), and the
//! route and store settings built on that view: `CDN-Cache-Control`,
//! `set_cookie`, `Vary` normalisation and tag purge.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_case_directives_are_obeyed() {
    let o = Origin::start(Script::new("Public, MAX-AGE=60")).await;
    let p = proxy(&o, "true", "");
    assert_stored_miss(&get(&p, "/upper", &[]).await);
    assert_hit(&get(&p, "/upper", &[]).await);
    assert_eq!(o.requests(), 1, "MAX-AGE=60 gives freshness");
    // No-CaChE: stored, but every use is revalidated with the origin.
    o.set(|s| {
        s.headers = vec![
            ("cache-control".into(), "Max-Age=60, No-CaChE".into()),
            ("etag".into(), "\"v1\"".into()),
        ]
    });
    get(&p, "/nc", &[]).await;
    let b = get(&p, "/nc", &[]).await;
    assert_eq!(
        o.requests(),
        3,
        "No-CaChE: the second use reached the origin"
    );
    assert_eq!(o.last().headers["if-none-match"], "\"v1\"");
    assert!(
        status(&b).contains("fwd=stale; fwd-status=304"),
        "{}",
        status(&b)
    );
    // NO-STORE: never stored.
    o.set(|s| s.headers = vec![("cache-control".into(), "max-age=60, NO-STORE".into())]);
    get(&p, "/ns", &[]).await;
    assert!(!status(&get(&p, "/ns", &[]).await).contains("hit"));
    assert_eq!(o.requests(), 5);
    // A request's own No-Cache skips the store too.
    let fresh = get(&p, "/upper", &[("cache-control", "No-Cache")]).await;
    assert!(status(&fresh).contains("fwd=request"), "{}", status(&fresh));
    assert_eq!(o.requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_without_validators_refreshes_the_entry_with_one_request() {
    let mut script = Script::new("max-age=2").header("etag", "\"v1\"");
    script.bare_304 = true;
    let o = Origin::start(script).await;
    let p = proxy(&o, "true", "");
    let a = get(&p, "/bare", &[]).await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let before = o.requests();
    let b = get(&p, "/bare", &[]).await;
    assert_eq!(
        o.requests() - before,
        1,
        "one conditional request; the validator-less 304 updated the entry"
    );
    assert_eq!(o.last().headers["if-none-match"], "\"v1\"");
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(b.body, a.body, "the stored body");
    let s = status(&b);
    assert!(
        s.contains("fwd=stale; fwd-status=304") && s.contains("stored"),
        "{s}"
    );
    // Refreshed: fresh again for its max-age.
    assert_hit(&get(&p, "/bare", &[]).await);
    assert_eq!(o.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_is_read_as_rfc_9111_says() {
    // The first member of a list counts: 120 s old with max-age=60 is stale.
    let o = Origin::start(Script::new("max-age=60").header("age", "120, 0")).await;
    let p = proxy(&o, "true", "");
    get(&p, "/list", &[]).await;
    let b = get(&p, "/list", &[]).await;
    assert!(
        !status(&b).contains("hit"),
        "Age: 120, 0 is stale: {}",
        status(&b)
    );
    assert_eq!(o.requests(), 2);
    // An invalid Age (not a non-negative integer, or with parameters) is
    // ignored (§5.1): the age is the time since Date. Had the `3600` been
    // read, these would be stale.
    for (path, age) in [
        ("/old", "old, 3600"),
        ("/param", "3600;foo=bar"),
        ("/neg", "-3600"),
    ] {
        o.set(|s| {
            s.headers = vec![
                ("cache-control".into(), "max-age=60".into()),
                ("age".into(), age.into()),
            ]
        });
        get(&p, path, &[]).await;
        let b = get(&p, path, &[]).await;
        assert_hit(&b);
        let shown: u64 = b.header("age").unwrap().parse().unwrap();
        assert!(shown < 5, "Age: {age} ignored, age shown {shown}");
    }
}

/// `t` in the RFC 850 and asctime forms (RFC 9110 §5.6.7).
fn obsolete_dates(t: SystemTime) -> (String, String) {
    let imf = httpdate::fmt_http_date(t); // "Wed, 02 Dec 2026 05:15:00 GMT"
    let (wd, rest) = imf.split_once(", ").unwrap();
    let f: Vec<&str> = rest.split(' ').collect(); // [02, Dec, 2026, 05:15:00, GMT]
    let long = match wd {
        "Mon" => "Monday",
        "Tue" => "Tuesday",
        "Wed" => "Wednesday",
        "Thu" => "Thursday",
        "Fri" => "Friday",
        "Sat" => "Saturday",
        _ => "Sunday",
    };
    let rfc850 = format!("{long}, {}-{}-{} {} GMT", f[0], f[1], &f[2][2..], f[3]);
    let day: u32 = f[0].parse().unwrap();
    let asctime = format!("{wd} {} {day:>2} {} {}", f[1], f[3], f[2]);
    (rfc850, asctime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_in_an_invalid_format_is_already_expired() {
    let later = SystemTime::now() + Duration::from_secs(600);
    let imf = httpdate::fmt_http_date(later);
    let (rfc850, asctime) = obsolete_dates(later);
    let extra_space = imf.replacen(' ', "  ", 1);
    let numeric_zone = imf.replace("GMT", "+0000");
    let o = Origin::start(Script::new("x")).await;
    let p = proxy(&o, "true", "");
    let mut n = 0;
    for (i, (expires, valid)) in [
        (imf.as_str(), true),
        (rfc850.as_str(), true),
        (asctime.as_str(), true),
        (extra_space.as_str(), false),
        (numeric_zone.as_str(), false),
        ("0", false),
    ]
    .into_iter()
    .enumerate()
    {
        let e = expires.to_string();
        o.set(|s| s.headers = vec![("expires".into(), e)]);
        let path = format!("/exp/{i}");
        get(&p, &path, &[]).await;
        let b = get(&p, &path, &[]).await;
        n += if valid { 1 } else { 2 };
        assert_eq!(
            status(&b).starts_with("sluicegate; hit"),
            valid,
            "Expires: {expires:?}: {}",
            status(&b)
        );
        assert_eq!(o.requests(), n, "Expires: {expires:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_statuses_with_explicit_freshness_are_stored() {
    let o = Origin::start(Script::new("max-age=60")).await;
    let p = proxy(&o, "true", "");
    for code in [500u16, 503, 403, 400] {
        o.set(|s| s.status = code);
        let path = format!("/err/{code}");
        let a = get(&p, &path, &[]).await;
        assert_eq!(a.status.as_u16(), code);
        assert!(status(&a).contains("stored"), "{code}: {}", status(&a));
        let b = get(&p, &path, &[]).await;
        assert_eq!(b.status.as_u16(), code, "the stored status");
        assert!(
            status(&b).starts_with("sluicegate; hit"),
            "{code}: {}",
            status(&b)
        );
        assert_eq!(b.body, a.body);
    }
    assert_eq!(o.requests(), 4);
    // Without explicit freshness a 500 is not stored.
    o.set(|s| {
        s.status = 500;
        s.headers.clear();
    });
    get(&p, "/err/plain", &[]).await;
    get(&p, "/err/plain", &[]).await;
    assert_eq!(o.requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_extension_methods_invalidate() {
    let o = Origin::start(Script::new("max-age=60")).await;
    let p = proxy(&o, "true", "");
    for path in ["/doc", "/other"] {
        get(&p, path, &[]).await;
        assert_hit(&get(&p, path, &[]).await);
    }
    let reindex = Method::from_bytes(b"REINDEX").unwrap();
    let r = within(
        10,
        "REINDEX",
        p.request(reindex.clone(), "/doc", &[], Bytes::new()),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(o.last().method, "REINDEX");
    assert!(status(&get(&p, "/doc", &[]).await).contains("fwd=uri-miss"));
    // A safe method (OPTIONS, PROPFIND) invalidates nothing.
    for m in [Method::OPTIONS, Method::from_bytes(b"PROPFIND").unwrap()] {
        within(10, "safe", p.request(m, "/other", &[], Bytes::new())).await;
    }
    assert_hit(&get(&p, "/other", &[]).await);
    // An extension method answered with an error invalidates nothing either.
    o.set(|s| s.status = 500);
    within(
        10,
        "REINDEX",
        p.request(reindex, "/other", &[], Bytes::new()),
    )
    .await;
    assert_hit(&get(&p, "/other", &[]).await);
}

/// An origin that sends `103 Early Hints` before each `200`.
async fn early_hints_origin() -> Backend {
    Backend::raw("hints", |mut stream, requests, _| async move {
        let mut buf = vec![0u8; 8192];
        loop {
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                use tokio::io::AsyncReadExt;
                match stream.read(&mut buf).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let n = requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let body = format!("final {n}");
            let out = format!(
                "HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
                 HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(out.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_103_is_never_stored() {
    let origin = early_hints_origin().await;
    let toml = Cfg::new()
        .admin()
        .upstream("app", &[origin.addr()])
        .extra("[[route]]\npath_prefix = \"/\"\nupstream = \"app\"\ncache = true\n")
        .toml();
    let p = Proxy::start(&toml);
    let a = get(&p, "/h", &[]).await;
    assert_eq!(a.status, StatusCode::OK, "the final response, not the 103");
    assert_eq!(a.text(), "final 1");
    assert_stored_miss(&a);
    let b = get(&p, "/h", &[]).await;
    assert_hit(&b);
    assert_eq!(b.text(), "final 1");
    assert!(
        b.header("link").is_none(),
        "the 103's fields were not stored"
    );
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_on_accept_fields_is_normalised() {
    let mut script = Script::new("max-age=60").header("vary", "Accept-Encoding, Accept-Language");
    script.reflect = vec!["accept-encoding".into(), "accept-language".into()];
    let o = Origin::start(script).await;
    let p = proxy(&o, "true", "");
    let a = get(
        &p,
        "/v",
        &[
            ("accept-encoding", "gzip, br"),
            ("accept-language", "fr;q=0.5, en"),
        ],
    )
    .await;
    assert!(
        a.text().contains("accept-encoding=br, gzip"),
        "{}",
        a.text()
    );
    for (ae, al) in [
        ("br,gzip", "en,fr;q=0.5"),
        ("GZIP , BR", "EN, fr;q=0.50"),
        ("gzip, gzip, br", "en, fr;q=0.5"),
    ] {
        let b = get(
            &p,
            "/v",
            &[("accept-encoding", ae), ("accept-language", al)],
        )
        .await;
        assert_hit(&b);
        assert_eq!(b.body, a.body);
    }
    let other = get(
        &p,
        "/v",
        &[("accept-encoding", "gzip"), ("accept-language", "en")],
    )
    .await;
    assert!(
        status(&other).contains("fwd=vary-miss"),
        "{}",
        status(&other)
    );
    assert_eq!(o.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cookie_is_never_stored_unless_the_route_strips_it() {
    let o = Origin::start(Script::new("max-age=60").header("set-cookie", "sid=alice")).await;
    let never = proxy(&o, "true", "");
    get(&never, "/c", &[]).await;
    let b = get(&never, "/c", &[]).await;
    assert!(!status(&b).contains("hit"), "{}", status(&b));
    assert_eq!(o.requests(), 2);
    let strip = proxy(&o, "{ set_cookie = \"strip\" }", "");
    let a = get(&strip, "/c", &[]).await;
    assert_stored_miss(&a);
    assert_eq!(
        a.header("set-cookie").as_deref(),
        Some("sid=alice"),
        "the client that asked gets it"
    );
    let b = get(&strip, "/c", &[]).await;
    assert_hit(&b);
    assert!(
        b.header("set-cookie").is_none(),
        "a hit never carries another client's cookie"
    );
    assert_eq!(o.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdn_cache_control_overrides_cache_control() {
    let script = Script::new("no-store").header("cdn-cache-control", "Max-Age=60");
    let o = Origin::start(script).await;
    let p = proxy(&o, "true", "");
    assert_stored_miss(&get(&p, "/t", &[]).await);
    let b = get(&p, "/t", &[]).await;
    assert_hit(&b);
    assert_eq!(
        b.header("cache-control").as_deref(),
        Some("no-store"),
        "clients still see Cache-Control"
    );
    assert_eq!(o.requests(), 1);
    // Told to obey no targeted field: Cache-Control (no-store) counts.
    let off = proxy(&o, "true", "[cache]\ntargeted_fields = []\n");
    get(&off, "/t", &[]).await;
    get(&off, "/t", &[]).await;
    assert_eq!(o.requests(), 3);
    // Told to obey only its own field: Cache-Control alone stores nothing.
    let only = proxy(
        &o,
        "true",
        "[cache]\ntargeted_fields = [\"Acme-Cache-Control\"]\ntargeted_only = true\n",
    );
    o.set(|s| {
        s.headers = vec![("cache-control".into(), "max-age=60".into())];
    });
    get(&only, "/u", &[]).await;
    get(&only, "/u", &[]).await;
    assert_eq!(o.requests(), 5);
    o.set(|s| {
        s.headers
            .push(("acme-cache-control".into(), "max-age=60".into()))
    });
    get(&only, "/w", &[]).await;
    assert_hit(&get(&only, "/w", &[]).await);
    assert_eq!(o.requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_purge_every_entry_that_carries_them() {
    let o = Origin::start(Script::new("max-age=600")).await;
    let p = proxy(&o, "true", "");
    for (path, key, tag) in [
        ("/t/1", "a b", ""),
        ("/t/2", "b", "c"),
        ("/t/3", "", "c, d"),
        ("/t/4", "", ""),
    ] {
        o.set(|s| {
            s.headers = vec![("cache-control".into(), "max-age=600".into())];
            if !key.is_empty() {
                s.headers.push(("surrogate-key".into(), key.into()));
            }
            if !tag.is_empty() {
                s.headers.push(("cache-tag".into(), tag.into()));
            }
        });
        let r = get(&p, path, &[]).await;
        assert!(
            r.header("surrogate-key").is_none() && r.header("cache-tag").is_none(),
            "{r:?}"
        );
        assert_hit(&get(&p, path, &[]).await);
    }
    let purge = |q: &'static str, body: &'static str| {
        let addr = p.admin_addr();
        async move {
            let r = client::request(
                addr,
                Method::POST,
                q,
                &[],
                Bytes::from_static(body.as_bytes()),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()
        }
    };
    let r = purge("/cache/purge", r#"{"tags": ["b"]}"#).await;
    assert_eq!(r["purged"], 2, "{r}");
    for path in ["/t/1", "/t/2"] {
        assert!(
            status(&get(&p, path, &[]).await).contains("fwd=uri-miss"),
            "{path}"
        );
    }
    assert_hit(&get(&p, "/t/3", &[]).await);
    let r = purge("/cache/purge?tag=d&tag=nothing", "").await;
    assert_eq!(r["purged"], 1, "{r}");
    assert!(status(&get(&p, "/t/3", &[]).await).contains("fwd=uri-miss"));
    assert_hit(&get(&p, "/t/4", &[]).await);
    let metrics = p.admin_get("/metrics").await.text();
    assert!(
        client::metric_value(&metrics, "sluicegate_cache_purged_total") >= 3.0,
        "{metrics}"
    );
}
