//! `fuzz-guest` (test fixture): a filter driven by fuzz input. The request
//! header `x-fuzz` (hex) is a program: each byte picks a host call (header
//! reads and writes, path rewrite, key-value store, metrics, log, clocks)
//! and the following bytes its arguments — valid, invalid, empty or huge
//! names and values — and the last byte picks the action (continue,
//! respond with an arbitrary status/headers/body, route to an arbitrary
//! upstream). Every phase runs the program from a different offset. The
//! host must answer every call without crashing, leaking or letting an
//! invalid value reach the wire. Used by the `wit_fuzz` end-to-end test and
//! the `wit_boundary` fuzz target. No config.

use sluicegate_sdk::{
    env, export_filter, kv, log, metrics, BodyAction, Capabilities, Filter, LocalResponse,
    LogLevel, Request, RequestAction, Response, ResponseAction,
};

/// Most host calls per phase.
const MAX_OPS: usize = 64;

/// Names the program may pick, so valid calls are common too.
const NAMES: [&str; 12] = [
    "x-a",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "set-cookie",
    "location",
    "x-fuzz",
    "",
    "Bad Name",
    "x-\u{e9}",
    ":path",
];

/// The program: bytes read in order, zeros past the end.
struct Prog {
    bytes: Vec<u8>,
    at: usize,
}

impl Prog {
    fn from_request(req: &Request, offset: usize) -> Prog {
        let hex = req.header("x-fuzz").unwrap_or_default();
        let bytes: Vec<u8> = hex
            .as_bytes()
            .chunks(2)
            .filter_map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
            .collect();
        let at = if bytes.is_empty() {
            0
        } else {
            offset % bytes.len()
        };
        Prog { bytes, at }
    }

    fn byte(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |acc, _| (acc << 8) | u64::from(self.byte()))
    }

    fn data(&mut self) -> Vec<u8> {
        let n = self.byte() as usize;
        (0..n).map(|_| self.byte()).collect()
    }

    /// A string: a listed name, arbitrary bytes (lossy UTF-8), or a long one.
    fn text(&mut self) -> String {
        match self.byte() % 4 {
            0 => NAMES[self.byte() as usize % NAMES.len()].to_string(),
            1 | 2 => String::from_utf8_lossy(&self.data()).into_owned(),
            _ => {
                let c = char::from(b' ' + self.byte() % 95);
                std::iter::repeat_n(c, self.byte() as usize * 97).collect()
            }
        }
    }

    fn ttl(&mut self) -> Option<u64> {
        match self.byte() % 3 {
            0 => None,
            1 => Some(u64::from(self.byte())),
            _ => Some(self.u64()),
        }
    }

    fn local(&mut self) -> LocalResponse {
        const USUAL: [u16; 10] = [200, 201, 204, 301, 302, 400, 403, 404, 418, 503];
        let status = match self.byte() {
            // Now and then any u16: the host must refuse the invalid ones.
            b if b % 8 == 0 => u16::from_be_bytes([self.byte(), self.byte()]),
            b => USUAL[b as usize % USUAL.len()],
        };
        let mut resp = LocalResponse::new(status).with_body(self.data());
        for _ in 0..self.byte() % 4 {
            resp = resp.with_header(self.text(), self.text());
        }
        resp
    }

    /// Host calls common to every phase.
    fn shared_call(&mut self, op: u8) {
        match op {
            0 => drop(kv::get(&self.text())),
            1 => kv::set(&self.text(), self.data(), self.ttl()),
            2 => {
                let _ = kv::delete(&self.text());
            }
            3 => drop(kv::increment(&self.text(), self.u64() as i64, self.ttl())),
            4 => {
                let key = self.text();
                let expected = self.byte().is_multiple_of(2).then(|| self.data());
                let _ = kv::compare_and_swap(&key, expected.as_deref(), self.data(), self.ttl());
            }
            5 => metrics::counter_add(&self.text(), self.u64()),
            6 => {
                let level = [
                    LogLevel::Trace,
                    LogLevel::Debug,
                    LogLevel::Info,
                    LogLevel::Warn,
                    LogLevel::Error,
                ][self.byte() as usize % 5];
                log::write(level, self.text())
            }
            _ => drop((env::now_ms(), env::monotonic_ns(), env::random_u64())),
        }
    }

    fn request_calls(&mut self, req: &Request) {
        for _ in 0..MAX_OPS {
            if self.done() {
                return;
            }
            match self.byte() % 16 {
                0 => drop(req.header(&self.text())),
                1 => drop(req.header_all(&self.text())),
                2 => drop(req.header_names()),
                3 => drop(req.set_header(&self.text(), &self.text())),
                4 => drop(req.append_header(&self.text(), &self.text())),
                5 => req.remove_header(&self.text()),
                6 => drop(req.set_path(&self.text())),
                7 => drop((
                    req.method(),
                    req.path(),
                    req.authority(),
                    req.scheme(),
                    req.client_addr(),
                )),
                op => self.shared_call(op - 8),
            }
        }
    }

    fn response_calls(&mut self, resp: &Response) {
        for _ in 0..MAX_OPS {
            if self.done() {
                return;
            }
            match self.byte() % 14 {
                0 => drop(resp.header(&self.text())),
                1 => drop(resp.header_all(&self.text())),
                2 => drop(resp.header_names()),
                3 => drop(resp.set_header(&self.text(), &self.text())),
                4 => drop(resp.append_header(&self.text(), &self.text())),
                5 => resp.remove_header(&self.text()),
                op => self.shared_call(op - 6),
            }
        }
    }

    fn body_action(&mut self) -> BodyAction {
        if self.bytes.len() < 3 {
            return BodyAction::Continue;
        }
        self.at = 2;
        match self.byte() % 4 {
            0 => BodyAction::replace(self.data()),
            1 => self.local().into(),
            _ => BodyAction::Continue,
        }
    }
}

struct FuzzGuest;

impl Filter for FuzzGuest {
    const CAPABILITIES: Capabilities = Capabilities::ALL;

    fn init(_config: &str) -> Result<Self, String> {
        Ok(FuzzGuest)
    }

    fn on_request(&mut self, req: &Request) -> RequestAction {
        let mut p = Prog::from_request(req, 0);
        p.request_calls(req);
        // The action is picked by the program's first bytes, not by where
        // the calls happened to stop.
        p.at = 0;
        match p.byte() % 8 {
            0 if !p.bytes.is_empty() => p.local().into(),
            1 => RequestAction::route(p.text()),
            _ => RequestAction::Continue,
        }
    }

    fn on_request_body(&mut self, req: &Request, _body: Vec<u8>) -> BodyAction {
        let mut p = Prog::from_request(req, 7);
        p.request_calls(req);
        p.body_action()
    }

    fn on_response(&mut self, req: &Request, resp: &Response) -> ResponseAction {
        let mut p = Prog::from_request(req, 13);
        p.response_calls(resp);
        p.at = 1;
        if p.bytes.len() > 1
            && p.byte().is_multiple_of(8)
            && resp.set_status(u16::from(p.byte()) * 3).is_err()
        {
            return p.local().into();
        }
        ResponseAction::Continue
    }

    fn on_response_body(&mut self, req: &Request, resp: &Response, _body: Vec<u8>) -> BodyAction {
        let mut p = Prog::from_request(req, 29);
        p.response_calls(resp);
        p.body_action()
    }
}

export_filter!(FuzzGuest);
