//! `v2-probe`: the contract 0.2 test fixture (tests/e2e/filters_v2.rs).
//!
//! * request phase: stores the client's `x-token` (bytes) and the request
//!   id as locals, copies `x-v2-copy`'s raw bytes to the request header
//!   `x-v2-copied` and queues the same bytes as a deferred response header,
//!   reports a typed field error for an invalid name in `x-v2-err`, counts
//!   `requests{route}`, raises the `inflight` gauge, and counts
//!   `by_label{v=<x-v2-label>}` (for the series cap), and prints
//!   `x-v2-print` to stderr (WASI stdio from a synchronous call);
//! * response phase: writes the locals back as `x-v2-token` and
//!   `x-v2-local-rid`, the exchange's id as `x-v2-rid`, and the answering
//!   endpoint as `x-v2-endpoint`;
//! * chunk phase (config `{"chunks": true}`): upper-cases ASCII letters of
//!   the response body chunk by chunk, counting chunks in a local;
//! * log phase: records `duration_us{status}` in a histogram and lowers the
//!   gauge.

use serde::Deserialize;
use sluicegate_sdk_v2::{
    export_filter, metrics, ChunkAction, Context, FieldError, Filter, LogEntry, Phases, Request,
    RequestAction, Response, ResponseAction,
};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    chunks: bool,
}

struct Probe {
    chunks: bool,
}

impl Filter for Probe {
    const PHASES: Phases = Phases::REQUEST.union(Phases::RESPONSE).union(Phases::LOG);

    fn init(config: &str) -> Result<Self, String> {
        let c: Config = sluicegate_sdk_v2::parse_config(config)?;
        Ok(Probe { chunks: c.chunks })
    }

    fn phases(&self) -> Phases {
        if self.chunks {
            Self::PHASES.union(Phases::RESPONSE_CHUNKS)
        } else {
            Self::PHASES
        }
    }

    fn on_request(&mut self, cx: &Context, req: &Request) -> RequestAction {
        let h = req.headers();
        if let Some(token) = h.get("x-token") {
            let _ = cx.set_local("token", token);
        }
        let _ = cx.set_local("rid", cx.request_id());
        // Writing to stderr (WASI's blocking-write-and-flush) on a worker.
        if let Some(line) = h.get_str("x-v2-print") {
            eprintln!("v2-probe says {line}");
        }
        if let Some(raw) = h.get("x-v2-copy") {
            let _ = h.set("x-v2-copied", &raw);
            let _ = cx.defer_set("x-v2-copied", &raw);
        }
        let err = match h.set("bad name", "x") {
            Err(FieldError::InvalidName) => "invalid-name",
            Err(_) => "other",
            Ok(()) => "accepted",
        };
        let _ = h.set("x-v2-err", err);
        let info = cx.request_info();
        metrics::counter_add("requests", &[("route", &info.route)], 1);
        metrics::gauge_add("inflight", &[], 1.0);
        if let Some(v) = h.get_str("x-v2-label") {
            metrics::counter_add("by_label", &[("v", &v)], 1);
        }
        RequestAction::Continue
    }

    fn on_response(&mut self, cx: &Context, _req: &Request, resp: &Response) -> ResponseAction {
        let h = resp.headers();
        if let Some(token) = cx.local("token") {
            let _ = h.set("x-v2-token", token);
        }
        if let Some(rid) = cx.local("rid") {
            let _ = h.set("x-v2-local-rid", rid);
        }
        let _ = h.set("x-v2-rid", cx.request_id());
        if let Some(ep) = cx.upstream_info().and_then(|u| u.endpoint) {
            let _ = h.set("x-v2-endpoint", ep);
        }
        ResponseAction::Continue
    }

    fn on_response_chunk(&mut self, cx: &Context, mut chunk: Vec<u8>, _end: bool) -> ChunkAction {
        let n = cx
            .local_str("chunks")
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        let _ = cx.set_local("chunks", (n + 1).to_string());
        chunk.make_ascii_uppercase();
        ChunkAction::Replace(chunk)
    }

    fn on_log(&mut self, _cx: &Context, entry: &LogEntry) {
        let status = entry.status.to_string();
        metrics::histogram_record(
            "duration_us",
            &[("status", &status)],
            entry.duration_us as f64,
        );
        metrics::gauge_add("inflight", &[], -1.0);
    }
}

export_filter!(Probe);
