//! Pure helpers for parsing header values; they need no host and are safe
//! to unit-test natively.

/// Strips the port (and IPv6 brackets) from an `ip:port` address.
///
/// ```
/// use sluicegate_sdk::headers::strip_port;
/// assert_eq!(strip_port("10.0.0.1:5000"), "10.0.0.1");
/// assert_eq!(strip_port("[::1]:443"), "::1");
/// assert_eq!(strip_port("::1"), "::1");
/// assert_eq!(strip_port("10.0.0.1"), "10.0.0.1");
/// ```
pub fn strip_port(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rfind(':') {
        // One colon: IPv4 (or a name) with a port. More: bare IPv6.
        Some(i) if addr[..i].find(':').is_none() => &addr[..i],
        _ => addr,
    }
}

/// The value of cookie `name` in one `cookie` header value.
///
/// ```
/// use sluicegate_sdk::headers::cookie_value;
/// assert_eq!(cookie_value("a=1; canary=1; b=2", "canary"), Some("1"));
/// assert_eq!(cookie_value("xcanary=1", "canary"), None);
/// ```
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// The token of an `Authorization: Bearer <token>` value (scheme is
/// case-insensitive).
///
/// ```
/// use sluicegate_sdk::headers::bearer_token;
/// assert_eq!(bearer_token("Bearer abc.def"), Some("abc.def"));
/// assert_eq!(bearer_token("bearer  abc"), Some("abc"));
/// assert_eq!(bearer_token("Basic abc"), None);
/// ```
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The items of a comma-separated header value, trimmed, empty ones dropped.
///
/// ```
/// use sluicegate_sdk::headers::split_list;
/// assert_eq!(split_list(" a, b ,,c"), vec!["a", "b", "c"]);
/// ```
pub fn split_list(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
///
/// ```
/// use sluicegate_sdk::headers::list_contains;
/// assert!(list_contains("Accept-Encoding, Origin", "origin"));
/// assert!(!list_contains("origins", "origin"));
/// ```
pub fn list_contains(value: &str, token: &str) -> bool {
    split_list(value)
        .iter()
        .any(|t| t.eq_ignore_ascii_case(token))
}

/// Whether `name` is a valid header name for the host: a non-empty HTTP
/// token in lower case.
///
/// ```
/// use sluicegate_sdk::headers::is_valid_name;
/// assert!(is_valid_name("x-api-key"));
/// assert!(!is_valid_name("X-Api-Key"));
/// assert!(!is_valid_name("bad name"));
/// ```
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

/// Whether a header or cookie value means "yes": `1` or `true`
/// (case-insensitive), surrounding whitespace ignored.
///
/// ```
/// use sluicegate_sdk::headers::is_truthy;
/// assert!(is_truthy(" TRUE "));
/// assert!(is_truthy("1"));
/// assert!(!is_truthy("yes"));
/// ```
pub fn is_truthy(value: &str) -> bool {
    let v = value.trim();
    v == "1" || v.eq_ignore_ascii_case("true")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_port_cases() {
        assert_eq!(strip_port("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(strip_port("[2001:db8::1]:80"), "2001:db8::1");
        assert_eq!(strip_port("2001:db8::1"), "2001:db8::1");
        assert_eq!(strip_port(""), "");
    }

    #[test]
    fn cookie_cases() {
        assert_eq!(cookie_value("canary=\"1\"", "canary"), Some("1"));
        assert_eq!(cookie_value("a", "a"), None);
        assert_eq!(cookie_value("a=; b=2", "a"), Some(""));
    }
}
