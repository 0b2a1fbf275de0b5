//! Typed configuration.

use serde::de::DeserializeOwned;

/// Parses the filter's configuration into `T`.
///
/// The host passes the operator's `[filters.config.<name>]` TOML table
/// encoded as JSON, `{}` when there is none; an empty or blank string is
/// read as `{}` too. Use `#[serde(default)]` for optional fields and
/// `#[serde(deny_unknown_fields)]` to catch typos. The error names the
/// problem and its place, ready to return from [`Filter::init`](crate::Filter::init).
///
/// ```
/// #[derive(Debug, serde::Deserialize)]
/// struct Config {
///     #[serde(default)]
///     requests: u32,
/// }
/// let c: Config = sluicegate_sdk::parse_config(r#"{"requests": 10}"#).unwrap();
/// assert_eq!(c.requests, 10);
/// let c: Config = sluicegate_sdk::parse_config("").unwrap();
/// assert_eq!(c.requests, 0);
/// let e = sluicegate_sdk::parse_config::<Config>(r#"{"requests": "x"}"#).unwrap_err();
/// assert!(e.starts_with("invalid config: "));
/// ```
pub fn parse_config<T: DeserializeOwned>(config: &str) -> Result<T, String> {
    let json = if config.trim().is_empty() {
        "{}"
    } else {
        config
    };
    serde_json::from_str(json).map_err(|e| format!("invalid config: {e}"))
}
