//! The native HTTP cache end to end: every RFC 9111 directive and feature
//! the cache claims, against a scripted origin that counts what reaches it.
//! `rfc` holds the points where the cache corrects `http-cache-semantics`,
//! the targeted field, cookies and tags; `partial` the `304`, `206` and
//! `416` answered from the store.

mod disk;
mod partial;
mod rfc;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};

use crate::common::backend::{full, RespBody};
use crate::common::{client, wasm, within, Backend, Cfg, Fnv, Proxy, Resp};

/// What the scripted origin answers; tests change it between requests.
#[derive(Clone)]
struct Script {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    /// Request headers whose values the body reflects (`name=value`).
    reflect: Vec<String>,
    /// Wait this long before answering.
    delay: Duration,
    /// Answer a matching `If-None-Match` / `If-Modified-Since` with `304`.
    conditional: bool,
    /// Answer with this many bytes of pattern instead (no Content-Length
    /// when `chunked`).
    big: Option<(usize, bool)>,
    /// A `304` carries no header of the script (no validator, no
    /// `Cache-Control`).
    bare_304: bool,
}

impl Script {
    fn new(cache_control: &str) -> Script {
        Script {
            status: 200,
            headers: vec![("cache-control".into(), cache_control.into())],
            body: "body".into(),
            reflect: Vec::new(),
            delay: Duration::ZERO,
            conditional: true,
            big: None,
            bare_304: false,
        }
    }

    fn header(mut self, k: &str, v: &str) -> Script {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// What the origin saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    headers: HeaderMap,
}

/// The scripted origin.
struct Origin {
    backend: Backend,
    script: Arc<Mutex<Script>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    async fn start(script: Script) -> Origin {
        let script = Arc::new(Mutex::new(script));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (s, log) = (script.clone(), seen.clone());
        let backend = Backend::serve("origin", move |req| {
            let script = s.lock().unwrap().clone();
            let n = {
                let mut log = log.lock().unwrap();
                log.push(Seen {
                    method: req.method().to_string(),
                    uri: req.uri().to_string(),
                    headers: req.headers().clone(),
                });
                log.len()
            };
            async move { answer(script, n, req.headers(), req.method()).await }
        })
        .await;
        Origin {
            backend,
            script,
            seen,
        }
    }

    fn set(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.script.lock().unwrap());
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }
}

async fn answer(script: Script, n: usize, req: &HeaderMap, method: &Method) -> Response<RespBody> {
    tokio::time::sleep(script.delay).await;
    let header = |name: &str| {
        script
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    };
    let inm = req.get("if-none-match").and_then(|v| v.to_str().ok());
    let ims = req.get("if-modified-since").and_then(|v| v.to_str().ok());
    let not_modified = script.conditional
        && ((inm.is_some() && inm == header("etag").map(|s| s.as_str()))
            || (inm.is_none()
                && ims.is_some()
                && ims == header("last-modified").map(|s| s.as_str())));
    let mut resp = if not_modified {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else if let Some((len, chunked)) = script.big {
        let bytes = crate::common::pattern(0, len);
        let body = if chunked {
            use http_body_util::BodyExt;
            let frames: Vec<Result<_, crate::common::backend::BoxError>> = bytes
                .chunks(8192)
                .map(|c| Ok(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
        } else {
            full(bytes)
        };
        Response::new(body)
    } else {
        let mut text = format!("{} n={n} method={method}", script.body);
        for name in &script.reflect {
            let v = req
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            text += &format!(" {name}={v}");
        }
        let mut r = Response::new(full(text));
        *r.status_mut() = StatusCode::from_u16(script.status).unwrap();
        r
    };
    if not_modified && script.bare_304 {
        return resp;
    }
    for (k, v) in &script.headers {
        resp.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    resp
}

/// A proxy with one caching route (`route_cache`: the route's `cache`
/// value) and `extra` TOML (e.g. a `[cache]` table).
fn proxy(origin: &Origin, route_cache: &str, extra: &str) -> Proxy {
    let toml = Cfg::new()
        .admin()
        .upstream("app", &[origin.backend.addr()])
        .extra(&format!(
            "[[route]]\npath_prefix = \"/\"\nupstream = \"app\"\ncache = {route_cache}\n\n{extra}"
        ))
        .toml();
    Proxy::start(&toml)
}

async fn get(p: &Proxy, path: &str, headers: &[(&str, &str)]) -> Resp {
    within(10, path, p.get(path, headers)).await
}

fn status(r: &Resp) -> String {
    r.header("cache-status")
        .unwrap_or_else(|| panic!("no Cache-Status in {r:?}"))
}

fn assert_hit(r: &Resp) {
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let s = status(r);
    assert!(s.starts_with("sluicegate; hit"), "expected a hit: {s}");
}

fn assert_stored_miss(r: &Resp) {
    let s = status(r);
    assert!(
        s.contains("fwd=uri-miss") && s.contains("stored"),
        "expected a stored miss: {s}"
    );
}

async fn cache_stats(p: &Proxy) -> serde_json::Value {
    let r = within(10, "GET /cache", p.admin_get("/cache")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    serde_json::from_slice(&r.body).expect("GET /cache is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_is_fresh_then_expires() {
    let o = Origin::start(Script::new("max-age=1")).await;
    let p = proxy(&o, "true", "");
    let a = get(&p, "/x", &[]).await;
    assert_stored_miss(&a);
    assert!(a.text().starts_with("body n=1"), "{}", a.text());
    let b = get(&p, "/x", &[]).await;
    assert_hit(&b);
    assert_eq!(b.body, a.body, "a hit serves the stored body");
    assert_eq!(o.requests(), 1, "the hit did not reach the origin");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let c = get(&p, "/x", &[]).await;
    assert!(status(&c).contains("fwd=stale"), "{}", status(&c));
    assert_eq!(o.requests(), 2, "an expired entry goes back to the origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_maxage_wins_over_max_age_in_a_shared_cache() {
    let o = Origin::start(Script::new("max-age=0, s-maxage=60")).await;
    let p = proxy(&o, "true", "");
    get(&p, "/s", &[]).await;
    let b = get(&p, "/s", &[]).await;
    assert_hit(&b);
    assert_eq!(o.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_gives_freshness_without_cache_control() {
    let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
    let mut script = Script::new("x").header("expires", &later);
    script.headers.retain(|(k, _)| k != "cache-control");
    let o = Origin::start(script).await;
    let p = proxy(&o, "true", "");
    get(&p, "/e", &[]).await;
    let b = get(&p, "/e", &[]).await;
    assert_hit(&b);
    assert_eq!(o.requests(), 1);
    // An Expires in the past: stale at once, never a hit.
    let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(120));
    o.set(|s| s.headers = vec![("expires".into(), past)]);
    get(&p, "/e2", &[]).await;
    get(&p, "/e2", &[]).await;
    assert_eq!(o.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heuristic_freshness_from_last_modified() {
    let ten_days_ago = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(864_000));
    let mut script = Script::new("x").header("last-modified", &ten_days_ago);
    script.headers.retain(|(k, _)| k != "cache-control");
    let o = Origin::start(script).await;
    let p = proxy(&o, "true", "");
    get(&p, "/h", &[]).await;
    let b = get(&p, "/h", &[]).await;
    assert_hit(&b);
    let ttl: i64 = status(&b)
        .split("ttl=")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|t| t.trim().parse().ok())
        .expect("a ttl");
    // 10% of ten days is one day.
    assert!((86_000..=86_400).contains(&ttl), "ttl {ttl}");
    // Without Last-Modified there is no heuristic: not a hit.
    o.set(|s| s.headers.clear());
    get(&p, "/h2", &[]).await;
    get(&p, "/h2", &[]).await;
    assert_eq!(o.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_is_never_stored() {
    let o = Origin::start(Script::new("no-store, max-age=60")).await;
    let p = proxy(&o, "true", "");
    let a = get(&p, "/n", &[]).await;
    let b = get(&p, "/n", &[]).await;
    assert_eq!(o.requests(), 2);
    for r in [&a, &b] {
        let s = status(r);
        assert!(s.contains("fwd=uri-miss") && !s.contains("stored"), "{s}");
    }
    assert_eq!(cache_stats(&p).await["entries"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_is_stored_but_revalidated_every_time() {
    let o = Origin::start(Script::new("no-cache").header("etag", "\"v1\"")).await;
    let p = proxy(&o, "true", "");
    let a = get(&p, "/nc", &[]).await;
    assert_stored_miss(&a);
    let b = get(&p, "/nc", &[]).await;
    assert_eq!(o.requests(), 2, "no-cache: every use goes to the origin");
    assert_eq!(
        o.last()
            .headers
            .get("if-none-match")
            .map(|v| v.to_str().unwrap()),
        Some("\"v1\""),
        "the revalidation is conditional"
    );
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(b.body, a.body, "304: the stored body is served");
    let s = status(&b);
    assert!(
        s.contains("fwd=stale") && s.contains("fwd-status=304"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_is_not_stored_by_a_shared_cache() {
    let o = Origin::start(Script::new("private, max-age=60")).await;
    let p = proxy(&o, "true", "");
    get(&p, "/p", &[]).await;
    let b = get(&p, "/p", &[]).await;
    assert!(!status(&b).contains("hit"), "{}", status(&b));
    assert_eq!(o.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn must_revalidate_is_never_served_stale() {
    // The route would serve stale on error, but the response forbids it.
    let o = Origin::start(Script::new("max-age=1, must-revalidate")).await;
    let p = proxy(
        &o,
        "{ stale_if_error_s = 60, stale_while_revalidate_s = 60 }",
        "",
    );
    get(&p, "/m", &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    o.set(|s| s.status = 500);
    let b = get(&p, "/m", &[]).await;
    assert_eq!(b.status, StatusCode::INTERNAL_SERVER_ERROR, "{b:?}");
    assert!(
        b.text().contains("n=2"),
        "the origin's error, not the stale body"
    );
    assert_eq!(o.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_responses_are_shared_only_when_allowed() {
    let o = Origin::start(Script::new("max-age=60")).await;
    let p = proxy(&o, "true", "");
    let auth = [("authorization", "Bearer alice")];
    get(&p, "/a", &auth).await;
    get(&p, "/a", &auth).await;
    assert_eq!(
        o.requests(),
        2,
        "max-age alone: not stored for a request with Authorization"
    );
    o.set(|s| s.headers = vec![("cache-control".into(), "public, max-age=60".into())]);
    get(&p, "/pub", &auth).await;
    assert_hit(&get(&p, "/pub", &auth).await);
    assert_eq!(o.requests(), 3, "public: stored");
    o.set(|s| s.headers = vec![("cache-control".into(), "s-maxage=60".into())]);
    get(&p, "/s", &auth).await;
    assert_hit(&get(&p, "/s", &auth).await);
    assert_eq!(o.requests(), 4, "s-maxage: stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_counts_the_origins_age_and_time_in_cache() {
    let o = Origin::start(Script::new("max-age=60").header("age", "10")).await;
    let p = proxy(&o, "true", "");
    get(&p, "/age", &[]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let b = get(&p, "/age", &[]).await;
    assert_hit(&b);
    let age: u64 = b.header("age").expect("Age on a hit").parse().unwrap();
    assert!((11..=13).contains(&age), "age {age}");
    let ttl: i64 = status(&b)
        .split("ttl=")
        .nth(1)
        .and_then(|t| t.parse().ok())
        .expect("a ttl");
    assert!(
        (46..=49).contains(&ttl),
        "ttl counts the origin's age: {ttl}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_variants_are_stored_apart() {
    let mut script = Script::new("max-age=60").header("vary", "Accept-Encoding");
    script.reflect = vec!["accept-encoding".into()];
    let o = Origin::start(script).await;
    let p = proxy(&o, "true", "");
    let gz = get(&p, "/v", &[("accept-encoding", "gzip")]).await;
    let br = get(&p, "/v", &[("accept-encoding", "br")]).await;
    assert!(status(&br).contains("fwd=vary-miss"), "{}", status(&br));
    let gz2 = get(&p, "/v", &[("accept-encoding", "gzip")]).await;
    let br2 = get(&p, "/v", &[("accept-encoding", "br")]).await;
    assert_hit(&gz2);
    assert_hit(&br2);
    assert!(
        gz2.text().contains("accept-encoding=gzip"),
        "{}",
        gz2.text()
    );
    assert!(br2.text().contains("accept-encoding=br"), "{}", br2.text());
    assert_eq!((gz2.body.clone(), br2.body.clone()), (gz.body, br.body));
    assert_eq!(o.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etag_revalidation_merges_the_304() {
    let o = Origin::start(
        Script::new("max-age=1")
            .header("etag", "\"v1\"")
            .header("x-version", "first"),
    )
    .await;
    let p = proxy(&o, "true", "");
    let a = get(&p, "/r", &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // The 304 brings new metadata: a longer lifetime and an updated header.
    o.set(|s| {
        s.headers = vec![
            ("cache-control".into(), "max-age=60".into()),
            ("etag".into(), "\"v1\"".into()),
            ("x-version".into(), "merged".into()),
        ]
    });
    let b = get(&p, "/r", &[]).await;
    assert_eq!(o.last().headers["if-none-match"], "\"v1\"");
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(b.body, a.body, "the stored body");
    assert_eq!(b.header("x-version").as_deref(), Some("merged"));
    let s = status(&b);
    assert!(s.contains("fwd=stale; fwd-status=304"), "{s}");
    let c = get(&p, "/r", &[]).await;
    assert_hit(&c);
    assert_eq!(c.header("x-version").as_deref(), Some("merged"));
    assert_eq!(c.body, a.body);
    assert_eq!(o.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_modified_revalidation_merges_the_304() {
    let lm = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3600));
    let o = Origin::start(Script::new("max-age=1").header("last-modified", &lm)).await;
    let p = proxy(&o, "true", "");
    let a = get(&p, "/lm", &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let b = get(&p, "/lm", &[]).await;
    assert_eq!(
        o.last()
            .headers
            .get("if-modified-since")
            .map(|v| v.to_str().unwrap()),
        Some(lm.as_str())
    );
    assert_eq!(b.body, a.body);
    assert!(status(&b).contains("fwd-status=304"), "{}", status(&b));
    // A changed resource (the validator no longer matches) replaces the entry.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    o.set(|s| s.conditional = false);
    let c = get(&p, "/lm", &[]).await;
    assert!(c.text().contains("n=3"), "{}", c.text());
    assert!(
        status(&c).contains("fwd-status=200; stored"),
        "{}",
        status(&c)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_invalidate_the_url_and_its_location() {
    let o = Origin::start(Script::new("max-age=60")).await;
    let p = proxy(&o, "true", "");
    for path in ["/items", "/items/7", "/other"] {
        get(&p, path, &[]).await;
        assert_hit(&get(&p, path, &[]).await);
    }
    assert_eq!(o.requests(), 3);
    o.set(|s| s.headers.push(("location".into(), "/items/7".into())));
    let post = within(
        10,
        "POST",
        p.request(Method::POST, "/items", &[], Bytes::from_static(b"new")),
    )
    .await;
    assert!(status(&post).contains("fwd=method"), "{}", status(&post));
    assert_eq!(
        (o.last().method.as_str(), o.last().uri.as_str()),
        ("POST", "/items")
    );
    o.set(|s| s.headers.retain(|(k, _)| k != "location"));
    let items = get(&p, "/items", &[]).await;
    assert!(
        status(&items).contains("fwd=uri-miss"),
        "{}",
        status(&items)
    );
    let item = get(&p, "/items/7", &[]).await;
    assert!(
        status(&item).contains("fwd=uri-miss"),
        "Location invalidated: {}",
        status(&item)
    );
    assert_hit(&get(&p, "/other", &[]).await);
    // DELETE too; an error answer invalidates nothing.
    within(
        10,
        "DELETE",
        p.request(Method::DELETE, "/items", &[], Bytes::new()),
    )
    .await;
    assert!(status(&get(&p, "/items", &[]).await).contains("fwd=uri-miss"));
    o.set(|s| s.status = 500);
    within(
        10,
        "PUT",
        p.request(Method::PUT, "/other", &[], Bytes::new()),
    )
    .await;
    assert_hit(&get(&p, "/other", &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_answered_from_a_get_entry() {
    let o = Origin::start(Script::new("max-age=60")).await;
    let p = proxy(&o, "true", "");
    let a = get(&p, "/hd", &[]).await;
    let h = within(
        10,
        "HEAD",
        p.request(Method::HEAD, "/hd", &[], Bytes::new()),
    )
    .await;
    assert_hit(&h);
    assert!(h.body.is_empty());
    assert_eq!(
        h.header("content-length").as_deref(),
        Some(a.body.len().to_string().as_str())
    );
    assert_eq!(o.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_status_names_what_happened() {
    let o = Origin::start(Script::new("max-age=60")).await;
    let p = proxy(&o, "true", "");
    assert_eq!(
        status(&get(&p, "/cs", &[]).await),
        "sluicegate; fwd=uri-miss; fwd-status=200; stored"
    );
    let hit = status(&get(&p, "/cs", &[]).await);
    assert!(
        hit == "sluicegate; hit; ttl=60" || hit == "sluicegate; hit; ttl=59",
        "{hit}"
    );
    let opts = within(
        10,
        "OPTIONS",
        p.request(Method::OPTIONS, "/cs", &[], Bytes::new()),
    )
    .await;
    assert_eq!(status(&opts), "sluicegate; fwd=method; fwd-status=200");
    // A range is answered from the store (see `partial`).
    let range = get(&p, "/cs", &[("range", "bytes=0-1")]).await;
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT);
    assert!(
        status(&range).starts_with("sluicegate; hit"),
        "{}",
        status(&range)
    );
    let fresh = get(&p, "/cs", &[("cache-control", "no-cache")]).await;
    assert_eq!(
        status(&fresh),
        "sluicegate; fwd=request; fwd-status=200; stored"
    );
    // An upstream cache's member comes first.
    o.set(|s| s.headers.push(("cache-status".into(), "edge; hit".into())));
    let r = get(&p, "/cs2", &[]).await;
    assert!(
        status(&r).starts_with("edge; hit, sluicegate; fwd=uri-miss"),
        "{}",
        status(&r)
    );
    // And on a hit, the stored upstream member is kept and ours follows
    // it, once (the fast hit path and HEAD alike).
    for method in [Method::GET, Method::HEAD] {
        let hit = within(10, "hit", p.request(method, "/cs2", &[], Bytes::new())).await;
        let s = status(&hit);
        assert!(
            s == "edge; hit, sluicegate; hit; ttl=60" || s == "edge; hit, sluicegate; hit; ttl=59",
            "{s}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_origin_request() {
    let mut script = Script::new("max-age=60");
    script.delay = Duration::from_millis(1000);
    let o = Origin::start(script).await;
    let p = proxy(&o, "true", "");
    let addr = p.addr();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                client::request(addr, Method::GET, "/co", &[], Bytes::new()).await
            })
        })
        .collect();
    let mut bodies = Vec::new();
    let (mut stored, mut collapsed, mut hits) = (0, 0, 0);
    for t in tasks {
        let r = within(10, "coalesced request", t).await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        let s = status(&r);
        stored += s.contains("stored") as usize;
        collapsed += s.contains("collapsed") as usize;
        hits += s.starts_with("sluicegate; hit") as usize;
        bodies.push(r.body);
    }
    assert_eq!(o.requests(), 1, "20 concurrent misses, one origin request");
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "everyone got the same response"
    );
    // One leader stored it; the others waited for it (or, arriving after
    // it was stored, hit).
    assert_eq!((stored, collapsed + hits), (1, 19));
    assert!(collapsed > 0, "nobody waited for the leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let o = Origin::start(Script::new("max-age=1, stale-while-revalidate=30")).await;
    let p = proxy(&o, "true", "");
    get(&p, "/swr", &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    o.set(|s| {
        s.delay = Duration::from_millis(2000);
        s.conditional = false;
    });
    for _ in 0..5 {
        let started = Instant::now();
        let r = get(&p, "/swr", &[]).await;
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "stale served without waiting for the 2 s origin"
        );
        assert!(r.text().contains("n=1"), "the stale body: {}", r.text());
        let s = status(&r);
        assert!(
            s.contains("hit") && s.contains("detail=stale-while-revalidate"),
            "{s}"
        );
    }
    o.backend.wait_requests(2, 5).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        o.requests(),
        2,
        "one background refresh for five stale hits"
    );
    let fresh = get(&p, "/swr", &[]).await;
    assert_hit(&fresh);
    assert!(fresh.text().contains("n=2"), "refreshed: {}", fresh.text());
    assert!(cache_stats(&p).await["stale"].as_u64().unwrap() >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_stale_when_the_origin_fails() {
    let o = Origin::start(Script::new("max-age=1, stale-if-error=60")).await;
    // /d has no directive of its own: the route's default applies.
    let p = proxy(&o, "{ stale_if_error_s = 60 }", "");
    get(&p, "/sie", &[]).await;
    o.set(|s| s.headers = vec![("cache-control".into(), "max-age=1".into())]);
    get(&p, "/d", &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    o.set(|s| s.status = 503);
    for path in ["/sie", "/d"] {
        let r = get(&p, path, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {r:?}");
        assert!(
            r.text().contains("n=1") || r.text().contains("n=2"),
            "{}",
            r.text()
        );
        let s = status(&r);
        assert!(
            s.contains("fwd=stale; fwd-status=503") && s.contains("detail=stale-if-error"),
            "{s}"
        );
    }
    // Without a stale-if-error window the error goes through.
    let q = proxy(&o, "true", "");
    o.set(|s| s.status = 200);
    get(&q, "/d", &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    o.set(|s| s.status = 503);
    assert_eq!(
        get(&q, "/d", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bound_is_never_exceeded() {
    let mut script = Script::new("max-age=600");
    script.body = "x".repeat(8 * 1024);
    let o = Origin::start(script).await;
    let bound = 64 * 1024;
    let p = proxy(
        &o,
        "true",
        &format!("[cache]\nmax_bytes = {bound}\nmax_object_bytes = 16384\n"),
    );
    for i in 0..40 {
        let r = get(&p, &format!("/mem/{i}"), &[]).await;
        assert_stored_miss(&r);
        let st = cache_stats(&p).await;
        let bytes = st["bytes"].as_u64().unwrap();
        assert!(bytes <= bound, "after {i}: {bytes} bytes > {bound}");
    }
    let st = cache_stats(&p).await;
    assert!(st["evictions"].as_u64().unwrap() > 0, "{st}");
    let entries = st["entries"].as_u64().unwrap();
    assert!((1..40).contains(&entries), "{st}");
    assert!(st["bytes"].as_u64().unwrap() > 8 * 1024, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_over_the_size_limit_pass_through() {
    let mut script = Script::new("max-age=60");
    script.big = Some((64 * 1024, false));
    let o = Origin::start(script).await;
    let p = proxy(&o, "true", "[cache]\nmax_object_bytes = 16384\n");
    let want = Fnv::of(&crate::common::pattern(0, 64 * 1024));
    for _ in 0..2 {
        let r = get(&p, "/big", &[]).await;
        assert_eq!(Fnv::of(&r.body), want);
        assert!(status(&r).contains("detail=too-big"), "{}", status(&r));
    }
    // Unknown length: streamed whole, dropped from the store past the limit.
    o.set(|s| s.big = Some((64 * 1024, true)));
    for _ in 0..2 {
        let r = get(&p, "/chunked", &[]).await;
        assert_eq!(Fnv::of(&r.body), want);
    }
    assert_eq!(o.requests(), 4);
    assert_eq!(cache_stats(&p).await["entries"], 0);
    // A small one on the same route is stored.
    o.set(|s| s.big = None);
    get(&p, "/small", &[]).await;
    assert_hit(&get(&p, "/small", &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_exact_url_and_prefix() {
    let o = Origin::start(Script::new("max-age=600")).await;
    let p = proxy(&o, "true", "");
    for path in ["/a/1", "/a/2", "/b/1"] {
        get(&p, path, &[]).await;
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
    let r = purge("/cache/purge", r#"{"url": "http://LOCALHOST/a/1"}"#).await;
    assert_eq!(r["purged"], 1, "{r}");
    assert!(status(&get(&p, "/a/1", &[]).await).contains("fwd=uri-miss"));
    assert_hit(&get(&p, "/a/2", &[]).await);
    let r = purge("/cache/purge?prefix=%2Fa%2F", "").await;
    assert_eq!(r["purged"], 2, "{r}");
    assert!(status(&get(&p, "/a/2", &[]).await).contains("fwd=uri-miss"));
    assert_hit(&get(&p, "/b/1", &[]).await);
    let bad = client::request(
        p.admin_addr(),
        Method::POST,
        "/cache/purge",
        &[],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let st = cache_stats(&p).await;
    assert!(st["hits"].as_u64().unwrap() >= 5, "{st}");
    assert!(st["hit_ratio"].as_f64().unwrap() > 0.0, "{st}");
    let metrics = p.admin_get("/metrics").await.text();
    for m in [
        "sluicegate_cache_hits_total",
        "sluicegate_cache_misses_total",
        "sluicegate_cache_bytes",
    ] {
        assert!(metrics.contains(m), "{m} missing from /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_still_runs_the_auth_filter_and_the_response_filters() {
    let o = Origin::start(Script::new("public, max-age=600")).await;
    let toml = Cfg::new()
        .admin()
        .upstream("app", &[o.backend.addr()])
        .extra(
            r#"[[route]]
path_prefix = "/"
upstream = "app"
filters = ["add-header", "auth"]
cache = true

[filters]
dir = "@DIR@/filters"
[filters.config.add-header]
response_headers = { "x-hello" = "world" }
[filters.config.auth]
api_keys = ["k1"]
"#,
        )
        .toml();
    let p = Proxy::builder(&toml)
        .file("filters/add-header.wasm", wasm("add-header"))
        .file("filters/auth.wasm", wasm("auth"))
        .start();
    let key = [("x-api-key", "k1")];
    let a = get(&p, "/secret", &key).await;
    assert_stored_miss(&a);
    let b = get(&p, "/secret", &key).await;
    assert_hit(&b);
    assert_eq!(
        b.header("x-hello").as_deref(),
        Some("world"),
        "response filter ran on the hit"
    );
    let denied = get(&p, "/secret", &[]).await;
    assert_eq!(
        denied.status,
        StatusCode::UNAUTHORIZED,
        "cached, yet no key, no content"
    );
    assert!(
        denied.header("cache-status").is_none(),
        "never reached the cache"
    );
    assert_eq!(o.requests(), 1);
    // The store holds the origin's response, not the filtered one.
    assert!(!o.last().headers.contains_key("x-hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_request_headers_cannot_poison_an_entry() {
    let mut script = Script::new("max-age=600").header("vary", "X-Theme");
    script.reflect = [
        "x-forwarded-host",
        "x-original-url",
        "x-http-method-override",
        "x-forwarded-scheme",
        "x-theme",
    ]
    .map(String::from)
    .to_vec();
    let o = Origin::start(script).await;
    let p = proxy(&o, "true", "");
    let attack = get(
        &p,
        "/home",
        &[
            ("x-forwarded-host", "evil.example"),
            ("x-original-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("x-forwarded-scheme", "nothttps"),
        ],
    )
    .await;
    assert!(!attack.text().contains("evil"), "{}", attack.text());
    assert!(
        attack.text().contains("x-forwarded-host=localhost"),
        "{}",
        attack.text()
    );
    assert!(
        attack.text().contains("x-original-url=-"),
        "{}",
        attack.text()
    );
    assert!(
        attack.text().contains("x-http-method-override=-"),
        "{}",
        attack.text()
    );
    assert!(
        attack.text().contains("x-forwarded-scheme=-"),
        "{}",
        attack.text()
    );
    let victim = get(&p, "/home", &[]).await;
    assert_hit(&victim);
    assert_eq!(
        victim.body, attack.body,
        "the victim gets the clean stored response"
    );
    // A header the response varies on is keyed: its variant is apart.
    let themed = get(&p, "/home", &[("x-theme", "dark")]).await;
    assert!(themed.text().contains("x-theme=dark"));
    let plain = get(&p, "/home", &[]).await;
    assert_hit(&plain);
    assert!(plain.text().contains("x-theme=-"), "{}", plain.text());
    assert_eq!(o.requests(), 2);
}
