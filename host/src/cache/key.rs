//! The cache key, the request headers a cache must not let through, and
//! which keys an unsafe request invalidates.
//!
//! The primary key is `scheme://host/path?query` (host lower-cased, as the
//! request carried it after the request filters). `Vary` variants of one
//! URL live under the same key and are told apart by their policy.

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use http::Uri;

/// Request headers that some frameworks obey to rewrite the URL, the host
/// or the method, but that are not part of the cache key: a response built
/// from them could be stored under a key that does not name them (cache
/// poisoning). The cache removes them from requests it may store from.
/// (`X-Forwarded-Host`/`-Proto` are rewritten by the proxy itself from what
/// it saw, so a client cannot set them either.)
pub static UNKEYED_OVERRIDES: [HeaderName; 10] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-host"),
];

/// Remove [`UNKEYED_OVERRIDES`] from `headers`.
pub fn strip_unkeyed_overrides(headers: &mut HeaderMap) {
    // Most requests carry none: one pass over the names they do carry
    // (comparisons, no name parsing or hashing).
    if headers.keys().any(|k| UNKEYED_OVERRIDES.contains(k)) {
        for name in &UNKEYED_OVERRIDES {
            headers.remove(name);
        }
    }
}

/// The host the request names: authority of an absolute URI, else `Host`.
pub fn request_host(parts: &Parts) -> Option<String> {
    let host = match parts.uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => parts.headers.get(header::HOST)?.to_str().ok()?.to_string(),
    };
    Some(host.to_ascii_lowercase())
}

/// `scheme://host/path?query`, or `None` without a host (one allocation).
pub fn primary_key(scheme: &str, parts: &Parts) -> Option<String> {
    let host = match parts.uri.authority() {
        Some(a) => a.as_str(),
        None => parts.headers.get(header::HOST)?.to_str().ok()?,
    };
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut key = String::with_capacity(scheme.len() + 3 + host.len() + pq.len());
    key.push_str(scheme);
    key.push_str("://");
    let at = key.len();
    key.push_str(host);
    key[at..].make_ascii_lowercase();
    key.push_str(pq);
    Some(key)
}

/// Make the request's URI origin-form (`/path?query`), moving an absolute
/// URI's authority (HTTP/2 `:authority`) into `Host`, so that a request
/// matches stored responses whatever protocol it came by.
pub fn origin_form(parts: &mut Parts) {
    let Some(authority) = parts.uri.authority() else {
        return;
    };
    if !parts.headers.contains_key(header::HOST) {
        if let Ok(v) = http::HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if let Ok(uri) = pq.parse() {
        parts.uri = uri;
    }
}

/// The keys an unsafe request's non-error response invalidates (RFC 9111
/// §4.4): its own URL, and `Location` / `Content-Location` when they name
/// the same host (relative references do).
pub fn invalidated_keys(scheme: &str, parts: &Parts, response: &HeaderMap) -> Vec<String> {
    let mut keys: Vec<String> = primary_key(scheme, parts).into_iter().collect();
    let Some(host) = request_host(parts) else {
        return keys;
    };
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = response.get(name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let Ok(uri) = value.parse::<Uri>() else {
            continue;
        };
        let same_host = match uri.authority() {
            None => true,
            Some(a) => a.as_str().eq_ignore_ascii_case(&host),
        };
        if !same_host {
            continue;
        }
        let pq = match uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.as_str(),
            _ => continue,
        };
        let key = format!("{scheme}://{host}{pq}");
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Request};

    fn parts(uri: &str, host: &str) -> Parts {
        Request::builder()
            .uri(uri)
            .header("host", host)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn key_is_scheme_host_path_query() {
        let p = parts("/a/b?x=1", "Example.COM:8080");
        assert_eq!(
            primary_key("http", &p).unwrap(),
            "http://example.com:8080/a/b?x=1"
        );
    }

    #[test]
    fn overrides_are_stripped_and_others_kept() {
        let mut p = parts("/", "h");
        p.headers
            .insert("x-original-url", HeaderValue::from_static("/admin"));
        p.headers
            .insert("x-http-method-override", HeaderValue::from_static("DELETE"));
        p.headers.insert("accept", HeaderValue::from_static("*/*"));
        strip_unkeyed_overrides(&mut p.headers);
        assert_eq!(p.headers.len(), 2, "{:?}", p.headers);
    }

    #[test]
    fn location_on_the_same_host_is_invalidated_too() {
        let p = parts("/items", "h");
        let mut resp = HeaderMap::new();
        resp.insert("location", HeaderValue::from_static("/items/7"));
        resp.insert(
            "content-location",
            HeaderValue::from_static("http://other/items"),
        );
        assert_eq!(
            invalidated_keys("http", &p, &resp),
            vec!["http://h/items".to_string(), "http://h/items/7".to_string()]
        );
        resp.insert("location", HeaderValue::from_static("http://H/x"));
        assert_eq!(invalidated_keys("http", &p, &resp)[1], "http://h/x");
    }
}
