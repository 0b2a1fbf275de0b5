//! `add-header-v2`: `add-header` on contract 0.2. Request headers are set
//! in the request phase; response headers are queued there as deferred
//! edits that the host applies natively when the response arrives, so the
//! filter takes no response-phase call at all.
//!
//! Config (as `add-header`'s; both tables optional):
//!
//! ```toml
//! [filters.config.add-header-v2]
//! request_headers = { "x-forwarded-by" = "sluicegate" }
//! response_headers = { "x-served-by" = "sluicegate" }
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;
use sluicegate_sdk_v2::{export_filter, log, Context, Filter, Phases, Request, RequestAction};

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

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn validate(table: &str, map: BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
    map.into_iter()
        .map(|(name, value)| {
            let name = name.to_ascii_lowercase();
            if !valid_name(&name) {
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
        let c: Config = sluicegate_sdk_v2::parse_config(config)?;
        Ok(AddHeader {
            request: validate("request_headers", c.request_headers)?,
            response: validate("response_headers", c.response_headers)?,
        })
    }
}

impl Filter for AddHeader {
    const PHASES: Phases = Phases::empty();

    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn phases(&self) -> Phases {
        if self.request.is_empty() && self.response.is_empty() {
            Phases::empty()
        } else {
            Phases::REQUEST
        }
    }

    fn on_request(&mut self, cx: &Context, req: &Request) -> RequestAction {
        if !self.request.is_empty() {
            let headers = req.headers();
            for (name, value) in &self.request {
                if let Err(e) = headers.set(name, value) {
                    log::warn(format!("request header {name}: {e}"));
                }
            }
        }
        for (name, value) in &self.response {
            if let Err(e) = cx.defer_set(name, value) {
                log::warn(format!("response header {name}: {e}"));
            }
        }
        RequestAction::Continue
    }
}

export_filter!(AddHeader);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_tables() {
        let f = AddHeader::from_config("{}").unwrap();
        assert_eq!(f.phases(), Phases::empty());
        let f = AddHeader::from_config(r#"{"response_headers": {"X-A": "1"}}"#).unwrap();
        assert_eq!(f.phases(), Phases::REQUEST, "response edits are deferred");
        assert!(AddHeader::from_config(r#"{"request_headers": {"a b": "1"}}"#).is_err());
    }
}
