//! `[tracing]`: OpenTelemetry traces exported over OTLP/HTTP (protobuf).
//! Absent, there is no tracing and no cost (see `telemetry`).

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};

/// `[tracing]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces URL, e.g.
    /// `http://127.0.0.1:4318/v1/traces`; a URL with no path gets
    /// `/v1/traces`.
    pub endpoint: Spanned<String>,
    /// Share of new traces recorded, 0.0..=1.0 (default 1.0). A request
    /// whose `traceparent` says sampled (or not) follows its parent.
    #[serde(default = "default_ratio")]
    pub sampling_ratio: f64,
    /// `service.name` of the exported spans (default `sluicegate`).
    #[serde(default = "default_service")]
    pub service_name: String,
    /// Ended spans are sent at least this often, in ms (default 5000).
    #[serde(default = "default_batch_delay")]
    pub batch_delay_ms: u64,
    /// Spans waiting to be sent; past it new ones are dropped (default 2048).
    #[serde(default = "default_queue")]
    pub max_queue: usize,
    /// One export may take this long, in ms (default 10000).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// For an `https` endpoint: PEM file of the CA certificates to trust
    /// (default: the system's).
    pub ca: Option<PathBuf>,
}

fn default_ratio() -> f64 {
    1.0
}

fn default_service() -> String {
    "sluicegate".to_string()
}

fn default_batch_delay() -> u64 {
    5_000
}

fn default_queue() -> usize {
    2_048
}

fn default_timeout() -> u64 {
    10_000
}

impl TracingConfig {
    /// The traces URL: the endpoint, with `/v1/traces` when it has no path.
    pub fn traces_url(&self) -> String {
        let url = self.endpoint.get_ref().trim_end_matches('/');
        match url.split_once("://") {
            Some((_, rest)) if !rest.contains('/') => format!("{url}/v1/traces"),
            _ => url.to_string(),
        }
    }
}

impl Validator<'_> {
    pub(super) fn validate_tracing(&self, t: Option<&TracingConfig>) -> Result<(), ConfigError> {
        let Some(t) = t else { return Ok(()) };
        let url = t.traces_url();
        let ok = url
            .parse::<http::Uri>()
            .ok()
            .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if ok.is_none() {
            let reason = format!(
                "{:?} is not an http:// or https:// URL",
                t.endpoint.get_ref()
            );
            return self.error(t.endpoint.span(), "tracing.endpoint".into(), reason);
        }
        if !(0.0..=1.0).contains(&t.sampling_ratio) {
            let reason = "must be between 0.0 and 1.0".to_string();
            return self.error(0..0, "tracing.sampling_ratio".into(), reason);
        }
        for (key, v) in [
            ("batch_delay_ms", t.batch_delay_ms),
            ("timeout_ms", t.timeout_ms),
            ("max_queue", t.max_queue as u64),
        ] {
            if v == 0 {
                return self.error(0..0, format!("tracing.{key}"), "must be > 0".into());
            }
        }
        if t.service_name.is_empty() {
            let reason = "must not be empty".to_string();
            return self.error(0..0, "tracing.service_name".into(), reason);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(endpoint: &str) -> TracingConfig {
        toml::from_str(&format!("endpoint = {endpoint:?}")).unwrap()
    }

    #[test]
    fn the_traces_path_is_added_to_a_bare_endpoint() {
        assert_eq!(
            with("http://c:4318").traces_url(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            with("http://c:4318/").traces_url(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(with("http://c/otlp/t").traces_url(), "http://c/otlp/t");
        let t = with("http://c:4318");
        assert_eq!(t.sampling_ratio, 1.0);
        assert_eq!(t.service_name, "sluicegate");
    }
}
