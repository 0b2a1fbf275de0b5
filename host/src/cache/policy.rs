//! RFC 9111 decisions. Freshness, storability, `Vary` matching, `Age` and
//! the merge of a `304` come from the `http-cache-semantics` crate; this
//! file adds what it leaves to the cache: the RFC 5861 stale extensions
//! (`stale-while-revalidate`, `stale-if-error`), whether serving stale is
//! forbidden (`must-revalidate`, `proxy-revalidate`, `no-cache`), and how
//! variants of one URL are told apart.

use std::time::Duration;

use http::header::{self, HeaderMap};
use http_cache_semantics::CacheOptions;

/// The crate's options for a shared cache.
pub fn options(heuristic_percent: u32) -> CacheOptions {
    CacheOptions {
        shared: true,
        cache_heuristic: heuristic_percent as f32 / 100.0,
        ..CacheOptions::default()
    }
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
    use http::HeaderValue;

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
    fn request_no_cache_wants_fresh() {
        assert!(request_wants_fresh(&h(&[("cache-control", "no-cache")])));
        assert!(request_wants_fresh(&h(&[("cache-control", "max-age=0")])));
        assert!(request_wants_fresh(&h(&[("pragma", "no-cache")])));
        assert!(!request_wants_fresh(&h(&[("accept", "*/*")])));
    }
}
