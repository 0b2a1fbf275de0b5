//! Fleet settings: `[redis]` (the one store a fleet of replicas shares) and
//! `[filters.kv]` (where filter KV lives). A route's `rate_limit.backend`
//! and `on_redis_error` are in `limits.rs`. See docs/operations.md,
//! "Scaling out".

use serde::Deserialize;
use toml::Spanned;

use super::{Config, ConfigError, RateBackend, Validator};

/// `[redis]`: the Redis server every replica points at. Read once at
/// start: a changed `[redis]` table needs a restart (a reload logs it).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]` or `redis+unix:///path`
    /// (TLS, `rediss://`, is not built in: refused at load).
    pub url: Spanned<String>,
    /// Per-operation deadline of route rate limits and purge fan-out,
    /// milliseconds (default 25). Filter KV has its own
    /// (`[filters.kv] timeout_ms`).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Deadline of one connection attempt, milliseconds (default 1000).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Prefix of every key and channel (default `sluicegate:`), so fleets
    /// can share one Redis.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Fan `POST /cache/purge` out to every replica (pub/sub).
    #[serde(default)]
    pub purge: bool,
    /// `/readyz` fails (503) while Redis is unreachable. Default false:
    /// `/readyz` stays 200 and says `degraded`, since the fail policies
    /// keep a replica serving.
    #[serde(default)]
    pub required_for_ready: bool,
}

fn default_timeout() -> u64 {
    25
}
fn default_connect_timeout() -> u64 {
    1_000
}
fn default_prefix() -> String {
    "sluicegate:".to_string()
}

/// `[filters.kv]`: where filters' key-value stores live.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KvConfig {
    /// `local` (this process's memory, default) or `redis` (shared by every
    /// replica on the same `[redis]`).
    pub backend: KvBackend,
    /// Per-operation deadline with the Redis backend, milliseconds
    /// (default 5). The wait counts against the filter's CPU deadline
    /// (`timeout_ms`), which is wall-clock time.
    pub timeout_ms: u64,
    /// What a KV call does when Redis is unreachable or slow: `fail_open`
    /// (default: `get` is absent, `set` is dropped, `delete` and
    /// `compare-and-swap` are false, `increment` returns an error) or
    /// `fail_closed` (the call traps: the filter's `on_error` applies).
    pub on_error: KvOnError,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            backend: KvBackend::Local,
            timeout_ms: 5,
            on_error: KvOnError::FailOpen,
        }
    }
}

/// Where filter KV lives.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvBackend {
    /// This process's memory.
    Local,
    /// The `[redis]` server.
    Redis,
}

/// What a filter's KV call does when Redis fails.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvOnError {
    /// The call answers as if the key were absent (or the write refused).
    FailOpen,
    /// The call traps; the filter's `on_error` policy applies.
    FailClosed,
}

impl Validator<'_> {
    /// `[redis]`, `[filters.kv]` and the routes' Redis-backed limits.
    pub(super) fn validate_redis(&self, config: &Config) -> Result<(), ConfigError> {
        if let Some(r) = &config.redis {
            if let Err(e) = check_url(r.url.get_ref()) {
                return self.error(r.url.span(), "redis.url".into(), e);
            }
            for (key, v) in [
                ("timeout_ms", r.timeout_ms),
                ("connect_timeout_ms", r.connect_timeout_ms),
            ] {
                if v == 0 {
                    return self.error(0..0, format!("redis.{key}"), "must be > 0".into());
                }
            }
        }
        let kv = &config.filters.kv;
        if kv.timeout_ms == 0 {
            return self.error(0..0, "filters.kv.timeout_ms".into(), "must be > 0".into());
        }
        if kv.backend == KvBackend::Redis && config.redis.is_none() {
            let reason = "backend = \"redis\" needs a [redis] table with its url".into();
            return self.error(0..0, "filters.kv.backend".into(), reason);
        }
        for (i, route) in config.routes.iter().enumerate() {
            let Some(rl) = &route.rate_limit else {
                continue;
            };
            if rl.get_ref().backend == RateBackend::Redis && config.redis.is_none() {
                let reason = "backend = \"redis\" needs a [redis] table with its url".into();
                return self.error(rl.span(), format!("route[{i}].rate_limit.backend"), reason);
            }
        }
        Ok(())
    }
}

/// Does `url` name a Redis server the client can connect to?
fn check_url(url: &str) -> Result<(), String> {
    match redis::Client::open(url) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{:?} is not a Redis URL: {e}", redact_url(url))),
    }
}

/// `url` with the password (if any) replaced by `[redacted]`, for logs and
/// `/config`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:[redacted]@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const BASE: &str = "[proxy]\nlisten = [\"127.0.0.1:8080\"]\n[[upstream]]\nname = \"a\"\nendpoints = [\"127.0.0.1:1\"]\n[[route]]\nupstream = \"a\"\n";

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("x.toml"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn redis_keys_parse_and_validate() {
        let ok = format!("{BASE}rate_limit = {{ rps = 5, backend = \"redis\", on_redis_error = \"deny\" }}\n[redis]\nurl = \"redis://127.0.0.1:6379\"\npurge = true\n[filters.kv]\nbackend = \"redis\"\non_error = \"fail_closed\"\n");
        let c = Config::parse(&ok, Path::new("x.toml")).unwrap();
        let r = c.redis.as_ref().unwrap();
        assert_eq!(
            (r.timeout_ms, r.prefix.as_str(), r.purge),
            (25, "sluicegate:", true)
        );
        assert_eq!(c.filters.kv.backend, KvBackend::Redis);
        assert_eq!(c.filters.kv.on_error, KvOnError::FailClosed);

        let e = err(&ok.replace("redis://127.0.0.1:6379", "http://nope"));
        assert!(e.starts_with("x.toml: line 10: redis.url:"), "{e}");
        let e = err(&ok.replace("redis://127.0.0.1:6379", "rediss://:pw@h:6379"));
        assert!(
            e.contains("redis.url") && e.contains("TLS") && !e.contains("pw@"),
            "{e}"
        );
        let e = err(&format!(
            "{BASE}rate_limit = {{ rps = 5, backend = \"redis\" }}\n"
        ));
        assert!(
            e.contains("route[0].rate_limit.backend") && e.contains("[redis]"),
            "{e}"
        );
        let e = err(&format!("{BASE}[filters.kv]\nbackend = \"redis\"\n"));
        assert!(e.contains("filters.kv.backend"), "{e}");
        let e = err(&format!("{BASE}[filters.kv]\nbackend = \"memcached\"\n"));
        assert!(e.contains("memcached"), "{e}");
        let e = err(&ok.replace("purge = true", "timeout_ms = 0"));
        assert!(e.contains("redis.timeout_ms: must be > 0"), "{e}");
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("redis://:s3cret@h:6379/0"),
            "redis://:[redacted]@h:6379/0"
        );
        assert_eq!(
            redact_url("redis://me:s3cret@h:6379"),
            "redis://me:[redacted]@h:6379"
        );
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    }
}
