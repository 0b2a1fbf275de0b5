//! The admin API of the cache: `GET /cache` (statistics) and
//! `POST /cache/purge` (an exact URL or a prefix).
//!
//! A purge target is either a full URL (`http://host/path?q`, scheme and
//! host case-insensitive), which names keys on that host, or a path
//! (`/path?q`), which names that path on every host. Given as JSON
//! (`{"url": "..."}` or `{"prefix": "..."}`) or as the query
//! (`/cache/purge?url=...` / `?prefix=...`).

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;

use super::HttpCache;
use crate::body::{self, ProxyBody};

/// What `POST /cache/purge` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeTarget {
    /// Exactly this URL (every variant).
    Url(String),
    /// Every URL starting with this.
    Prefix(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    url: Option<String>,
    prefix: Option<String>,
}

impl PurgeTarget {
    /// From the query string or, failing that, a JSON body.
    pub fn parse(query: Option<&str>, body: &[u8]) -> Result<PurgeTarget, String> {
        let (mut url, mut prefix) = (None, None);
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "url" => url = Some(v.into_owned()),
                "prefix" => prefix = Some(v.into_owned()),
                other => return Err(format!("unknown query parameter {other:?}")),
            }
        }
        if url.is_none() && prefix.is_none() && !body.iter().all(u8::is_ascii_whitespace) {
            let b: PurgeBody = serde_json::from_slice(body)
                .map_err(|e| format!("body is not {{\"url\": ...}} or {{\"prefix\": ...}}: {e}"))?;
            (url, prefix) = (b.url, b.prefix);
        }
        let target = match (url, prefix) {
            (Some(u), None) => PurgeTarget::Url(normalize(&u)?),
            (None, Some(p)) => PurgeTarget::Prefix(normalize(&p)?),
            (Some(_), Some(_)) => return Err("give either url or prefix, not both".into()),
            (None, None) => return Err("give url or prefix (query or JSON body)".into()),
        };
        Ok(target)
    }

    /// Does this target name `key` (`scheme://host/path?q`)?
    pub fn matches(&self, key: &str) -> bool {
        let (want, exact) = match self {
            PurgeTarget::Url(u) => (u.as_str(), true),
            PurgeTarget::Prefix(p) => (p.as_str(), false),
        };
        let subject = if want.starts_with('/') {
            match key_path(key) {
                Some(p) => p,
                None => return false,
            }
        } else {
            key
        };
        if exact {
            subject == want
        } else {
            subject.starts_with(want)
        }
    }
}

/// `HTTP://Host/x` → `http://host/x`; `http://host` → `http://host/`;
/// paths unchanged. Anything else is an error.
fn normalize(target: &str) -> Result<String, String> {
    let target = target.trim();
    if target.starts_with('/') {
        return Ok(target.to_string());
    }
    let Some((scheme, rest)) = target.split_once("://") else {
        return Err(format!(
            "{target:?} is neither a URL (http://host/path) nor a path (/path)"
        ));
    };
    let (host, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if host.is_empty() {
        return Err(format!("{target:?} has no host"));
    }
    Ok(format!(
        "{}://{}{path}",
        scheme.to_ascii_lowercase(),
        host.to_ascii_lowercase()
    ))
}

/// The `/path?q` part of a key.
fn key_path(key: &str) -> Option<&str> {
    let rest = key.split_once("://")?.1;
    rest.find('/').map(|i| &rest[i..])
}

impl HttpCache {
    /// Remove what `target` names; how many URLs were removed.
    pub fn purge(&self, target: &PurgeTarget) -> usize {
        let n = match target {
            PurgeTarget::Url(u) if !u.starts_with('/') => self.store.remove(u) as usize,
            _ => self.store.purge(|k| target.matches(k)),
        };
        self.stats.bytes.set(self.store.bytes() as f64);
        n
    }

    /// `GET /cache`.
    pub fn stats_json(&self) -> serde_json::Value {
        let s = &self.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let (hits, misses) = (load(&s.hits), load(&s.misses));
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        let (max_bytes, max_object_bytes) = self.store.bounds();
        serde_json::json!({
            "entries": self.store.len(),
            "bytes": self.store.bytes(),
            "max_bytes": max_bytes,
            "max_object_bytes": max_object_bytes,
            "hits": hits,
            "misses": misses,
            "stale": load(&s.stale),
            "revalidations": load(&s.revalidations),
            "hit_ratio": ratio,
            "evictions": self.store.evictions(),
            "in_flight": self.flights.len(),
        })
    }
}

/// Largest purge request body read.
const MAX_PURGE_BODY: usize = 64 * 1024;

/// Serve `POST /cache/purge`.
pub async fn purge_request<B>(cache: &HttpCache, req: Request<B>) -> Response<ProxyBody>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let query = req.uri().query().map(str::to_string);
    let body = match Limited::new(req.into_body(), MAX_PURGE_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    match PurgeTarget::parse(query.as_deref(), &body) {
        Ok(target) => {
            let purged = cache.purge(&target);
            let (kind, value) = match &target {
                PurgeTarget::Url(u) => ("url", u),
                PurgeTarget::Prefix(p) => ("prefix", p),
            };
            tracing::info!(kind, target = %value, purged, "cache purge");
            let mut resp = Response::new(body::full(
                serde_json::json!({ "purged": purged, kind: value }).to_string(),
            ));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(reason) => body::text_response(StatusCode::BAD_REQUEST, &reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_query_or_json() {
        assert_eq!(
            PurgeTarget::parse(Some("url=http%3A%2F%2FHost%2Fa%3Fb%3D1"), b"").unwrap(),
            PurgeTarget::Url("http://host/a?b=1".into())
        );
        assert_eq!(
            PurgeTarget::parse(None, br#"{"prefix": "/img/"}"#).unwrap(),
            PurgeTarget::Prefix("/img/".into())
        );
        assert!(PurgeTarget::parse(None, b"").is_err());
        assert!(PurgeTarget::parse(None, br#"{"url": "x"}"#).is_err());
        assert!(PurgeTarget::parse(Some("nope=1"), b"").is_err());
    }

    #[test]
    fn targets_match_keys() {
        let key = "http://h/img/a.png?v=2";
        assert!(PurgeTarget::Url("http://h/img/a.png?v=2".into()).matches(key));
        assert!(PurgeTarget::Url("/img/a.png?v=2".into()).matches(key));
        assert!(!PurgeTarget::Url("/img/a.png".into()).matches(key));
        assert!(PurgeTarget::Prefix("/img/".into()).matches(key));
        assert!(PurgeTarget::Prefix("http://h/img".into()).matches(key));
        assert!(!PurgeTarget::Prefix("http://other/".into()).matches(key));
    }
}
