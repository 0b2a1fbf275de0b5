//! Header rules of a proxy (RFC 9110 §7.6): hop-by-hop removal, `Via`,
//! and the `X-Forwarded-*` family.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
];

/// Is this request asking to switch protocols (e.g. WebSocket)? Returns the
/// `Upgrade` value to pass on.
pub fn upgrade_request(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Remove hop-by-hop headers: the fixed list, `Proxy-Authorization`, and
/// every header named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP.iter() {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    if headers.contains_key(header::PROXY_AUTHORIZATION) {
        headers.remove(header::PROXY_AUTHORIZATION);
    }
}

/// The protocol part of a `Via` entry for this version.
fn via_protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// Append `<proto> <pseudonym>` to `Via`.
pub fn add_via(headers: &mut HeaderMap, version: Version, pseudonym: &str) {
    let entry = format!("{} {pseudonym}", via_protocol(version));
    let value = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {entry}"),
        _ => entry,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(header::VIA, v);
    }
}

/// `X-Forwarded-For` gets the client appended; `-Proto` and `-Host` are set
/// to what this proxy saw (a client cannot spoof them through us).
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    scheme: &str,
    host: Option<&HeaderValue>,
) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let prior: Vec<&str> = headers
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
        .collect();
    let value = if prior.is_empty() {
        client.to_string()
    } else {
        format!("{}, {client}", prior.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(xff, v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }),
    );
    if let Some(host) = host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn via_and_xff_append() {
        let mut h = HeaderMap::new();
        h.insert(header::VIA, HeaderValue::from_static("1.0 fred"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        add_via(&mut h, Version::HTTP_11, "sg");
        add_forwarded(&mut h, "127.0.0.1".parse().unwrap(), "http", None);
        assert_eq!(h["via"], "1.0 fred, 1.1 sg");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn upgrade_is_detected() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_request(&h).unwrap(), "websocket");
    }
}
