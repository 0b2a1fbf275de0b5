//! The auth service's verdict: read from its answer, kept in KV, turned
//! into what the filter does. Pure, so it is tested natively.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluicegate_sdk_v2::callout::Response;

/// Deny answers larger than this (body and headers) are not cached, so one
/// chatty service cannot fill the filter's KV quota.
pub const MAX_CACHED_DENY_BYTES: usize = 8 * 1024;

/// What the service decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// 2xx: let the request through, with these headers from the answer.
    Allow {
        /// `(name, value)` for each configured `upstream_headers` name the
        /// answer carried.
        headers: Vec<(String, Vec<u8>)>,
    },
    /// 401 or 403: answer the client with the service's status,
    /// `www-authenticate`, `content-type` and body.
    Deny {
        /// 401 or 403.
        status: u16,
        /// The headers passed on to the client.
        headers: Vec<(String, Vec<u8>)>,
        /// The service's body.
        body: Vec<u8>,
    },
}

/// Headers of a deny answer passed on to the client.
const DENY_HEADERS: [&str; 2] = ["www-authenticate", "content-type"];

impl Verdict {
    /// The verdict in `resp`, or `None` if it gives none (any status other
    /// than 2xx, 401 and 403): the `on_unavailable` policy applies.
    pub fn from_response(resp: &Response, upstream_headers: &[String]) -> Option<Verdict> {
        let pick = |names: &mut dyn Iterator<Item = &str>| -> Vec<(String, Vec<u8>)> {
            names
                .filter_map(|n| resp.header(n).map(|v| (n.to_string(), v.to_vec())))
                .collect()
        };
        match resp.status {
            200..=299 => Some(Verdict::Allow {
                headers: pick(&mut upstream_headers.iter().map(String::as_str)),
            }),
            401 | 403 => Some(Verdict::Deny {
                status: resp.status,
                headers: pick(&mut DENY_HEADERS.iter().copied()),
                body: resp.body.clone(),
            }),
            _ => None,
        }
    }

    /// The label of `ext_authz_decisions_total`'s `result`.
    pub fn result_label(&self) -> &'static str {
        match self {
            Verdict::Allow { .. } => "allow",
            Verdict::Deny { .. } => "deny",
        }
    }

    /// The verdict as stored in KV, or `None` if it is too large to keep.
    pub fn encode(&self) -> Option<Vec<u8>> {
        let bytes = serde_json::to_vec(self).ok()?;
        match self {
            Verdict::Deny { .. } if bytes.len() > MAX_CACHED_DENY_BYTES => None,
            _ => Some(bytes),
        }
    }

    /// A verdict read back from KV (`None` if it does not parse, e.g. one
    /// written by another version: it is then asked for again).
    pub fn decode(bytes: &[u8]) -> Option<Verdict> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The KV key of the verdict for these forwarded header values: SHA-256
/// over each configured name and every value it has, length-prefixed so
/// that no two different sets of values share an encoding. A collision
/// would hand one client another's verdict, hence a cryptographic hash.
pub fn cache_key(forwarded: &[(String, Vec<Vec<u8>>)]) -> String {
    let mut h = Sha256::new();
    for (name, values) in forwarded {
        h.update((name.len() as u64).to_be_bytes());
        h.update(name.as_bytes());
        h.update((values.len() as u64).to_be_bytes());
        for v in values {
            h.update((v.len() as u64).to_be_bytes());
            h.update(v);
        }
    }
    let digest = h.finalize();
    let mut key = String::with_capacity(7 + 64);
    key.push_str("authz:");
    for b in digest {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn two_xx_allows_with_configured_headers_only() {
        let resp = Response::new(204)
            .with_header("X-Auth-User", "alice")
            .with_header("x-secret", "no");
        let v = Verdict::from_response(&resp, &names(&["x-auth-user", "x-tenant"])).unwrap();
        assert_eq!(
            v,
            Verdict::Allow {
                headers: vec![("x-auth-user".into(), b"alice".to_vec())]
            }
        );
        assert_eq!(v.result_label(), "allow");
    }

    #[test]
    fn four_oh_one_and_three_deny_with_challenge_and_body() {
        for status in [401, 403] {
            let resp = Response::new(status)
                .with_header("WWW-Authenticate", "Bearer realm=\"x\"")
                .with_header("content-type", "text/plain")
                .with_header("x-other", "dropped")
                .with_body("go away");
            let v = Verdict::from_response(&resp, &[]).unwrap();
            assert_eq!(
                v,
                Verdict::Deny {
                    status,
                    headers: vec![
                        ("www-authenticate".into(), b"Bearer realm=\"x\"".to_vec()),
                        ("content-type".into(), b"text/plain".to_vec()),
                    ],
                    body: b"go away".to_vec(),
                }
            );
        }
    }

    #[test]
    fn other_statuses_give_no_verdict() {
        for status in [100, 302, 400, 404, 429, 500, 503] {
            assert_eq!(Verdict::from_response(&Response::new(status), &[]), None);
        }
    }

    #[test]
    fn encode_round_trips_and_refuses_huge_denies() {
        let allow = Verdict::Allow {
            headers: vec![("x-auth-user".into(), vec![0, 255, b'a'])],
        };
        assert_eq!(Verdict::decode(&allow.encode().unwrap()), Some(allow));
        let deny = Verdict::Deny {
            status: 403,
            headers: vec![],
            body: b"no".to_vec(),
        };
        assert_eq!(Verdict::decode(&deny.encode().unwrap()), Some(deny));
        let huge = Verdict::Deny {
            status: 401,
            headers: vec![],
            body: vec![b'x'; MAX_CACHED_DENY_BYTES],
        };
        assert_eq!(huge.encode(), None);
        assert_eq!(Verdict::decode(b"garbage"), None);
    }

    #[test]
    fn cache_key_separates_every_value() {
        let k = |v: &[(&str, &[&str])]| {
            cache_key(
                &v.iter()
                    .map(|(n, vals)| {
                        (
                            n.to_string(),
                            vals.iter().map(|s| s.as_bytes().to_vec()).collect(),
                        )
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let a = k(&[("authorization", &["Bearer a"]), ("cookie", &[])]);
        assert_eq!(a, k(&[("authorization", &["Bearer a"]), ("cookie", &[])]));
        assert!(a.starts_with("authz:") && a.len() == 6 + 64);
        assert_ne!(a, k(&[("authorization", &["Bearer b"]), ("cookie", &[])]));
        // Shifting bytes between values or fields changes the key.
        assert_ne!(
            k(&[("authorization", &["ab", "c"])]),
            k(&[("authorization", &["a", "bc"])])
        );
        assert_ne!(
            k(&[("authorization", &["x"]), ("cookie", &[])]),
            k(&[("authorization", &[]), ("cookie", &["x"])])
        );
    }
}
