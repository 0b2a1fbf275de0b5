//! The operator's TOML configuration: parsing, defaults and validation.
//!
//! Every error names the file, the line and the key, so `sluicegate check`
//! can point at the mistake. The keys below are a public contract; see the
//! README's configuration reference.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

mod cache;
mod filters;
mod limits;
mod ops;
mod redis;
mod telemetry;
mod upstream;
pub use cache::*;
pub use filters::*;
pub use limits::*;
pub use ops::*;
pub use redis::*;
pub use telemetry::*;
pub use upstream::*;

/// A configuration error: which file, which line, which key, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The config file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax or type errors, unknown keys.
    #[error("{file}: {message}")]
    Parse {
        /// The config file.
        file: PathBuf,
        /// toml's message (it names the line, column and key).
        message: String,
    },
    /// A semantic error found by validation.
    #[error("{file}: line {line}: {key}: {reason}")]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the offending value (0 when unknown).
        line: usize,
        /// The dotted key, e.g. `route[2].upstream`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[proxy]`: listeners and process-wide settings.
    pub proxy: ProxyConfig,
    /// `[[upstream]]`: named pools of endpoints.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    /// `[[route]]`: host + path prefix to upstream (and filters).
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// `[filters]`: the WebAssembly filter runtime.
    #[serde(default)]
    pub filters: FiltersConfig,
    /// `[cache]`: the shared HTTP cache's bounds (used by routes with `cache`).
    #[serde(default)]
    pub cache: CacheConfig,
    /// `[redis]`: state shared by a fleet of replicas (see `config/redis.rs`).
    pub redis: Option<RedisConfig>,
    /// `[tracing]`: OpenTelemetry traces over OTLP (absent: off).
    pub tracing: Option<TracingConfig>,
    /// Where this config was read from (not a TOML key).
    #[serde(skip)]
    pub source: PathBuf,
    /// The text it was parsed from (for the admin API's `/config`).
    #[serde(skip)]
    pub text: String,
    /// Keys whose new values a reload could not apply (they need a
    /// restart): `(key, running value)`, for `/config`.
    #[serde(skip)]
    pub pending_restart: Vec<(String, String)>,
}

impl Config {
    /// After a reload: keep the running values of the keys that only a
    /// restart can change (listeners, workers, the admin address, the
    /// artifact cache and compute pool), and note each one that differs.
    pub fn pin_restart_only(&mut self, running: &Config) {
        let mut pending = Vec::new();
        macro_rules! pin {
            ($key:literal, $($field:tt)+) => {
                if format!("{:?}", self.$($field)+) != format!("{:?}", running.$($field)+) {
                    self.$($field)+ = running.$($field)+.clone();
                    pending.push(($key.to_string(), format!("{:?}", running.$($field)+)));
                }
            };
        }
        pin!("proxy.listen", proxy.listen);
        pin!("proxy.tls", proxy.tls);
        pin!("proxy.workers", proxy.workers);
        pin!("proxy.admin", proxy.admin);
        pin!("filters.cache_dir", filters.cache_dir);
        pin!("filters.compute_threads", filters.compute_threads);
        pin!("tracing", tracing);
        // `running` holds the running values (pinned by earlier reloads),
        // so this is the full list, not only what this reload changed.
        self.pending_restart = pending;
    }
}

/// `[proxy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Addresses to serve HTTP/1.1 and h2c (prior knowledge) on.
    #[serde(default)]
    pub listen: Vec<Spanned<String>>,
    /// Optional admin listener: `/healthz`, `/readyz`, `/metrics`, `/filters`.
    pub admin: Option<Spanned<String>>,
    /// Tokio worker threads (default: the number of cores).
    pub workers: Option<usize>,
    /// The pseudonym added to `Via` (default `sluicegate`).
    #[serde(default = "default_via")]
    pub via: String,
    /// `[proxy.timeouts]`.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// `[proxy.limits]`.
    #[serde(default)]
    pub limits: Limits,
    /// `[proxy.dns]`: resolving endpoints given by name.
    #[serde(default)]
    pub dns: DnsConfig,
    /// `[[proxy.tls]]`: listeners that terminate TLS.
    #[serde(default)]
    pub tls: Vec<TlsListenerConfig>,
    /// `[proxy.access_log]`: one line per request (absent: no access log).
    pub access_log: Option<AccessLogConfig>,
    /// Bearer token the admin API asks for (`/healthz` and `/readyz` stay open).
    pub admin_token: Option<String>,
    /// A file holding the admin token (e.g. a mounted Kubernetes Secret).
    pub admin_token_file: Option<PathBuf>,
    /// Origin response headers removed before the client sees them (e.g.
    /// `server`, `x-powered-by`); see docs/security.md.
    #[serde(default)]
    pub hide_response_headers: Vec<Spanned<String>>,
}

fn default_via() -> String {
    "sluicegate".to_string()
}

/// `[proxy.timeouts]`, all in milliseconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect to an upstream endpoint.
    pub connect_ms: u64,
    /// The whole request head must arrive within this (slowloris guard).
    pub header_read_ms: u64,
    /// The upstream's response head must arrive within this, else 504.
    pub upstream_response_ms: u64,
    /// Keep-alive connections idle this long (up to a quarter more) are closed.
    pub idle_ms: u64,
    /// Pooled upstream connections idle this long are closed (sooner when
    /// the upstream announces a shorter `Keep-Alive: timeout`).
    pub upstream_idle_ms: u64,
    /// An HTTP/1.1 keep-alive connection idle about this long (up to twice
    /// it) gives back its buffers (parked, like nginx's idle keep-alive
    /// connections); the next request gets new ones. 0 = never.
    pub keepalive_park_ms: u64,
    /// Graceful shutdown: how long in-flight requests may take to finish.
    pub drain_ms: u64,
    /// Graceful shutdown: how long `/readyz` fails before the listeners
    /// close (time for a load balancer to stop sending new connections).
    pub drain_delay_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: 2_000,
            header_read_ms: 10_000,
            upstream_response_ms: 30_000,
            idle_ms: 60_000,
            upstream_idle_ms: 4_000,
            keepalive_park_ms: 20,
            drain_ms: 10_000,
            drain_delay_ms: 0,
        }
    }
}

/// `[proxy.limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head accepted, bytes (HTTP/1.1).
    pub max_header_bytes: usize,
    /// Idle keep-alive connections kept per upstream endpoint.
    pub upstream_idle_per_host: usize,
    /// Most request header fields (431 past it). See `config/limits.rs` for
    /// the keys below.
    pub max_headers: usize,
    /// Largest request body, bytes (413); 0 = unlimited. Routes may override.
    pub max_body_bytes: u64,
    /// Most open connections from one client IP address; 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// Most open client connections in all; past it new clients wait in the
    /// listen backlog. 0 = three quarters of the open-file limit.
    pub max_connections: usize,
    /// Requests on one HTTP/1.1 connection, then `Connection: close`; 0 = unlimited.
    pub max_requests_per_connection: u64,
    /// HTTP/2 streams in flight per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before they are accepted (CVE-2023-44487).
    pub h2_max_pending_reset_streams: usize,
    /// HTTP/2 streams the proxy may reset for client errors before GOAWAY.
    pub h2_max_local_error_reset_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            upstream_idle_per_host: 256,
            max_headers: 100,
            max_body_bytes: 0,
            max_connections_per_ip: 0,
            max_connections: 0,
            max_requests_per_connection: 0,
            h2_max_concurrent_streams: 256,
            h2_max_pending_reset_streams: 20,
            h2_max_local_error_reset_streams: 1024,
        }
    }
}

/// `[[route]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Host to match (without port, case-insensitive); absent = any.
    pub host: Option<String>,
    /// Path prefix to match; the longest wins.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// The upstream requests go to (a filter may pick another).
    pub upstream: Spanned<String>,
    /// Filters run on this route: request phase in order, response reversed.
    #[serde(default)]
    pub filters: Vec<Spanned<String>>,
    /// `cache = true` or `cache = { ... }`: store and serve responses (see docs/cache.md).
    #[serde(default)]
    pub cache: Option<Spanned<RouteCacheConfig>>,
    /// `rate_limit = { rps, burst, key }`: a token bucket (429 past it).
    pub rate_limit: Option<Spanned<RateLimitConfig>>,
    /// Largest request body on this route, bytes (overrides `[proxy.limits]`).
    pub max_body_bytes: Option<Spanned<u64>>,
}

fn default_prefix() -> String {
    "/".to_string()
}

impl ProxyConfig {
    /// Worker threads: `workers`, else one per core.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parse and validate config text that came from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        config.source = path.to_path_buf();
        config.text = text.to_string();
        config.resolve_paths(path);
        config.read_admin_token()?;
        Validator { text, file: path }.validate(&config)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, path: &Path) {
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(dir) = &self.filters.dir {
            if dir.is_relative() {
                self.filters.dir = Some(base.join(dir));
            }
        }
        if let Some(dir) = &self.filters.cache_dir {
            if dir.is_relative() {
                self.filters.cache_dir = Some(base.join(dir));
            }
        }
        self.resolve_ops_paths(base);
        if let Some(ca) = self.tracing.as_mut().and_then(|t| t.ca.as_mut()) {
            if ca.is_relative() {
                *ca = base.join(&*ca);
            }
        }
    }

    /// The listener addresses, already validated.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.proxy
            .listen
            .iter()
            .filter_map(|a| a.get_ref().parse().ok())
            .collect()
    }

    /// The admin address, if any (already validated).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.proxy
            .admin
            .as_ref()
            .and_then(|a| a.get_ref().parse().ok())
    }
}

/// Semantic checks that serde cannot express.
struct Validator<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Validator<'_> {
    fn error<T>(
        &self,
        span: std::ops::Range<usize>,
        key: String,
        reason: String,
    ) -> Result<T, ConfigError> {
        let line = if span.start == 0 && span.end == 0 {
            0
        } else {
            self.text[..span.start.min(self.text.len())]
                .matches('\n')
                .count()
                + 1
        };
        Err(ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line,
            key,
            reason,
        })
    }

    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let proxy = &config.proxy;
        if proxy.listen.is_empty() && proxy.tls.is_empty() {
            return self.error(
                0..0,
                "proxy.listen".into(),
                "at least one address (or a [[proxy.tls]] listener) is required".into(),
            );
        }
        for (i, addr) in proxy.listen.iter().enumerate() {
            if addr.get_ref().parse::<SocketAddr>().is_err() {
                let reason = format!("{:?} is not an ip:port address", addr.get_ref());
                return self.error(addr.span(), format!("proxy.listen[{i}]"), reason);
            }
        }
        if let Some(admin) = &proxy.admin {
            if admin.get_ref().parse::<SocketAddr>().is_err() {
                let reason = format!("{:?} is not an ip:port address", admin.get_ref());
                return self.error(admin.span(), "proxy.admin".into(), reason);
            }
        }
        if proxy.workers == Some(0) {
            return self.error(0..0, "proxy.workers".into(), "must be at least 1".into());
        }
        self.validate_dns(&proxy.dns)?;
        let mut names = HashSet::new();
        for (i, up) in config.upstreams.iter().enumerate() {
            let name = up.name.get_ref();
            if !names.insert(name.as_str()) {
                return self.error(
                    up.name.span(),
                    format!("upstream[{i}].name"),
                    format!("duplicate upstream {name:?}"),
                );
            }
            if up.endpoints.get_ref().is_empty() {
                let reason = format!("upstream {name:?} has no endpoints");
                return self.error(
                    up.endpoints.span(),
                    format!("upstream[{i}].endpoints"),
                    reason,
                );
            }
            for (j, ep) in up.endpoints.get_ref().iter().enumerate() {
                if let Err(reason) = check_endpoint(ep.get_ref().addr()) {
                    return self.error(ep.span(), format!("upstream[{i}].endpoints[{j}]"), reason);
                }
                if !(1..=1000).contains(&ep.get_ref().weight()) {
                    let reason = "weight must be between 1 and 1000".to_string();
                    return self.error(
                        ep.span(),
                        format!("upstream[{i}].endpoints[{j}].weight"),
                        reason,
                    );
                }
            }
            self.validate_balance(i, up)?;
        }
        self.validate_ops(config)?;
        for (i, route) in config.routes.iter().enumerate() {
            if !route.path_prefix.starts_with('/') {
                let reason = format!("{:?} must start with '/'", route.path_prefix);
                return self.error(
                    route.upstream.span(),
                    format!("route[{i}].path_prefix"),
                    reason,
                );
            }
            let up = route.upstream.get_ref();
            if !names.contains(up.as_str()) {
                let reason = format!(
                    "route names upstream {up:?}, which is not defined by any [[upstream]]"
                );
                return self.error(
                    route.upstream.span(),
                    format!("route[{i}].upstream"),
                    reason,
                );
            }
            for (j, f) in route.filters.iter().enumerate() {
                if !valid_filter_name(f.get_ref()) {
                    let reason = format!(
                        "{:?} is not a filter name (letters, digits, '-', '_')",
                        f.get_ref()
                    );
                    return self.error(f.span(), format!("route[{i}].filters[{j}]"), reason);
                }
            }
            if !route.filters.is_empty() && config.filters.dir.is_none() {
                let reason = "route uses filters but [filters] dir is not set".to_string();
                return self.error(route.upstream.span(), format!("route[{i}].filters"), reason);
            }
        }
        self.validate_cache(config)?;
        self.validate_protection(config)?;
        self.validate_redis(config)?;
        self.validate_tracing(config.tracing.as_ref())?;
        self.validate_filters(config, &names)?;
        Ok(())
    }
}

/// A filter name as it appears in a file stem and a route.
pub fn valid_filter_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_endpoint(ep: &str) -> Result<(), String> {
    let (host, port) = ep
        .rsplit_once(':')
        .ok_or_else(|| format!("{ep:?} is not host:port"))?;
    if host.is_empty() {
        return Err(format!("{ep:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{ep:?} has an invalid port")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[proxy]
listen = ["127.0.0.1:8080"]

[[upstream]]
name = "app"
endpoints = ["127.0.0.1:9001"]

[[route]]
path_prefix = "/"
upstream = "app"
"#;

    #[test]
    fn good_config_parses() {
        let c = Config::parse(GOOD, Path::new("x.toml")).unwrap();
        assert_eq!(c.routes[0].upstream.get_ref(), "app");
        assert_eq!(c.proxy.timeouts.connect_ms, 2000);
    }

    #[test]
    fn unknown_upstream_names_line_and_key() {
        let text = GOOD.replace("upstream = \"app\"", "upstream = \"nope\"");
        let e = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml: line 11: route[0].upstream:"), "{e}");
        assert!(e.contains("\"nope\""), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let text = GOOD.replace("[proxy]", "[proxy]\nlisten_typo = 1");
        let e = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen_typo"), "{e}");
    }

    #[test]
    fn balancing_keys_are_validated_with_line_and_key() {
        let text = GOOD.replace(
            "endpoints = [\"127.0.0.1:9001\"]",
            "endpoints = [\"127.0.0.1:9001\", { addr = \"127.0.0.1:9002\", weight = 4 }]\nbalance = \"consistent_hash\"\nhash_key = \"cookie:sid\"",
        );
        let c = Config::parse(&text, Path::new("x.toml")).unwrap();
        assert_eq!(c.upstreams[0].endpoints.get_ref()[1].get_ref().weight(), 4);
        let bad = text.replace("weight = 4", "weight = 0");
        let e = Config::parse(&bad, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.toml: line 7: upstream[0].endpoints[1].weight:"),
            "{e}"
        );
        let bad = text.replace("cookie:sid", "body");
        let e = Config::parse(&bad, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.toml: line 9: upstream[0].hash_key:"),
            "{e}"
        );
        let bad = text.replace("balance = \"consistent_hash\"", "balance = \"fastest\"");
        let e = Config::parse(&bad, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fastest") && e.contains("line 8"), "{e}");
    }

    #[test]
    fn limits_budget_and_dns_are_validated() {
        let err = |extra: &str| {
            let text = GOOD.replace(
                "endpoints = [\"127.0.0.1:9001\"]",
                &format!("endpoints = [\"app.svc:9001\"]\n{extra}"),
            );
            Config::parse(&text, Path::new("x.toml"))
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(err("[upstream.limits]\nmax_connections = 10"), None);
        let e = err("[upstream.limits]\nmax_connections = 0").unwrap();
        assert!(e.contains("upstream[0].limits.max_connections"), "{e}");
        let e = err("[upstream.retry_budget]\npercent = 150.0").unwrap();
        assert!(e.contains("upstream[0].retry_budget.percent"), "{e}");
        let e = err("[upstream.limits]\nmax_conns = 1").unwrap();
        assert!(e.contains("max_conns"), "{e}");
        let text = GOOD.replace(
            "[[upstream]]",
            "[proxy.dns]\nservers = [\"dns.local\"]\n\n[[upstream]]",
        );
        let e = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("proxy.dns.servers") && e.contains("dns.local"),
            "{e}"
        );
    }

    #[test]
    fn policy_overrides_defaults() {
        let text = format!("{GOOD}\n[filters]\ndir = \"f\"\ntimeout_ms = 5\n[filters.policy.a]\ntimeout_ms = 7\non_error = \"fail_open\"\n");
        let c = Config::parse(&text, Path::new("/etc/x.toml")).unwrap();
        assert_eq!(c.filters.policy_for("a").timeout_ms, 7);
        assert_eq!(c.filters.policy_for("a").on_error, OnError::FailOpen);
        assert_eq!(c.filters.policy_for("b").timeout_ms, 5);
        assert_eq!(c.filters.dir.as_deref(), Some(Path::new("/etc/f")));
        assert_eq!(c.filters.policy_for("a").init_timeout_ms, 1_000);
    }

    #[test]
    fn zero_filter_limits_are_refused_with_the_key_named() {
        for (table, key) in [
            ("[filters]\ndir = \"f\"", "timeout_ms"),
            ("[filters]\ndir = \"f\"", "init_timeout_ms"),
            ("[filters]\ndir = \"f\"\n[filters.policy.a]", "memory_mb"),
            (
                "[filters]\ndir = \"f\"\n[filters.policy.a]",
                "init_timeout_ms",
            ),
        ] {
            let text = format!("{GOOD}\n{table}\n{key} = 0\n");
            let e = Config::parse(&text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            let want = if table.contains("policy") {
                format!("filters.policy.a.{key}")
            } else {
                format!("filters.{key}")
            };
            assert!(
                e.contains(&want) && e.contains("must be > 0"),
                "{want}: {e}"
            );
        }
    }
}
