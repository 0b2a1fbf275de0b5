//! A thin layer over `http-cache-semantics` 2.1 where the crate is looser
//! than RFC 9111 (or predates it): the crate keeps deciding freshness,
//! storability, `Vary` matching and `Age`, but it is shown a *view* of the
//! response head in which the fields it misreads have been put in the form
//! the RFC gives them. The head served to clients is never the view: it is
//! the stored origin head (see `store.rs`).
//!
//! What the view fixes, each with a unit test below:
//! - `Cache-Control` directive names are case-insensitive (§5.2): the crate
//!   compares them as written, so `MAX-AGE=60` or `No-Cache` were ignored.
//!   Names are lower-cased (values kept), in responses and requests.
//! - `Age` (§5.1): a list keeps its first member; a value that is not a
//!   non-negative integer (`old`, `7200;x=y`, `-1`, `1.5`) is ignored; one
//!   too large is 2147483648. The crate read `7200, 0` as 0 (fresh).
//! - `Expires` (§5.3) and `Date`, `Last-Modified`: only the three formats of
//!   RFC 9110 §5.6.7 are dates (IMF-fixdate, and the obsolete RFC 850 and
//!   asctime forms a recipient must accept), parsed strictly. The crate's
//!   RFC 2822 parser took extra spaces and other formats as valid dates and
//!   refused the two obsolete ones. An invalid `Expires` (or more than one)
//!   means "already expired"; an invalid `Date` or `Last-Modified` is
//!   dropped from the view.
//! - Statuses (§3): any final status except `206` and `304` may be stored
//!   when the response has explicit freshness (`max-age`, `s-maxage`,
//!   `Expires`); the crate stores only the statuses it lists. The view shows
//!   such a response as a `200` to the crate (the stored head keeps its
//!   real status).
//! - `CDN-Cache-Control` (RFC 9213): a configured targeted field, when
//!   present and valid, replaces `Cache-Control`, `Expires` and `Pragma` in
//!   the view.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

/// `Expires` for an invalid date: a time in the past (RFC 9111 §5.3).
const EXPIRED: &str = "Thu, 01 Jan 1970 00:00:00 GMT";
/// The largest `Age` (RFC 9111 §1.2.2: delta-seconds past it are this).
const MAX_AGE_SECS: u64 = 2_147_483_648;

/// Statuses `http-cache-semantics` 2.1 stores (its `UNDERSTOOD_STATUSES`).
const CRATE_STATUSES: [u16; 14] = [
    200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501,
];

/// How the cache reads a response's caching fields: which targeted field
/// (RFC 9213) is its own, and whether only that field counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading {
    /// Targeted fields, first match wins (e.g. `CDN-Cache-Control`).
    pub targeted: Vec<HeaderName>,
    /// Obey only the targeted field: a response without one is not stored.
    pub targeted_only: bool,
}

/// The response head the crate is shown. `None`: never stored (only a
/// targeted field counts and there is none).
pub fn response_view(
    head: &http::response::Parts,
    reading: &Reading,
) -> Option<http::response::Parts> {
    let mut view = http::response::Parts::clone(head);
    let h = &mut view.headers;
    let targeted = reading
        .targeted
        .iter()
        .find_map(|name| targeted_value(head.headers.get_all(name).iter()));
    match targeted {
        Some(cc) => {
            h.remove(header::EXPIRES);
            h.remove(header::PRAGMA);
            h.insert(header::CACHE_CONTROL, cc);
        }
        None if reading.targeted_only => return None,
        None => normalise_cache_control(h),
    }
    normalise_age(h);
    normalise_dates(h);
    if !CRATE_STATUSES.contains(&view.status.as_u16())
        && storable_status(view.status)
        && explicit_freshness(h)
    {
        view.status = StatusCode::OK;
    }
    Some(view)
}

/// Put a request's `Cache-Control` and `Pragma` in the form the crate
/// reads (lower-case directive names); untouched when already so.
pub fn normalise_request(headers: &mut HeaderMap) {
    normalise_cache_control(headers);
    if let Some(p) = headers.get(header::PRAGMA) {
        if p.as_bytes().iter().any(u8::is_ascii_uppercase) {
            let lower = p.as_bytes().to_ascii_lowercase();
            if let Ok(v) = HeaderValue::from_bytes(&lower) {
                headers.insert(header::PRAGMA, v);
            }
        }
    }
}

/// A status a shared cache may store given explicit freshness: final, not
/// partial, not `304` (RFC 9111 §3).
fn storable_status(status: StatusCode) -> bool {
    status.as_u16() >= 200
        && status != StatusCode::PARTIAL_CONTENT
        && status != StatusCode::NOT_MODIFIED
}

/// `max-age`, `s-maxage` or `Expires` (a normalised view).
fn explicit_freshness(h: &HeaderMap) -> bool {
    h.contains_key(header::EXPIRES) || directives(h).any(|(n, _)| n == "max-age" || n == "s-maxage")
}

/// The `(name, value)` pairs of every `Cache-Control` field, names as written.
fn directives(h: &HeaderMap) -> impl Iterator<Item = (String, Option<String>)> + '_ {
    h.get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .filter_map(|d| {
            let (n, v) = match d.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().to_string())),
                None => (d.trim(), None),
            };
            (!n.is_empty()).then(|| (n.to_string(), v))
        })
}

/// Split a field value on commas outside quoted strings.
pub fn split_list(v: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in v.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&v[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&v[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Rewrite `Cache-Control` as one field with lower-case directive names,
/// when some name is not lower-case already.
fn normalise_cache_control(h: &mut HeaderMap) {
    let upper = directives(h).any(|(n, _)| n.bytes().any(|b| b.is_ascii_uppercase()));
    if !upper {
        return;
    }
    let joined = directives(h)
        .map(|(n, v)| match v {
            Some(v) => format!("{}={v}", n.to_ascii_lowercase()),
            None => n.to_ascii_lowercase(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(v) = HeaderValue::from_str(&joined) {
        h.insert(header::CACHE_CONTROL, v);
    }
}

/// A targeted field's value as a `Cache-Control` value: present, non-empty
/// and made of valid directives (RFC 9213 §2.1: an invalid one is ignored),
/// names lower-cased.
fn targeted_value<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Option<HeaderValue> {
    let mut parts = Vec::new();
    for v in values {
        for d in split_list(v.to_str().ok()?) {
            let (name, value) = match d.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (d, None),
            };
            let token = |s: &str| !s.is_empty() && s.bytes().all(is_tchar);
            if !token(name) || value.is_some_and(|v| v.is_empty()) {
                return None;
            }
            parts.push(match value {
                Some(v) => format!("{}={v}", name.to_ascii_lowercase()),
                None => name.to_ascii_lowercase(),
            });
        }
    }
    if parts.is_empty() {
        return None;
    }
    HeaderValue::from_str(&parts.join(", ")).ok()
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `Age` as RFC 9111 §5.1 reads it (see the module doc).
fn normalise_age(h: &mut HeaderMap) {
    let Some(first) = h.get(header::AGE).map(|v| {
        let s = String::from_utf8_lossy(v.as_bytes()).into_owned();
        s.split(',').next().unwrap_or("").trim().to_string()
    }) else {
        return;
    };
    match age_secs(&first) {
        Some(n) => h.insert(header::AGE, HeaderValue::from(n)),
        None => h.remove(header::AGE),
    };
}

/// `delta-seconds`: digits only; past the maximum, the maximum.
fn age_secs(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(MAX_AGE_SECS).min(MAX_AGE_SECS))
}

/// `Expires`, `Date` and `Last-Modified` as the crate can read them: valid
/// dates in IMF-fixdate, invalid ones replaced (`Expires`: already
/// expired) or removed.
fn normalise_dates(h: &mut HeaderMap) {
    if h.contains_key(header::EXPIRES) {
        let mut all = h.get_all(header::EXPIRES).iter();
        let date = match (all.next(), all.next()) {
            (Some(one), None) => http_date(one),
            _ => None,
        };
        let v = date.unwrap_or_else(|| EXPIRED.to_string());
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(header::EXPIRES, v);
        }
    }
    for name in [header::DATE, header::LAST_MODIFIED] {
        let Some(value) = h.get(&name) else { continue };
        match http_date(value).and_then(|d| HeaderValue::from_str(&d).ok()) {
            Some(v) => h.insert(name, v),
            None => h.remove(name),
        };
    }
}

/// A date in one of the three formats of RFC 9110 §5.6.7, parsed strictly,
/// as IMF-fixdate; `None` if it is not one.
pub fn http_date(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    let t = httpdate::parse_http_date(s).ok()?;
    Some(httpdate::fmt_http_date(t))
}

/// The system time of a header date (strict, as [`http_date`]).
pub fn parse_date(v: &HeaderValue) -> Option<std::time::SystemTime> {
    httpdate::parse_http_date(v.to_str().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16, pairs: &[(&str, &str)]) -> http::response::Parts {
        let mut b = http::Response::builder().status(status);
        for (k, v) in pairs {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn view(status: u16, pairs: &[(&str, &str)]) -> http::response::Parts {
        response_view(&head(status, pairs), &Reading::default()).unwrap()
    }

    fn get<'a>(p: &'a http::response::Parts, name: &str) -> Option<&'a str> {
        p.headers.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn directive_names_are_case_insensitive() {
        let v = view(
            200,
            &[(
                "cache-control",
                "MAX-AGE=60, No-CaChE, private=\"Set-Cookie, X\"",
            )],
        );
        assert_eq!(
            get(&v, "cache-control"),
            Some("max-age=60, no-cache, private=\"Set-Cookie, X\"")
        );
        let v = view(200, &[("cache-control", "max-age=60")]);
        assert_eq!(get(&v, "cache-control"), Some("max-age=60"));
        let mut req = HeaderMap::new();
        req.insert("cache-control", HeaderValue::from_static("No-Cache"));
        req.insert("pragma", HeaderValue::from_static("No-Cache"));
        normalise_request(&mut req);
        assert_eq!(req["cache-control"], "no-cache");
        assert_eq!(req["pragma"], "no-cache");
    }

    #[test]
    fn age_keeps_a_valid_first_member_only() {
        for (given, want) in [
            ("7200, 0", Some("7200")),
            ("old, 0", None),
            ("7200;foo=bar", None),
            ("-5", None),
            ("1.5", None),
            ("", None),
            ("99999999999999999999999", Some("2147483648")),
            ("30", Some("30")),
        ] {
            let v = view(200, &[("age", given)]);
            assert_eq!(get(&v, "age"), want, "Age: {given}");
        }
    }

    #[test]
    fn expires_must_be_one_of_the_three_date_formats() {
        let imf = "Sat, 06 Nov 2094 08:49:37 GMT";
        for (given, want) in [
            (imf, imf),
            (
                "Sunday, 06-Nov-94 08:49:37 GMT",
                "Sun, 06 Nov 1994 08:49:37 GMT",
            ),
            ("Sat Nov  6 08:49:37 2094", imf),
            ("Sat,  06 Nov 2094 08:49:37 GMT", EXPIRED),
            ("Sat, 06 Nov 2094 08:49:37 +0000", EXPIRED),
            ("2094-11-06T08:49:37Z", EXPIRED),
            ("0", EXPIRED),
        ] {
            let v = view(200, &[("expires", given)]);
            assert_eq!(get(&v, "expires"), Some(want), "Expires: {given}");
        }
        let mut two = head(200, &[("expires", imf)]);
        two.headers.append("expires", HeaderValue::from_static(imf));
        let v = response_view(&two, &Reading::default()).unwrap();
        assert_eq!(get(&v, "expires"), Some(EXPIRED));
        let v = view(200, &[("date", "yesterday"), ("last-modified", imf)]);
        assert_eq!(get(&v, "date"), None);
        assert_eq!(get(&v, "last-modified"), Some(imf));
    }

    #[test]
    fn errors_with_explicit_freshness_are_storable() {
        assert_eq!(view(500, &[("cache-control", "max-age=60")]).status, 200);
        assert_eq!(view(403, &[("cache-control", "S-MAXAGE=5")]).status, 200);
        assert_eq!(
            view(500, &[("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")]).status,
            500
        );
        assert_eq!(view(206, &[("cache-control", "max-age=60")]).status, 206);
        assert_eq!(view(404, &[]).status, 404);
    }

    #[test]
    fn a_targeted_field_replaces_cache_control() {
        let reading = Reading {
            targeted: vec![HeaderName::from_static("cdn-cache-control")],
            targeted_only: false,
        };
        let h = head(
            200,
            &[
                ("cache-control", "no-store"),
                ("expires", "0"),
                ("cdn-cache-control", "Max-Age=600"),
            ],
        );
        let v = response_view(&h, &reading).unwrap();
        assert_eq!(get(&v, "cache-control"), Some("max-age=600"));
        assert_eq!(get(&v, "expires"), None);
        // Invalid or empty: Cache-Control counts.
        for bad in ["", "max-age=", "bad directive"] {
            let h = head(
                200,
                &[("cache-control", "max-age=5"), ("cdn-cache-control", bad)],
            );
            let v = response_view(&h, &reading).unwrap();
            assert_eq!(get(&v, "cache-control"), Some("max-age=5"), "{bad:?}");
        }
        let only = Reading {
            targeted_only: true,
            ..reading
        };
        assert!(response_view(&head(200, &[("cache-control", "max-age=5")]), &only).is_none());
    }

    #[test]
    fn lists_split_outside_quotes() {
        assert_eq!(split_list("a, b=\"x, y\" ,c"), vec!["a", "b=\"x, y\"", "c"]);
    }
}
