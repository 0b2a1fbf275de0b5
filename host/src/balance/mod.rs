//! Choosing an endpoint of an upstream. Balancing is native: a filter may
//! pick *which* upstream, never which endpoint.
//!
//! Every endpoint carries its live state in atomics ([`EndpointState`]):
//! in-flight requests, a peak-EWMA of response latency, consecutive
//! failures and an ejection deadline. The state is shared by every worker
//! thread (they share the snapshot's `Upstream`s) and survives config
//! reloads for endpoints that stay (same upstream name and address).
//! The algorithms themselves live in [`algorithms`]; passive ejection and
//! panic mode here; active health checks in [`health`].

pub mod algorithms;
pub mod dns;
pub mod grpc_health;
pub mod health;
pub mod limits;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{HeaderMap, StatusCode};

use crate::config::{Balance, HashKey, HealthConfig, UpstreamConfig};
use dns::DnsTable;
use limits::{Admission, RetryBudget};

/// Longest ejection, however often an endpoint is re-ejected.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Nanoseconds since the first call (a process-wide monotonic clock that
/// fits in an atomic).
pub fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// The live, shared state of one endpoint. Plain atomics: a request only
/// touches its own endpoint's cache lines.
#[derive(Debug)]
pub struct EndpointState {
    in_flight: AtomicU64,
    /// Peak-EWMA of the response-head latency, nanoseconds, as `f64` bits.
    ewma: AtomicU64,
    ewma_stamp: AtomicU64,
    consecutive_failures: AtomicU32,
    /// `now_ns()` until which the endpoint is ejected (0: never was).
    ejected_until: AtomicU64,
    /// Ejections in a row: the next one lasts `ejection_ms << backoff`.
    backoff: AtomicU32,
    /// The active health check's verdict (true until a check says otherwise).
    active_healthy: AtomicBool,
    /// Active checks in a row that passed (> 0) or failed (< 0).
    check_streak: std::sync::atomic::AtomicI32,
    requests: AtomicU64,
    failures: AtomicU64,
    ejections: AtomicU64,
}

impl Default for EndpointState {
    fn default() -> Self {
        EndpointState {
            in_flight: AtomicU64::new(0),
            ewma: AtomicU64::new(0f64.to_bits()),
            ewma_stamp: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            backoff: AtomicU32::new(0),
            active_healthy: AtomicBool::new(true),
            check_streak: std::sync::atomic::AtomicI32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
        }
    }
}

/// How fast the EWMA forgets: the weight of an old sample after `t` is
/// `exp(-t / EWMA_DECAY)`.
const EWMA_DECAY_NS: f64 = 10e9;

impl EndpointState {
    /// Requests sent and not yet finished (response body included).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Is the endpoint passively ejected at `now` (from [`now_ns`])?
    pub fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// The active checker's verdict.
    pub fn active_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
    }

    /// Neither ejected nor failing active checks.
    pub fn healthy(&self, now: u64) -> bool {
        self.active_healthy() && !self.ejected(now)
    }

    /// The raw peak-EWMA latency, nanoseconds (0: not measured yet).
    pub fn ewma_ns(&self) -> f64 {
        f64::from_bits(self.ewma.load(Ordering::Relaxed))
    }

    /// The EWMA decayed to `now`, so an endpoint that stopped getting
    /// traffic because it was slow is eventually probed again.
    pub fn ewma_at(&self, now: u64) -> f64 {
        let last = self.ewma_stamp.load(Ordering::Relaxed);
        let age = now.saturating_sub(last) as f64;
        self.ewma_ns() * (-age / EWMA_DECAY_NS).exp()
    }

    /// Fold one latency sample in: a higher sample replaces the average at
    /// once (peak), a lower one is averaged in by elapsed time.
    pub fn observe(&self, rtt: Duration) {
        let now = now_ns();
        let rtt = rtt.as_nanos() as f64;
        let last = self.ewma_stamp.swap(now, Ordering::Relaxed);
        let prev = self.ewma_ns();
        let next = if prev == 0.0 || rtt > prev {
            rtt
        } else {
            let w = (-(now.saturating_sub(last) as f64) / EWMA_DECAY_NS).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Counters for the admin API: (requests, failures, ejections).
    pub fn counters(&self) -> (u64, u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.ejections.load(Ordering::Relaxed),
        )
    }

    /// Record one active check result; returns the new verdict if it changed.
    pub fn check_result(&self, ok: bool, healthy_after: u32, unhealthy_after: u32) -> Option<bool> {
        let streak = self.check_streak.load(Ordering::Relaxed);
        let streak = match (ok, streak > 0) {
            (true, true) => streak.saturating_add(1),
            (true, false) => 1,
            (false, false) => streak.saturating_sub(1),
            (false, true) => -1,
        };
        self.check_streak.store(streak, Ordering::Relaxed);
        let healthy = self.active_healthy();
        if !healthy && streak >= healthy_after as i32 {
            self.active_healthy.store(true, Ordering::Relaxed);
            return Some(true);
        }
        if healthy && -streak >= unhealthy_after as i32 {
            self.active_healthy.store(false, Ordering::Relaxed);
            return Some(false);
        }
        None
    }
}

/// Counts a request against its endpoint's in-flight number until dropped
/// (the proxy keeps it with the response body).
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One server of an upstream.
#[derive(Debug)]
pub struct Endpoint {
    /// `host:port` as configured, or the address a name resolved to.
    pub addr: Arc<str>,
    /// The configured `host:port` name this address came from (DNS), if any.
    pub name: Option<Arc<str>>,
    /// The same, parsed for building upstream URIs.
    pub authority: Authority,
    /// Relative share of traffic (≥ 1).
    pub weight: u32,
    /// Live state, shared by every worker.
    pub state: Arc<EndpointState>,
    /// `sluicegate_upstream_requests_total` by status class 1xx..5xx, then `error`.
    by_status: [metrics::Counter; 6],
}

impl Endpoint {
    /// An endpoint of upstream `upstream` at `addr`, keeping the state
    /// the same address had in `previous`.
    fn new(
        upstream: &str,
        addr: &str,
        name: Option<Arc<str>>,
        weight: u32,
        previous: Option<&Upstream>,
    ) -> anyhow::Result<Endpoint> {
        let authority = addr
            .parse::<Authority>()
            .map_err(|e| anyhow::anyhow!("upstream {upstream}: endpoint {addr:?}: {e}"))?;
        let state = previous
            .and_then(|p| p.endpoints.as_slice().iter().find(|e| &*e.addr == addr))
            .map(|e| e.state.clone())
            .unwrap_or_default();
        let c = |status: &'static str| {
            metrics::counter!("sluicegate_upstream_requests_total",
                "upstream" => upstream.to_string(), "endpoint" => addr.to_string(), "status" => status)
        };
        Ok(Endpoint {
            addr: Arc::from(addr),
            name,
            authority,
            weight: weight.max(1),
            state,
            by_status: [c("1xx"), c("2xx"), c("3xx"), c("4xx"), c("5xx"), c("error")],
        })
    }
}

/// The endpoints of an upstream, as an algorithm sees them.
#[derive(Debug)]
pub struct EndpointSet {
    endpoints: Vec<Endpoint>,
}

impl EndpointSet {
    /// The endpoints, in config order.
    pub fn as_slice(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Never true for a validated upstream.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// May endpoint `i` take this request?
    pub fn usable(&self, i: usize, ctx: &PickContext) -> bool {
        !ctx.excluded.contains(&i)
            && self
                .endpoints
                .get(i)
                .is_some_and(|e| ctx.panic || e.state.healthy(ctx.now))
    }

    /// The weight of endpoint `i` (0 if out of range).
    pub fn weight(&self, i: usize) -> u32 {
        self.endpoints.get(i).map_or(0, |e| e.weight)
    }
}

/// What an algorithm knows about the request it places.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// The consistent-hash key, when the upstream has one and the request
    /// carries it.
    pub key: Option<u64>,
    /// Endpoints already tried by this request.
    pub excluded: &'a [usize],
    /// Every remaining endpoint is unhealthy: use them anyway.
    pub panic: bool,
    /// [`now_ns`] at the pick.
    pub now: u64,
}

/// A selection algorithm: which usable endpoint takes the request.
pub trait Selector: Send + Sync + std::fmt::Debug {
    /// The index of an endpoint for which `set.usable(i, ctx)` holds, or
    /// `None` if there is none.
    fn pick(&self, set: &EndpointSet, ctx: &PickContext) -> Option<usize>;
}

/// A named pool of endpoints with its selection algorithm and policies.
#[derive(Debug)]
pub struct Upstream {
    /// The name routes and filters use.
    pub name: Arc<str>,
    /// The servers, never empty.
    pub endpoints: EndpointSet,
    /// The algorithm's name.
    pub balance: Balance,
    /// Where `consistent_hash` takes its key.
    pub hash_key: Option<HashKey>,
    /// Extra attempts allowed per request.
    pub retries: usize,
    /// Ejection and active check settings.
    pub health: HealthConfig,
    /// `[upstream.limits]`: slots and a bounded queue (`None`: unlimited).
    pub admission: Option<Arc<Admission>>,
    /// `[upstream.retry_budget]`.
    pub retry_budget: Arc<RetryBudget>,
    /// `[upstream.tls]`: endpoints speak TLS.
    pub tls: Option<Arc<crate::tls::UpstreamTls>>,
    /// `protocol`: HTTP/1.1, or HTTP/2 (`h2` over TLS, `h2c`).
    pub protocol: crate::config::Protocol,
    /// `[upstream.http2]`.
    pub http2: crate::config::Http2Config,
    /// Time to the upstream's response head, every attempt.
    pub latency: std::sync::Arc<crate::hist::Histogram>,
    selector: Box<dyn Selector>,
}

impl Upstream {
    /// Build from a validated `[[upstream]]` table, keeping the live state
    /// of endpoints `previous` (the same upstream before a reload) had.
    /// An endpoint given by name becomes one endpoint per address `dns`
    /// holds for it (or stays the name, resolved at connect time).
    pub fn new(
        config: &UpstreamConfig,
        previous: Option<&Upstream>,
        dns: &DnsTable,
    ) -> anyhow::Result<Upstream> {
        let name = config.name.get_ref();
        let mut endpoints = Vec::new();
        for ep in config.endpoints.get_ref() {
            let ep = ep.get_ref();
            let configured = ep.addr();
            match dns.get(configured).filter(|a| !a.is_empty()) {
                Some(addrs) => {
                    let origin: Arc<str> = Arc::from(configured);
                    for a in addrs {
                        let addr = a.to_string();
                        endpoints.push(Endpoint::new(
                            name,
                            &addr,
                            Some(origin.clone()),
                            ep.weight(),
                            previous,
                        )?);
                    }
                }
                None => endpoints.push(Endpoint::new(
                    name,
                    configured,
                    None,
                    ep.weight(),
                    previous,
                )?),
            }
        }
        anyhow::ensure!(!endpoints.is_empty(), "upstream {name} has no endpoints");
        let endpoints = EndpointSet { endpoints };
        let hash_key = match &config.hash_key {
            Some(k) => Some(HashKey::parse(k.get_ref()).map_err(anyhow::Error::msg)?),
            None => None,
        };
        // Circuit breakers survive a reload that leaves their settings alone.
        let admission = match previous.and_then(|p| p.admission.as_ref()) {
            Some(a) if a.config == config.limits => Some(a.clone()),
            _ => Admission::new(&config.limits).map(Arc::new),
        };
        let retry_budget = match previous.map(|p| &p.retry_budget) {
            Some(b) if b.config == config.retry_budget => b.clone(),
            _ => Arc::new(RetryBudget::new(&config.retry_budget)),
        };
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(
                crate::tls::UpstreamTls::new(t)
                    .map_err(|e| anyhow::anyhow!("upstream {name}: tls: {e}"))?,
            )),
            None => None,
        };
        Ok(Upstream {
            tls,
            protocol: config.protocol,
            http2: config.http2.clone(),
            latency: crate::hist::histogram(
                "sluicegate_upstream_response_seconds",
                "upstream",
                name,
            ),
            name: Arc::from(name.as_str()),
            selector: algorithms::selector(config.balance, &endpoints),
            endpoints,
            balance: config.balance,
            hash_key,
            retries: *config.retries.get_ref(),
            health: config.health.clone(),
            admission,
            retry_budget,
        })
    }

    /// Requests in flight on every endpoint (what the retry budget is a share of).
    pub fn in_flight(&self) -> u64 {
        self.endpoints
            .as_slice()
            .iter()
            .map(|e| e.state.in_flight())
            .sum()
    }

    /// The endpoint at `i`.
    pub fn endpoint(&self, i: usize) -> Option<&Endpoint> {
        self.endpoints.endpoints.get(i)
    }

    /// Choose an endpoint, never one in `excluded`. Unhealthy endpoints are
    /// skipped unless all remaining ones are (panic mode: spread anyway).
    pub fn pick(&self, key: Option<u64>, excluded: &[usize]) -> Option<usize> {
        let now = now_ns();
        let set = &self.endpoints;
        let mut ctx = PickContext {
            key,
            excluded,
            panic: false,
            now,
        };
        if !(0..set.len()).any(|i| set.usable(i, &ctx)) {
            ctx.panic = true;
        }
        self.selector.pick(set, &ctx)
    }

    /// Count a request as in flight on endpoint `i` until the guard drops.
    pub fn begin(&self, i: usize) -> Option<InFlight> {
        let ep = self.endpoint(i)?;
        ep.state.in_flight.fetch_add(1, Ordering::Relaxed);
        ep.state.requests.fetch_add(1, Ordering::Relaxed);
        Some(InFlight(ep.state.clone()))
    }

    /// Record the outcome of an attempt on endpoint `i`: a response status
    /// (`None`: no response — connect failure, broken, timed out) and the
    /// time to the response head.
    pub fn record(&self, i: usize, status: Option<StatusCode>, rtt: Duration) {
        let Some(ep) = self.endpoint(i) else { return };
        let class = status.map_or(5, |s| (s.as_u16() / 100).clamp(1, 5) as usize - 1);
        ep.by_status[class].increment(1);
        match status {
            Some(s) => {
                ep.state.observe(rtt);
                if s.is_server_error() {
                    self.failed(ep);
                } else {
                    self.succeeded(ep);
                }
            }
            None => self.failed(ep),
        }
    }

    fn succeeded(&self, ep: &Endpoint) {
        let st = &ep.state;
        if st.consecutive_failures.load(Ordering::Relaxed) != 0 {
            st.consecutive_failures.store(0, Ordering::Relaxed);
        }
        // A whole base ejection period healthy since the last ejection
        // forgives the backoff.
        if st.backoff.load(Ordering::Relaxed) != 0 {
            let until = st.ejected_until.load(Ordering::Relaxed);
            let base = self.health.ejection_ms.saturating_mul(1_000_000);
            if now_ns() > until.saturating_add(base) {
                st.backoff.store(0, Ordering::Relaxed);
            }
        }
    }

    fn failed(&self, ep: &Endpoint) {
        let st = &ep.state;
        st.failures.fetch_add(1, Ordering::Relaxed);
        let n = st.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let max = self.health.max_failures;
        if max == 0 || n < max {
            return;
        }
        let now = now_ns();
        let old = st.ejected_until.load(Ordering::Relaxed);
        if old > now {
            return;
        }
        let set = self.endpoints.as_slice();
        let ejected = set.iter().filter(|e| e.state.ejected(now)).count();
        if (ejected + 1) * 100 > self.health.max_ejected_percent as usize * set.len() {
            return;
        }
        let level = st.backoff.load(Ordering::Relaxed).min(16);
        let ms = self
            .health
            .ejection_ms
            .saturating_mul(1 << level)
            .min(MAX_EJECTION.as_millis() as u64);
        let until = now.saturating_add(ms.saturating_mul(1_000_000));
        if st
            .ejected_until
            .compare_exchange(old, until, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            st.backoff.store(level + 1, Ordering::Relaxed);
            st.consecutive_failures.store(0, Ordering::Relaxed);
            st.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(upstream = %self.name, endpoint = %ep.addr, failures = n, ejection_ms = ms, "endpoint ejected");
        }
    }
}

/// A stable 64-bit hash (FNV-1a, then a murmur3 finalizer to spread the bits).
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The consistent-hash key of a request, if it carries one.
pub fn request_key(key: &HashKey, headers: &HeaderMap, path: &str, client: IpAddr) -> Option<u64> {
    match key {
        HashKey::Header(name) => headers.get(name).map(|v| hash64(v.as_bytes())),
        HashKey::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash64(v.as_bytes())),
        HashKey::Path => Some(hash64(path.as_bytes())),
        HashKey::Client => Some(match client {
            IpAddr::V4(a) => hash64(&a.octets()),
            IpAddr::V6(a) => hash64(&a.octets()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(extra: &str) -> Upstream {
        let text = format!(
            "[proxy]\nlisten = [\"127.0.0.1:1\"]\n[[upstream]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\", \"127.0.0.1:4\"]\n{extra}"
        );
        let c = crate::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        Upstream::new(&c.upstreams[0], None, &DnsTable::new()).unwrap()
    }

    #[test]
    fn failures_eject_with_doubling_backoff_and_a_cap_on_the_share() {
        let u = upstream("[upstream.health]\nmax_failures = 2\nejection_ms = 1000\n");
        for i in 0..4 {
            u.record(i, None, Duration::ZERO);
            u.record(i, Some(StatusCode::BAD_GATEWAY), Duration::ZERO);
        }
        let now = now_ns();
        let ejected: Vec<bool> = (0..4)
            .map(|i| u.endpoints.as_slice()[i].state.ejected(now))
            .collect();
        assert_eq!(ejected, vec![true, true, false, false], "at most 50%");
        let st = &u.endpoints.as_slice()[0].state;
        let first = st.ejected_until.load(Ordering::Relaxed) - now;
        assert!(first <= 1_000_000_000);
        st.ejected_until.store(1, Ordering::Relaxed);
        u.record(0, None, Duration::ZERO);
        u.record(0, None, Duration::ZERO);
        let second = st.ejected_until.load(Ordering::Relaxed) - now_ns();
        assert!(
            second > 1_500_000_000 && second <= 2_000_000_000,
            "{second}"
        );
        for _ in 0..100 {
            assert!(matches!(u.pick(None, &[]), Some(2 | 3)));
        }
    }

    #[test]
    fn all_unhealthy_is_panic_mode_and_exclusions_hold() {
        let u = upstream("");
        for e in u.endpoints.as_slice() {
            e.state.active_healthy.store(false, Ordering::Relaxed);
        }
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[u.pick(None, &[0]).unwrap()] += 1;
        }
        assert_eq!(seen[0], 0);
        assert!(seen[1..].iter().all(|&n| n > 50), "{seen:?}");
        assert_eq!(u.pick(None, &[0, 1, 2, 3]), None);
    }

    #[test]
    fn cookie_and_header_keys() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; session=abc; b=2".parse().unwrap());
        h.insert("x-user", "abc".parse().unwrap());
        let ip = IpAddr::from([127, 0, 0, 1]);
        let cookie = request_key(&HashKey::Cookie("session".into()), &h, "/", ip);
        let header = request_key(&HashKey::parse("header:x-user").unwrap(), &h, "/", ip);
        assert_eq!(cookie, Some(hash64(b"abc")));
        assert_eq!(cookie, header);
        assert_eq!(
            request_key(&HashKey::Cookie("nope".into()), &h, "/", ip),
            None
        );
    }
}
