//! The filter's configuration, parsed and checked once in `init`.

use serde::Deserialize;

/// The shortest tick interval the host grants.
pub const MIN_REFRESH_MS: u32 = 100;

/// `[filters.config.jwks-auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The upstream serving the JWKS (it must be in the filter's
    /// `callouts` grant).
    pub jwks_upstream: String,
    /// The JWKS document's path.
    #[serde(default = "default_jwks_path")]
    pub jwks_path: String,
    /// How often the keys are fetched again, ms (the tick interval).
    #[serde(default = "default_refresh_ms")]
    pub refresh_ms: u32,
    /// The `iss` a token must carry, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// An `aud` a token must carry (a string or one of a list), if set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
}

fn default_jwks_path() -> String {
    "/.well-known/jwks.json".to_string()
}
fn default_refresh_ms() -> u32 {
    60_000
}
fn default_leeway_s() -> u64 {
    30
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
        let c: Config = from_json(json)?;
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !name_ok(&c.jwks_upstream) {
            return Err(format!(
                "jwks_upstream: {:?} is not an upstream name (letters, digits, '-', '_', '.')",
                c.jwks_upstream
            ));
        }
        if !c.jwks_path.starts_with('/')
            || c.jwks_path
                .contains(|ch: char| ch.is_ascii_control() || ch == ' ')
        {
            return Err(format!(
                "jwks_path: {:?} must start with '/' and hold no spaces or control characters",
                c.jwks_path
            ));
        }
        if c.refresh_ms < MIN_REFRESH_MS {
            return Err(format!(
                "refresh_ms: {} is below the minimum of {MIN_REFRESH_MS}",
                c.refresh_ms
            ));
        }
        if c.issuer.as_deref() == Some("") {
            return Err("issuer: must not be empty (leave it out to accept any)".into());
        }
        if c.audience.as_deref() == Some("") {
            return Err("audience: must not be empty (leave it out to accept any)".into());
        }
        if c.leeway_s > 3600 {
            return Err(format!("leeway_s: {} is more than an hour", c.leeway_s));
        }
        Ok(c)
    }

    /// The KV key of the JWKS document: named for its source, so a config
    /// pointing elsewhere never reads the old source's keys.
    pub fn kv_key(&self) -> String {
        format!("jwks:{}{}", self.jwks_upstream, self.jwks_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::parse(r#"{"jwks_upstream":"idp"}"#).unwrap();
        assert_eq!(c.jwks_path, "/.well-known/jwks.json");
        assert_eq!(c.refresh_ms, 60_000);
        assert_eq!(c.leeway_s, 30);
        assert_eq!(c.issuer, None);
        assert_eq!(c.audience, None);
        assert_eq!(c.kv_key(), "jwks:idp/.well-known/jwks.json");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("{}", "jwks_upstream"),
            (r#"{"jwks_upstream":"idp","x":1}"#, "unknown field"),
            (r#"{"jwks_upstream":"i dp"}"#, "jwks_upstream:"),
            (
                r#"{"jwks_upstream":"idp","jwks_path":"keys"}"#,
                "jwks_path:",
            ),
            (r#"{"jwks_upstream":"idp","refresh_ms":99}"#, "refresh_ms:"),
            (r#"{"jwks_upstream":"idp","issuer":""}"#, "issuer:"),
            (r#"{"jwks_upstream":"idp","audience":""}"#, "audience:"),
            (r#"{"jwks_upstream":"idp","leeway_s":7200}"#, "leeway_s:"),
            (
                r#"{"jwks_upstream":"idp","refresh_ms":"1s"}"#,
                "refresh_ms: invalid type",
            ),
        ];
        for (json, want) in cases {
            let err = Config::parse(json).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
        assert!(Config::parse(r#"{"jwks_upstream":"idp","refresh_ms":100}"#).is_ok());
    }
}
