//! `[filters]` and `[filters.policy.<name>]`: where filters come from, their
//! limits and failure policy, and the capability manifest of each filter
//! (what it may route to, read, write and store).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};

/// `[filters]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FiltersConfig {
    /// Directory of `*.wasm` filters, each named by its file stem. Relative
    /// paths are relative to the config file.
    pub dir: Option<PathBuf>,
    /// Where precompiled artifacts are cached (default:
    /// `$XDG_CACHE_HOME/sluicegate/artifacts`, else
    /// `~/.cache/sluicegate/artifacts`; see
    /// `filter::artifacts`).
    pub cache_dir: Option<PathBuf>,
    /// Defaults for every filter.
    #[serde(flatten)]
    pub defaults: FilterPolicyConfig,
    /// Largest body buffered for a filter's body phase, bytes.
    pub max_body_bytes: usize,
    /// A filter that takes longer than this to compile is refused.
    pub compile_timeout_ms: u64,
    /// Threads that run filter calls which outlive an epoch tick, apart
    /// from the workers (default 1).
    pub compute_threads: usize,
    /// `[filters.config.<name>]`: handed to that filter's init as JSON.
    pub config: BTreeMap<String, toml::Table>,
    /// `[filters.policy.<name>]`: per-filter overrides of the defaults.
    pub policy: BTreeMap<String, FilterPolicyConfig>,
    /// `[filters.kv]`: the KV backend (see `config/redis.rs`).
    pub kv: super::KvConfig,
}

impl Default for FiltersConfig {
    fn default() -> Self {
        FiltersConfig {
            dir: None,
            cache_dir: None,
            defaults: FilterPolicyConfig::default(),
            max_body_bytes: 1024 * 1024,
            compile_timeout_ms: 30_000,
            compute_threads: 1,
            config: BTreeMap::new(),
            policy: BTreeMap::new(),
            kv: super::KvConfig::default(),
        }
    }
}

/// Limits, failure policy and grants of one filter (or the defaults of
/// all). Every key is optional; unset keys take the `[filters]` default,
/// then the built-in one.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterPolicyConfig {
    /// CPU deadline per call, milliseconds (default 10).
    pub timeout_ms: Option<u64>,
    /// Deadline for making a new instance and running its `init`,
    /// milliseconds (default 1000).
    pub init_timeout_ms: Option<u64>,
    /// Linear memory cap per instance, MiB (default 32).
    pub memory_mb: Option<u64>,
    /// What a trap, timeout or bad action does (default fail_closed).
    pub on_error: Option<OnError>,
    /// `pool` (warm instances, default) or `request` (fresh per request).
    pub isolation: Option<Isolation>,
    /// Recycle a pooled instance after this many requests (default 10000).
    pub max_requests_per_instance: Option<u64>,
    /// Upstreams the filter's `route` action may pick (default none; `"*"`
    /// for any).
    pub upstreams: Option<Spanned<Vec<Spanned<String>>>>,
    /// Request and response headers the filter may not read (hidden from
    /// `header`, `header-all` and `header-names`). A trailing `*` matches a
    /// prefix. Default none.
    pub hide_headers: Option<Vec<Spanned<String>>>,
    /// Headers the filter may not set, append or remove (default `host`,
    /// `x-forwarded-*`, `forwarded`, `via`; `[]` grants them all).
    pub protect_headers: Option<Vec<Spanned<String>>>,
    /// May the filter answer locally (`respond`)? Default true.
    pub may_respond: Option<bool>,
    /// Most live KV entries in the filter's namespace (default 100000).
    pub kv_max_entries: Option<u64>,
    /// Most KV bytes (keys plus values) in the filter's namespace (default
    /// 64 MiB).
    pub kv_max_bytes: Option<u64>,
    /// Most distinct metric names the filter may create (default 128).
    pub max_metrics: Option<u64>,
    /// The filter's share of the workers' CPU, percent of all worker
    /// threads together (default 25). Past it, its calls are shed by its
    /// failure policy.
    pub max_cpu_percent: Option<f64>,
    /// How long a call may wait for the filter's CPU share before it is
    /// shed, milliseconds (default 500; 0 sheds at once).
    pub cpu_queue_ms: Option<u64>,
    /// Upstreams the filter may call (`upstream-client.call`; default
    /// none; `"*"` for any). A component that imports the call with no
    /// grant is refused at load.
    pub callouts: Option<Spanned<Vec<Spanned<String>>>>,
    /// Timeout of one callout, milliseconds (default 1000).
    pub callout_timeout_ms: Option<u64>,
    /// Callouts per request (per tick), every phase together (default 8).
    pub callout_max_calls: Option<u64>,
    /// Request and response body bytes of a request's callouts together
    /// (default 1 MiB).
    pub callout_max_bytes: Option<u64>,
    /// Time a request's callouts may spend waiting, milliseconds
    /// (default 5000).
    pub callout_max_wall_ms: Option<u64>,
    /// Largest response body one callout may return, bytes (default
    /// 256 KiB).
    pub callout_max_response_bytes: Option<u64>,
}

/// The failure policy of a filter.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Answer the client with a 5xx.
    FailClosed,
    /// Skip the filter and go on.
    FailOpen,
}

/// How instances are reused.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// A pool of warm instances; globals may persist between requests.
    Pool,
    /// A fresh instance per request; nothing survives a request.
    Request,
}

/// A filter's effective policy: the defaults with its overrides applied.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FilterPolicy {
    /// CPU deadline per call, milliseconds.
    pub timeout_ms: u64,
    /// Deadline for instantiating and initialising an instance, milliseconds.
    pub init_timeout_ms: u64,
    /// Linear memory cap, MiB.
    pub memory_mb: u64,
    /// Failure policy.
    pub on_error: OnError,
    /// Instance reuse.
    pub isolation: Isolation,
    /// Recycle after this many requests.
    pub max_requests_per_instance: u64,
    /// Share of the workers' CPU, percent.
    pub max_cpu_percent: f64,
    /// Longest wait for the CPU share, milliseconds.
    pub cpu_queue_ms: u64,
    /// Limits of its callouts.
    pub callout: CalloutLimits,
    /// What the filter may do: its capability manifest.
    pub grants: Grants,
}

/// The limits of a filter's outbound calls (see `filter::callout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CalloutLimits {
    /// One call's timeout, milliseconds.
    pub timeout_ms: u64,
    /// Calls per request (or tick).
    pub max_calls: u64,
    /// Body bytes (sent and received) per request.
    pub max_bytes: u64,
    /// Time spent waiting on callouts per request, milliseconds.
    pub max_wall_ms: u64,
    /// Largest response body of one call, bytes.
    pub max_response_bytes: u64,
}

/// A filter's capability manifest, checked at load where it can be and on
/// every action at run time.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Grants {
    /// Upstreams its `route` action may pick.
    pub upstreams: UpstreamGrant,
    /// Header names (lower case; a trailing `*` is a prefix) it may not read.
    pub hide_headers: Vec<String>,
    /// Header names it may not write.
    pub protect_headers: Vec<String>,
    /// May it answer locally?
    pub may_respond: bool,
    /// KV quota: live entries.
    pub kv_max_entries: u64,
    /// KV quota: bytes of keys and values.
    pub kv_max_bytes: u64,
    /// Distinct metric names.
    pub max_metrics: u64,
    /// Upstreams it may call out to.
    pub callouts: UpstreamGrant,
}

/// The upstreams a filter may route to.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamGrant {
    /// Any configured upstream (`"*"`).
    Any,
    /// Only these (empty: the filter may not route at all).
    Only(Vec<String>),
}

impl UpstreamGrant {
    /// The grant a list of names makes (`"*"` among them: any).
    pub fn of(names: Vec<String>) -> UpstreamGrant {
        if names.iter().any(|u| u == "*") {
            UpstreamGrant::Any
        } else {
            UpstreamGrant::Only(names)
        }
    }

    /// Does it grant nothing at all?
    pub fn is_empty(&self) -> bool {
        matches!(self, UpstreamGrant::Only(names) if names.is_empty())
    }

    /// May the filter route to `name`?
    pub fn allows(&self, name: &str) -> bool {
        match self {
            UpstreamGrant::Any => true,
            UpstreamGrant::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// The headers a filter may not write unless granted.
pub const DEFAULT_PROTECTED_HEADERS: [&str; 4] = ["host", "x-forwarded-*", "forwarded", "via"];

/// Does `name` match one of `patterns` (lower case; a trailing `*` matches
/// a prefix)? Case-insensitive in `name`, as header names are.
pub fn header_listed(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => {
            name.len() >= prefix.len()
                && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        }
        None => name.eq_ignore_ascii_case(p),
    })
}

fn lower_names(list: Option<&Vec<Spanned<String>>>) -> Option<Vec<String>> {
    list.map(|l| l.iter().map(|s| s.get_ref().to_ascii_lowercase()).collect())
}

impl FiltersConfig {
    /// The effective policy of the filter `name`.
    pub fn policy_for(&self, name: &str) -> FilterPolicy {
        let over = self.policy.get(name);
        let d = &self.defaults;
        let pick = |f: fn(&FilterPolicyConfig) -> Option<u64>, v: u64| {
            over.and_then(f).or(f(d)).unwrap_or(v)
        };
        let upstreams = over
            .and_then(|p| p.upstreams.as_ref())
            .or(d.upstreams.as_ref())
            .map(|l| {
                l.get_ref()
                    .iter()
                    .map(|s| s.get_ref().clone())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let upstreams = UpstreamGrant::of(upstreams);
        let callouts = UpstreamGrant::of(
            over.and_then(|p| p.callouts.as_ref())
                .or(d.callouts.as_ref())
                .map(|l| l.get_ref().iter().map(|s| s.get_ref().clone()).collect())
                .unwrap_or_default(),
        );
        let list = |f: fn(&FilterPolicyConfig) -> Option<&Vec<Spanned<String>>>| {
            lower_names(over.and_then(f).or(f(d)))
        };
        FilterPolicy {
            timeout_ms: pick(|p| p.timeout_ms, 10),
            init_timeout_ms: pick(|p| p.init_timeout_ms, 1_000),
            memory_mb: pick(|p| p.memory_mb, 32),
            max_requests_per_instance: pick(|p| p.max_requests_per_instance, 10_000),
            on_error: over
                .and_then(|p| p.on_error)
                .or(d.on_error)
                .unwrap_or(OnError::FailClosed),
            isolation: over
                .and_then(|p| p.isolation)
                .or(d.isolation)
                .unwrap_or(Isolation::Pool),
            cpu_queue_ms: pick(|p| p.cpu_queue_ms, 500),
            callout: CalloutLimits {
                timeout_ms: pick(|p| p.callout_timeout_ms, 1_000),
                max_calls: pick(|p| p.callout_max_calls, 8),
                max_bytes: pick(|p| p.callout_max_bytes, 1 << 20),
                max_wall_ms: pick(|p| p.callout_max_wall_ms, 5_000),
                max_response_bytes: pick(|p| p.callout_max_response_bytes, 256 << 10),
            },
            max_cpu_percent: over
                .and_then(|p| p.max_cpu_percent)
                .or(d.max_cpu_percent)
                .unwrap_or(25.0),
            grants: Grants {
                upstreams,
                hide_headers: list(|p| p.hide_headers.as_ref()).unwrap_or_default(),
                protect_headers: list(|p| p.protect_headers.as_ref()).unwrap_or_else(|| {
                    DEFAULT_PROTECTED_HEADERS
                        .iter()
                        .map(|s| s.to_string())
                        .collect()
                }),
                may_respond: over
                    .and_then(|p| p.may_respond)
                    .or(d.may_respond)
                    .unwrap_or(true),
                kv_max_entries: pick(|p| p.kv_max_entries, 100_000),
                kv_max_bytes: pick(|p| p.kv_max_bytes, 64 << 20),
                max_metrics: pick(|p| p.max_metrics, 128),
                callouts,
            },
        }
    }

    /// The JSON handed to the filter's init: its config table, or `{}`.
    pub fn init_json(&self, name: &str) -> String {
        match self.config.get(name) {
            Some(table) => serde_json::to_string(table).unwrap_or_else(|_| "{}".into()),
            None => "{}".to_string(),
        }
    }
}

impl Validator<'_> {
    /// Limits must be positive, grants must name real upstreams and valid
    /// header names.
    pub(super) fn validate_filters(
        &self,
        config: &super::Config,
        upstreams: &HashSet<&str>,
    ) -> Result<(), ConfigError> {
        if config.filters.compute_threads == 0 {
            return self.error(
                0..0,
                "filters.compute_threads".into(),
                "must be at least 1".into(),
            );
        }
        let policies = config
            .filters
            .policy
            .iter()
            .map(|(name, p)| (format!("filters.policy.{name}"), p));
        for (table, policy) in
            std::iter::once(("filters".to_string(), &config.filters.defaults)).chain(policies)
        {
            let zero = [
                ("timeout_ms", policy.timeout_ms),
                ("init_timeout_ms", policy.init_timeout_ms),
                ("memory_mb", policy.memory_mb),
                ("kv_max_entries", policy.kv_max_entries),
                ("kv_max_bytes", policy.kv_max_bytes),
                ("callout_timeout_ms", policy.callout_timeout_ms),
                ("callout_max_wall_ms", policy.callout_max_wall_ms),
            ]
            .into_iter()
            .find(|(_, v)| *v == Some(0));
            if let Some((key, _)) = zero {
                return self.error(0..0, format!("{table}.{key}"), "must be > 0".into());
            }
            if let Some(cpu) = policy.max_cpu_percent {
                if !(cpu > 0.0 && cpu <= 100.0) {
                    let reason = format!("{cpu} must be above 0 and at most 100");
                    return self.error(0..0, format!("{table}.max_cpu_percent"), reason);
                }
            }
            for (key, list) in [
                ("upstreams", &policy.upstreams),
                ("callouts", &policy.callouts),
            ] {
                for (i, up) in list.iter().flat_map(|l| l.get_ref()).enumerate() {
                    let name = up.get_ref();
                    if name != "*" && !upstreams.contains(name.as_str()) {
                        let reason = format!(
                            "grants upstream {name:?}, which is not defined by any [[upstream]]"
                        );
                        return self.error(up.span(), format!("{table}.{key}[{i}]"), reason);
                    }
                }
            }
            for (key, list) in [
                ("hide_headers", &policy.hide_headers),
                ("protect_headers", &policy.protect_headers),
            ] {
                for (i, h) in list.iter().flatten().enumerate() {
                    let name = h.get_ref();
                    let bare = name.strip_suffix('*').unwrap_or(name);
                    let valid = (bare.is_empty() && name == "*")
                        || http::HeaderName::from_bytes(bare.as_bytes()).is_ok();
                    if !valid || bare.contains('*') {
                        let reason = format!(
                            "{name:?} is not a header name (a trailing '*' matches a prefix)"
                        );
                        return self.error(h.span(), format!("{table}.{key}[{i}]"), reason);
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
    use crate::config::Config;
    use std::path::Path;

    const BASE: &str = r#"
[proxy]
listen = ["127.0.0.1:8080"]

[[upstream]]
name = "app"
endpoints = ["127.0.0.1:9001"]

[[upstream]]
name = "admin"
endpoints = ["127.0.0.1:9002"]

[[route]]
path_prefix = "/"
upstream = "app"

[filters]
dir = "f"
"#;

    #[test]
    fn grants_default_to_nothing_but_reading() {
        let c = Config::parse(BASE, Path::new("x.toml")).unwrap();
        let g = c.filters.policy_for("any").grants;
        assert_eq!(g.upstreams, UpstreamGrant::Only(vec![]));
        assert!(!g.upstreams.allows("app"));
        assert!(g.hide_headers.is_empty());
        assert!(header_listed(&g.protect_headers, "X-Forwarded-For"));
        assert!(header_listed(&g.protect_headers, "host"));
        assert!(!header_listed(&g.protect_headers, "x-added"));
        assert!(g.may_respond);
    }

    #[test]
    fn a_policy_grants_upstreams_and_hides_headers() {
        let text = format!(
            "{BASE}[filters.policy.t]\nupstreams = [\"app\"]\nhide_headers = [\"Authorization\", \"x-secret-*\"]\nprotect_headers = []\nmay_respond = false\n[filters.policy.star]\nupstreams = [\"*\"]\n"
        );
        let c = Config::parse(&text, Path::new("x.toml")).unwrap();
        let g = c.filters.policy_for("t").grants;
        assert!(g.upstreams.allows("app") && !g.upstreams.allows("admin"));
        assert!(header_listed(&g.hide_headers, "authorization"));
        assert!(header_listed(&g.hide_headers, "X-Secret-Token"));
        assert!(!header_listed(&g.hide_headers, "x-secre"));
        assert!(g.protect_headers.is_empty() && !g.may_respond);
        assert_eq!(
            c.filters.policy_for("star").grants.upstreams,
            UpstreamGrant::Any
        );
    }

    #[test]
    fn a_grant_of_an_unknown_upstream_names_file_line_and_key() {
        let text = format!("{BASE}[filters.policy.t]\nupstreams = [\"app\", \"nope\"]\n");
        let e = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.toml: line 20: filters.policy.t.upstreams[1]:"),
            "{e}"
        );
        assert!(e.contains("\"nope\""), "{e}");
    }

    #[test]
    fn callouts_are_granted_by_name_and_limited() {
        let text = format!(
            "{BASE}[filters.policy.t]\ncallouts = [\"admin\"]\ncallout_timeout_ms = 250\ncallout_max_calls = 2\n"
        );
        let c = Config::parse(&text, Path::new("x.toml")).unwrap();
        let p = c.filters.policy_for("t");
        assert!(p.grants.callouts.allows("admin") && !p.grants.callouts.allows("app"));
        assert_eq!((p.callout.timeout_ms, p.callout.max_calls), (250, 2));
        assert_eq!(p.callout.max_response_bytes, 256 << 10);
        assert!(c.filters.policy_for("other").grants.callouts.is_empty());
        let text = format!("{BASE}[filters.policy.t]\ncallouts = [\"nope\"]\n");
        let e = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("filters.policy.t.callouts[0]"), "{e}");
        assert!(e.contains("\"nope\""), "{e}");
    }

    #[test]
    fn bad_header_patterns_and_cpu_shares_are_refused() {
        let text = format!("{BASE}[filters.policy.t]\nhide_headers = [\"bad header\"]\n");
        let e = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("filters.policy.t.hide_headers[0]"), "{e}");
        let text = format!("{BASE}max_cpu_percent = 0.0\n");
        let e = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("filters.max_cpu_percent"), "{e}");
    }
}
