//! A route's `rate_limit` with `backend = "redis"`: one limit for every
//! replica on the same Redis, the same GCRA as the local buckets
//! (`burst` requests at once, then one per `1/rps` seconds), run as a Lua
//! script on Redis's clock so replicas need not agree on time.
//!
//! Key: `P rl:<route label>:<bucket>` holding the bucket's theoretical
//! arrival time (µs), expiring once the bucket is full again. When Redis
//! does not answer within `[redis] timeout_ms`, the route's
//! `on_redis_error` decides: `allow` lets the request through, `deny`
//! answers `503` with `Retry-After: 1`. Both are counted
//! (`sluicegate_rate_limit_redis_fallback_total`).

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use redis::Script;

use crate::body::{self as pbody, ProxyBody};
use crate::config::{OnRedisError, RateLimitConfig};
use crate::fleet::{self, Op};

/// KEYS: the bucket. ARGV: emission interval (µs), tolerance (µs).
/// → 0 when admitted, else the wait in µs until a request would be.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local allow_at = tat + emission - tau
if now < allow_at then return allow_at - now end
local new_tat = tat + emission
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', string.format('%d', math.ceil((new_tat - now) / 1000) + 1))
return 0
"#;

fn script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(GCRA))
}

/// The Redis side of one route's limit.
pub struct GlobalRate {
    /// `P rl:<label>:`, the bucket name appended.
    prefix: String,
    emission_us: u64,
    tolerance_us: u64,
    on_error: OnRedisError,
}

impl GlobalRate {
    /// The limit of the route labelled `label` (`host/prefix`).
    pub fn new(config: &RateLimitConfig, label: &str) -> GlobalRate {
        let emission_us = (1_000_000 / u64::from(config.rps.max(1))).max(1);
        GlobalRate {
            prefix: format!("rl:{label}:"),
            emission_us,
            tolerance_us: emission_us * u64::from(config.burst()),
            on_error: config.on_redis_error,
        }
    }

    /// Take a token from `bucket`; `Some(429)` (or the failure answer)
    /// when refused.
    pub async fn check(&self, bucket: &str) -> Option<Response<ProxyBody>> {
        let Some(link) = fleet::link() else {
            return self.fallback("redis is not configured (a [redis] table needs a restart)");
        };
        let key = link.key(&format!("{}{bucket}", self.prefix));
        let (emission, tolerance) = (self.emission_us, self.tolerance_us);
        let timeout = Duration::from_millis(link.config.timeout_ms);
        let waited = link
            .run(Op::RateLimit, timeout, move |mut c| async move {
                script()
                    .key(key)
                    .arg(emission)
                    .arg(tolerance)
                    .invoke_async::<u64>(&mut c)
                    .await
            })
            .await;
        match waited {
            Ok(0) => None,
            Ok(wait_us) => {
                super::count_rejection("rate_limit");
                Some(too_many(Duration::from_micros(wait_us)))
            }
            Err(e) => self.fallback(&e.to_string()),
        }
    }

    /// The answer when Redis gave none.
    fn fallback(&self, why: &str) -> Option<Response<ProxyBody>> {
        let policy = match self.on_error {
            OnRedisError::Allow => "allow",
            OnRedisError::Deny => "deny",
        };
        metrics::counter!("sluicegate_rate_limit_redis_fallback_total", "policy" => policy)
            .increment(1);
        tracing::debug!(policy, why, "rate limit: redis gave no answer");
        match self.on_error {
            OnRedisError::Allow => None,
            OnRedisError::Deny => {
                super::count_rejection("rate_limit_unavailable");
                let mut resp =
                    pbody::text_response(StatusCode::SERVICE_UNAVAILABLE, "rate limit unavailable");
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
                Some(resp)
            }
        }
    }
}

/// The `429` with `Retry-After` in whole seconds, rounded up (at least 1):
/// a client that waits this long finds a token.
pub fn too_many(wait: Duration) -> Response<ProxyBody> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut resp = pbody::text_response(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    resp
}
