//! `kv-counter`: a test fixture that counts in the shared KV store, two
//! ways, and answers locally with what it saw. The fleet tests (shared KV
//! on Redis) rely on exactly this.
//!
//! Request headers (request phase only; no config):
//!
//! - `x-kv-incr: <key>` → `increment(key, 1)`; answers `200` with
//!   `x-kv-value: <new value>`.
//! - `x-kv-cas: <key>` → a compare-and-swap loop: read the integer at key
//!   (absent = 0), `compare-and-swap(read → read + 1)`, again until it
//!   wins (at most 10,000 tries); answers `200` with `x-kv-value: <the
//!   value it wrote>` and `x-kv-tries: <tries>`.
//! - `x-kv-get: <key>` → answers `200` with `x-kv-value` (absent: no
//!   header).
//!
//! A failed call answers `200` with `x-kv-error: <why>` (an increment's
//! error, a value that is not an integer, or `contention` after 10,000
//! lost swaps). Without those headers the
//! request continues.

use sluicegate_sdk::{
    export_filter, kv, Capabilities, Filter, LocalResponse, Request, RequestAction,
};

struct KvCounter;

/// The most swaps one request tries before it gives up.
const MAX_TRIES: u32 = 10_000;

fn answer(headers: &[(&str, String)]) -> RequestAction {
    let mut resp = LocalResponse::new(200).with_header("content-type", "text/plain");
    for (name, value) in headers {
        resp = resp.with_header(*name, value.clone());
    }
    resp.with_body("kv-counter\n").into()
}

/// Add one to the integer at `key` by read + compare-and-swap.
fn cas_increment(key: &str) -> Result<(i64, u32), String> {
    for tries in 1..=MAX_TRIES {
        let current = kv::get(key);
        let n = match &current {
            None => 0,
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| format!("value at {key:?} is not an integer"))?,
        };
        let next = (n + 1).to_string();
        if kv::compare_and_swap(key, current.as_deref(), &next, None) {
            return Ok((n + 1, tries));
        }
    }
    Err("contention".to_string())
}

impl Filter for KvCounter {
    const CAPABILITIES: Capabilities = Capabilities::REQUEST;

    fn init(_config: &str) -> Result<Self, String> {
        Ok(KvCounter)
    }

    fn on_request(&mut self, req: &Request) -> RequestAction {
        if let Some(key) = req.header("x-kv-incr") {
            return match kv::increment(&key, 1, None) {
                Ok(n) => answer(&[("x-kv-value", n.to_string())]),
                Err(e) => answer(&[("x-kv-error", e)]),
            };
        }
        if let Some(key) = req.header("x-kv-cas") {
            return match cas_increment(&key) {
                Ok((n, tries)) => answer(&[
                    ("x-kv-value", n.to_string()),
                    ("x-kv-tries", tries.to_string()),
                ]),
                Err(e) => answer(&[("x-kv-error", e)]),
            };
        }
        if let Some(key) = req.header("x-kv-get") {
            return match kv::get(&key) {
                Some(v) => answer(&[("x-kv-value", String::from_utf8_lossy(&v).into_owned())]),
                None => answer(&[]),
            };
        }
        RequestAction::Continue
    }
}

export_filter!(KvCounter);
