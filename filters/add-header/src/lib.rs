//! `add-header`: sets fixed headers on the request (before the upstream) and
//! on the response.
//!
//! Config (both tables optional, names lower-case):
//!
//! ```toml
//! [filters.config.add-header]
//! request_headers = { "x-forwarded-by" = "sluicegate" }
//! response_headers = { "x-served-by" = "sluicegate" }
//! ```
//!
//! Each header replaces any value already there (`set-header`). The filter
//! takes part only in the phases it has headers for; with neither table it
//! asks for no phase at all. Invalid names are rejected at `init`.

use std::collections::BTreeMap;

use serde::Deserialize;
use sluicegate_sdk::{
    export_filter, headers, log, Capabilities, Filter, Request, RequestAction, Response,
    ResponseAction,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    request_headers: BTreeMap<String, String>,
    #[serde(default)]
    response_headers: BTreeMap<String, String>,
}

struct AddHeader {
    request: Vec<(String, String)>,
    response: Vec<(String, String)>,
}

fn validate(table: &str, map: BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
    map.into_iter()
        .map(|(name, value)| {
            let name = name.to_ascii_lowercase();
            if !headers::is_valid_name(&name) {
                return Err(format!("{table}: invalid header name {name:?}"));
            }
            if value.contains(['\r', '\n', '\0']) {
                return Err(format!("{table}: invalid value for {name:?}"));
            }
            Ok((name, value))
        })
        .collect()
}

impl AddHeader {
    fn from_config(config: &str) -> Result<Self, String> {
        let c: Config = sluicegate_sdk::parse_config(config)?;
        Ok(AddHeader {
            request: validate("request_headers", c.request_headers)?,
            response: validate("response_headers", c.response_headers)?,
        })
    }
}

impl Filter for AddHeader {
    const CAPABILITIES: Capabilities = Capabilities::NONE;

    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            request: !self.request.is_empty(),
            response: !self.response.is_empty(),
            ..Capabilities::NONE
        }
    }

    fn on_request(&mut self, req: &Request) -> RequestAction {
        for (name, value) in &self.request {
            if let Err(e) = req.set_header(name, value) {
                log::warn(format!("request header {name}: {e}"));
            }
        }
        RequestAction::Continue
    }

    fn on_response(&mut self, _req: &Request, resp: &Response) -> ResponseAction {
        for (name, value) in &self.response {
            if let Err(e) = resp.set_header(name, value) {
                log::warn(format!("response header {name}: {e}"));
            }
        }
        ResponseAction::Continue
    }
}

export_filter!(AddHeader);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_asks_for_nothing() {
        let f = AddHeader::from_config("{}").unwrap();
        assert_eq!(f.capabilities(), Capabilities::NONE);
    }

    #[test]
    fn phases_follow_tables() {
        let f = AddHeader::from_config(r#"{"response_headers": {"X-A": "1"}}"#).unwrap();
        assert_eq!(f.capabilities(), Capabilities::RESPONSE);
        assert_eq!(f.response, vec![("x-a".to_string(), "1".to_string())]);
    }

    #[test]
    fn rejects_bad_names_and_fields() {
        assert!(AddHeader::from_config(r#"{"request_headers": {"a b": "1"}}"#).is_err());
        assert!(AddHeader::from_config(r#"{"request_headers": {"a": "1\n"}}"#).is_err());
        assert!(AddHeader::from_config(r#"{"headers": {}}"#).is_err());
    }
}
