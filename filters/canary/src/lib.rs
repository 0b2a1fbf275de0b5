//! `canary`: sends a share of the traffic, and every request that asks for
//! it, to a canary upstream.
//!
//! Config:
//!
//! ```toml
//! [filters.config.canary]
//! upstream = "canary"     # the upstream to route to (default "canary")
//! header = "x-canary"     # forcing header (default "x-canary")
//! cookie = "canary"       # forcing cookie (default "canary")
//! weight_percent = 10     # share of the other requests, 0..=100 (default 0)
//! ```
//!
//! Request phase only. A request is routed to `upstream` when the forcing
//! header is `1` or `true` (case-insensitive), or the forcing cookie is `1`,
//! or else when `env.random-u64 % 100 < weight_percent`. A forcing header of
//! `0` or `false` keeps the request off the canary whatever the weight. A
//! routed request gets request header `x-canary: routed` (replacing any
//! value); the others go on unchanged. Counter: `routed`.

use serde::Deserialize;
use sluicegate_sdk::{
    env, export_filter, headers, metrics, Capabilities, Filter, Request, RequestAction,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_upstream")]
    upstream: String,
    #[serde(default = "default_header")]
    header: String,
    #[serde(default = "default_cookie")]
    cookie: String,
    #[serde(default)]
    weight_percent: u64,
}

fn default_upstream() -> String {
    "canary".to_string()
}
fn default_header() -> String {
    "x-canary".to_string()
}
fn default_cookie() -> String {
    "canary".to_string()
}

struct Canary {
    upstream: String,
    header: String,
    cookie: String,
    weight: u64,
}

/// What the forcing header and cookie say.
#[derive(Debug, PartialEq)]
enum Force {
    On,
    Off,
    Neither,
}

fn force(header: Option<&str>, cookie: Option<&str>) -> Force {
    match header.map(str::trim) {
        Some(v) if headers::is_truthy(v) => return Force::On,
        Some(v) if v == "0" || v.eq_ignore_ascii_case("false") => return Force::Off,
        _ => {}
    }
    if cookie.map(str::trim) == Some("1") {
        return Force::On;
    }
    Force::Neither
}

impl Canary {
    fn from_config(config: &str) -> Result<Self, String> {
        let c: Config = sluicegate_sdk::parse_config(config)?;
        if c.upstream.is_empty() {
            return Err("upstream is empty".to_string());
        }
        if c.weight_percent > 100 {
            return Err(format!("weight_percent {} is over 100", c.weight_percent));
        }
        let header = c.header.to_ascii_lowercase();
        if !headers::is_valid_name(&header) {
            return Err(format!("invalid header name {:?}", c.header));
        }
        Ok(Canary {
            upstream: c.upstream,
            header,
            cookie: c.cookie,
            weight: c.weight_percent,
        })
    }

    fn choose(&self, force: Force, random: impl FnOnce() -> u64) -> bool {
        match force {
            Force::On => true,
            Force::Off => false,
            Force::Neither => self.weight > 0 && random() % 100 < self.weight,
        }
    }
}

impl Filter for Canary {
    const CAPABILITIES: Capabilities = Capabilities::REQUEST;

    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn on_request(&mut self, req: &Request) -> RequestAction {
        let header = req.header(&self.header);
        let cookie = if self.cookie.is_empty() {
            None
        } else {
            req.cookie(&self.cookie)
        };
        let forced = force(header.as_deref(), cookie.as_deref());
        if !self.choose(forced, env::random_u64) {
            return RequestAction::Continue;
        }
        let _ = req.set_header("x-canary", "routed");
        metrics::increment("routed");
        RequestAction::route(self.upstream.clone())
    }
}

export_filter!(Canary);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config() {
        let c = Canary::from_config("{}").unwrap();
        assert_eq!(
            (c.upstream.as_str(), c.header.as_str(), c.weight),
            ("canary", "x-canary", 0)
        );
        assert!(Canary::from_config(r#"{"weight_percent": 101}"#).is_err());
        assert!(Canary::from_config(r#"{"upstream": ""}"#).is_err());
        assert!(Canary::from_config(r#"{"header": "a b"}"#).is_err());
    }

    #[test]
    fn forcing() {
        assert_eq!(force(Some("1"), None), Force::On);
        assert_eq!(force(Some("TRUE"), None), Force::On);
        assert_eq!(force(Some("false"), Some("1")), Force::Off);
        assert_eq!(force(Some("0"), None), Force::Off);
        assert_eq!(force(Some("maybe"), Some("1")), Force::On);
        assert_eq!(force(None, Some("true")), Force::Neither);
        assert_eq!(force(None, None), Force::Neither);
    }

    #[test]
    fn weights() {
        let c = Canary::from_config(r#"{"weight_percent": 10}"#).unwrap();
        assert!(c.choose(Force::Neither, || 109));
        assert!(!c.choose(Force::Neither, || 110));
        assert!(c.choose(Force::On, || unreachable!()));
        let none = Canary::from_config("{}").unwrap();
        assert!(!none.choose(Force::Neither, || unreachable!()));
        let all = Canary::from_config(r#"{"weight_percent": 100}"#).unwrap();
        assert!(all.choose(Force::Neither, || u64::MAX));
    }
}
