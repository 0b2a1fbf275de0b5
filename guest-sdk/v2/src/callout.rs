//! Calls to upstreams of the proxy's config, and periodic ticks (the world
//! `callout-filter`; the `callouts` feature).
//!
//! A call goes through the host's balancer like any proxied request
//! (endpoint choice, health, limits) and simply returns its answer: the
//! host suspends the filter while the upstream answers, and the worker
//! serves other connections meanwhile. The operator grants the upstreams a
//! filter may call (`callouts = ["authz"]` in `[filters.policy.<name>]`)
//! and bounds each request's calls (count, bytes, wall time) and each
//! answer's size; past them a call fails with a [`CallError`].
//!
//! ```no_run
//! use sluicegate_sdk_v2::callout::{self, Request};
//!
//! # fn f() -> Result<(), callout::CallError> {
//! let resp = callout::call(
//!     "authz",
//!     Request::get("/check").header("authorization", "Bearer t").timeout_ms(200),
//! )?;
//! if resp.is_success() {
//!     let user = resp.header_str("x-auth-user");
//! }
//! # Ok(()) }
//! ```
//!
//! Ticks: call [`request_tick`] from [`Filter::init`](crate::Filter::init)
//! and override [`Filter::on_tick`](crate::Filter::on_tick); the host then
//! calls it every `interval_ms` on one instance of the version.

use crate::bindings::sluicegate::filter::{timer, upstream_client as raw};

/// Why a call produced no response: `NotAllowed` (not in the grant),
/// `UnknownUpstream`, `Timeout`, `BudgetExhausted` (this request's calls,
/// bytes or wall time are spent), `TooLarge` (the answer's body),
/// `Unavailable(reason)`, `InvalidRequest(reason)`. Nothing was sent for
/// `NotAllowed`, `UnknownUpstream`, `BudgetExhausted` and `InvalidRequest`.
pub use raw::CallError;

/// A request to an upstream: a method, a path, headers, a body and an
/// optional timeout, built with chained calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    timeout_ms: Option<u32>,
}

impl Request {
    /// A request with this method and path (path and query, starting with
    /// `/`), no headers and no body.
    pub fn new(method: impl Into<String>, path: impl Into<String>) -> Self {
        Request {
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout_ms: None,
        }
    }

    /// A `GET` of `path`.
    pub fn get(path: impl Into<String>) -> Self {
        Self::new("GET", path)
    }

    /// A `POST` to `path` (give it a [`body`](Self::body)).
    pub fn post(path: impl Into<String>) -> Self {
        Self::new("POST", path)
    }

    /// Add a header (kept in order; a name may repeat). The host refuses
    /// the call with `InvalidRequest` if a name or value is not valid, and
    /// drops hop-by-hop headers; `host` is the endpoint's.
    pub fn header(mut self, name: impl Into<String>, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    /// Set the body (bytes or text); the host sets `content-length`.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// This call's timeout; the host caps it at the policy's
    /// `callout_timeout_ms`, which is also the default.
    pub fn timeout_ms(mut self, ms: u32) -> Self {
        self.timeout_ms = Some(ms);
        self
    }

    /// The method.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The path and query.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The headers, in order.
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header_value(&self, name: &str) -> Option<&[u8]> {
        first(&self.headers, name)
    }

    /// The body.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body
    }

    /// The timeout asked for, if any.
    pub fn timeout(&self) -> Option<u32> {
        self.timeout_ms
    }

    fn into_raw(self) -> raw::OutgoingRequest {
        raw::OutgoingRequest {
            method: self.method,
            path: self.path,
            headers: self.headers,
            body: self.body,
            timeout_ms: self.timeout_ms,
        }
    }
}

/// An upstream's answer, read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers, in order, names as the upstream sent them.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response (for tests of code that takes one).
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// This response with a header added (for tests).
    pub fn with_header(mut self, name: impl Into<String>, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    /// This response with this body (for tests).
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first value of header `name` (case-insensitive), as bytes.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        first(&self.headers, name)
    }

    /// The first value of header `name` as text (`None` if absent or not
    /// UTF-8).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of header `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as text (`None` if not UTF-8).
    pub fn body_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }
}

fn first<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Send `request` to the upstream named `upstream` (one of the filter's
/// `callouts` grant) and wait for its answer. Any status is an `Ok`; an
/// `Err` means there is no answer.
pub fn call(upstream: &str, request: Request) -> Result<Response, CallError> {
    raw::call(upstream, &request.into_raw()).map(|r| Response {
        status: r.status,
        headers: r.headers,
        body: r.body,
    })
}

/// Ask for [`Filter::on_tick`](crate::Filter::on_tick) every
/// `interval_ms` (at least 100). Only during `init`; an `Err` carries the
/// host's reason (return it from `init` to refuse the version).
pub fn request_tick(interval_ms: u32) -> Result<(), String> {
    timer::request_tick(interval_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_keeps_what_it_is_given() {
        let r = Request::get("/check?a=1")
            .header("Authorization", "Bearer x")
            .header("x-a", b"1".as_slice())
            .body("hi")
            .timeout_ms(250);
        assert_eq!(r.method(), "GET");
        assert_eq!(r.path(), "/check?a=1");
        assert_eq!(r.header_value("authorization"), Some(&b"Bearer x"[..]));
        assert_eq!(r.headers().len(), 2);
        assert_eq!(r.body_bytes(), b"hi");
        assert_eq!(r.timeout(), Some(250));
        let raw = r.into_raw();
        assert_eq!(raw.timeout_ms, Some(250));
        assert_eq!(raw.headers[0].0, "Authorization");
    }

    #[test]
    fn response_helpers() {
        let r = Response::new(204)
            .with_header("X-Auth-User", "alice")
            .with_header("set-cookie", "a=1")
            .with_header("Set-Cookie", "b=2")
            .with_body("ok");
        assert!(r.is_success());
        assert_eq!(r.header_str("x-auth-user"), Some("alice"));
        assert_eq!(r.header_all("set-cookie").len(), 2);
        assert_eq!(r.body_str(), Some("ok"));
        assert!(!Response::new(401).is_success());
        assert_eq!(Response::new(200).with_body(vec![0xff]).body_str(), None);
    }
}
