//! `ext-authz`: asks an external auth service about each request, as
//! Envoy's `ext_authz` HTTP filter and nginx's `auth_request` do, and caches
//! its verdicts in KV.
//!
//! ```toml
//! [[upstream]]
//! name = "authz"
//! endpoints = ["127.0.0.1:9001"]
//!
//! [filters.policy.ext-authz]
//! callouts = ["authz"]                   # the grant: upstreams it may call
//!
//! [filters.config.ext-authz]             # every key optional
//! upstream = "authz"                     # the auth service's upstream
//! path = "/check"                        # the check request's path
//! forward_headers = ["authorization", "cookie"]
//! cache_ttl_ms = 5000                    # 0: no cache
//! on_unavailable = "deny"                # or "allow"
//! upstream_headers = ["x-auth-user"]     # copied from an allowing answer
//! # timeout_ms = 200                     # default: the policy's callout_timeout_ms
//! ```
//!
//! The protocol: for each request the filter sends `GET <path>` to the
//! service with `x-original-method`, `x-original-uri`, `x-request-id` and
//! the `forward_headers` the client sent. A 2xx answer allows: the
//! request goes on with the answer's `upstream_headers` set on it. A 401 or
//! 403 denies: the client gets that status with the service's
//! `www-authenticate`, `content-type` and body. Anything else (another
//! status, a timeout, the service down, the callout budget spent) follows
//! `on_unavailable`: `deny` answers 503, `allow` lets the request through.
//! The client's own `upstream_headers` are always removed, so a client
//! cannot claim an identity the service did not give.
//!
//! Allow and deny verdicts are cached in KV (shared by every instance) for
//! `cache_ttl_ms`, keyed by a SHA-256 of the forwarded header values: the
//! cache assumes the verdict depends on the identity those headers carry,
//! not on the method or path. If the service decides per path, set
//! `cache_ttl_ms = 0` (an empty `forward_headers` requires it). Verdicts
//! are never cached for unavailability, nor denials larger than 8 KiB.
//!
//! Metrics: `ext_authz_decisions_total{result="allow|deny|error",
//! cached="true|false"}` (in `sluicegate_filter_counter_total`).

mod config;
mod verdict;

use config::{Config, OnUnavailable};
use sluicegate_sdk_v2::callout::{self, Request as Check};
use sluicegate_sdk_v2::{
    export_filter, kv, log, metrics, Context, Filter, LocalResponse, Phases, Request, RequestAction,
};
use verdict::{cache_key, Verdict};

struct ExtAuthz {
    config: Config,
}

/// The forwarded headers of `req`: each configured name with every value
/// the client sent (none if absent).
fn forwarded(config: &Config, req: &Request) -> Vec<(String, Vec<Vec<u8>>)> {
    let headers = req.headers();
    config
        .forward_headers
        .iter()
        .map(|name| (name.clone(), headers.get_all(name)))
        .collect()
}

/// The check request for a client request.
fn check_request(
    config: &Config,
    method: &str,
    uri: &str,
    request_id: &str,
    forwarded: &[(String, Vec<Vec<u8>>)],
) -> Check {
    let mut check = Check::get(config.path.clone())
        .header("x-original-method", method)
        .header("x-original-uri", uri)
        .header("x-request-id", request_id);
    for (name, values) in forwarded {
        for value in values {
            check = check.header(name.clone(), value);
        }
    }
    if let Some(ms) = config.timeout_ms {
        check = check.timeout_ms(ms);
    }
    check
}

fn count(result: &str, cached: bool) {
    metrics::counter_add(
        "ext_authz_decisions_total",
        &[
            ("result", result),
            ("cached", if cached { "true" } else { "false" }),
        ],
        1,
    );
}

impl ExtAuthz {
    /// The verdict for this request: from the cache, or from the service
    /// (then cached). `Err` carries why there is none.
    fn verdict(&self, cx: &Context, req: &Request) -> Result<(Verdict, bool), String> {
        let forwarded = forwarded(&self.config, req);
        let key = (self.config.cache_ttl_ms > 0).then(|| cache_key(&forwarded));
        if let Some(hit) = key
            .as_deref()
            .and_then(kv::get)
            .and_then(|b| Verdict::decode(&b))
        {
            return Ok((hit, true));
        }
        let check = check_request(
            &self.config,
            &req.method(),
            &req.path(),
            &cx.request_id(),
            &forwarded,
        );
        let resp = callout::call(&self.config.upstream, check)
            .map_err(|e| format!("call to {:?} failed: {e:?}", self.config.upstream))?;
        let verdict = Verdict::from_response(&resp, &self.config.upstream_headers)
            .ok_or_else(|| format!("auth service answered {}", resp.status))?;
        if let (Some(key), Some(bytes)) = (key, verdict.encode()) {
            kv::set(&key, &bytes, Some(self.config.cache_ttl_ms));
        }
        Ok((verdict, false))
    }
}

impl Filter for ExtAuthz {
    const PHASES: Phases = Phases::REQUEST;

    fn init(config: &str) -> Result<Self, String> {
        Ok(ExtAuthz {
            config: Config::parse(config)?,
        })
    }

    fn on_request(&mut self, cx: &Context, req: &Request) -> RequestAction {
        let headers = req.headers();
        // Identity headers come from the service only, never the client.
        for name in &self.config.upstream_headers {
            let _ = headers.remove(name);
        }
        match self.verdict(cx, req) {
            Ok((verdict, cached)) => {
                count(verdict.result_label(), cached);
                match verdict {
                    Verdict::Allow {
                        headers: from_service,
                    } => {
                        for (name, value) in from_service {
                            if let Err(e) = headers.set(&name, &value) {
                                log::warn(format!("ext-authz: setting {name}: {e}"));
                            }
                        }
                        RequestAction::Continue
                    }
                    Verdict::Deny {
                        status,
                        headers,
                        body,
                    } => RequestAction::Respond(LocalResponse {
                        status,
                        headers,
                        body,
                    }),
                }
            }
            Err(why) => {
                count("error", false);
                log::warn(format!("ext-authz: no verdict: {why}"));
                match self.config.on_unavailable {
                    OnUnavailable::Allow => RequestAction::Continue,
                    OnUnavailable::Deny => {
                        RequestAction::Respond(sluicegate_sdk_v2::text_response(
                            503,
                            "authorization service unavailable\n",
                        ))
                    }
                }
            }
        }
    }
}

export_filter!(ExtAuthz);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_request_carries_the_protocol_headers() {
        let config = Config::parse(r#"{"path":"/v1/check","timeout_ms":150}"#).unwrap();
        let fwd = vec![
            ("authorization".to_string(), vec![b"Bearer t".to_vec()]),
            ("cookie".to_string(), vec![b"a=1".to_vec(), b"b=2".to_vec()]),
        ];
        let c = check_request(&config, "POST", "/api/x?y=1", "rid-1", &fwd);
        assert_eq!(c.method(), "GET");
        assert_eq!(c.path(), "/v1/check");
        assert_eq!(c.header_value("x-original-method"), Some(&b"POST"[..]));
        assert_eq!(c.header_value("x-original-uri"), Some(&b"/api/x?y=1"[..]));
        assert_eq!(c.header_value("x-request-id"), Some(&b"rid-1"[..]));
        assert_eq!(c.header_value("authorization"), Some(&b"Bearer t"[..]));
        let cookies: Vec<_> = c.headers().iter().filter(|(n, _)| n == "cookie").collect();
        assert_eq!(cookies.len(), 2);
        assert_eq!(c.timeout(), Some(150));
        assert!(c.body_bytes().is_empty());
    }
}
