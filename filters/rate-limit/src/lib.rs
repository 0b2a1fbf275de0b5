//! `rate-limit`: a fixed-window request limit per client, kept in the shared
//! KV store so every instance counts together.
//!
//! Config:
//!
//! ```toml
//! [filters.config.rate-limit]
//! requests = 10           # allowed per window (default 10, at least 1)
//! window_ms = 1000        # window length (default 1000)
//! key = "client"          # "client" (the client IP) or "header:<name>"
//! response_headers = false
//! ```
//!
//! Windows are aligned to the wall clock (`now-ms / window_ms`); each
//! request does `kv.increment("<window>:<bucket>", 1, ttl = window_ms)`.
//! With `key = "header:<name>"` the bucket is that header's value, or the
//! client IP when the header is absent. Over the limit the filter answers
//! `429` itself with `retry-after` (whole seconds until the window ends, at
//! least 1), `x-ratelimit-limit` and `x-ratelimit-remaining: 0`. If the KV
//! store fails the request passes (fail open) and a warning is logged.
//!
//! With `response_headers = true` the filter also takes part in the
//! response phase: the request phase sets request header
//! `x-ratelimit-remaining` (the upstream sees it too), and the response
//! phase copies it to the response with `x-ratelimit-limit`. The value is
//! carried in the request because the response phase may run in another
//! instance. Counter: `limited`.

use serde::Deserialize;
use sluicegate_sdk::{
    env, export_filter, headers, kv, log, metrics, Capabilities, Filter, LocalResponse, Request,
    RequestAction, Response, ResponseAction,
};

const REMAINING: &str = "x-ratelimit-remaining";
const LIMIT: &str = "x-ratelimit-limit";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_requests")]
    requests: u64,
    #[serde(default = "default_window")]
    window_ms: u64,
    #[serde(default = "default_key")]
    key: String,
    #[serde(default)]
    response_headers: bool,
}

fn default_requests() -> u64 {
    10
}
fn default_window() -> u64 {
    1000
}
fn default_key() -> String {
    "client".to_string()
}

#[derive(Debug, PartialEq)]
enum KeySource {
    Client,
    Header(String),
}

struct RateLimit {
    requests: i64,
    window_ms: u64,
    key: KeySource,
    response_headers: bool,
}

/// What one request's count means.
#[derive(Debug, PartialEq)]
enum Verdict {
    Allow { remaining: i64 },
    Deny { retry_after_s: u64 },
}

/// FNV-1a, to keep long header values out of KV keys.
fn fnv64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl RateLimit {
    fn from_config(config: &str) -> Result<Self, String> {
        let c: Config = sluicegate_sdk::parse_config(config)?;
        if c.requests == 0 || c.requests > i64::MAX as u64 {
            return Err("requests must be at least 1".to_string());
        }
        if c.window_ms == 0 {
            return Err("window_ms must be at least 1".to_string());
        }
        let key = match c.key.as_str() {
            "client" => KeySource::Client,
            other => match other.strip_prefix("header:") {
                Some(name) if headers::is_valid_name(&name.to_ascii_lowercase()) => {
                    KeySource::Header(name.to_ascii_lowercase())
                }
                _ => {
                    return Err(format!(
                        "key must be \"client\" or \"header:<name>\", not {other:?}"
                    ))
                }
            },
        };
        Ok(RateLimit {
            requests: c.requests as i64,
            window_ms: c.window_ms,
            key,
            response_headers: c.response_headers,
        })
    }

    fn bucket(&self, header_value: Option<String>, client_ip: impl FnOnce() -> String) -> String {
        match header_value {
            Some(v) if v.len() > 64 => format!("h#{:016x}", fnv64(&v)),
            Some(v) => format!("h:{v}"),
            None => format!("ip:{}", client_ip()),
        }
    }

    /// The KV key and TTL for a bucket at `now_ms`.
    fn kv_key(&self, bucket: &str, now_ms: u64) -> String {
        format!("{}:{bucket}", now_ms / self.window_ms)
    }

    fn verdict(&self, count: i64, now_ms: u64) -> Verdict {
        if count <= self.requests {
            return Verdict::Allow {
                remaining: self.requests - count,
            };
        }
        let window_end = (now_ms / self.window_ms + 1).saturating_mul(self.window_ms);
        let left_ms = window_end - now_ms;
        Verdict::Deny {
            retry_after_s: left_ms.div_ceil(1000).max(1),
        }
    }
}

impl Filter for RateLimit {
    const CAPABILITIES: Capabilities = Capabilities::REQUEST;

    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            response: self.response_headers,
            ..Capabilities::REQUEST
        }
    }

    fn on_request(&mut self, req: &Request) -> RequestAction {
        let header_value = match &self.key {
            KeySource::Client => None,
            KeySource::Header(name) => req.header(name),
        };
        let bucket = self.bucket(header_value, || req.client_ip());
        let now = env::now_ms();
        let key = self.kv_key(&bucket, now);
        let count = match kv::increment(&key, 1, Some(self.window_ms)) {
            Ok(n) => n,
            Err(e) => {
                log::warn(format!(
                    "rate-limit: kv increment failed, letting through: {e}"
                ));
                return RequestAction::Continue;
            }
        };
        match self.verdict(count, now) {
            Verdict::Allow { remaining } => {
                if self.response_headers {
                    let _ = req.set_header(REMAINING, &remaining.to_string());
                }
                RequestAction::Continue
            }
            Verdict::Deny { retry_after_s } => {
                metrics::increment("limited");
                LocalResponse::text(429, "rate limit exceeded\n")
                    .with_header("retry-after", retry_after_s.to_string())
                    .with_header(LIMIT, self.requests.to_string())
                    .with_header(REMAINING, "0")
                    .into()
            }
        }
    }

    fn on_response(&mut self, req: &Request, resp: &Response) -> ResponseAction {
        if let Some(remaining) = req.header(REMAINING) {
            let _ = resp.set_header(REMAINING, &remaining);
            let _ = resp.set_header(LIMIT, &self.requests.to_string());
        }
        ResponseAction::Continue
    }
}

export_filter!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config() {
        let r = RateLimit::from_config("{}").unwrap();
        assert_eq!(
            (r.requests, r.window_ms, &r.key),
            (10, 1000, &KeySource::Client)
        );
        assert_eq!(r.capabilities(), Capabilities::REQUEST);
        let r = RateLimit::from_config(r#"{"key": "header:X-User", "response_headers": true}"#)
            .unwrap();
        assert_eq!(r.key, KeySource::Header("x-user".into()));
        assert_eq!(r.capabilities(), Capabilities::REQUEST.with_response());
        assert!(RateLimit::from_config(r#"{"requests": 0}"#).is_err());
        assert!(RateLimit::from_config(r#"{"window_ms": 0}"#).is_err());
        assert!(RateLimit::from_config(r#"{"key": "ip"}"#).is_err());
        assert!(RateLimit::from_config(r#"{"key": "header:"}"#).is_err());
    }

    #[test]
    fn buckets_and_windows() {
        let r = RateLimit::from_config(r#"{"window_ms": 60000}"#).unwrap();
        assert_eq!(r.bucket(None, || "10.0.0.1".into()), "ip:10.0.0.1");
        assert_eq!(r.bucket(Some("u1".into()), || unreachable!()), "h:u1");
        assert!(r
            .bucket(Some("x".repeat(100)), || unreachable!())
            .starts_with("h#"));
        assert_eq!(r.kv_key("ip:a", 119_999), "1:ip:a");
        assert_eq!(r.kv_key("ip:a", 120_000), "2:ip:a");
    }

    #[test]
    fn verdicts() {
        let r = RateLimit::from_config(r#"{"requests": 2, "window_ms": 10000}"#).unwrap();
        assert_eq!(r.verdict(1, 0), Verdict::Allow { remaining: 1 });
        assert_eq!(r.verdict(2, 0), Verdict::Allow { remaining: 0 });
        assert_eq!(r.verdict(3, 1), Verdict::Deny { retry_after_s: 10 });
        assert_eq!(r.verdict(3, 9_001), Verdict::Deny { retry_after_s: 1 });
        assert_eq!(r.verdict(3, 9_999), Verdict::Deny { retry_after_s: 1 });
        let r = RateLimit::from_config(r#"{"requests": 1, "window_ms": 100}"#).unwrap();
        assert_eq!(r.verdict(2, 50), Verdict::Deny { retry_after_s: 1 });
    }
}
