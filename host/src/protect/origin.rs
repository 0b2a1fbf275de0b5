//! Responses never reveal an origin's address: a `Location`,
//! `Content-Location` or `Refresh` that points at an endpoint is rewritten
//! to the host the client asked for, and the operator's list of origin
//! headers (`Server`, `X-Powered-By`, ...) is dropped.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that may carry an absolute URL of the origin.
static URL_HEADERS: [HeaderName; 3] = [
    header::LOCATION,
    header::CONTENT_LOCATION,
    HeaderName::from_static("refresh"),
];

/// Rewrite or drop whatever in `headers` names an endpoint (`is_endpoint`
/// says whether a URL's authority does). `public` is the host the client
/// used (`Host`); without it, URLs are made relative.
pub fn hide_origin(
    headers: &mut HeaderMap,
    is_endpoint: impl Fn(&str) -> bool,
    public: Option<&str>,
    scheme: &str,
    hide: &[HeaderName],
) {
    // One pass over the names present decides what to look up: a response
    // usually has a `Server` to drop and no URL header.
    let (mut drop_some, mut urls) = (false, false);
    for name in headers.keys() {
        drop_some |= hide.contains(name);
        urls |= URL_HEADERS.contains(name);
    }
    if drop_some {
        for name in hide {
            headers.remove(name);
        }
    }
    if !urls {
        return;
    }
    for name in URL_HEADERS.iter() {
        let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let Some(rewritten) = rewrite(value, &is_endpoint, public, scheme) else {
            continue;
        };
        match HeaderValue::from_str(&rewritten) {
            Ok(v) => {
                headers.insert(name.clone(), v);
            }
            Err(_) => {
                headers.remove(name);
            }
        }
    }
}

/// The value with an endpoint's URL replaced, or `None` when it names none.
/// `Refresh: 5; url=http://…` keeps its delay.
pub fn rewrite(
    value: &str,
    is_endpoint: &dyn Fn(&str) -> bool,
    public: Option<&str>,
    scheme: &str,
) -> Option<String> {
    let lower = value.to_ascii_lowercase();
    let start = ["http://", "https://", "//"]
        .iter()
        .filter_map(|p| lower.find(p).map(|i| (i, p.len())))
        .min_by_key(|(i, _)| *i)?;
    let (at, prefix_len) = start;
    let rest = &value[at + prefix_len..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let authority = authority
        .rsplit_once('@')
        .map(|(_, a)| a)
        .unwrap_or(authority);
    if !is_endpoint(authority) {
        return None;
    }
    let path = &rest[end..];
    let path = if path.is_empty() { "/" } else { path };
    let url = match public {
        Some(host) => format!("{scheme}://{host}{path}"),
        None => path.to_string(),
    };
    Some(format!("{}{url}", &value[..at]))
}

/// `authority` (from a URL) names endpoint `ep` (`host:port`): same host,
/// and the same port, or no port and the endpoint on 80/443.
pub fn same_authority(authority: &str, ep: &str) -> bool {
    if authority.eq_ignore_ascii_case(ep) {
        return true;
    }
    let Some((host, port)) = ep.rsplit_once(':') else {
        return false;
    };
    authority.eq_ignore_ascii_case(host) && (port == "80" || port == "443")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_become_the_public_host() {
        let eps = ["10.0.0.7:8080", "backend.internal:80"];
        let is_ep = |a: &str| eps.iter().any(|ep| same_authority(a, ep));
        let r = |v| rewrite(v, &is_ep, Some("www.example.com"), "https");
        assert_eq!(
            r("http://10.0.0.7:8080/login?x=1").as_deref(),
            Some("https://www.example.com/login?x=1")
        );
        assert_eq!(
            r("http://BACKEND.internal/a").as_deref(),
            Some("https://www.example.com/a")
        );
        assert_eq!(
            r("0; url=http://10.0.0.7:8080").as_deref(),
            Some("0; url=https://www.example.com/")
        );
        assert_eq!(
            r("http://user@10.0.0.7:8080/").as_deref(),
            Some("https://www.example.com/")
        );
        assert_eq!(r("/relative"), None);
        assert_eq!(r("https://elsewhere.org/x"), None);
        assert_eq!(
            rewrite("http://10.0.0.7:8080/x", &is_ep, None, "http").as_deref(),
            Some("/x")
        );
    }

    #[test]
    fn listed_headers_are_dropped_and_locations_rewritten() {
        let mut h = HeaderMap::new();
        h.insert(
            header::SERVER,
            HeaderValue::from_static("Apache/2.4.1 (internal)"),
        );
        h.insert("x-powered-by", HeaderValue::from_static("PHP/5"));
        h.insert(
            header::LOCATION,
            HeaderValue::from_static("http://127.0.0.1:9001/next"),
        );
        let hide = [header::SERVER, HeaderName::from_static("x-powered-by")];
        let is_ep = |a: &str| same_authority(a, "127.0.0.1:9001");
        hide_origin(&mut h, is_ep, Some("site"), "http", &hide);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::LOCATION], "http://site/next");
    }
}
