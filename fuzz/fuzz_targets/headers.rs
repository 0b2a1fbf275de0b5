//! Arbitrary header sets through the proxy's header rules: hop-by-hop
//! removal leaves no hop-by-hop header and nothing `Connection` named;
//! `Via` and `X-Forwarded-*` stay valid; origin hiding never panics and
//! never leaves an endpoint's authority in a URL header.
#![no_main]

use arbitrary::Arbitrary;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sluicegate_fuzz::headers;
use sluicegate_fuzz::protect::origin;

#[derive(Arbitrary, Debug)]
struct Input {
    fields: Vec<(String, Vec<u8>)>,
    client: [u8; 4],
    https: bool,
    public: Option<String>,
}

const HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

fuzz_target!(|input: Input| {
    let mut h = HeaderMap::new();
    for (n, v) in &input.fields {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            h.append(n, v);
        }
    }
    let named: Vec<HeaderName> = h
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let _ = headers::upgrade_request(&h);
    let mut stripped = h.clone();
    headers::remove_hop_by_hop(&mut stripped);
    for name in HOP {
        assert!(!stripped.contains_key(name), "{name} survived");
    }
    for name in &named {
        assert!(
            !stripped.contains_key(name),
            "{name} (named in Connection) survived"
        );
    }
    let host = stripped.get("host").cloned();
    headers::add_forwarded(
        &mut stripped,
        input.client.into(),
        if input.https { "https" } else { "http" },
        host.as_ref(),
    );
    headers::add_via(
        &mut stripped,
        http::Version::HTTP_11,
        &headers::Via::new("sluicegate"),
    );
    assert!(stripped.contains_key("x-forwarded-for") && stripped.contains_key("via"));
    // The client comes last, written out in full.
    let client = std::net::Ipv4Addr::from(input.client).to_string();
    let xff = stripped["x-forwarded-for"].to_str().unwrap_or_default();
    assert!(
        xff == client || xff.ends_with(&format!(", {client}")),
        "{xff}"
    );

    let endpoint = "10.1.2.3:8080";
    let is_ep = |a: &str| origin::same_authority(a, endpoint);
    let public = input.public.as_deref().filter(|p| !p.contains("10.1.2.3"));
    origin::hide_origin(&mut h, is_ep, public, "http", &[]);
    for name in ["location", "content-location", "refresh"] {
        if let Some(v) = h.get(name).and_then(|v| v.to_str().ok()) {
            let lower = v.to_ascii_lowercase();
            let first_url = [
                "http://10.1.2.3:8080",
                "https://10.1.2.3:8080",
                "//10.1.2.3:8080",
            ];
            let leaked = first_url
                .iter()
                .any(|u| lower.find(u).is_some_and(|i| !lower[..i].contains("//")));
            assert!(!leaked, "{name}: {v}");
        }
    }
});
