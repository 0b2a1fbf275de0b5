//! Native abuse protection, in the order a request meets it:
//!
//! 1. [`ConnLimiter`]: open connections per client IP (checked on accept,
//!    released on close); past the limit the connection is closed at once.
//! 2. [`h1::StrictH1`]: every HTTP/1.1 request head is checked byte by byte
//!    before hyper parses it; ambiguous framing (request smuggling) gets
//!    `400` and the connection is closed.
//! 3. hyper's own limits: head size and header count (`431`), the header
//!    read timeout (slowloris), HTTP/2 stream and reset limits
//!    (CVE-2023-44487).
//! 4. Per route: the token-bucket [`RouteRate`] (`429` + `Retry-After`;
//!    in this process, or with `backend = "redis"` one bucket for the
//!    fleet: [`global::GlobalRate`]) and
//!    the body size limit (`413`, early from `Content-Length`, else while
//!    streaming: [`body::LimitedBody`]).
//! 5. On the way back: [`origin::hide_origin`] rewrites redirects that name
//!    an endpoint and drops the configured origin headers.
//! 6. Keep-alive request limit: [`last_request`] adds `Connection: close`.
//!
//! State that must outlive a reload (connection counts, buckets of routes
//! whose limit did not change) is carried into the new snapshot.

pub mod body;
pub mod global;
pub mod h1;
pub mod origin;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode, Version};

use crate::body::{self as pbody, ProxyBody};
use crate::config::{Config, RateBackend, RateKey, RateLimitConfig};

/// Count a rejection by reason (`sluicegate_rejected_total`).
pub fn count_rejection(reason: &'static str) {
    metrics::counter!("sluicegate_rejected_total", "reason" => reason).increment(1);
}

/// The protection state of one snapshot.
pub struct Protection {
    /// Open connections per client IP, shared by every worker.
    pub conns: Arc<ConnLimiter>,
    /// Token buckets per route index (`None`: the route has no limit).
    rates: Vec<Option<Arc<RouteRate>>>,
    /// `[proxy] hide_response_headers`, parsed.
    pub hidden_headers: Vec<http::HeaderName>,
}

impl Protection {
    /// Build for `config`, keeping `previous` state where it still applies.
    pub fn new(config: &Config, previous: Option<&Protection>) -> Protection {
        let conns = previous
            .map(|p| p.conns.clone())
            .unwrap_or_else(|| Arc::new(ConnLimiter::default()));
        let rates = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let rl = r.rate_limit.as_ref()?.get_ref();
                let kept = previous
                    .and_then(|p| p.rates.get(i).cloned().flatten())
                    .filter(|old| old.config == *rl);
                let host = r.host.as_ref().map(|h| h.to_ascii_lowercase());
                let label = format!("{}{}", host.as_deref().unwrap_or("*"), r.path_prefix);
                Some(kept.unwrap_or_else(|| Arc::new(RouteRate::new(rl, &label))))
            })
            .collect();
        let hidden_headers = config
            .proxy
            .hide_response_headers
            .iter()
            .filter_map(|h| http::HeaderName::from_bytes(h.get_ref().as_bytes()).ok())
            .collect();
        Protection {
            conns,
            rates,
            hidden_headers,
        }
    }

    /// Take a token from route `index`'s bucket; `Some(429)` when empty.
    /// Local limits answer at once (a ready future, nothing allocated);
    /// Redis-backed ones wait (bounded by `[redis] timeout_ms`) in a boxed
    /// future, so the plain path's request future does not carry the Redis
    /// call's state.
    pub fn check_rate<'a>(
        &'a self,
        index: usize,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> impl std::future::Future<Output = Option<Response<ProxyBody>>> + Send + 'a {
        use futures_util::future::Either;
        let Some(rate) = self.rates.get(index).and_then(|r| r.as_ref()) else {
            return Either::Left(std::future::ready(None));
        };
        match &rate.global {
            Some(global) => {
                let bucket = rate.bucket(headers, client).name();
                Either::Right(Box::pin(async move { global.check(&bucket).await }))
            }
            None => Either::Left(std::future::ready(rate.check(headers, client))),
        }
    }
}

/// Open connections per client IP address.
#[derive(Default)]
pub struct ConnLimiter {
    open: DashMap<IpAddr, usize>,
}

/// One admitted connection; releases its slot when dropped.
pub struct ConnGuard(Option<(Arc<ConnLimiter>, IpAddr)>);

impl ConnLimiter {
    /// Admit a connection from `ip` if it has fewer than `max` open
    /// (`max == 0`: no limit, nothing counted).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ConnGuard> {
        if max == 0 {
            return Some(ConnGuard(None));
        }
        let mut open = self.open.entry(ip).or_insert(0);
        if *open >= max {
            drop(open);
            count_rejection("connections_per_ip");
            return None;
        }
        *open += 1;
        Some(ConnGuard(Some((self.clone(), ip))))
    }

    /// Connections open from `ip` (counted only while a limit is set).
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.get(&ip).map(|n| *n).unwrap_or(0)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some((limiter, ip)) = self.0.take() {
            if let Some(mut n) = limiter.open.get_mut(&ip) {
                *n = n.saturating_sub(1);
            }
            limiter.open.remove_if(&ip, |_, n| *n == 0);
        }
    }
}

/// What a bucket is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum BucketKey {
    Ip(IpAddr),
    Value(Box<[u8]>),
    All,
}

impl BucketKey {
    /// The bucket's name in Redis: the address, `*`, or the header value
    /// (hashed when long or not printable, so keys stay short).
    fn name(&self) -> String {
        match self {
            BucketKey::Ip(ip) => ip.to_string(),
            BucketKey::All => "*".to_string(),
            BucketKey::Value(v) if v.len() <= 64 && v.iter().all(|b| b.is_ascii_graphic()) => {
                format!("h:{}", String::from_utf8_lossy(v))
            }
            BucketKey::Value(v) => {
                use sha2::Digest;
                format!("h#{}", hex::encode(&sha2::Sha256::digest(v)[..16]))
            }
        }
    }
}

type KeyedLimiter = RateLimiter<BucketKey, DefaultKeyedStateStore<BucketKey>, DefaultClock>;

/// A route's token buckets (GCRA, which admits exactly what a token bucket
/// of `burst` tokens refilled at `rps` per second admits).
pub struct RouteRate {
    config: RateLimitConfig,
    key: RateKey,
    limiter: KeyedLimiter,
    checks: AtomicU64,
    /// With `backend = "redis"`: the fleet's bucket (then `limiter` is unused).
    global: Option<global::GlobalRate>,
}

/// Buckets are pruned (full ones dropped) every this many checks, so a
/// flood of distinct clients costs bounded memory.
const PRUNE_EVERY: u64 = 4096;

impl RouteRate {
    fn new(config: &RateLimitConfig, label: &str) -> RouteRate {
        let rps = NonZeroU32::new(config.rps).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.burst()).unwrap_or(NonZeroU32::MIN);
        RouteRate {
            config: config.clone(),
            key: config.key().unwrap_or(RateKey::Client),
            limiter: RateLimiter::keyed(Quota::per_second(rps).allow_burst(burst)),
            checks: AtomicU64::new(0),
            global: (config.backend == RateBackend::Redis)
                .then(|| global::GlobalRate::new(config, label)),
        }
    }

    fn bucket(&self, headers: &HeaderMap, client: IpAddr) -> BucketKey {
        match &self.key {
            RateKey::Client => BucketKey::Ip(client),
            RateKey::Route => BucketKey::All,
            RateKey::Header(name) => match headers.get(name) {
                Some(v) => BucketKey::Value(v.as_bytes().into()),
                None => BucketKey::Ip(client),
            },
        }
    }

    fn check(&self, headers: &HeaderMap, client: IpAddr) -> Option<Response<ProxyBody>> {
        let key = self.bucket(headers, client);
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        match self.limiter.check_key(&key) {
            Ok(()) => None,
            Err(not_until) => {
                count_rejection("rate_limit");
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Some(global::too_many(wait))
            }
        }
    }
}

/// Raise the soft open-file limit to the hard one (one fd per client
/// connection, one per upstream connection); returns the soft limit.
pub fn raise_fd_limit() -> u64 {
    let soft = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    tracing::debug!(soft, "open-file limit");
    soft
}

/// How many client connections may be open at once: `configured`, or
/// three quarters of the open-file limit less a small reserve, so that
/// upstream connections, filter files and the listeners still get
/// descriptors when clients flood in.
pub fn connection_cap(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) if soft < u64::MAX / 4 => {
            ((soft * 3 / 4).saturating_sub(32)).max(16) as usize
        }
        _ => usize::MAX,
    }
}

/// `text` with every control character (newlines, escapes, NUL) written as
/// a Rust escape, for log lines that carry untrusted text.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The body limit of a route: its own, else the global one (`None`: unlimited).
pub fn body_limit(config: &Config, route_index: usize) -> Option<u64> {
    let own = config
        .routes
        .get(route_index)
        .and_then(|r| r.max_body_bytes.as_ref())
        .map(|m| *m.get_ref());
    match (own, config.proxy.limits.max_body_bytes) {
        (Some(n), _) => Some(n),
        (None, 0) => None,
        (None, n) => Some(n),
    }
}

/// `Some(413)` when the announced `Content-Length` is over `limit`.
pub fn check_content_length(
    headers: &HeaderMap,
    version: Version,
    limit: Option<u64>,
) -> Option<Response<ProxyBody>> {
    let limit = limit?;
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match announced {
        Some(n) if n > limit => {
            count_rejection("body_too_large");
            Some(too_large(version))
        }
        _ => None,
    }
}

/// The `413` answer. The unread body makes the HTTP/1.1 connection unusable,
/// so it is closed after the answer.
pub fn too_large(version: Version) -> Response<ProxyBody> {
    let mut resp = pbody::text_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    close_after(&mut resp, version);
    resp
}

/// The `400` answer for a request body that broke (bad chunked framing, or
/// the client went away mid-body).
pub fn bad_body(version: Version) -> Response<ProxyBody> {
    let mut resp = pbody::text_response(StatusCode::BAD_REQUEST, "malformed request body");
    close_after(&mut resp, version);
    resp
}

/// After request filters: hop-by-hop headers a filter added are removed and
/// `Content-Length` follows the body (set when its size is known and a
/// length was sent, removed when it streams), so what goes upstream is
/// framed one way only.
pub fn normalise_request_framing(headers: &mut HeaderMap, body: &impl http_body::Body) {
    crate::headers::remove_hop_by_hop(headers);
    match body.size_hint().exact() {
        Some(n) if n > 0 || headers.contains_key(header::CONTENT_LENGTH) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Some(_) => {}
        None => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
}

/// After response filters: the same for the response (an empty body keeps
/// its `Content-Length`, which describes the representation of a `HEAD` or
/// `304`).
pub fn normalise_response_framing(headers: &mut HeaderMap, body: &impl http_body::Body) {
    crate::headers::remove_hop_by_hop(headers);
    match body.size_hint().exact() {
        Some(0) => {}
        Some(n) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
}

/// Ask hyper to close an HTTP/1.x connection after this response.
fn close_after(resp: &mut Response<ProxyBody>, version: Version) {
    if version < Version::HTTP_2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// The keep-alive request limit: the `served`-th request on an HTTP/1.x
/// connection whose limit is `max` (0: none) is answered with
/// `Connection: close`, so the client opens a fresh connection.
pub fn last_request(resp: &mut Response<ProxyBody>, version: Version, served: u64, max: u64) {
    if max > 0 && served >= max && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        close_after(resp, version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            escape_controls("a\nb\x1b[31mc\u{0}"),
            "a\\nb\\u{1b}[31mc\\u{0}"
        );
        assert_eq!(escape_controls("plain é"), "plain é");
    }

    #[test]
    fn connection_slots_are_released() {
        let l = Arc::new(ConnLimiter::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = l.admit(ip, 2).unwrap();
        let b = l.admit(ip, 2).unwrap();
        assert!(l.admit(ip, 2).is_none());
        assert!(l.admit("10.0.0.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert_eq!(l.open(ip), 1);
        let _c = l.admit(ip, 2).unwrap();
        drop(b);
        assert_eq!(l.open(ip), 1);
        assert!(l.admit(ip, 0).is_some());
    }

    #[test]
    fn bucket_allows_burst_then_429_with_retry_after() {
        let cfg = RateLimitConfig {
            rps: 1,
            burst: Some(3),
            key: "client".into(),
            backend: RateBackend::Local,
            on_redis_error: Default::default(),
        };
        let rate = RouteRate::new(&cfg, "*/");
        let h = HeaderMap::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(rate.check(&h, ip).is_none());
        }
        let resp = rate.check(&h, ip).unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        // Another client has its own bucket.
        assert!(rate.check(&h, "10.0.0.2".parse().unwrap()).is_none());
    }

    #[test]
    fn content_length_over_the_limit_is_413() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("101"));
        assert!(check_content_length(&h, Version::HTTP_11, Some(101)).is_none());
        assert!(check_content_length(&h, Version::HTTP_11, None).is_none());
        let resp = check_content_length(&h, Version::HTTP_11, Some(100)).unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
    }
}
