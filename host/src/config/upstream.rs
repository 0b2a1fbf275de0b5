//! `[[upstream]]`: endpoints, weights, the balancing algorithm, retries
//! and `[upstream.health]`.

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};

/// `[[upstream]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The name routes and filters refer to.
    pub name: Spanned<String>,
    /// Each server: `"host:port"` or `{ addr = "host:port", weight = N }`.
    pub endpoints: Spanned<Vec<Spanned<EndpointConfig>>>,
    /// The balancing algorithm (default `round_robin`).
    #[serde(default)]
    pub balance: Balance,
    /// `consistent_hash` only: `header:NAME`, `cookie:NAME`, `path` or `client`.
    pub hash_key: Option<Spanned<String>>,
    /// Extra attempts on other endpoints (connect failures; 502/503/504 for
    /// idempotent requests without a body). Default 2.
    #[serde(default = "default_retries")]
    pub retries: Spanned<usize>,
    /// `[upstream.health]`: passive ejection and active checks.
    #[serde(default)]
    pub health: HealthConfig,
    /// `[upstream.tls]`: connect to the endpoints over TLS.
    pub tls: Option<super::UpstreamTlsConfig>,
    /// `[upstream.limits]`: concurrency limits, answered with 503 past them.
    #[serde(default)]
    pub limits: UpstreamLimits,
    /// `[upstream.retry_budget]`: the share of active requests that may be retries.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
    /// `http1` (default), `h2` (HTTP/2 over TLS, ALPN `h2`) or `h2c`
    /// (HTTP/2 over plain TCP, prior knowledge). gRPC needs `h2` or `h2c`.
    #[serde(default)]
    pub protocol: Protocol,
    /// `[upstream.http2]`: connections and streams per endpoint (`h2`/`h2c`).
    #[serde(default)]
    pub http2: Http2Config,
}

/// The protocol spoken to an upstream's endpoints.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (over TLS when `[upstream.tls]` is set).
    #[default]
    #[serde(rename = "http1")]
    Http1,
    /// HTTP/2 over TLS, negotiated by ALPN (`[upstream.tls]` required).
    #[serde(rename = "h2")]
    H2,
    /// HTTP/2 over plain TCP with prior knowledge (no `[upstream.tls]`).
    #[serde(rename = "h2c")]
    H2c,
}

impl Protocol {
    /// HTTP/2 (`h2` or `h2c`)?
    pub fn is_http2(self) -> bool {
        !matches!(self, Protocol::Http1)
    }

    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
            Protocol::H2c => "h2c",
        }
    }
}

/// `[upstream.http2]`: how an HTTP/2 upstream's connections are shared.
/// Streams are multiplexed on a connection until it carries
/// `max_concurrent_streams` (or the lower limit the endpoint announced in
/// its SETTINGS); then another is opened, up to
/// `max_connections_per_endpoint` per endpoint, process-wide.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Config {
    /// Connections to one endpoint at most (1..=64).
    pub max_connections_per_endpoint: usize,
    /// Streams on one connection before another one is opened (1..).
    pub max_concurrent_streams: u32,
    /// Send a PING on a connection idle this long, close it if no answer
    /// within as long again (0: off).
    pub keepalive_ms: u64,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            max_connections_per_endpoint: 4,
            max_concurrent_streams: 100,
            keepalive_ms: 0,
        }
    }
}

/// `[upstream.health] check`: what an active health check sends.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// `GET path` over HTTP/1.1; a `2xx` passes.
    #[default]
    Http,
    /// `grpc.health.v1.Health/Check` for `grpc_service` over HTTP/2; `SERVING` passes.
    Grpc,
}

/// `[upstream.limits]`: a circuit breaker per upstream (as Envoy's
/// `max_connections` / `max_pending_requests`). Absent: no limit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamLimits {
    /// Requests in flight to the upstream at once, over all its endpoints
    /// and workers. Under HTTP/1.1 each holds one upstream connection, so
    /// this bounds the connections in use. `None`: unlimited.
    pub max_connections: Option<usize>,
    /// Requests allowed to wait for a free slot once `max_connections` are
    /// busy; one more is answered `503` at once.
    pub max_pending: usize,
    /// How long a pending request waits for a slot before `503`.
    pub pending_timeout_ms: u64,
}

impl Default for UpstreamLimits {
    fn default() -> Self {
        UpstreamLimits {
            max_connections: None,
            max_pending: 1024,
            pending_timeout_ms: 1_000,
        }
    }
}

/// `[upstream.retry_budget]`: retries may be at most `percent` of the
/// requests active on the upstream, but `min_concurrent` are always allowed
/// (Envoy's retry budget). Bounds retry storms when an upstream is sick.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    /// Share of active requests that may be retries at once, 0..=100.
    pub percent: f64,
    /// Retries allowed at once whatever the share says.
    pub min_concurrent: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: 20.0,
            min_concurrent: 10,
        }
    }
}

/// `[proxy.dns]`: how endpoints given by name (`"app.svc:8080"`) are
/// resolved. Each address a name resolves to becomes an endpoint (a
/// Kubernetes headless Service's pods), re-resolved every `refresh_ms`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Re-resolve names this often, milliseconds (0: only at start and on reload).
    pub refresh_ms: u64,
    /// How long one resolution may take before the last answer is kept.
    pub timeout_ms: u64,
    /// Name servers (`"ip:port"`) to ask instead of the system resolver
    /// (`/etc/resolv.conf`, `/etc/hosts`).
    pub servers: Vec<String>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            refresh_ms: 5_000,
            timeout_ms: 2_000,
            servers: Vec::new(),
        }
    }
}

fn default_retries() -> Spanned<usize> {
    Spanned::new(0..0, 2)
}

/// Most retries an upstream may configure.
pub const MAX_RETRIES: usize = 8;

/// One endpoint of an upstream, plain or weighted.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EndpointConfig {
    /// `"host:port"`, weight 1.
    Addr(String),
    /// `{ addr = "host:port", weight = N }`.
    Weighted(WeightedEndpoint),
}

/// `{ addr = "host:port", weight = N }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedEndpoint {
    /// `host:port`.
    pub addr: String,
    /// Relative share of traffic, 1..=1000 (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl EndpointConfig {
    /// `host:port`.
    pub fn addr(&self) -> &str {
        match self {
            EndpointConfig::Addr(a) => a,
            EndpointConfig::Weighted(w) => &w.addr,
        }
    }

    /// The weight (1 when not given).
    pub fn weight(&self) -> u32 {
        match self {
            EndpointConfig::Addr(_) => 1,
            EndpointConfig::Weighted(w) => w.weight,
        }
    }
}

/// The balancing algorithms.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin (nginx).
    #[default]
    RoundRobin,
    /// Weighted random.
    Random,
    /// Power of two choices on in-flight requests.
    LeastRequest,
    /// Peak-EWMA latency times (in-flight + 1).
    Ewma,
    /// A hash ring keyed by `hash_key`.
    ConsistentHash,
}

/// `[upstream.health]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Consecutive failures (connect errors, broken connections, 5xx)
    /// that eject an endpoint; 0 disables passive ejection.
    pub max_failures: u32,
    /// First ejection, milliseconds; doubles on each re-ejection (cap 5 min).
    pub ejection_ms: u64,
    /// At most this share of an upstream's endpoints is ejected at once.
    pub max_ejected_percent: u32,
    /// Active check: `GET path` on each endpoint (absent = no active checks).
    pub path: Option<String>,
    /// Active check period, milliseconds.
    pub interval_ms: u64,
    /// Active check timeout (connect + status line), milliseconds.
    pub timeout_ms: u64,
    /// Consecutive passing checks that mark an endpoint healthy again.
    pub healthy_threshold: u32,
    /// Consecutive failing checks that mark an endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// `http` (default: `GET path`) or `grpc` (the gRPC health protocol;
    /// active checks run without a `path`). `grpc` needs `protocol = "h2"` or `"h2c"`.
    pub check: HealthCheckKind,
    /// `check = "grpc"`: the service name asked about (`""`: the whole server).
    pub grpc_service: String,
}

impl HealthConfig {
    /// Are active checks configured (an HTTP `path`, or `check = "grpc"`)?
    pub fn active(&self) -> bool {
        self.path.is_some() || self.check == HealthCheckKind::Grpc
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            max_failures: 5,
            ejection_ms: 10_000,
            max_ejected_percent: 50,
            path: None,
            interval_ms: 5_000,
            timeout_ms: 1_000,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            check: HealthCheckKind::Http,
            grpc_service: String::new(),
        }
    }
}

/// Where a `consistent_hash` upstream takes its key from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header (name lower-cased).
    Header(http::HeaderName),
    /// A cookie by name.
    Cookie(String),
    /// The request path.
    Path,
    /// The client IP address.
    Client,
}

impl HashKey {
    /// Parse `header:NAME`, `cookie:NAME`, `path` or `client`.
    pub fn parse(s: &str) -> Result<HashKey, String> {
        match s.split_once(':') {
            Some(("header", name)) => http::HeaderName::from_bytes(name.trim().as_bytes())
                .map(HashKey::Header)
                .map_err(|_| format!("{name:?} is not a header name")),
            Some(("cookie", name)) if !name.trim().is_empty() => {
                Ok(HashKey::Cookie(name.trim().to_string()))
            }
            None if s == "path" => Ok(HashKey::Path),
            None if s == "client" => Ok(HashKey::Client),
            _ => Err(format!(
                "{s:?} is not header:NAME, cookie:NAME, path or client"
            )),
        }
    }
}

impl DnsConfig {
    /// The configured name servers, parsed.
    pub fn server_addrs(&self) -> Result<Vec<std::net::SocketAddr>, String> {
        self.servers
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|_| format!("{s:?} is not an ip:port address"))
            })
            .collect()
    }
}

impl Validator<'_> {
    /// `[proxy.dns]`.
    pub(super) fn validate_dns(&self, dns: &DnsConfig) -> Result<(), ConfigError> {
        if let Err(reason) = dns.server_addrs() {
            return self.error(0..0, "proxy.dns.servers".into(), reason);
        }
        if dns.refresh_ms != 0 && dns.refresh_ms < 100 {
            let reason = "at least 100 (or 0 to resolve only at start and reload)".to_string();
            return self.error(0..0, "proxy.dns.refresh_ms".into(), reason);
        }
        if dns.timeout_ms == 0 {
            return self.error(0..0, "proxy.dns.timeout_ms".into(), "must be > 0".into());
        }
        Ok(())
    }

    pub(super) fn validate_balance(
        &self,
        i: usize,
        up: &UpstreamConfig,
    ) -> Result<(), ConfigError> {
        let name = up.name.get_ref();
        match (&up.hash_key, up.balance) {
            (Some(k), Balance::ConsistentHash) => {
                if let Err(reason) = HashKey::parse(k.get_ref()) {
                    return self.error(k.span(), format!("upstream[{i}].hash_key"), reason);
                }
            }
            (None, Balance::ConsistentHash) => {
                let reason = format!("upstream {name:?} uses consistent_hash but has no hash_key");
                return self.error(up.name.span(), format!("upstream[{i}].hash_key"), reason);
            }
            (Some(k), _) => {
                let reason = "hash_key needs balance = \"consistent_hash\"".to_string();
                return self.error(k.span(), format!("upstream[{i}].hash_key"), reason);
            }
            (None, _) => {}
        }
        if *up.retries.get_ref() > MAX_RETRIES {
            let reason = format!("at most {MAX_RETRIES}");
            return self.error(up.retries.span(), format!("upstream[{i}].retries"), reason);
        }
        let h = &up.health;
        let key = |k: &str| format!("upstream[{i}].health.{k}");
        let span = up.name.span();
        if h.max_ejected_percent > 100 {
            return self.error(span, key("max_ejected_percent"), "at most 100".into());
        }
        if h.ejection_ms == 0 {
            return self.error(span, key("ejection_ms"), "must be > 0".into());
        }
        if let Some(path) = &h.path {
            if !path.starts_with('/') {
                let reason = format!("{path:?} must start with '/'");
                return self.error(span, key("path"), reason);
            }
        }
        if h.active() {
            if h.interval_ms == 0 || h.timeout_ms == 0 {
                let reason = "interval_ms and timeout_ms must be > 0".to_string();
                return self.error(span, key("interval_ms"), reason);
            }
            if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
                let reason = "thresholds must be >= 1".to_string();
                return self.error(span, key("healthy_threshold"), reason);
            }
        }
        let l = &up.limits;
        if l.max_connections == Some(0) {
            let reason = "must be >= 1 (leave it out for no limit)".to_string();
            return self.error(
                span,
                format!("upstream[{i}].limits.max_connections"),
                reason,
            );
        }
        if l.max_connections.is_some() && l.pending_timeout_ms == 0 {
            let reason = "must be > 0".to_string();
            return self.error(
                span,
                format!("upstream[{i}].limits.pending_timeout_ms"),
                reason,
            );
        }
        let b = &up.retry_budget;
        if !(0.0..=100.0).contains(&b.percent) {
            let reason = format!("{} is not a share between 0 and 100", b.percent);
            return self.error(span, format!("upstream[{i}].retry_budget.percent"), reason);
        }
        self.validate_protocol(i, up)
    }

    /// `protocol`, `[upstream.http2]` and `health.check = "grpc"`.
    fn validate_protocol(&self, i: usize, up: &UpstreamConfig) -> Result<(), ConfigError> {
        let span = up.name.span();
        let name = up.name.get_ref();
        let key = |k: &str| format!("upstream[{i}].{k}");
        match (up.protocol, up.tls.is_some()) {
            (Protocol::H2, false) => {
                let reason = format!(
                    "upstream {name:?}: protocol \"h2\" is HTTP/2 over TLS and needs [upstream.tls] (use \"h2c\" for plain TCP)"
                );
                return self.error(span, key("protocol"), reason);
            }
            (Protocol::H2c, true) => {
                let reason = format!(
                    "upstream {name:?}: protocol \"h2c\" is HTTP/2 over plain TCP; with [upstream.tls] use \"h2\""
                );
                return self.error(span, key("protocol"), reason);
            }
            _ => {}
        }
        let h2 = &up.http2;
        if !(1..=64).contains(&h2.max_connections_per_endpoint) {
            let reason = "between 1 and 64".to_string();
            return self.error(span, key("http2.max_connections_per_endpoint"), reason);
        }
        if h2.max_concurrent_streams == 0 {
            let reason = "must be >= 1".to_string();
            return self.error(span, key("http2.max_concurrent_streams"), reason);
        }
        if up.health.check == HealthCheckKind::Grpc && !up.protocol.is_http2() {
            let reason =
                format!("upstream {name:?}: check = \"grpc\" needs protocol = \"h2\" or \"h2c\"");
            return self.error(span, key("health.check"), reason);
        }
        Ok(())
    }
}
