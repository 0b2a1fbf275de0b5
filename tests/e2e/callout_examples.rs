//! The callout example filters end to end (issue 23): `ext-authz` and
//! `jwks-auth` (Rust) and `py-quota` (Python) in the real proxy, calling
//! real in-process services through `[[upstream]]`s granted in their
//! policies (`callouts = [...]`).
//!
//! JWTs are signed with the `openssl` command-line tool (keys made per
//! test, `callout_examples/jwt_keys.rs`), so the suite needs no signing
//! crate.

mod jwt_keys;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::common::backend::{full, RespBody};
use crate::common::killable::Killable;
use crate::common::{
    client, free_addr, start_with_filters, start_with_filters_as, wasm, within, Backend, Cfg,
    Proxy, Resp,
};
use jwt_keys::{b64, claims, jwks, now_s, TestKey};

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

/// The value of the filter counter `name` of `filter` with every label of
/// `labels` (`key="value"`), 0 if absent.
fn counter(page: &str, filter: &str, name: &str, labels: &[&str]) -> f64 {
    let filter = format!("filter=\"{filter}\"");
    let name = format!("name=\"{name}\"");
    page.lines()
        .filter(|l| l.starts_with("sluicegate_filter_counter_total{"))
        .filter(|l| l.contains(&filter) && l.contains(&name))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Poll `/metrics` (≤ 5 s) until the counter reaches `want`.
async fn wait_counter(p: &Proxy, filter: &str, name: &str, labels: &[&str], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let page = metrics_page(p).await;
        let got = counter(&page, filter, name, labels);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} of {filter} is {got}, want {want}:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll `cond` (≤ `secs`) until it holds.
async fn eventually<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {secs}s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn respond(status: u16, headers: &[(&str, &str)], body: &str) -> Response<RespBody> {
    let mut b = Response::builder().status(status);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(full(body.to_string())).unwrap()
}

// ------------------------------------------------------------- ext-authz

/// An auth service: `Bearer good` is alice (200 with `x-auth-user`),
/// `Bearer forbidden` gets 403, `Bearer boom` a 500, anything else 401
/// with a challenge. It keeps the headers of every check it gets.
async fn auth_service() -> (Killable, Arc<Mutex<Vec<HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let service = Killable::serve(move |req: Request<Incoming>| {
        log.lock().unwrap().push(req.headers().clone());
        let auth = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("").to_string());
        async move {
            match auth.as_deref() {
                Some("Bearer good") => respond(200, &[("x-auth-user", "alice")], ""),
                Some("Bearer forbidden") => respond(
                    403,
                    &[("content-type", "text/plain")],
                    "forbidden by policy\n",
                ),
                Some("Bearer boom") => respond(500, &[], "oops\n"),
                _ => respond(
                    401,
                    &[("www-authenticate", "Bearer realm=\"test\"")],
                    "who are you?\n",
                ),
            }
        }
    })
    .await;
    (service, seen)
}

fn authz_cfg(app: &Backend, authz: std::net::SocketAddr) -> Cfg {
    Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("authz", &[authz])
        .route_with_filters(None, "/api", "app", &["ext-authz"])
        .route(None, "/plain", "app")
}

const AUTHZ_POLICY: &str = "[filters.policy.ext-authz]\ncallouts = [\"authz\"]\n";

#[tokio::test]
async fn ext_authz_allows_with_the_services_identity_and_passes_denials_on() {
    let app = Backend::echo("app").await;
    let (authz, seen) = auth_service().await;
    let p = start_with_filters(
        authz_cfg(&app, authz.addr()),
        &["ext-authz"],
        &format!("{AUTHZ_POLICY}[filters.config.ext-authz]\ncache_ttl_ms = 0\n"),
    );

    // Allowed: the identity is the service's, never the client's.
    let r = get(
        &p,
        "/api/orders?id=7",
        &[
            ("authorization", "Bearer good"),
            ("x-auth-user", "mallory"),
            ("x-request-id", "rid-authz-1"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.echo().one("x-auth-user"), "alice");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let h = &seen[0];
        assert_eq!(h["x-original-method"], "GET");
        assert_eq!(h["x-original-uri"], "/api/orders?id=7");
        assert_eq!(h["x-request-id"], "rid-authz-1");
        assert_eq!(h["authorization"], "Bearer good");
    }

    // 401 and 403 come back as the service gave them; the app sees nothing.
    let before = app.requests();
    let r = get(&p, "/api/orders", &[("authorization", "Bearer nope")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"test\"")
    );
    assert_eq!(r.text(), "who are you?\n");
    let r = get(&p, "/api/orders", &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = get(&p, "/api/orders", &[("authorization", "Bearer forbidden")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.text(), "forbidden by policy\n");
    assert_eq!(app.requests(), before, "a denied request reached the app");

    wait_counter(
        &p,
        "ext-authz",
        "ext_authz_decisions_total",
        &["result=\"allow\"", "cached=\"false\""],
        1.0,
    )
    .await;
    wait_counter(
        &p,
        "ext-authz",
        "ext_authz_decisions_total",
        &["result=\"deny\"", "cached=\"false\""],
        3.0,
    )
    .await;
}

#[tokio::test]
async fn ext_authz_caches_verdicts_in_kv() {
    let app = Backend::echo("app").await;
    let (authz, _) = auth_service().await;
    let p = start_with_filters(
        authz_cfg(&app, authz.addr()),
        &["ext-authz"],
        &format!("{AUTHZ_POLICY}[filters.config.ext-authz]\ncache_ttl_ms = 60000\n"),
    );
    // Five identical requests (on new connections, so on any instance):
    // the service is asked once.
    for _ in 0..5 {
        let r = get(&p, "/api/a", &[("authorization", "Bearer good")]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.echo().one("x-auth-user"), "alice");
    }
    assert_eq!(authz.requests(), 1, "the allow verdict was not cached");
    assert_eq!(app.requests(), 5);
    // Denials are cached too, per identity.
    for _ in 0..3 {
        let r = get(&p, "/api/a", &[("authorization", "Bearer forbidden")]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.text(), "forbidden by policy\n");
    }
    assert_eq!(authz.requests(), 2, "the deny verdict was not cached");
    // Unavailability is not: each 500 is asked again.
    for _ in 0..2 {
        let r = get(&p, "/api/a", &[("authorization", "Bearer boom")]).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(authz.requests(), 4);

    wait_counter(
        &p,
        "ext-authz",
        "ext_authz_decisions_total",
        &["result=\"allow\"", "cached=\"true\""],
        4.0,
    )
    .await;
    wait_counter(
        &p,
        "ext-authz",
        "ext_authz_decisions_total",
        &["result=\"deny\"", "cached=\"true\""],
        2.0,
    )
    .await;
    wait_counter(
        &p,
        "ext-authz",
        "ext_authz_decisions_total",
        &["result=\"error\""],
        2.0,
    )
    .await;
}

#[tokio::test]
async fn ext_authz_follows_its_policy_when_the_service_is_down() {
    let app = Backend::echo("app").await;
    let (authz, _) = auth_service().await;
    // The same filter twice: one failing closed, one open.
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("authz", &[authz.addr()])
        .route_with_filters(None, "/closed", "app", &["authz-closed"])
        .route_with_filters(None, "/open", "app", &["authz-open"])
        .route(None, "/plain", "app");
    let p = start_with_filters_as(
        cfg,
        &[("authz-closed", "ext-authz"), ("authz-open", "ext-authz")],
        "[filters.policy.authz-closed]\ncallouts = [\"authz\"]\ncallout_timeout_ms = 500\n\
         [filters.policy.authz-open]\ncallouts = [\"authz\"]\ncallout_timeout_ms = 500\n\
         [filters.config.authz-closed]\ncache_ttl_ms = 0\n\
         [filters.config.authz-open]\ncache_ttl_ms = 0\non_unavailable = \"allow\"\n",
    );
    let good = [("authorization", "Bearer good"), ("x-auth-user", "mallory")];
    assert_eq!(get(&p, "/closed", &good).await.status, StatusCode::OK);
    assert_eq!(get(&p, "/open", &good).await.status, StatusCode::OK);

    // The service goes away mid-run.
    authz.kill();
    let started = Instant::now();
    let r = get(&p, "/closed", &good).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    let r = get(&p, "/open", &good).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    // Let through, but with no identity (the client's is removed).
    assert!(!r.echo().has("x-auth-user"), "{:?}", r.echo());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "requests waited {:?} on a dead service",
        started.elapsed()
    );
    // Plain routes never notice.
    for _ in 0..5 {
        assert_eq!(get(&p, "/plain/x", &[]).await.status, StatusCode::OK);
    }
    wait_counter(
        &p,
        "authz-closed",
        "ext_authz_decisions_total",
        &["result=\"error\""],
        1.0,
    )
    .await;
    wait_counter(
        &p,
        "authz-open",
        "ext_authz_decisions_total",
        &["result=\"error\""],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn ext_authz_with_nothing_listening_fails_closed_by_default() {
    let app = Backend::echo("app").await;
    let p = start_with_filters(authz_cfg(&app, free_addr()), &["ext-authz"], AUTHZ_POLICY);
    let r = get(&p, "/api/x", &[("authorization", "Bearer good")]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert_eq!(app.requests(), 0);
    assert_eq!(get(&p, "/plain", &[]).await.status, StatusCode::OK);
}

// ------------------------------------------------------------- jwks-auth

/// An identity provider serving whatever JWKS document `doc` holds.
async fn jwks_service(doc: Arc<Mutex<String>>) -> Killable {
    Killable::serve(move |req: Request<Incoming>| {
        let body = doc.lock().unwrap().clone();
        let path = req.uri().path().to_string();
        async move {
            if path == "/.well-known/jwks.json" {
                respond(200, &[("content-type", "application/json")], &body)
            } else {
                respond(404, &[], "")
            }
        }
    })
    .await
}

fn jwks_proxy(app: &Backend, idp: &Killable, refresh_ms: u32) -> Proxy {
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("idp", &[idp.addr()])
        .route_with_filters(None, "/api", "app", &["jwks-auth"]);
    start_with_filters(
        cfg,
        &["jwks-auth"],
        &format!(
            "[filters.policy.jwks-auth]\ncallouts = [\"idp\"]\n\
             [filters.config.jwks-auth]\njwks_upstream = \"idp\"\nrefresh_ms = {refresh_ms}\n\
             issuer = \"https://idp.test\"\naudience = \"api\"\nleeway_s = 5\n"
        ),
    )
}

async fn with_token(p: &Proxy, token: &str) -> Resp {
    let auth = format!("Bearer {token}");
    get(
        p,
        "/api/me",
        &[("authorization", &auth), ("x-jwt-sub", "mallory")],
    )
    .await
}

fn assert_refused(r: &Resp, what: &str) {
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {r:?}");
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Bearer error=\"invalid_token\""),
        "{what}"
    );
}

#[tokio::test]
async fn jwks_auth_accepts_rs256_and_es256_and_refuses_bad_tokens() {
    let (rsa, ec) = (TestKey::rsa("rsa-1"), TestKey::ec("ec-1"));
    let doc = Arc::new(Mutex::new(jwks(&[&rsa, &ec])));
    let (app, idp) = (Backend::echo("app").await, jwks_service(doc).await);
    // A long refresh: the first request fetches the keys itself.
    let p = jwks_proxy(&app, &idp, 60_000);

    for (key, sub) in [(&rsa, "alice"), (&ec, "bob")] {
        let r = with_token(&p, &key.sign(&claims(sub))).await;
        assert_eq!(r.status, StatusCode::OK, "{} token: {r:?}", key.alg);
        assert_eq!(r.echo().one("x-jwt-sub"), sub);
    }

    assert_refused(
        &get(&p, "/api/me", &[("x-jwt-sub", "mallory")]).await,
        "no token",
    );
    let mut expired = claims("alice");
    expired["exp"] = (now_s() - 60).into();
    assert_refused(&with_token(&p, &rsa.sign(&expired)).await, "expired");
    let mut wrong_aud = claims("alice");
    wrong_aud["aud"] = "other".into();
    assert_refused(&with_token(&p, &ec.sign(&wrong_aud)).await, "wrong aud");
    let mut wrong_iss = claims("alice");
    wrong_iss["iss"] = "https://evil.test".into();
    assert_refused(&with_token(&p, &rsa.sign(&wrong_iss)).await, "wrong iss");
    // alg none, unsigned.
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let none = format!("{header}.{}.", b64(claims("alice").to_string().as_bytes()));
    assert_refused(&with_token(&p, &none).await, "alg none");
    // An RSA signature presented as ES256 under the RSA key's kid.
    assert_refused(
        &with_token(&p, &rsa.sign_as("ES256", &claims("alice"))).await,
        "alg/key mismatch",
    );
    // A signature by a key the JWKS does not hold, under a known kid.
    let stranger = TestKey::rsa("rsa-1");
    assert_refused(
        &with_token(&p, &stranger.sign(&claims("alice"))).await,
        "bad signature",
    );
    let unknown = TestKey::ec("ec-9");
    assert_refused(
        &with_token(&p, &unknown.sign(&claims("alice"))).await,
        "unknown kid",
    );
    assert_eq!(app.requests(), 2, "a refused request reached the app");
    wait_counter(
        &p,
        "jwks-auth",
        "jwt_requests_total",
        &["result=\"valid\""],
        2.0,
    )
    .await;
}

#[tokio::test]
async fn jwks_auth_picks_up_a_rotated_key_on_tick() {
    let (old, new) = (TestKey::rsa("2024"), TestKey::ec("2025"));
    let doc = Arc::new(Mutex::new(jwks(&[&old])));
    let (app, idp) = (Backend::echo("app").await, jwks_service(doc.clone()).await);
    let p = jwks_proxy(&app, &idp, 200);

    let old_token = old.sign(&claims("alice"));
    let new_token = new.sign(&claims("bob"));
    assert_eq!(with_token(&p, &old_token).await.status, StatusCode::OK);
    assert_refused(&with_token(&p, &new_token).await, "a key not yet published");

    // Rotate: the IdP now publishes only the new key.
    *doc.lock().unwrap() = jwks(&[&new]);
    eventually(10, "the new key to be accepted after a tick", || async {
        with_token(&p, &new_token).await.status == StatusCode::OK
    })
    .await;
    assert_refused(&with_token(&p, &old_token).await, "a retired key");
    assert!(
        idp.requests() >= 2,
        "the JWKS was fetched {} time(s)",
        idp.requests()
    );
    // Ticks go on, and every instance reads the keys from KV.
    let fetched = idp.requests();
    eventually(10, "more ticks", || async { idp.requests() > fetched }).await;
    for _ in 0..4 {
        assert_eq!(with_token(&p, &new_token).await.status, StatusCode::OK);
    }
    wait_counter(
        &p,
        "jwks-auth",
        "jwks_refresh_total",
        &["result=\"error\""],
        0.0,
    )
    .await;
}

#[tokio::test]
async fn jwks_auth_keeps_its_keys_when_the_idp_goes_away() {
    let key = TestKey::ec("k1");
    let doc = Arc::new(Mutex::new(jwks(&[&key])));
    let (app, idp) = (Backend::echo("app").await, jwks_service(doc).await);
    let p = jwks_proxy(&app, &idp, 200);
    let token = key.sign(&claims("alice"));
    assert_eq!(with_token(&p, &token).await.status, StatusCode::OK);
    idp.kill();
    // Failed refreshes are counted; the stored keys stay in use.
    eventually(10, "a failed refresh", || async {
        counter(
            &metrics_page(&p).await,
            "jwks-auth",
            "jwks_refresh_total",
            &["result=\"error\""],
        ) >= 1.0
    })
    .await;
    assert_eq!(with_token(&p, &token).await.status, StatusCode::OK);
}

// ------------------------------------------------------------- py-quota

/// A quota service: key `blocked` is over quota (429, `retry-after: 7`),
/// `boom` gets a 500, any other key is fine (`x-ratelimit-remaining: 41`).
/// It keeps the request target of every check.
async fn quota_service() -> (Backend, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let backend = Backend::serve("quota", move |req: Request<Incoming>| {
        let target = req.uri().to_string();
        log.lock().unwrap().push(target.clone());
        async move {
            if target.ends_with("key=blocked") {
                respond(
                    429,
                    &[("retry-after", "7"), ("content-type", "text/plain")],
                    "slow down\n",
                )
            } else if target.ends_with("key=boom") {
                respond(500, &[], "")
            } else {
                respond(200, &[("x-ratelimit-remaining", "41")], "")
            }
        }
    })
    .await;
    (backend, seen)
}

/// A proxy running py-quota; an 18 MB Python component needs room to
/// compile on a busy machine and a roomier CPU deadline.
fn quota_proxy(app: &Backend, quota: std::net::SocketAddr, config: &str) -> Proxy {
    let toml = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream("quota", &[quota])
        .route_with_filters(None, "/api", "app", &["py-quota"])
        .admin()
        .extra(&format!(
            "[filters]\ndir = \"@DIR@/filters\"\ntimeout_ms = 1000\nmemory_mb = 128\n\
             compile_timeout_ms = 600000\n\
             [filters.policy.py-quota]\ncallouts = [\"quota\"]\n\
             [filters.config.py-quota]\n{config}"
        ))
        .toml();
    crate::common::Proxy::builder(&toml)
        .start_timeout(Duration::from_secs(120))
        .file("filters/py-quota.wasm", wasm("py-quota"))
        .start()
}

#[tokio::test]
async fn py_quota_asks_the_quota_service_and_passes_429_on() {
    let app = Backend::echo("app").await;
    let (quota, seen) = quota_service().await;
    let p = quota_proxy(&app, quota.addr(), "");

    let r = get(&p, "/api/x", &[("x-api-key", "alice")]).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining").as_deref(), Some("41"));
    let r = get(&p, "/api/x", &[("x-api-key", "blocked")]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    assert_eq!(r.header("retry-after").as_deref(), Some("7"));
    assert_eq!(r.text(), "slow down\n");
    assert_eq!(app.requests(), 1, "a limited request reached the app");
    // No key: the client's address; keys are URL-encoded.
    assert_eq!(get(&p, "/api/x", &[]).await.status, StatusCode::OK);
    assert_eq!(
        get(&p, "/api/x", &[("x-api-key", "a b&c")]).await.status,
        StatusCode::OK
    );
    // The service failing: on_unavailable defaults to allow.
    assert_eq!(
        get(&p, "/api/x", &[("x-api-key", "boom")]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "/quota?key=alice",
            "/quota?key=blocked",
            "/quota?key=127.0.0.1",
            "/quota?key=a%20b%26c",
            "/quota?key=boom",
        ]
    );
    wait_counter(
        &p,
        "py-quota",
        "quota_decisions_total",
        &["result=\"limited\""],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn py_quota_fails_closed_when_told_to() {
    let app = Backend::echo("app").await;
    let p = quota_proxy(&app, free_addr(), "on_unavailable = \"deny\"\n");
    let r = get(&p, "/api/x", &[("x-api-key", "alice")]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert_eq!(app.requests(), 0);
}
