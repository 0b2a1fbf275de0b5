//! `security-headers`: adds the usual security headers to every response
//! and handles CORS for the configured origins.
//!
//! Config (all optional):
//!
//! ```toml
//! [filters.config.security-headers]
//! hsts_max_age = 31536000            # strict-transport-security max-age; 0: no header
//! hsts_include_subdomains = false
//! referrer_policy = "strict-origin-when-cross-origin"
//! frame_options = "DENY"
//! cors_allow_origins = ["https://a.example"]   # or ["*"]; empty: no CORS
//! cors_allow_methods = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
//! cors_allow_credentials = false
//! cors_max_age = 600                 # preflight cache, seconds
//! ```
//!
//! Response phase: sets (replacing upstream values) `strict-transport-security:
//! max-age=N[; includeSubDomains]`, `x-content-type-options: nosniff`,
//! `x-frame-options`, `referrer-policy`. When the request's `origin`
//! matches `cors_allow_origins` (exact, ASCII case-insensitive), sets
//! `access-control-allow-origin` to that origin and adds `origin` to `vary`
//! (with `"*"` configured: `*` and no `vary`, unless credentials are
//! allowed, which echo the origin), plus
//! `access-control-allow-credentials: true` when configured.
//!
//! Request phase (only when `cors_allow_origins` is non-empty): a CORS
//! preflight (`OPTIONS` with `origin` and `access-control-request-method`)
//! is answered locally with `204`. For an allowed origin it carries
//! `access-control-allow-origin`, `-allow-methods`, `-allow-headers` (the
//! requested ones echoed), `-max-age`, `vary: origin` (and credentials when
//! configured); for any other origin it carries no CORS header, so the
//! browser refuses. Other requests go on unchanged.

use serde::Deserialize;
use sluicegate_sdk::{
    export_filter, Capabilities, Filter, LocalResponse, Request, RequestAction, Response,
    ResponseAction,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_hsts")]
    hsts_max_age: u64,
    #[serde(default)]
    hsts_include_subdomains: bool,
    #[serde(default = "default_referrer")]
    referrer_policy: String,
    #[serde(default = "default_frame")]
    frame_options: String,
    #[serde(default)]
    cors_allow_origins: Vec<String>,
    #[serde(default = "default_methods")]
    cors_allow_methods: String,
    #[serde(default)]
    cors_allow_credentials: bool,
    #[serde(default = "default_max_age")]
    cors_max_age: u64,
}

fn default_hsts() -> u64 {
    31_536_000
}
fn default_referrer() -> String {
    "strict-origin-when-cross-origin".to_string()
}
fn default_frame() -> String {
    "DENY".to_string()
}
fn default_methods() -> String {
    "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS".to_string()
}
fn default_max_age() -> u64 {
    600
}

struct SecurityHeaders {
    /// Fixed headers for every response.
    fixed: Vec<(&'static str, String)>,
    origins: Vec<String>,
    any_origin: bool,
    methods: String,
    credentials: bool,
    max_age: u64,
}

/// How to answer one origin.
#[derive(Debug, PartialEq)]
enum Allow {
    /// Not allowed: no CORS header.
    No,
    /// `access-control-allow-origin: *`.
    Any,
    /// Echo this origin, with `vary: origin`.
    Echo(String),
}

impl SecurityHeaders {
    fn from_config(config: &str) -> Result<Self, String> {
        let c: Config = sluicegate_sdk::parse_config(config)?;
        let mut fixed = Vec::new();
        if c.hsts_max_age > 0 {
            let sub = if c.hsts_include_subdomains {
                "; includeSubDomains"
            } else {
                ""
            };
            fixed.push((
                "strict-transport-security",
                format!("max-age={}{sub}", c.hsts_max_age),
            ));
        }
        fixed.push(("x-content-type-options", "nosniff".to_string()));
        if !c.frame_options.is_empty() {
            fixed.push(("x-frame-options", c.frame_options));
        }
        if !c.referrer_policy.is_empty() {
            fixed.push(("referrer-policy", c.referrer_policy));
        }
        if let Some((_, v)) = fixed.iter().find(|(_, v)| v.contains(['\r', '\n'])) {
            return Err(format!("invalid header value {v:?}"));
        }
        let any_origin = c.cors_allow_origins.iter().any(|o| o == "*");
        let origins = c
            .cors_allow_origins
            .into_iter()
            .filter(|o| o != "*")
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .collect();
        Ok(SecurityHeaders {
            fixed,
            origins,
            any_origin,
            methods: c.cors_allow_methods,
            credentials: c.cors_allow_credentials,
            max_age: c.cors_max_age,
        })
    }

    fn cors_enabled(&self) -> bool {
        self.any_origin || !self.origins.is_empty()
    }

    fn allow(&self, origin: Option<&str>) -> Allow {
        let Some(origin) = origin.filter(|o| !o.is_empty()) else {
            return Allow::No;
        };
        if self.any_origin && !self.credentials {
            return Allow::Any;
        }
        if self.any_origin || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
            return Allow::Echo(origin.to_string());
        }
        Allow::No
    }

    fn preflight(&self, origin: Option<&str>, request_headers: Option<String>) -> LocalResponse {
        let mut resp = LocalResponse::new(204);
        let allow_origin = match self.allow(origin) {
            Allow::No => return resp,
            Allow::Any => "*".to_string(),
            Allow::Echo(o) => {
                resp = resp.with_header("vary", "origin");
                o
            }
        };
        resp = resp
            .with_header("access-control-allow-origin", allow_origin)
            .with_header("access-control-allow-methods", self.methods.clone())
            .with_header("access-control-max-age", self.max_age.to_string());
        if let Some(h) = request_headers.filter(|h| !h.trim().is_empty()) {
            resp = resp.with_header("access-control-allow-headers", h);
        }
        if self.credentials {
            resp = resp.with_header("access-control-allow-credentials", "true");
        }
        resp
    }
}

impl Filter for SecurityHeaders {
    const CAPABILITIES: Capabilities = Capabilities::RESPONSE;

    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            request: self.cors_enabled(),
            ..Capabilities::RESPONSE
        }
    }

    fn on_request(&mut self, req: &Request) -> RequestAction {
        if !req.method().eq_ignore_ascii_case("OPTIONS") {
            return RequestAction::Continue;
        }
        let origin = req.header("origin");
        if origin.is_none() || !req.has_header("access-control-request-method") {
            return RequestAction::Continue;
        }
        let requested = req.header("access-control-request-headers");
        self.preflight(origin.as_deref(), requested).into()
    }

    fn on_response(&mut self, req: &Request, resp: &Response) -> ResponseAction {
        for (name, value) in &self.fixed {
            let _ = resp.set_header(name, value);
        }
        if self.cors_enabled() {
            match self.allow(req.header("origin").as_deref()) {
                Allow::No => {}
                Allow::Any => {
                    let _ = resp.set_header("access-control-allow-origin", "*");
                }
                Allow::Echo(origin) => {
                    let _ = resp.set_header("access-control-allow-origin", &origin);
                    let _ = resp.add_to_list_header("vary", "origin");
                    if self.credentials {
                        let _ = resp.set_header("access-control-allow-credentials", "true");
                    }
                }
            }
        }
        ResponseAction::Continue
    }
}

export_filter!(SecurityHeaders);

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(r: &'a LocalResponse, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn defaults() {
        let s = SecurityHeaders::from_config("{}").unwrap();
        assert_eq!(s.capabilities(), Capabilities::RESPONSE);
        assert_eq!(
            s.fixed[0],
            ("strict-transport-security", "max-age=31536000".into())
        );
        assert_eq!(s.fixed.len(), 4);
        assert_eq!(s.allow(Some("https://a.example")), Allow::No);
        let s =
            SecurityHeaders::from_config(r#"{"hsts_max_age": 0, "frame_options": ""}"#).unwrap();
        assert_eq!(s.fixed.len(), 2);
        assert!(SecurityHeaders::from_config(r#"{"referrer_policy": "a\nb"}"#).is_err());
    }

    #[test]
    fn origins() {
        let s = SecurityHeaders::from_config(r#"{"cors_allow_origins": ["https://A.example/"]}"#)
            .unwrap();
        assert_eq!(s.capabilities(), Capabilities::REQUEST.with_response());
        assert_eq!(
            s.allow(Some("https://a.example")),
            Allow::Echo("https://a.example".into())
        );
        assert_eq!(s.allow(Some("https://b.example")), Allow::No);
        assert_eq!(s.allow(None), Allow::No);
        let any = SecurityHeaders::from_config(r#"{"cors_allow_origins": ["*"]}"#).unwrap();
        assert_eq!(any.allow(Some("https://x")), Allow::Any);
        let cred = SecurityHeaders::from_config(
            r#"{"cors_allow_origins": ["*"], "cors_allow_credentials": true}"#,
        )
        .unwrap();
        assert_eq!(
            cred.allow(Some("https://x")),
            Allow::Echo("https://x".into())
        );
    }

    #[test]
    fn preflights() {
        let s = SecurityHeaders::from_config(r#"{"cors_allow_origins": ["https://a.example"]}"#)
            .unwrap();
        let r = s.preflight(Some("https://a.example"), Some("content-type".into()));
        assert_eq!(r.status, 204);
        assert_eq!(
            header(&r, "access-control-allow-origin"),
            Some("https://a.example")
        );
        assert_eq!(
            header(&r, "access-control-allow-headers"),
            Some("content-type")
        );
        assert_eq!(header(&r, "access-control-max-age"), Some("600"));
        assert_eq!(header(&r, "vary"), Some("origin"));
        let r = s.preflight(Some("https://evil.example"), None);
        assert_eq!(r.status, 204);
        assert!(r.headers.is_empty());
    }
}
