//! The operator side of the admin API: the bearer token, `POST /reload`,
//! `/config` with secrets redacted, `/stats`, the status page, and the
//! per-endpoint gauges refreshed on each `/metrics` scrape.

use std::sync::atomic::Ordering;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::admin::{json, AdminState};
use crate::balance;
use crate::body::{self, ProxyBody};
use crate::proxy::Snapshot;
use crate::reload;

/// Paths open without the token: probes must work without credentials,
/// and the status page is static HTML (its script sends the token).
const OPEN: &[&str] = &["/healthz", "/readyz", "/", "/status"];

/// What replaces a secret's value in `/config`.
pub const REDACTED: &str = "[redacted]";

/// Authenticate, handle `POST /reload`, else hand over to `route`.
pub async fn handle(
    state: &AdminState,
    req: Request<Incoming>,
    route: fn(&AdminState, Request<Incoming>) -> Response<ProxyBody>,
) -> Response<ProxyBody> {
    let path = req.uri().path();
    if !OPEN.contains(&path) {
        let token = state.proxy.snapshot.load().config.proxy.admin_token.clone();
        if let Some(token) = token {
            if !authorized(req.headers().get(header::AUTHORIZATION), &token) {
                tracing::debug!(
                    path,
                    with_header = req.headers().contains_key(header::AUTHORIZATION),
                    "admin request refused: no valid token"
                );
                let mut resp =
                    body::text_response(StatusCode::UNAUTHORIZED, "admin token required");
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"sluicegate admin\""),
                );
                return resp;
            }
        }
    }
    if path == "/reload" {
        if req.method() != Method::POST {
            return body::text_response(StatusCode::METHOD_NOT_ALLOWED, "use POST /reload");
        }
        return reload(state).await;
    }
    if path == "/cache/purge" && req.method() == Method::POST {
        let cache = state.proxy.snapshot.load().cache.clone();
        return crate::fleet::purge::handle(&cache, req).await;
    }
    route(state, req)
}

/// `Authorization: Bearer <token>`, compared in constant time.
fn authorized(value: Option<&HeaderValue>, token: &str) -> bool {
    let Some(given) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The same reload as SIGHUP: the config file (and the filters if their
/// settings changed), or only the filters for an embedded config.
async fn reload(state: &AdminState) -> Response<ProxyBody> {
    let result = match &state.source {
        Some(path) => reload::reload_config(state.proxy.clone(), path.clone()).await,
        None => {
            reload::reload_filters(state.proxy.clone()).await;
            Ok(())
        }
    };
    let (status, value) = match result {
        Ok(()) => (StatusCode::OK, serde_json::json!({ "reloaded": true })),
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            serde_json::json!({ "reloaded": false, "error": e }),
        ),
    };
    let mut resp = json(&value);
    *resp.status_mut() = status;
    resp
}

/// The GET endpoints this module adds; `None` for the others.
pub fn route(state: &AdminState, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
    if req.method() != Method::GET {
        return None;
    }
    let resp = match req.uri().path() {
        "/" | "/status" => {
            let mut resp = Response::new(body::full(crate::status::PAGE));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
        "/stats" => {
            let mut stats = crate::status::stats_json(
                state.open_connections.load(Ordering::Relaxed),
                state.ready.load(Ordering::Relaxed),
            );
            stats["dependencies"] = crate::fleet::status_json();
            json(&stats)
        }
        "/config" => json(&config_json(&state.proxy.snapshot.load())),
        _ => return None,
    };
    Some(resp)
}

/// The running config as the operator wrote it, as JSON, secrets redacted.
fn config_json(snap: &Snapshot) -> serde_json::Value {
    let mut table: toml::Table = toml::from_str(&snap.config.text).unwrap_or_default();
    redact_table(&mut table);
    // The file's text, and the keys whose file values are not running yet
    // (they need a restart) with the values that are.
    let pending: serde_json::Map<String, serde_json::Value> = snap
        .config
        .pending_restart
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "source": snap.config.source.display().to_string(),
        "config": table,
        "pending_restart": pending,
    })
}

/// Does a key name a secret? (`admin_token`, `api_key`, `password`, ...)
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k == "hash_key" {
        return false;
    }
    ["key", "secret", "token", "password", "passwd", "credential"]
        .iter()
        .any(|s| k.contains(s))
}

fn redact_table(table: &mut toml::Table) {
    for (k, v) in table.iter_mut() {
        if is_secret(k) {
            *v = toml::Value::String(REDACTED.to_string());
        } else if let (true, toml::Value::String(url)) = (k == "url", &*v) {
            // `[redis] url` may carry a password.
            *v = toml::Value::String(crate::config::redact_url(url));
        } else {
            redact_value(v);
        }
    }
}

fn redact_value(v: &mut toml::Value) {
    match v {
        toml::Value::Table(t) => redact_table(t),
        toml::Value::Array(a) => a.iter_mut().for_each(redact_value),
        _ => {}
    }
}

/// `sluicegate_endpoint_healthy` (1/0), `sluicegate_endpoint_in_flight` and
/// `sluicegate_endpoint_ejections_total` per endpoint, set from the live
/// state when `/metrics` is scraped.
pub fn endpoint_gauges(snap: &Snapshot) {
    let now = balance::now_ns();
    for u in snap.upstreams.values() {
        for e in u.endpoints.as_slice() {
            let (up, ep) = (u.name.to_string(), e.addr.to_string());
            let healthy = if e.state.healthy(now) { 1.0 } else { 0.0 };
            metrics::gauge!("sluicegate_endpoint_healthy", "upstream" => up.clone(), "endpoint" => ep.clone())
                .set(healthy);
            metrics::gauge!("sluicegate_endpoint_in_flight", "upstream" => up.clone(), "endpoint" => ep.clone())
                .set(e.state.in_flight() as f64);
            let (_, _, ejections) = e.state.counters();
            metrics::counter!("sluicegate_endpoint_ejections_total", "upstream" => up, "endpoint" => ep)
                .absolute(ejections);
        }
    }
}

/// `sluicegate_filter_quarantined` (1/0) per filter, set when `/metrics` is
/// scraped.
pub fn filter_gauges(filters: Option<&crate::filter::FilterRuntime>) {
    let Some(rt) = filters else { return };
    for f in rt.current().status() {
        let benched = if f.state == "quarantined" { 1.0 } else { 0.0 };
        metrics::gauge!("sluicegate_filter_quarantined", "filter" => f.name).set(benched);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let mut t: toml::Table = toml::from_str(
            r#"
[proxy]
admin_token = "t0ken"
[[upstream]]
name = "app"
hash_key = "cookie:sid"
[filters.config.auth]
keys = ["k1", "k2"]
header = "authorization"
[filters.config.x]
nested = [{ client_secret = "s", id = "i" }]
[redis]
url = "redis://:pw0rd@redis:6379"
"#,
        )
        .unwrap();
        redact_table(&mut t);
        let text = serde_json::to_string(&t).unwrap();
        for secret in ["t0ken", "k1", "k2", "\"s\"", "pw0rd"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert!(
            text.contains("cookie:sid") && text.contains("authorization"),
            "{text}"
        );
        assert!(text.contains("\"id\":\"i\""), "{text}");
    }

    #[test]
    fn bearer_token_must_match_exactly() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(authorized(Some(&v("Bearer abc")), "abc"));
        assert!(!authorized(Some(&v("Bearer abd")), "abc"));
        assert!(!authorized(Some(&v("Bearer ab")), "abc"));
        assert!(!authorized(Some(&v("Basic abc")), "abc"));
        assert!(!authorized(None, "abc"));
    }
}
