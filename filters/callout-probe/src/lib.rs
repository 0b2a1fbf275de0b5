//! `callout-probe`: the host's test fixture for outbound calls and ticks
//! (tests/e2e/callouts.rs), on raw `callout-filter` bindings.
//!
//! Request phase, driven by the request's headers:
//!
//! * `x-call: <upstream>` makes `x-call-count` (default 1) calls, one
//!   after the other, of `GET <x-call-path>` (default `/`), each with the
//!   header `x-from-filter: <marker>` and `timeout-ms` from
//!   `x-call-timeout` if given. It answers 200 locally with
//!   `x-call-result` listing each call's outcome (`ok:<status>` or
//!   `err:<kind>`), `x-marker` (config `marker`), and the last answer's body.
//! * `x-spin-ms: N` computes for N ms (wall clock) before calling.
//! * `x-trap-after-call: 1` traps once the calls returned.
//! * `x-read-tick: 1` answers with the KV value the ticks wrote.
//! * no `x-call`: continue (the request goes upstream), with `x-marker` set
//!   on the request.
//!
//! Ticks (config `tick_ms`, `tick_upstream`, `tick_path`): init asks for a
//! tick; each tick calls the upstream and stores `<n>:<body>` in KV under
//! `tick`. Config `tick_in_request: true` tries `request-tick` outside
//! init (it must fail) and reports it in `x-tick-refused`.

use std::cell::Cell;

use serde::Deserialize;

wit_bindgen::generate!({
    path: "../../wit/v0.2",
    world: "callout-filter",
});

use exports::sluicegate::filter::handler::Guest;
use exports::sluicegate::filter::tick_handler::Guest as TickGuest;
use sluicegate::filter::types::{
    BodyAction, ChunkAction, Exchange, LocalResponse, LogEntry, Phases, Request, RequestAction,
    Response, ResponseAction,
};
use sluicegate::filter::upstream_client::{self, CallError, OutgoingRequest};
use sluicegate::filter::{env, kv, timer};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    marker: String,
    tick_ms: Option<u32>,
    tick_upstream: Option<String>,
    tick_path: Option<String>,
}

thread_local! {
    static CONFIG: std::cell::RefCell<Config> = std::cell::RefCell::new(Config::default());
    static TICKS: Cell<u64> = const { Cell::new(0) };
}

struct Probe;

fn header(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

fn kind(e: &CallError) -> &'static str {
    match e {
        CallError::NotAllowed => "not-allowed",
        CallError::UnknownUpstream => "unknown-upstream",
        CallError::Timeout => "timeout",
        CallError::BudgetExhausted => "budget-exhausted",
        CallError::TooLarge => "too-large",
        CallError::Unavailable(_) => "unavailable",
        CallError::InvalidRequest(_) => "invalid-request",
    }
}

fn marker() -> String {
    CONFIG.with(|c| c.borrow().marker.clone())
}

impl Guest for Probe {
    fn init(config: String) -> Result<Phases, String> {
        let c: Config = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        if let Some(ms) = c.tick_ms {
            timer::request_tick(ms)?;
        }
        CONFIG.with(|slot| *slot.borrow_mut() = c);
        Ok(Phases::REQUEST)
    }

    fn on_request(_cx: &Exchange, req: &Request) -> RequestAction {
        if header(req, "x-read-tick").is_some() {
            let body = kv::get("tick").unwrap_or_default();
            return RequestAction::Respond(LocalResponse {
                status: 200,
                headers: vec![],
                body,
            });
        }
        if header(req, "x-tick-outside-init").is_some() {
            let refused = timer::request_tick(1000).is_err();
            return RequestAction::Respond(LocalResponse {
                status: 200,
                headers: vec![("x-tick-refused".into(), refused.to_string().into_bytes())],
                body: vec![],
            });
        }
        let Some(upstream) = header(req, "x-call") else {
            let _ = req.headers().set("x-marker", marker().as_bytes());
            return RequestAction::Continue;
        };
        if let Some(ms) = header(req, "x-spin-ms").and_then(|v| v.parse::<u64>().ok()) {
            let until = env::monotonic_ns() + ms * 1_000_000;
            let mut x = 0u64;
            while env::monotonic_ns() < until {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            std::hint::black_box(x);
        }
        let path = header(req, "x-call-path").unwrap_or_else(|| "/".into());
        let count: usize = header(req, "x-call-count")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let timeout_ms = header(req, "x-call-timeout").and_then(|v| v.parse().ok());
        let mut results = Vec::new();
        let mut last = Vec::new();
        for _ in 0..count {
            let r = upstream_client::call(
                &upstream,
                &OutgoingRequest {
                    method: "GET".into(),
                    path: path.clone(),
                    headers: vec![("x-from-filter".into(), marker().into_bytes())],
                    body: vec![],
                    timeout_ms,
                },
            );
            match r {
                Ok(resp) => {
                    results.push(format!("ok:{}", resp.status));
                    last = resp.body;
                }
                Err(e) => results.push(format!("err:{}", kind(&e))),
            }
        }
        if header(req, "x-trap-after-call").is_some() {
            panic!("callout-probe: trap after the call, as asked");
        }
        RequestAction::Respond(LocalResponse {
            status: 200,
            headers: vec![
                ("x-call-result".into(), results.join(",").into_bytes()),
                ("x-marker".into(), marker().into_bytes()),
            ],
            body: last,
        })
    }

    fn on_request_body(_cx: &Exchange, _req: &Request, _body: Vec<u8>) -> BodyAction {
        BodyAction::Continue
    }

    fn on_request_chunk(_cx: &Exchange, _chunk: Vec<u8>, _end: bool) -> ChunkAction {
        ChunkAction::Continue
    }

    fn on_response(_cx: &Exchange, _req: &Request, _resp: &Response) -> ResponseAction {
        ResponseAction::Continue
    }

    fn on_response_body(
        _cx: &Exchange,
        _req: &Request,
        _resp: &Response,
        _body: Vec<u8>,
    ) -> BodyAction {
        BodyAction::Continue
    }

    fn on_response_chunk(_cx: &Exchange, _chunk: Vec<u8>, _end: bool) -> ChunkAction {
        ChunkAction::Continue
    }

    fn on_log(_cx: &Exchange, _entry: LogEntry) {}
}

impl TickGuest for Probe {
    fn on_tick() {
        let (upstream, path) = CONFIG.with(|c| {
            let c = c.borrow();
            (c.tick_upstream.clone(), c.tick_path.clone())
        });
        let n = TICKS.with(|t| {
            t.set(t.get() + 1);
            t.get()
        });
        let body = match upstream {
            Some(up) => match upstream_client::call(
                &up,
                &OutgoingRequest {
                    method: "GET".into(),
                    path: path.unwrap_or_else(|| "/".into()),
                    headers: vec![],
                    body: vec![],
                    timeout_ms: None,
                },
            ) {
                Ok(r) => r.body,
                Err(e) => format!("err:{}", kind(&e)).into_bytes(),
            },
            None => vec![],
        };
        let mut value = format!("{n}:").into_bytes();
        value.extend_from_slice(&body);
        kv::set("tick", &value, None);
    }
}

export!(Probe);
