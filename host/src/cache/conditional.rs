//! A client's own conditions and ranges on a `GET`/`HEAD`, answered from
//! the full response the cache produced (a hit, a revalidated entry, or the
//! origin's answer being stored).
//!
//! The cache takes `If-None-Match`, `If-Modified-Since`, `Range` and
//! `If-Range` off the request before the lookup, so that the origin is asked
//! (on a miss) for the whole, storable representation, and the entry's own
//! validators alone go into a revalidation. Then:
//! - `If-None-Match` (weak comparison, `*`) or, without it,
//!   `If-Modified-Since` (against `Last-Modified`) that the representation
//!   does not pass gives `304 Not Modified` (RFC 9110 §13.1.2–3, §13.2.2);
//! - else `Range` (a `GET` only) gives `206` or `416` (see [`super::range`]),
//!   unless an `If-Range` does not match (strong ETag or the exact
//!   `Last-Modified` date): then the whole `200` (§13.1.5).
//!
//! Only a `200` is answered so: any other status goes out as it came. A
//! body being stored while it streams keeps streaming into the store in the
//! background when the client gets a `304`, a `416` or a range.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::range;
use super::rfc::{parse_date, split_list};
use crate::body::{self, ProxyBody};

/// What the client asked on top of the representation.
#[derive(Debug, Default)]
pub struct Asks {
    if_none_match: Vec<HeaderValue>,
    if_modified_since: Option<HeaderValue>,
    range: Option<HeaderValue>,
    if_range: Option<HeaderValue>,
}

/// Request fields [`Asks::take`] removes.
const TAKEN: [header::HeaderName; 4] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::RANGE,
    header::IF_RANGE,
];

/// Does this request carry a condition or range the cache answers?
pub fn any(headers: &HeaderMap) -> bool {
    TAKEN.iter().any(|n| headers.contains_key(n))
}

impl Asks {
    /// Take the client's conditions off `headers`. A `Range` on a `HEAD` is
    /// dropped (it applies to `GET` only; RFC 9110 §14.2).
    pub fn take(headers: &mut HeaderMap, method: &Method) -> Asks {
        let mut asks = Asks {
            if_none_match: headers
                .get_all(header::IF_NONE_MATCH)
                .iter()
                .cloned()
                .collect(),
            if_modified_since: headers.get(header::IF_MODIFIED_SINCE).cloned(),
            range: headers.get(header::RANGE).cloned(),
            if_range: headers.get(header::IF_RANGE).cloned(),
        };
        for n in &TAKEN {
            headers.remove(n);
        }
        if *method != Method::GET {
            asks.range = None;
        }
        asks
    }

    /// Nothing asked?
    pub fn is_empty(&self) -> bool {
        self.if_none_match.is_empty() && self.if_modified_since.is_none() && self.range.is_none()
    }

    /// Answer them from `resp` (see the module doc); `max_multipart` bounds
    /// the body a multipart range answer may read into memory.
    pub async fn answer(
        self,
        resp: Response<ProxyBody>,
        max_multipart: u64,
    ) -> Response<ProxyBody> {
        if resp.status() != StatusCode::OK {
            return resp;
        }
        if self.not_modified(resp.headers()) {
            return not_modified(resp);
        }
        match self.range {
            Some(r) if if_range_holds(self.if_range.as_ref(), resp.headers()) => {
                range::answer(resp, &r, max_multipart).await
            }
            _ => resp,
        }
    }

    /// Does the representation with these headers fail the client's
    /// `If-None-Match` or (without one) `If-Modified-Since`?
    fn not_modified(&self, resp: &HeaderMap) -> bool {
        if !self.if_none_match.is_empty() {
            let Some(etag) = resp.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
                return false;
            };
            return self
                .if_none_match
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(split_list)
                .any(|tag| tag == "*" || weak_eq(tag, etag));
        }
        let (Some(since), Some(modified)) = (
            self.if_modified_since.as_ref().and_then(parse_date),
            resp.get(header::LAST_MODIFIED).and_then(parse_date),
        ) else {
            return false;
        };
        modified <= since
    }
}

/// Weak comparison of entity tags (RFC 9110 §8.8.3.2).
pub fn weak_eq(a: &str, b: &str) -> bool {
    let opaque = |t: &str| t.trim().strip_prefix("W/").unwrap_or(t.trim()).to_string();
    let (a, b) = (opaque(a), opaque(b));
    a.starts_with('"') && a == b
}

/// Strong comparison: neither weak, same opaque tag.
pub fn strong_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim(), b.trim());
    !a.starts_with("W/") && !b.starts_with("W/") && a.starts_with('"') && a == b
}

/// Does `If-Range` (if any) let a range be served from this representation?
fn if_range_holds(if_range: Option<&HeaderValue>, resp: &HeaderMap) -> bool {
    let Some(cond) = if_range.and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let cond = cond.trim();
    if cond.starts_with('"') || cond.starts_with("W/") {
        return resp
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|etag| strong_eq(cond, etag));
    }
    // A date: only an exact match of Last-Modified.
    match (
        HeaderValue::from_str(cond)
            .ok()
            .as_ref()
            .and_then(parse_date),
        resp.get(header::LAST_MODIFIED).and_then(parse_date),
    ) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// `resp` (a `200`) as a `304`: its head without the representation's
/// metadata, no body (a stored-while-streaming body goes on into the store).
fn not_modified(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let (mut head, body) = resp.into_parts();
    super::tee::finish_in_background(&head.extensions, body);
    head.status = StatusCode::NOT_MODIFIED;
    for name in [
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::CONTENT_LANGUAGE,
        header::CONTENT_RANGE,
        header::TRANSFER_ENCODING,
    ] {
        head.headers.remove(name);
    }
    Response::from_parts(head, body::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asks(pairs: &[(&'static str, &'static str)]) -> Asks {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        let a = Asks::take(&mut h, &Method::GET);
        assert!(h.is_empty());
        a
    }

    fn resp_headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

    #[test]
    fn if_none_match_compares_weakly() {
        let r = resp_headers(&[("etag", "W/\"v1\"")]);
        assert!(asks(&[("if-none-match", "\"v1\"")]).not_modified(&r));
        assert!(asks(&[("if-none-match", "\"x\", W/\"v1\"")]).not_modified(&r));
        assert!(asks(&[("if-none-match", "*")]).not_modified(&r));
        assert!(!asks(&[("if-none-match", "\"v2\"")]).not_modified(&r));
        // If-None-Match wins over If-Modified-Since.
        let r = resp_headers(&[("etag", "\"v1\""), ("last-modified", LM)]);
        assert!(!asks(&[("if-none-match", "\"v2\""), ("if-modified-since", LM)]).not_modified(&r));
    }

    #[test]
    fn if_modified_since_compares_dates() {
        let r = resp_headers(&[("last-modified", LM)]);
        assert!(asks(&[("if-modified-since", LM)]).not_modified(&r));
        assert!(asks(&[("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT")]).not_modified(&r));
        assert!(!asks(&[("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT")]).not_modified(&r));
        assert!(!asks(&[("if-modified-since", "garbage")]).not_modified(&r));
        assert!(!asks(&[("if-modified-since", LM)]).not_modified(&HeaderMap::new()));
    }

    #[test]
    fn if_range_needs_a_strong_match() {
        let r = resp_headers(&[("etag", "\"v1\""), ("last-modified", LM)]);
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(if_range_holds(None, &r));
        assert!(if_range_holds(Some(&v("\"v1\"")), &r));
        assert!(!if_range_holds(Some(&v("W/\"v1\"")), &r));
        assert!(!if_range_holds(Some(&v("\"v2\"")), &r));
        assert!(if_range_holds(Some(&v(LM)), &r));
        assert!(!if_range_holds(
            Some(&v("Mon, 07 Nov 1994 08:49:37 GMT")),
            &r
        ));
    }
}
