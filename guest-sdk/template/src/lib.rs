//! `my-filter`: tags requests for the upstream and answers `/ping` itself.
//!
//! Config (`[filters.config.my-filter]`, all optional):
//!
//! ```toml
//! tag = "blue"      # value of request header `x-tag` (default "none")
//! ping = true       # answer GET /ping with 200 "pong" (default false)
//! ```

use serde::Deserialize;
use sluicegate_sdk::{
    export_filter, log, metrics, Capabilities, Filter, LocalResponse, Request, RequestAction,
    Response, ResponseAction,
};

/// The operator's config; unknown keys are an error, so typos show at deploy.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_tag")]
    tag: String,
    #[serde(default)]
    ping: bool,
}

fn default_tag() -> String {
    "none".to_string()
}

struct MyFilter {
    config: Config,
}

impl Filter for MyFilter {
    // Ask only for the phases you use: the host skips the others and never
    // buffers a body nobody asked for (add `.with_request_body()` etc.).
    const CAPABILITIES: Capabilities = Capabilities::REQUEST.with_response();

    fn init(config: &str) -> Result<Self, String> {
        let config: Config = sluicegate_sdk::parse_config(config)?;
        log::info(format!("my-filter starting with tag {}", config.tag));
        Ok(MyFilter { config })
    }

    fn on_request(&mut self, req: &Request) -> RequestAction {
        if self.config.ping && req.method() == "GET" && req.path_only() == "/ping" {
            metrics::increment("pings");
            return LocalResponse::text(200, "pong\n").into();
        }
        if let Err(e) = req.set_header("x-tag", &self.config.tag) {
            log::warn(format!("cannot set x-tag: {e}"));
        }
        RequestAction::Continue
    }

    fn on_response(&mut self, _req: &Request, resp: &Response) -> ResponseAction {
        // The response phase may run in another instance than the request
        // phase: read per-request state from `_req` (or kv), not from `self`.
        let _ = resp.set_header("x-filtered-by", "my-filter");
        ResponseAction::Continue
    }
}

export_filter!(MyFilter);
