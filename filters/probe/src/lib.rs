//! `probe`: a test filter that exercises every action and every host import,
//! driven by request headers. The end-to-end tests rely on exactly this.
//!
//! Config: `{ "bodies": true|false }` (default `false`; other keys are
//! ignored). Capabilities: the request and response phases always; both
//! body phases only when `bodies` is true.
//!
//! Whenever a host call that can fail (`set-path`, `set-header`,
//! `append-header`, `set-status`) returns an error, the probe appends
//! `x-probe-error: <op>: <message>` to the head it was editing.
//!
//! **on-request**, in this order:
//! 1. Reads the method, path, authority, scheme, client address and
//!    header names first, then sets request headers `x-probe-method`,
//!    `x-probe-path`, `x-probe-authority` (`""` when none),
//!    `x-probe-scheme`, `x-probe-client` and `x-probe-names` (the names
//!    as read, before any probe header, joined by `,`).
//! 2. Logs (info) `probe saw <path>`; `metrics.counter-add("requests", 1)`.
//! 3. `x-probe-set-path: <p>` → `set-path(p)`.
//! 4. `x-probe-remove: <name>` → `remove-header(name)`.
//! 5. `x-probe-append: <name>=<value>` → `append-header(name, value)`
//!    (split at the first `=`; no `=` is an `append` error).
//! 6. `x-probe-all: <name>` → sets `x-probe-all-values` to
//!    `header-all(name)` joined by `|` (after steps 3-5).
//! 7. `x-probe-kv: <key>` → `increment(key, 1, ttl 60000)` and sets
//!    `x-probe-count` to the new value (`error: <msg>` on failure); then on
//!    key `rt-<key>`: `set("a", ttl 60000)`; `get` is `"a"` (step
//!    `get`); `cas(Some("a") → "b")` is true (`cas-match`);
//!    `cas(Some("zzz") → "c")` is false (`cas-mismatch`); `cas(None → "x")`
//!    is false (`cas-absent`); `get` is `"b"` (`get-after-cas`); `delete`
//!    is true (`delete`); `get` is none (`get-deleted`). Sets
//!    `x-probe-kv-ok: true` if every step matched, else `false:<step>` for
//!    the first that did not (the rest are skipped).
//! 8. `x-probe-time` present → sets `x-probe-now-ms`, `x-probe-mono-ns`,
//!    `x-probe-random` from `env`.
//! 9. `x-probe-action: respond` → respond(status from `x-probe-status`, or
//!    200 when absent or not a number; headers `x-probe-local: yes`,
//!    `content-type: text/plain`; body `local response from probe\n`).
//!    `x-probe-action: route=<name>` → `route(name)`. Otherwise continue.
//!
//! 10. Before returning: `x-probe-trap: request` → traps (after every edit
//!     above: a failed call must leave none of them behind).
//!
//! Before step 1: `x-probe-spin-ms: N` → computes for N ms of monotonic
//! time (a CPU-bound filter within its deadline); `x-probe-spin-ms:
//! forever` → computes until the host cuts it off; `x-probe-work: N` →
//! N × 100,000 rounds of a hash chain (fixed CPU work, whatever the
//! scheduling).
//!
//! **on-request-body** (bodies): request header `x-probe-body: upper` →
//! replace with the body ASCII-uppercased; `x-probe-body: reject` → respond
//! 413, `content-type: text/plain`, body `rejected by probe\n`; else
//! continue.
//!
//! **on-response**: sets response headers `x-probe-response: 1` and
//! `x-probe-status-seen: <status as received>`; request header
//! `x-probe-resp-status: N` → `set-status(N)`; `x-probe-resp-remove: <name>`
//! → removes that response header; `x-probe-resp-action: respond` →
//! respond 200, `content-type: text/plain`, body `replaced by probe\n`;
//! `x-probe-trap: response` → traps (after the edits above); else
//! continue.
//!
//! **on-response-body** (bodies): request header `x-probe-resp-body: upper`
//! → replace with the body ASCII-uppercased; else continue.

use serde::Deserialize;
use sluicegate_sdk::{
    env, export_filter, kv, log, metrics, BodyAction, Capabilities, Filter, LocalResponse, Request,
    RequestAction, Response, ResponseAction,
};

#[derive(Debug, Default, Deserialize)]
struct Config {
    #[serde(default)]
    bodies: bool,
}

struct Probe {
    bodies: bool,
}

fn note(req: &Request, op: &str, result: Result<(), String>) {
    if let Err(e) = result {
        let _ = req.append_header("x-probe-error", &format!("{op}: {e}"));
    }
}

fn note_resp(resp: &Response, op: &str, result: Result<(), String>) {
    if let Err(e) = result {
        let _ = resp.append_header("x-probe-error", &format!("{op}: {e}"));
    }
}

/// The KV round trip on `rt-<key>`: `Ok` or the first step that failed.
fn kv_round_trip(key: &str) -> Result<(), &'static str> {
    let rt = format!("rt-{key}");
    let check = |ok: bool, step: &'static str| if ok { Ok(()) } else { Err(step) };
    kv::set(&rt, "a", Some(60_000));
    check(kv::get(&rt).as_deref() == Some(b"a"), "get")?;
    check(
        kv::compare_and_swap(&rt, Some(b"a"), "b", Some(60_000)),
        "cas-match",
    )?;
    check(
        !kv::compare_and_swap(&rt, Some(b"zzz"), "c", Some(60_000)),
        "cas-mismatch",
    )?;
    check(
        !kv::compare_and_swap(&rt, None, "x", Some(60_000)),
        "cas-absent",
    )?;
    check(kv::get(&rt).as_deref() == Some(b"b"), "get-after-cas")?;
    check(kv::delete(&rt), "delete")?;
    check(kv::get(&rt).is_none(), "get-deleted")
}

impl Filter for Probe {
    const CAPABILITIES: Capabilities = Capabilities::REQUEST.with_response();

    fn init(config: &str) -> Result<Self, String> {
        let c: Config = sluicegate_sdk::parse_config(config)?;
        Ok(Probe { bodies: c.bodies })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            request_body: self.bodies,
            response_body: self.bodies,
            ..Self::CAPABILITIES
        }
    }

    fn on_request(&mut self, req: &Request) -> RequestAction {
        if let Some(spin) = req.header("x-probe-spin-ms") {
            spin_for(spin.trim().parse::<u64>().ok());
        }
        if let Some(n) = req
            .header("x-probe-work")
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            let mut x = work(n.min(1_000_000) * 100, 1);
            if x == 42 {
                x += 1;
                log::info(format!("unlikely {x}"));
            }
        }
        let method = req.method();
        let path = req.path();
        let authority = req.authority().unwrap_or_default();
        let scheme = req.scheme();
        let client = req.client_addr();
        let names = req.header_names().join(",");
        for (name, value) in [
            ("x-probe-method", &method),
            ("x-probe-path", &path),
            ("x-probe-authority", &authority),
            ("x-probe-scheme", &scheme),
            ("x-probe-client", &client),
            ("x-probe-names", &names),
        ] {
            note(req, "set-header", req.set_header(name, value));
        }
        log::info(format!("probe saw {path}"));
        metrics::counter_add("requests", 1);

        if let Some(p) = req.header("x-probe-set-path") {
            note(req, "set-path", req.set_path(&p));
        }
        if let Some(name) = req.header("x-probe-remove") {
            req.remove_header(&name);
        }
        if let Some(spec) = req.header("x-probe-append") {
            let result = match spec.split_once('=') {
                Some((name, value)) => req.append_header(name, value),
                None => Err(format!("expected <name>=<value>, got {spec:?}")),
            };
            note(req, "append", result);
        }
        if let Some(name) = req.header("x-probe-all") {
            let all = req.header_all(&name).join("|");
            note(
                req,
                "set-header",
                req.set_header("x-probe-all-values", &all),
            );
        }
        if let Some(key) = req.header("x-probe-kv") {
            let count = match kv::increment(&key, 1, Some(60_000)) {
                Ok(n) => n.to_string(),
                Err(e) => format!("error: {e}"),
            };
            note(req, "set-header", req.set_header("x-probe-count", &count));
            let ok = match kv_round_trip(&key) {
                Ok(()) => "true".to_string(),
                Err(step) => format!("false:{step}"),
            };
            note(req, "set-header", req.set_header("x-probe-kv-ok", &ok));
        }
        if req.has_header("x-probe-time") {
            for (name, value) in [
                ("x-probe-now-ms", env::now_ms()),
                ("x-probe-mono-ns", env::monotonic_ns()),
                ("x-probe-random", env::random_u64()),
            ] {
                note(req, "set-header", req.set_header(name, &value.to_string()));
            }
        }

        let action = req.header("x-probe-action").unwrap_or_default();
        if action == "respond" {
            let status = req
                .header("x-probe-status")
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(200);
            return LocalResponse::new(status)
                .with_header("x-probe-local", "yes")
                .with_header("content-type", "text/plain")
                .with_body("local response from probe\n")
                .into();
        }
        if req.header("x-probe-trap").as_deref() == Some("request") {
            trap();
        }
        if let Some(upstream) = action.strip_prefix("route=") {
            return RequestAction::route(upstream);
        }
        RequestAction::Continue
    }

    fn on_request_body(&mut self, req: &Request, body: Vec<u8>) -> BodyAction {
        match req.header("x-probe-body").as_deref() {
            Some("upper") => BodyAction::replace(body.to_ascii_uppercase()),
            Some("reject") => LocalResponse::new(413)
                .with_header("content-type", "text/plain")
                .with_body("rejected by probe\n")
                .into(),
            _ => BodyAction::Continue,
        }
    }

    fn on_response(&mut self, req: &Request, resp: &Response) -> ResponseAction {
        let status = resp.status();
        note_resp(resp, "set-header", resp.set_header("x-probe-response", "1"));
        note_resp(
            resp,
            "set-header",
            resp.set_header("x-probe-status-seen", &status.to_string()),
        );
        if let Some(s) = req.header("x-probe-resp-status") {
            let result = match s.trim().parse::<u16>() {
                Ok(n) => resp.set_status(n),
                Err(_) => Err(format!("not a status: {s:?}")),
            };
            note_resp(resp, "set-status", result);
        }
        if let Some(name) = req.header("x-probe-resp-remove") {
            resp.remove_header(&name);
        }
        if req.header("x-probe-trap").as_deref() == Some("response") {
            trap();
        }
        if req.header("x-probe-resp-action").as_deref() == Some("respond") {
            return LocalResponse::new(200)
                .with_header("content-type", "text/plain")
                .with_body("replaced by probe\n")
                .into();
        }
        ResponseAction::Continue
    }

    fn on_response_body(&mut self, req: &Request, _resp: &Response, body: Vec<u8>) -> BodyAction {
        match req.header("x-probe-resp-body").as_deref() {
            Some("upper") => BodyAction::replace(body.to_ascii_uppercase()),
            _ => BodyAction::Continue,
        }
    }
}

/// Compute for `ms` of monotonic time (`None`: until cut off). The work
/// is a hash chain the optimiser cannot drop.
fn spin_for(ms: Option<u64>) {
    let start = env::monotonic_ns();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    loop {
        x = work(1, x);
        if let Some(ms) = ms {
            if env::monotonic_ns().saturating_sub(start) >= ms * 1_000_000 {
                break;
            }
        }
    }
    if x == 42 {
        log::info("unlikely");
    }
}

/// `thousands` × 1,000 rounds of a hash chain from `x`.
fn work(thousands: u64, mut x: u64) -> u64 {
    for _ in 0..thousands * 1000 {
        x = core::hint::black_box(
            x.rotate_left(7).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5851_f42d,
        );
    }
    x
}

/// Trap on purpose (a wasm `unreachable`).
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    panic!("probe traps on purpose");
}

export_filter!(Probe);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_follow_bodies() {
        let p = Probe::init("{}").unwrap();
        assert_eq!(p.capabilities(), Capabilities::REQUEST.with_response());
        let p = Probe::init(r#"{"bodies": true, "other": 1}"#).unwrap();
        assert_eq!(p.capabilities(), Capabilities::ALL);
        assert!(Probe::init(r#"{"bodies": "yes"}"#).is_err());
    }
}
