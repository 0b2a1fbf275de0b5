//! Header rules of a proxy (RFC 9110 §7.6): hop-by-hop removal, `Via`,
//! and the `X-Forwarded-*` family.

use std::net::IpAddr;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
/// `Trailer` is not one: it announces the message's own trailer fields
/// (RFC 9110 §6.6.2), which pass end to end, and HTTP/1.1 needs it to send
/// them. Of `TE`, the `trailers` token is kept (see [`remove_hop_by_hop`]).
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Is this request asking to switch protocols (e.g. WebSocket)? Returns the
/// `Upgrade` value to pass on.
pub fn upgrade_request(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
    if wants {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// The comma-separated tokens of every `Connection` line, trimmed (lines
/// that are not text are skipped).
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Remove hop-by-hop headers: the fixed list, `Proxy-Authorization`, and
/// every header named in `Connection`. A `TE` that names `trailers` becomes
/// `TE: trailers` (the proxy passes trailers on, so it may say it accepts
/// them for the one who asked; gRPC servers want it), its other codings go.
///
/// Runs on every request and response (twice when filters ran), so the
/// common case is one pass over the names present with no hashing: most
/// messages carry no hop-by-hop header, or only `Connection: keep-alive`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Which of HOP_BY_HOP (and, last, Proxy-Authorization) are present.
    let mut present = [false; HOP_BY_HOP.len() + 1];
    for name in headers.keys() {
        if let Some(i) = hop_index(name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // Headers named in `Connection` (index 0). `close` and `keep-alive`
    // are the usual tokens: one names no header, the other is in the list.
    if present[0] {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case("close")
                    && !t.eq_ignore_ascii_case("keep-alive")
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let te_trailers = present[2]
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                let t = t.split(';').next().unwrap_or("").trim();
                t.eq_ignore_ascii_case("trailers")
            });
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if present[HOP_BY_HOP.len()] {
        headers.remove(header::PROXY_AUTHORIZATION);
    }
}

/// Where `name` is in HOP_BY_HOP (`Proxy-Authorization`: just past it).
/// A match on the text (a length test, then one comparison), not a scan
/// of the list: it runs for every header of every message.
fn hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "te" => 2,
        "transfer-encoding" => 3,
        "upgrade" => 4,
        "proxy-connection" => 5,
        "proxy-authenticate" => 6,
        "proxy-authorization" => 7,
        _ => return None,
    })
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

/// This proxy's `Via` entries (`<proto> <pseudonym>`), rendered once per
/// configuration for each protocol version.
#[derive(Clone)]
pub struct Via {
    /// By [`via_index`]; `None` if the pseudonym is not a valid value.
    entries: [Option<HeaderValue>; 5],
}

impl Via {
    /// The entries for `pseudonym`.
    pub fn new(pseudonym: &str) -> Via {
        let entry =
            |v: Version| HeaderValue::from_str(&format!("{} {pseudonym}", via_protocol(v))).ok();
        Via {
            entries: [
                entry(Version::HTTP_09),
                entry(Version::HTTP_10),
                entry(Version::HTTP_11),
                entry(Version::HTTP_2),
                entry(Version::HTTP_3),
            ],
        }
    }
}

/// Index of `version` in [`Via::entries`].
fn via_index(version: Version) -> usize {
    match version {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    }
}

/// Append `<proto> <pseudonym>` to `Via`.
pub fn add_via(headers: &mut HeaderMap, version: Version, via: &Via) {
    let Some(entry) = &via.entries[via_index(version)] else {
        return;
    };
    // One lookup (the entry), not a `get` and then an `insert`.
    match headers.entry(header::VIA) {
        Entry::Occupied(mut e) => match (e.get().to_str(), entry.to_str()) {
            (Ok(prev), Ok(own)) if !prev.is_empty() => {
                if let Ok(v) = HeaderValue::from_str(&format!("{prev}, {own}")) {
                    e.insert(v);
                }
            }
            _ => {
                e.insert(entry.clone());
            }
        },
        Entry::Vacant(v) => {
            v.insert(entry.clone());
        }
    }
}

/// `client` as a header value; IPv4 without the formatting machinery.
fn ip_value(client: IpAddr) -> Option<HeaderValue> {
    let IpAddr::V4(v4) = client else {
        return HeaderValue::from_str(&client.to_string()).ok();
    };
    let mut buf = [0u8; 15];
    let mut n = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        let digits = [octet / 100, octet / 10 % 10, octet % 10];
        let skip = if octet >= 100 {
            0
        } else if octet >= 10 {
            1
        } else {
            2
        };
        for d in &digits[skip..] {
            buf[n] = b'0' + d;
            n += 1;
        }
    }
    HeaderValue::from_bytes(&buf[..n]).ok()
}

/// `X-Forwarded-For` gets the client appended; `-Proto` and `-Host` are set
/// to what this proxy saw (a client cannot spoof them through us).
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    scheme: &str,
    host: Option<&HeaderValue>,
) {
    // The usual request has no `X-Forwarded-For` yet: then the value is the
    // client alone, written without `fmt` and without a list to join.
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Vacant(v) => {
            if let Some(ip) = ip_value(client) {
                v.insert(ip);
            }
        }
        Entry::Occupied(mut e) => {
            let prior: Vec<&str> = e
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter(|v| !v.trim().is_empty())
                .collect();
            let value = if prior.is_empty() {
                ip_value(client)
            } else {
                HeaderValue::from_str(&format!("{}, {client}", prior.join(", "))).ok()
            };
            if let Some(v) = value {
                e.insert(v);
            }
        }
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }),
    );
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_index_follows_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_index(name), Some(i), "{name}");
        }
        assert_eq!(
            hop_index(&header::PROXY_AUTHORIZATION),
            Some(HOP_BY_HOP.len())
        );
        assert_eq!(hop_index(&header::HOST), None);
        assert_eq!(hop_index(&HeaderName::from_static("x-te")), None);
        assert_eq!(hop_index(&header::TRAILER), None);
    }

    #[test]
    fn te_keeps_only_trailers() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip;q=0.5, Trailers"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h[header::TRAILER], "x-sum");
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        remove_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn every_hop_by_hop_header_is_removed_and_nothing_else() {
        let mut h = HeaderMap::new();
        for name in HOP_BY_HOP.iter().chain([&header::PROXY_AUTHORIZATION]) {
            h.append(name.clone(), HeaderValue::from_static("keep-alive"));
        }
        h.append(header::CONNECTION, HeaderValue::from_static("x-a, close"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert("x-b", HeaderValue::from_static("2"));
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["host", "x-b"]);
        // Nothing to remove: untouched.
        let before = h.clone();
        remove_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

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
        add_via(&mut h, Version::HTTP_11, &Via::new("sg"));
        add_forwarded(&mut h, "127.0.0.1".parse().unwrap(), "http", None);
        assert_eq!(h["via"], "1.0 fred, 1.1 sg");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn via_and_xff_are_set_when_absent() {
        let via = Via::new("edge-1");
        for (version, want) in [
            (Version::HTTP_10, "1.0 edge-1"),
            (Version::HTTP_11, "1.1 edge-1"),
            (Version::HTTP_2, "2 edge-1"),
        ] {
            let mut h = HeaderMap::new();
            add_via(&mut h, version, &via);
            assert_eq!(h["via"], want);
        }
        for ip in [
            "0.0.0.0",
            "1.22.133.4",
            "255.255.255.255",
            "10.0.100.9",
            "::1",
            "2001:db8::7",
        ] {
            let mut h = HeaderMap::new();
            add_forwarded(&mut h, ip.parse().unwrap(), "https", None);
            assert_eq!(h["x-forwarded-for"], ip);
            assert_eq!(h["x-forwarded-proto"], "https");
        }
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
