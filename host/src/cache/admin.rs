//! The admin API of the cache: `GET /cache` (statistics) and
//! `POST /cache/purge` (exact URLs, prefixes, tags).
//!
//! A URL or prefix target is either a full URL (`http://host/path?q`,
//! scheme and host case-insensitive), which names keys on that host, or a
//! path (`/path?q`), which names that path on every host. A tag names
//! every entry whose origin response carried it in `Surrogate-Key` or
//! `Cache-Tag`. Given as JSON (`{"url": "..."}`, `{"prefix": "..."}`,
//! `{"tags": ["a", "b"]}`, or several of these) or as the query
//! (`?url=...`, `?prefix=...`, `?tag=a&tag=b`).
//!
//! Every purge, whoever asks for it, goes through [`HttpCache::purge`]
//! with one [`Purge`]: the hook for a purge that must also reach other
//! replicas.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;

use super::HttpCache;
use crate::body::{self, ProxyBody};

/// What a purge removes: every stored URL any member names.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Purge {
    /// Exact URLs (`http://host/p?q`) or paths (`/p?q`, any host); every
    /// variant.
    pub urls: Vec<String>,
    /// URL or path prefixes.
    pub prefixes: Vec<String>,
    /// Tags from `Surrogate-Key` / `Cache-Tag`.
    pub tags: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    url: Option<String>,
    prefix: Option<String>,
    tag: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// Longest tag list one purge may carry.
const MAX_PURGE_TAGS: usize = 1024;

impl Purge {
    /// From the query string or, failing that, a JSON body.
    pub fn parse(query: Option<&str>, body: &[u8]) -> Result<Purge, String> {
        let mut p = Purge::default();
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "url" => p.urls.push(normalize(&v)?),
                "prefix" => p.prefixes.push(normalize(&v)?),
                "tag" => p.tags.push(v.trim().to_string()),
                other => return Err(format!("unknown query parameter {other:?}")),
            }
        }
        if p.is_empty() && !body.iter().all(u8::is_ascii_whitespace) {
            let b: PurgeBody = serde_json::from_slice(body).map_err(|e| {
                format!(
                    "body is not {{\"url\": ...}}, {{\"prefix\": ...}} or {{\"tags\": [...]}}: {e}"
                )
            })?;
            p.urls.extend(b.url.as_deref().map(normalize).transpose()?);
            p.prefixes
                .extend(b.prefix.as_deref().map(normalize).transpose()?);
            p.tags.extend(b.tag);
            p.tags.extend(b.tags);
        }
        p.tags.retain(|t| !t.is_empty());
        if p.tags.len() > MAX_PURGE_TAGS {
            return Err(format!("at most {MAX_PURGE_TAGS} tags per purge"));
        }
        if p.is_empty() {
            return Err("give url, prefix or tags (query or JSON body)".into());
        }
        Ok(p)
    }

    /// Names nothing?
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty() && self.prefixes.is_empty() && self.tags.is_empty()
    }

    /// Does a URL or prefix of this purge name `key` (`scheme://host/path?q`)?
    pub fn names_key(&self, key: &str) -> bool {
        let path = key_path(key);
        let subject = |want: &str| {
            if want.starts_with('/') {
                path
            } else {
                Some(key)
            }
        };
        self.urls.iter().any(|u| subject(u) == Some(u.as_str()))
            || self
                .prefixes
                .iter()
                .any(|p| subject(p).is_some_and(|s| s.starts_with(p.as_str())))
    }

    /// Does a tag of this purge name an entry with these tags?
    pub fn names_tags(&self, tags: &[Box<str>]) -> bool {
        !self.tags.is_empty() && tags.iter().any(|t| self.tags.iter().any(|w| **t == **w))
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
    /// Remove every stored URL `purge` names; how many. Exact full URLs
    /// are removed by key; paths, prefixes and tags scan the store.
    pub fn purge(&self, purge: &Purge) -> usize {
        let mut n = 0;
        let mut scan = Purge {
            tags: purge.tags.clone(),
            prefixes: purge.prefixes.clone(),
            urls: Vec::new(),
        };
        for u in &purge.urls {
            if u.starts_with('/') {
                scan.urls.push(u.clone());
            } else {
                let on_disk = self.disk.as_ref().is_some_and(|d| d.get(u).is_some());
                if let Some(d) = &self.disk {
                    d.forget(u, None);
                }
                n += (self.store.remove(u) || on_disk) as usize;
            }
        }
        if !scan.is_empty() {
            let selects = |k: &str, variants: &super::store::Variants| {
                scan.names_key(k) || variants.iter().any(|v| scan.names_tags(&v.tags))
            };
            let mem = self.store.purge(selects);
            // A key in both tiers counts once.
            let disk = self.disk.as_ref().map_or(0, |d| d.purge(selects));
            n += mem.max(disk);
        }
        self.stats.bytes.set(self.store.bytes() as f64);
        self.stats
            .purged
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.stats.m_purged.increment(n as u64);
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
            "purged": load(&s.purged),
            "hit_ratio": ratio,
            "evictions": self.store.evictions(),
            "in_flight": self.flights.len(),
            "disk": self.disk.as_ref().map(|d| d.stats_json()),
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
    match Purge::parse(query.as_deref(), &body) {
        Ok(purge) => {
            let purged = cache.purge(&purge);
            tracing::info!(urls = ?purge.urls, prefixes = ?purge.prefixes, tags = ?purge.tags, purged, "cache purge");
            let mut resp = Response::new(body::full(
                serde_json::json!({
                    "purged": purged,
                    "urls": purge.urls,
                    "prefixes": purge.prefixes,
                    "tags": purge.tags,
                })
                .to_string(),
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
    fn purges_parse_from_query_or_json() {
        let p = Purge::parse(Some("url=http%3A%2F%2FHost%2Fa%3Fb%3D1"), b"").unwrap();
        assert_eq!(p.urls, ["http://host/a?b=1"]);
        let p = Purge::parse(None, br#"{"prefix": "/img/"}"#).unwrap();
        assert_eq!(p.prefixes, ["/img/"]);
        let p = Purge::parse(Some("tag=a&tag=b"), b"").unwrap();
        assert_eq!(p.tags, ["a", "b"]);
        let p = Purge::parse(None, br#"{"tags": ["x", ""], "tag": "y"}"#).unwrap();
        assert_eq!(p.tags, ["y", "x"]);
        assert!(Purge::parse(None, b"").is_err());
        assert!(Purge::parse(None, br#"{"tags": []}"#).is_err());
        assert!(Purge::parse(None, br#"{"url": "x"}"#).is_err());
        assert!(Purge::parse(Some("nope=1"), b"").is_err());
    }

    #[test]
    fn purges_name_keys_and_tags() {
        let key = "http://h/img/a.png?v=2";
        let url = |u: &str| Purge {
            urls: vec![u.into()],
            ..Purge::default()
        };
        let prefix = |p: &str| Purge {
            prefixes: vec![p.into()],
            ..Purge::default()
        };
        assert!(url("http://h/img/a.png?v=2").names_key(key));
        assert!(url("/img/a.png?v=2").names_key(key));
        assert!(!url("/img/a.png").names_key(key));
        assert!(prefix("/img/").names_key(key));
        assert!(prefix("http://h/img").names_key(key));
        assert!(!prefix("http://other/").names_key(key));
        let tags = Purge {
            tags: vec!["b".into()],
            ..Purge::default()
        };
        assert!(tags.names_tags(&["a".into(), "b".into()]));
        assert!(!tags.names_tags(&["a".into()]));
        assert!(!url("/x").names_tags(&["a".into()]));
    }
}
