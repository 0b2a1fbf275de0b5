//! RFC 9111 decisions. Freshness, storability, `Vary` matching and `Age`
//! come from the `http-cache-semantics` crate, shown a corrected view of
//! each response (`rfc.rs`); this file adds what it leaves to the cache:
//! the RFC 5861 stale extensions (`stale-while-revalidate`,
//! `stale-if-error`), whether serving stale is forbidden (`must-revalidate`,
//! `proxy-revalidate`, `no-cache`), how variants of one URL are told apart
//! (with `Accept-Encoding` / `Accept-Language` normalised), purge tags, and
//! which methods invalidate.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use http_cache_semantics::CacheOptions;

use super::rfc::{self, Reading};

/// How responses are read and stored: the crate's options and the
/// targeted-field settings.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The crate's options for a shared cache.
    pub opts: CacheOptions,
    /// `CDN-Cache-Control` and the like (RFC 9213).
    pub reading: Reading,
}

impl Rules {
    /// A shared cache with this heuristic and these targeted fields.
    pub fn new(heuristic_percent: u32, reading: Reading) -> Rules {
        Rules {
            opts: CacheOptions {
                shared: true,
                cache_heuristic: heuristic_percent as f32 / 100.0,
                ..CacheOptions::default()
            },
            reading,
        }
    }

    /// The view of `head` the crate decides on (see `rfc.rs`); `None`: not
    /// to be stored.
    pub fn view(&self, head: &http::response::Parts) -> Option<http::response::Parts> {
        rfc::response_view(head, &self.reading)
    }
}

/// Safe methods (RFC 9110 §9.2.1 and the IANA method registry): they never
/// invalidate. Any other method, extension methods included, answered with
/// a `2xx` or `3xx`, invalidates (RFC 9111 §4.4).
pub fn is_safe(method: &Method) -> bool {
    matches!(
        method.as_str(),
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PROPFIND" | "REPORT" | "SEARCH"
    )
}

/// `surrogate-key`: space-separated purge tags (Fastly's convention).
pub const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
/// `cache-tag`: comma-separated purge tags (Cloudflare's convention).
pub const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");
/// Most tags kept per response, and the longest tag.
const MAX_TAGS: usize = 64;
const MAX_TAG_LEN: usize = 256;

/// Remove the tag fields from a response head; the tags they carried
/// (deduplicated, at most [`MAX_TAGS`], each at most [`MAX_TAG_LEN`] bytes).
pub fn take_tags(headers: &mut HeaderMap) -> Vec<Box<str>> {
    let mut tags: Vec<Box<str>> = Vec::new();
    for (name, sep) in [(SURROGATE_KEY, ' '), (CACHE_TAG, ',')] {
        for v in headers
            .get_all(&name)
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            for t in v.split(sep).map(str::trim).filter(|t| !t.is_empty()) {
                if t.len() <= MAX_TAG_LEN
                    && tags.len() < MAX_TAGS
                    && !tags.iter().any(|x| &**x == t)
                {
                    tags.push(t.into());
                }
            }
        }
        headers.remove(&name);
    }
    tags
}

/// Put `Accept-Encoding` and `Accept-Language` in one canonical form, so
/// that requests that mean the same match the same variant: members
/// lower-cased, whitespace removed, duplicates dropped, sorted by
/// preference (`q`, highest first) and then by name. `gzip, br` and
/// `BR,gzip` both become `br, gzip`; `fr;q=0.5, en` becomes `en, fr;q=0.5`.
pub fn normalise_vary_fields(headers: &mut HeaderMap) {
    for name in [header::ACCEPT_ENCODING, header::ACCEPT_LANGUAGE] {
        if !headers.contains_key(&name) {
            continue;
        }
        let joined: Vec<String> = headers
            .get_all(&name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect();
        let canonical = canonical_accept(&joined.join(","));
        if let Ok(v) = HeaderValue::from_str(&canonical) {
            headers.insert(name, v);
        }
    }
}

/// See [`normalise_vary_fields`].
fn canonical_accept(value: &str) -> String {
    let mut members: Vec<(u32, String)> = Vec::new();
    for m in value.split(',') {
        let m: String = m
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        if m.is_empty() {
            continue;
        }
        let (token, params) = m.split_once(';').unwrap_or((m.as_str(), ""));
        let q = params
            .split(';')
            .find_map(|p| p.strip_prefix("q="))
            .and_then(|q| q.parse::<f32>().ok())
            .map_or(1000, |q| (q.clamp(0.0, 1.0) * 1000.0).round() as u32);
        let member = if q == 1000 {
            token.to_string()
        } else {
            format!("{token};q={}", trim_q(q))
        };
        if !members
            .iter()
            .any(|(_, x)| x.split(';').next() == Some(token))
        {
            members.push((q, member));
        }
    }
    members.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    members
        .into_iter()
        .map(|(_, m)| m)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `q` in thousandths as the shortest decimal: 500 → `0.5`, 0 → `0`.
fn trim_q(q: u32) -> String {
    if q == 0 {
        return "0".into();
    }
    let s = format!("0.{q:03}");
    s.trim_end_matches('0').to_string()
}

/// `Cache-Control` directives as `(name, value)`, names lower-case.
fn directives(headers: &HeaderMap) -> impl Iterator<Item = (String, Option<String>)> + '_ {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|d| {
            let d = d.trim();
            if d.is_empty() {
                return None;
            }
            Some(match d.split_once('=') {
                Some((k, v)) => (
                    k.trim().to_ascii_lowercase(),
                    Some(v.trim().trim_matches('"').to_string()),
                ),
                None => (d.to_ascii_lowercase(), None),
            })
        })
}

/// What a stored response allows once it is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StaleRules {
    /// `stale-while-revalidate=N`, if given.
    pub while_revalidate: Option<Duration>,
    /// `stale-if-error=N`, if given.
    pub if_error: Option<Duration>,
    /// `must-revalidate`, `proxy-revalidate`, `no-cache` or `s-maxage`
    /// (which implies proxy-revalidate for a shared cache): never serve
    /// this response stale.
    pub never_stale: bool,
}

impl StaleRules {
    /// The rules of a response with these headers.
    pub fn of(headers: &HeaderMap) -> StaleRules {
        let mut r = StaleRules::default();
        for (name, value) in directives(headers) {
            let secs = || value.as_deref().and_then(|v| v.parse::<u64>().ok());
            match name.as_str() {
                "stale-while-revalidate" => r.while_revalidate = secs().map(Duration::from_secs),
                "stale-if-error" => r.if_error = secs().map(Duration::from_secs),
                "must-revalidate" | "proxy-revalidate" | "no-cache" | "s-maxage" => {
                    r.never_stale = true
                }
                _ => {}
            }
        }
        r
    }
}

/// Does the request refuse a stale answer (`no-cache`, `max-age=0`,
/// `Pragma: no-cache`)?
pub fn request_wants_fresh(headers: &HeaderMap) -> bool {
    let pragma = headers
        .get(header::PRAGMA)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("no-cache"));
    pragma
        || directives(headers)
            .any(|(n, v)| n == "no-cache" || (n == "max-age" && v.as_deref() == Some("0")))
}

/// `Vary: *`: the response can never be matched, so it is not stored.
pub fn vary_star(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim() == "*")
}

/// The identity of a variant: the upstream that answered and the request's
/// values of the headers the response's `Vary` names. A new response with
/// the same identity replaces the stored one.
pub fn variant_id(upstream: &str, request: &HeaderMap, response: &HeaderMap) -> String {
    let mut names: Vec<String> = response
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    let mut id = String::from(upstream);
    for n in names {
        id.push('\n');
        id.push_str(&n);
        id.push('=');
        for v in request.get_all(n.as_str()) {
            id.push_str(&String::from_utf8_lossy(v.as_bytes()));
            id.push(',');
        }
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn stale_extensions_are_read() {
        let r = StaleRules::of(&h(&[(
            "cache-control",
            "max-age=1, stale-while-revalidate=30, stale-if-error=\"60\"",
        )]));
        assert_eq!(r.while_revalidate, Some(Duration::from_secs(30)));
        assert_eq!(r.if_error, Some(Duration::from_secs(60)));
        assert!(!r.never_stale);
        let r = StaleRules::of(&h(&[("cache-control", "max-age=1, Must-Revalidate")]));
        assert!(r.never_stale);
    }

    #[test]
    fn variants_differ_only_by_vary_headers() {
        let resp = h(&[("vary", "Accept-Encoding, accept-language")]);
        let a = variant_id(
            "app",
            &h(&[("accept-encoding", "gzip"), ("x-y", "1")]),
            &resp,
        );
        let b = variant_id("app", &h(&[("accept-encoding", "gzip")]), &resp);
        let c = variant_id("app", &h(&[("accept-encoding", "br")]), &resp);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(
            a,
            variant_id("canary", &h(&[("accept-encoding", "gzip")]), &resp)
        );
    }

    #[test]
    fn accept_fields_are_normalised() {
        assert_eq!(canonical_accept("gzip, br"), "br, gzip");
        assert_eq!(canonical_accept(" BR ,gzip,, gzip"), "br, gzip");
        assert_eq!(
            canonical_accept("fr;q=0.5, en-US, de;q=0.50"),
            "en-us, de;q=0.5, fr;q=0.5"
        );
        assert_eq!(canonical_accept("*;q=0, identity"), "identity, *;q=0");
        let mut h = h(&[("accept-language", "FR, en"), ("accept-encoding", "gzip")]);
        h.append("accept-encoding", HeaderValue::from_static("br"));
        normalise_vary_fields(&mut h);
        assert_eq!(h["accept-language"], "en, fr");
        assert_eq!(h["accept-encoding"], "br, gzip");
        assert_eq!(h.get_all("accept-encoding").iter().count(), 1);
    }

    #[test]
    fn tags_are_read_and_removed() {
        let mut resp = h(&[("surrogate-key", "a  b a"), ("cache-tag", "c, b,d")]);
        let tags = take_tags(&mut resp);
        let tags: Vec<&str> = tags.iter().map(|t| &**t).collect();
        assert_eq!(tags, ["a", "b", "c", "d"]);
        assert!(resp.is_empty());
    }

    #[test]
    fn extension_methods_are_unsafe() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PROPFIND"] {
            assert!(is_safe(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
        for m in ["POST", "PUT", "DELETE", "PATCH", "PURGEX", "MKCOL", "LINK"] {
            assert!(!is_safe(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
    }

    #[test]
    fn request_no_cache_wants_fresh() {
        assert!(request_wants_fresh(&h(&[("cache-control", "no-cache")])));
        assert!(request_wants_fresh(&h(&[("cache-control", "max-age=0")])));
        assert!(request_wants_fresh(&h(&[("pragma", "no-cache")])));
        assert!(!request_wants_fresh(&h(&[("accept", "*/*")])));
    }
}
