//! The filter's configuration, parsed and checked once in `init`.

use serde::Deserialize;

/// What to do when the auth service gives no verdict (a call error, or a
/// status other than 2xx, 401 and 403).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Answer 503; the upstream is not asked.
    Deny,
    /// Let the request through (without any identity headers).
    Allow,
}

/// `[filters.config.ext-authz]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The auth service's upstream name (it must be in the filter's
    /// `callouts` grant).
    #[serde(default = "default_upstream")]
    pub upstream: String,
    /// The path of the check request.
    #[serde(default = "default_path")]
    pub path: String,
    /// Request headers copied onto the check request; their values are
    /// also the cache key.
    #[serde(default = "default_forward_headers")]
    pub forward_headers: Vec<String>,
    /// How long a verdict is cached in KV, ms; 0 turns the cache off.
    #[serde(default = "default_cache_ttl_ms")]
    pub cache_ttl_ms: u64,
    /// The policy when the service gives no verdict.
    #[serde(default = "default_on_unavailable")]
    pub on_unavailable: OnUnavailable,
    /// Headers copied from an allowing answer onto the proxied request
    /// (and removed from the client's request in every case).
    #[serde(default = "default_upstream_headers")]
    pub upstream_headers: Vec<String>,
    /// The check call's timeout, ms (default: the policy's
    /// `callout_timeout_ms`).
    #[serde(default)]
    pub timeout_ms: Option<u32>,
}

fn default_upstream() -> String {
    "authz".to_string()
}
fn default_path() -> String {
    "/check".to_string()
}
fn default_forward_headers() -> Vec<String> {
    vec!["authorization".to_string(), "cookie".to_string()]
}
fn default_cache_ttl_ms() -> u64 {
    5000
}
fn default_on_unavailable() -> OnUnavailable {
    OnUnavailable::Deny
}
fn default_upstream_headers() -> Vec<String> {
    vec!["x-auth-user".to_string()]
}

/// Headers the filter itself sends on the check request.
pub const OWN_HEADERS: [&str; 3] = ["x-original-method", "x-original-uri", "x-request-id"];

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn valid_upstream_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn header_list(key: &str, names: Vec<String>) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let lower = name.to_ascii_lowercase();
        if !valid_header_name(&lower) {
            return Err(format!("{key}: {name:?} is not a header name"));
        }
        if !out.contains(&lower) {
            out.push(lower);
        }
    }
    Ok(out)
}

/// `[filters.config.<name>]` as JSON into `T` (blank reads as `{}`); an
/// error names the key it is about (`cache_ttl_ms: invalid value ...`).
fn from_json<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    let de = &mut serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            format!("invalid config: {inner}")
        } else {
            format!("invalid config: {path}: {inner}")
        }
    })
}

impl Config {
    /// Parse and check the JSON config; errors name the key.
    pub fn parse(json: &str) -> Result<Config, String> {
        let mut c: Config = from_json(json)?;
        if !valid_upstream_name(&c.upstream) {
            return Err(format!(
                "upstream: {:?} is not an upstream name (letters, digits, '-', '_', '.')",
                c.upstream
            ));
        }
        if !c.path.starts_with('/')
            || c.path
                .contains(|ch: char| ch.is_ascii_control() || ch == ' ')
        {
            return Err(format!(
                "path: {:?} must start with '/' and hold no spaces or control characters",
                c.path
            ));
        }
        c.forward_headers = header_list("forward_headers", c.forward_headers)?;
        if let Some(own) = c
            .forward_headers
            .iter()
            .find(|h| OWN_HEADERS.contains(&h.as_str()))
        {
            return Err(format!(
                "forward_headers: {own:?} is set by the filter itself"
            ));
        }
        if c.forward_headers.is_empty() && c.cache_ttl_ms > 0 {
            return Err(
                "forward_headers: empty, so every request would share one cached \
                        verdict; name the identity headers, or set cache_ttl_ms = 0"
                    .into(),
            );
        }
        c.upstream_headers = header_list("upstream_headers", c.upstream_headers)?;
        if c.timeout_ms == Some(0) {
            return Err("timeout_ms: must be at least 1 (leave it out for the policy's)".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.upstream, "authz");
        assert_eq!(c.path, "/check");
        assert_eq!(c.forward_headers, ["authorization", "cookie"]);
        assert_eq!(c.cache_ttl_ms, 5000);
        assert_eq!(c.on_unavailable, OnUnavailable::Deny);
        assert_eq!(c.upstream_headers, ["x-auth-user"]);
        assert_eq!(c.timeout_ms, None);
    }

    #[test]
    fn full_config_lower_cases_headers() {
        let c = Config::parse(
            r#"{"upstream":"auth-svc","path":"/v1/check?x=1","forward_headers":["X-Api-Key","x-api-key"],
                "cache_ttl_ms":0,"on_unavailable":"allow","upstream_headers":["X-User","x-tenant"],"timeout_ms":250}"#,
        )
        .unwrap();
        assert_eq!(c.upstream, "auth-svc");
        assert_eq!(c.forward_headers, ["x-api-key"]);
        assert_eq!(c.upstream_headers, ["x-user", "x-tenant"]);
        assert_eq!(c.on_unavailable, OnUnavailable::Allow);
        assert_eq!(c.timeout_ms, Some(250));
        // No identity headers is fine without a cache.
        let c = Config::parse(r#"{"forward_headers":[],"cache_ttl_ms":0}"#).unwrap();
        assert!(c.forward_headers.is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (r#"{"upstrem":"a"}"#, "unknown field"),
            (r#"{"upstream":"a b"}"#, "upstream:"),
            (r#"{"path":"check"}"#, "path:"),
            (r#"{"forward_headers":["bad header"]}"#, "forward_headers:"),
            (
                r#"{"forward_headers":["X-Request-Id"]}"#,
                "set by the filter",
            ),
            (r#"{"upstream_headers":[""]}"#, "upstream_headers:"),
            (
                r#"{"on_unavailable":"maybe"}"#,
                "on_unavailable: unknown variant",
            ),
            (r#"{"timeout_ms":0}"#, "timeout_ms:"),
            (
                r#"{"cache_ttl_ms":-1}"#,
                "invalid config: cache_ttl_ms: invalid value",
            ),
            (
                r#"{"forward_headers":"authorization"}"#,
                "forward_headers: invalid type",
            ),
        ];
        for (json, want) in cases {
            let err = Config::parse(json).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}
