//! `[cache]` (the store's bounds and the shared-cache defaults) and the
//! per-route `cache = true` / `cache = { ... }` switch.

use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::{Config, ConfigError, RouteConfig, Validator};

/// `[cache]`: one store for the whole process, shared by every worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Memory bound of the store: stored bodies plus headers, bytes.
    pub max_bytes: Spanned<u64>,
    /// Largest response stored; bigger ones pass through uncached.
    pub max_object_bytes: Spanned<u64>,
    /// Most `Vary` variants kept per URL (the oldest goes first).
    pub max_variants: usize,
    /// Heuristic freshness for responses with `Last-Modified` and no
    /// explicit lifetime: this percent of the time since the modification.
    pub heuristic_percent: u32,
    /// How long a request waits for a coalesced miss of the same URL before
    /// it asks the origin itself, milliseconds.
    pub lock_timeout_ms: u64,
    /// Targeted cache-control fields this cache obeys (RFC 9213), first
    /// present and valid one wins over `Cache-Control` and `Expires`.
    /// Empty: none (only `Cache-Control`).
    pub targeted_fields: Vec<String>,
    /// Obey only the targeted fields: a response without one is not stored.
    pub targeted_only: bool,
    /// `[cache.disk]`: the disk tier (none without it).
    pub disk: Option<DiskConfig>,
}

/// `[cache.disk]`: a directory every stored response that fits is also
/// written to, bounded in size; memory misses are looked up there, hits
/// stream from it, and it survives restarts (see `cache/disk.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The directory (created if missing; one process per directory).
    pub path: std::path::PathBuf,
    /// Bound of the files' total size, MiB.
    pub max_size_mb: u64,
    /// Largest object written, MiB (default: 64, at most `max_size_mb`).
    /// Objects above `[cache] max_object_bytes` but within this go to disk
    /// only (they are buffered in memory while they arrive).
    #[serde(default = "default_disk_object_mb")]
    pub max_object_mb: u64,
}

fn default_disk_object_mb() -> u64 {
    64
}

impl DiskConfig {
    /// The bound in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_size_mb.saturating_mul(1024 * 1024)
    }

    /// The largest object in bytes.
    pub fn max_object_bytes(&self) -> u64 {
        self.max_object_mb
            .min(self.max_size_mb)
            .saturating_mul(1024 * 1024)
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: Spanned::new(0..0, 64 * 1024 * 1024),
            max_object_bytes: Spanned::new(0..0, 8 * 1024 * 1024),
            max_variants: 8,
            heuristic_percent: 10,
            lock_timeout_ms: 5_000,
            targeted_fields: vec!["CDN-Cache-Control".to_string()],
            targeted_only: false,
            disk: None,
        }
    }
}

impl CacheConfig {
    /// The targeted-field settings (names validated by `validate_cache`).
    pub fn reading(&self) -> crate::cache::rfc::Reading {
        crate::cache::rfc::Reading {
            targeted: self
                .targeted_fields
                .iter()
                .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
                .collect(),
            targeted_only: self.targeted_only,
        }
    }
}

/// What a caching route does with a response that sets a cookie.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetCookiePolicy {
    /// Never store it (the default).
    #[default]
    Never,
    /// Store it without its `Set-Cookie` fields: the client whose request
    /// reached the origin gets them, hits never do.
    Strip,
}

/// A route's `cache` key: `true`/`false`, or a table of settings (which
/// turns caching on).
#[derive(Debug, Clone, PartialEq)]
pub enum RouteCacheConfig {
    /// `cache = true` or `cache = false`.
    Enabled(bool),
    /// `cache = { ... }`.
    Settings(RouteCacheSettings),
}

/// `cache = { ... }` on a route.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheSettings {
    /// Serve a stale response this many seconds past its freshness while a
    /// background refresh runs, when the response has no
    /// `stale-while-revalidate` of its own (default 0).
    pub stale_while_revalidate_s: Option<u64>,
    /// Serve a stale response this many seconds past its freshness when the
    /// origin fails, when the response has no `stale-if-error` of its own
    /// (default 0).
    pub stale_if_error_s: Option<u64>,
    /// Overrides `[cache] max_object_bytes` for this route.
    pub max_object_bytes: Option<u64>,
    /// `never` (default) or `strip`: see [`SetCookiePolicy`].
    pub set_cookie: Option<SetCookiePolicy>,
}

impl<'de> Deserialize<'de> for RouteCacheConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::Boolean(b) => Ok(RouteCacheConfig::Enabled(b)),
            toml::Value::Table(t) => RouteCacheSettings::deserialize(t)
                .map(RouteCacheConfig::Settings)
                .map_err(serde::de::Error::custom),
            other => Err(serde::de::Error::custom(format!(
                "expected true, false or a table of cache settings, found {}",
                other.type_str()
            ))),
        }
    }
}

/// What caching means on one route, resolved against `[cache]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheRule {
    /// Default stale-while-revalidate window.
    pub stale_while_revalidate: Duration,
    /// Default stale-if-error window.
    pub stale_if_error: Duration,
    /// Largest response stored on this route.
    pub max_object_bytes: u64,
    /// Responses with `Set-Cookie`.
    pub set_cookie: SetCookiePolicy,
}

impl RouteConfig {
    /// The cache rule of this route, or `None` when it does not cache.
    pub fn cache_rule(&self, global: &CacheConfig) -> Option<CacheRule> {
        let settings = match self.cache.as_ref().map(Spanned::get_ref) {
            None | Some(RouteCacheConfig::Enabled(false)) => return None,
            Some(RouteCacheConfig::Enabled(true)) => RouteCacheSettings::default(),
            Some(RouteCacheConfig::Settings(s)) => s.clone(),
        };
        Some(CacheRule {
            stale_while_revalidate: Duration::from_secs(
                settings.stale_while_revalidate_s.unwrap_or(0),
            ),
            stale_if_error: Duration::from_secs(settings.stale_if_error_s.unwrap_or(0)),
            max_object_bytes: settings
                .max_object_bytes
                .unwrap_or(*global.max_object_bytes.get_ref()),
            set_cookie: settings.set_cookie.unwrap_or_default(),
        })
    }
}

/// Smallest store accepted: below this nothing useful fits.
const MIN_CACHE_BYTES: u64 = 4096;

impl Validator<'_> {
    /// `[cache]` and every route's `cache`.
    pub(super) fn validate_cache(&self, config: &Config) -> Result<(), ConfigError> {
        let c = &config.cache;
        let max = *c.max_bytes.get_ref();
        if max < MIN_CACHE_BYTES {
            let reason = format!("must be at least {MIN_CACHE_BYTES} bytes");
            return self.error(c.max_bytes.span(), "cache.max_bytes".into(), reason);
        }
        let obj = *c.max_object_bytes.get_ref();
        if obj == 0 || obj > max {
            let reason = format!("must be between 1 and cache.max_bytes ({max})");
            return self.error(
                c.max_object_bytes.span(),
                "cache.max_object_bytes".into(),
                reason,
            );
        }
        if !(1..=64).contains(&c.max_variants) {
            let reason = "must be between 1 and 64".to_string();
            return self.error(0..0, "cache.max_variants".into(), reason);
        }
        if c.heuristic_percent > 100 {
            let reason = "must be between 0 and 100".to_string();
            return self.error(0..0, "cache.heuristic_percent".into(), reason);
        }
        if c.lock_timeout_ms == 0 {
            let reason = "must be at least 1".to_string();
            return self.error(0..0, "cache.lock_timeout_ms".into(), reason);
        }
        for name in &c.targeted_fields {
            if http::HeaderName::from_bytes(name.trim().as_bytes()).is_err() {
                let reason = format!("{name:?} is not a header field name");
                return self.error(0..0, "cache.targeted_fields".into(), reason);
            }
        }
        if c.targeted_only && c.targeted_fields.is_empty() {
            let reason = "needs at least one of cache.targeted_fields".to_string();
            return self.error(0..0, "cache.targeted_only".into(), reason);
        }
        if let Some(d) = &c.disk {
            if d.max_size_mb == 0 {
                let reason = "must be at least 1".to_string();
                return self.error(0..0, "cache.disk.max_size_mb".into(), reason);
            }
            if d.max_object_mb == 0 {
                let reason = "must be at least 1".to_string();
                return self.error(0..0, "cache.disk.max_object_mb".into(), reason);
            }
            if d.path.as_os_str().is_empty() {
                let reason = "must name a directory".to_string();
                return self.error(0..0, "cache.disk.path".into(), reason);
            }
        }
        for (i, route) in config.routes.iter().enumerate() {
            let Some(rc) = &route.cache else { continue };
            if let RouteCacheConfig::Settings(s) = rc.get_ref() {
                if let Some(o) = s.max_object_bytes {
                    if o == 0 || o > max {
                        let reason = format!("must be between 1 and cache.max_bytes ({max})");
                        return self.error(
                            rc.span(),
                            format!("route[{i}].cache.max_object_bytes"),
                            reason,
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
[proxy]
listen = ["127.0.0.1:8080"]

[[upstream]]
name = "app"
endpoints = ["127.0.0.1:9001"]
"#;

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}{extra}"), Path::new("c.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn route_cache_true_and_table() {
        let c = parse(
            "[[route]]\nupstream = \"app\"\ncache = true\n[[route]]\npath_prefix = \"/s\"\nupstream = \"app\"\ncache = { stale_if_error_s = 30 }\n[[route]]\npath_prefix = \"/n\"\nupstream = \"app\"\n",
        )
        .unwrap();
        let r0 = c.routes[0].cache_rule(&c.cache).unwrap();
        assert_eq!(r0.max_object_bytes, 8 * 1024 * 1024);
        assert_eq!(r0.stale_if_error, Duration::ZERO);
        let r1 = c.routes[1].cache_rule(&c.cache).unwrap();
        assert_eq!(r1.stale_if_error, Duration::from_secs(30));
        assert_eq!(r1.set_cookie, SetCookiePolicy::Never);
        assert!(c.routes[2].cache_rule(&c.cache).is_none());
    }

    #[test]
    fn the_disk_tier_table() {
        let c = parse("[cache.disk]\npath = \"/var/cache/sg\"\nmax_size_mb = 1024\n").unwrap();
        let d = c.cache.disk.as_ref().unwrap();
        assert_eq!(d.max_bytes(), 1 << 30);
        assert_eq!(d.max_object_bytes(), 64 << 20);
        assert!(parse("").unwrap().cache.disk.is_none());
        let e = parse("[cache.disk]\npath = \"/x\"\nmax_size_mb = 0\n").unwrap_err();
        assert!(e.contains("cache.disk.max_size_mb"), "{e}");
        let e = parse("[cache.disk]\npath = \"/x\"\nmax_size_mb = 1\nsize = 2\n").unwrap_err();
        assert!(e.contains("size"), "{e}");
    }

    #[test]
    fn bad_values_name_line_and_key() {
        let e = parse("[cache]\nmax_bytes = 100\n").unwrap_err();
        assert!(e.starts_with("c.toml: line 9: cache.max_bytes:"), "{e}");
        let e = parse("[cache]\nmax_bytes = 10000\nmax_object_bytes = 20000\n").unwrap_err();
        assert!(
            e.starts_with("c.toml: line 10: cache.max_object_bytes:"),
            "{e}"
        );
        let e = parse("[[route]]\nupstream = \"app\"\ncache = { ttl = 3 }\n").unwrap_err();
        assert!(e.contains("ttl") && e.contains("line 10"), "{e}");
        let e = parse("[[route]]\nupstream = \"app\"\ncache = 3\n").unwrap_err();
        assert!(e.contains("expected true, false or a table"), "{e}");
        let e = parse("[[route]]\nupstream = \"app\"\ncache = { set_cookie = \"keep\" }\n")
            .unwrap_err();
        assert!(e.contains("keep"), "{e}");
        let e = parse("[cache]\ntargeted_fields = [\"bad name\"]\n").unwrap_err();
        assert!(e.contains("cache.targeted_fields"), "{e}");
    }

    #[test]
    fn set_cookie_strip_and_targeted_fields() {
        let c = parse(
            "[cache]\ntargeted_fields = [\"Acme-Cache-Control\", \"CDN-Cache-Control\"]\n[[route]]\nupstream = \"app\"\ncache = { set_cookie = \"strip\" }\n",
        )
        .unwrap();
        let r = c.routes[0].cache_rule(&c.cache).unwrap();
        assert_eq!(r.set_cookie, SetCookiePolicy::Strip);
        let reading = c.cache.reading();
        assert_eq!(reading.targeted[0], "acme-cache-control");
        assert_eq!(reading.targeted.len(), 2);
    }
}
