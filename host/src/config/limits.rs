//! Abuse limits: `[proxy.limits]` (the protection keys) and a route's
//! `rate_limit` and `max_body_bytes`. See docs/security.md.

use serde::Deserialize;

use super::{Config, ConfigError, Validator};

/// A route's `rate_limit = { rps = 100, burst = 200, key = "client" }`: a
/// token bucket refilled at `rps` per second holding at most `burst` tokens.
/// A request takes one token; with none left it gets `429` and a
/// `Retry-After`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second (1..=1,000,000).
    pub rps: u32,
    /// Bucket size: requests allowed at once after a quiet spell (default `rps`).
    pub burst: Option<u32>,
    /// Whose bucket: `client` (IP address, default), `route` (one bucket
    /// for everyone) or `header:NAME` (the header's value; the client IP
    /// when it is absent).
    #[serde(default = "default_key")]
    pub key: String,
    /// `local` (this process's buckets, default) or `redis` (one limit
    /// shared by every replica on the same `[redis]`; GCRA in Redis).
    #[serde(default)]
    pub backend: RateBackend,
    /// With `backend = "redis"`, when Redis is unreachable or slower than
    /// `[redis] timeout_ms`: `allow` (default) or `deny` (`503`).
    #[serde(default)]
    pub on_redis_error: OnRedisError,
}

/// Where a route's buckets live.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateBackend {
    /// This process's memory: each replica limits alone.
    #[default]
    Local,
    /// Redis: one limit for the whole fleet.
    Redis,
}

/// A Redis-backed limit's answer when Redis fails.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Let the request through (fail open).
    #[default]
    Allow,
    /// Refuse it with `503` and `Retry-After: 1` (fail closed).
    Deny,
}

fn default_key() -> String {
    "client".to_string()
}

/// Whose bucket a request takes its token from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// The client's IP address.
    Client,
    /// One bucket for the whole route.
    Route,
    /// The value of this request header (lower-case name).
    Header(http::HeaderName),
}

impl RateLimitConfig {
    /// The burst (bucket size), `rps` when not given.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.rps).max(1)
    }

    /// The parsed `key`.
    pub fn key(&self) -> Result<RateKey, String> {
        match self.key.as_str() {
            "client" => Ok(RateKey::Client),
            "route" => Ok(RateKey::Route),
            k => match k.strip_prefix("header:") {
                Some(name) => http::HeaderName::from_bytes(name.as_bytes())
                    .map(RateKey::Header)
                    .map_err(|_| format!("{name:?} is not a header name")),
                None => Err(format!(
                    "{k:?}: expected \"client\", \"route\" or \"header:NAME\""
                )),
            },
        }
    }
}

impl Validator<'_> {
    /// The protection keys of `[proxy.limits]` and every route.
    pub(super) fn validate_protection(&self, config: &Config) -> Result<(), ConfigError> {
        let l = &config.proxy.limits;
        let key = |k: &str| format!("proxy.limits.{k}");
        if l.max_headers == 0 || l.max_headers > 10_000 {
            return self.error(0..0, key("max_headers"), "must be 1..=10000".into());
        }
        if l.max_header_bytes < 1024 {
            return self.error(
                0..0,
                key("max_header_bytes"),
                "must be at least 1024".into(),
            );
        }
        if l.h2_max_concurrent_streams == 0 {
            return self.error(
                0..0,
                key("h2_max_concurrent_streams"),
                "must be at least 1".into(),
            );
        }
        for (i, h) in config.proxy.hide_response_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.get_ref().as_bytes()).is_err() {
                let reason = format!("{:?} is not a header name", h.get_ref());
                return self.error(
                    h.span(),
                    format!("proxy.hide_response_headers[{i}]"),
                    reason,
                );
            }
        }
        for (i, route) in config.routes.iter().enumerate() {
            if let Some(rl) = &route.rate_limit {
                let span = rl.span();
                let rl = rl.get_ref();
                let key = format!("route[{i}].rate_limit");
                if !(1..=1_000_000).contains(&rl.rps) {
                    return self.error(span, key, "rps must be 1..=1000000".into());
                }
                if rl.burst == Some(0) {
                    return self.error(span, key, "burst must be at least 1".into());
                }
                if let Err(reason) = rl.key() {
                    return self.error(span, format!("{key}.key"), reason);
                }
            }
            if let Some(max) = &route.max_body_bytes {
                if *max.get_ref() == 0 {
                    let reason = "must be at least 1 (leave it out for the global limit)".into();
                    return self.error(max.span(), format!("route[{i}].max_body_bytes"), reason);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, RateKey};

    const BASE: &str = "[proxy]\nlisten = [\"127.0.0.1:1\"]\n[[upstream]]\nname = \"a\"\nendpoints = [\"127.0.0.1:2\"]\n[[route]]\nupstream = \"a\"\n";

    #[test]
    fn rate_limit_parses_and_validates() {
        let ok = format!("{BASE}rate_limit = {{ rps = 5, key = \"header:x-user\" }}\n");
        let c = Config::parse(&ok, Path::new("x.toml")).unwrap();
        let rl = c.routes[0].rate_limit.as_ref().unwrap().get_ref();
        assert_eq!(rl.burst(), 5);
        assert_eq!(
            rl.key().unwrap(),
            RateKey::Header("x-user".parse().unwrap())
        );
        let bad = format!("{BASE}rate_limit = {{ rps = 5, key = \"cookie\" }}\n");
        let e = Config::parse(&bad, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.toml: line 8: route[0].rate_limit.key:"),
            "{e}"
        );
        let bad = format!("{BASE}rate_limit = {{ rps = 0 }}\n");
        let e = Config::parse(&bad, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rps must be"), "{e}");
        let bad = format!("{BASE}rate_limit = {{ rps = 1, bursts = 2 }}\n");
        let e = Config::parse(&bad, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bursts"), "{e}");
    }

    #[test]
    fn limits_validate() {
        let bad = BASE.replace(
            "[[upstream]]",
            "[proxy.limits]\nmax_headers = 0\n[[upstream]]",
        );
        let e = Config::parse(&bad, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy.limits.max_headers"), "{e}");
        let bad = BASE.replace(
            "[[upstream]]",
            "hide_response_headers = [\"bad header\"]\n[[upstream]]",
        );
        let e = Config::parse(&bad, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy.hide_response_headers[0]"), "{e}");
    }
}
