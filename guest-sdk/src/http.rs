//! [`Request`] and [`Response`]: thin wrappers over the host-owned heads.
//!
//! Every read is a call into the host (nothing is copied into the filter
//! until asked for), so read a value once and keep it in a local. Writes
//! return the host's error message when the host refuses them (an invalid
//! header name or value, a path that does not start with `/`, a status out
//! of range, or a limit the operator set).

use crate::bindings::sluicegate::filter::types::{RequestHead, ResponseHead};
use crate::headers;

/// The request being proxied (a borrowed, host-owned head).
///
/// Changes made in the request phase are what the upstream and the later
/// filters see.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    head: &'a RequestHead,
}

impl<'a> Request<'a> {
    /// Wraps a raw head from the bindings.
    pub fn new(head: &'a RequestHead) -> Self {
        Request { head }
    }

    /// The raw head from the bindings.
    pub fn raw(&self) -> &'a RequestHead {
        self.head
    }

    /// The method, e.g. `GET`.
    pub fn method(&self) -> String {
        self.head.method()
    }

    /// The path and query as sent by the client, e.g. `/a/b?x=1`.
    pub fn path(&self) -> String {
        self.head.path()
    }

    /// The path without the query, e.g. `/a/b`.
    pub fn path_only(&self) -> String {
        let mut path = self.path();
        if let Some(i) = path.find('?') {
            path.truncate(i);
        }
        path
    }

    /// The query string without the `?`, if there is one.
    pub fn query(&self) -> Option<String> {
        let path = self.path();
        path.find('?').map(|i| path[i + 1..].to_string())
    }

    /// Replaces the path and query; it must start with `/`.
    pub fn set_path(&self, path_and_query: &str) -> Result<(), String> {
        self.head.set_path(path_and_query)
    }

    /// The authority (the Host header or the HTTP/2 `:authority`).
    pub fn authority(&self) -> Option<String> {
        self.head.authority()
    }

    /// `http` or `https`: how the client reached the proxy.
    pub fn scheme(&self) -> String {
        self.head.scheme()
    }

    /// The client's address, `ip:port` (`[v6]:port` for IPv6).
    pub fn client_addr(&self) -> String {
        self.head.client_addr()
    }

    /// The client's IP address, without the port or IPv6 brackets.
    pub fn client_ip(&self) -> String {
        headers::strip_port(&self.client_addr()).to_string()
    }

    /// The first value of a header, if present (`name` is case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.header(name)
    }

    /// Every value of a header, in order.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.head.header_all(name)
    }

    /// The distinct header names present, lower-case.
    pub fn header_names(&self) -> Vec<String> {
        self.head.header_names()
    }

    /// Whether the header is present.
    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    /// The value of a cookie from the `cookie` header(s), if present.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.header_all("cookie")
            .iter()
            .find_map(|h| headers::cookie_value(h, name).map(str::to_string))
    }

    /// The token of an `Authorization: Bearer <token>` header, if present.
    pub fn bearer_token(&self) -> Option<String> {
        self.header("authorization")
            .and_then(|h| headers::bearer_token(&h).map(str::to_string))
    }

    /// Replaces every value of a header with this one.
    pub fn set_header(&self, name: &str, value: &str) -> Result<(), String> {
        self.head.set_header(name, value)
    }

    /// Adds a value to a header, keeping those already there.
    pub fn append_header(&self, name: &str, value: &str) -> Result<(), String> {
        self.head.append_header(name, value)
    }

    /// Removes every value of a header.
    pub fn remove_header(&self, name: &str) {
        self.head.remove_header(name)
    }
}

/// The response on its way to the client (a borrowed, host-owned head).
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    head: &'a ResponseHead,
}

impl<'a> Response<'a> {
    /// Wraps a raw head from the bindings.
    pub fn new(head: &'a ResponseHead) -> Self {
        Response { head }
    }

    /// The raw head from the bindings.
    pub fn raw(&self) -> &'a ResponseHead {
        self.head
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.head.status()
    }

    /// Replaces the status code (100..=999).
    pub fn set_status(&self, status: u16) -> Result<(), String> {
        self.head.set_status(status)
    }

    /// The first value of a header, if present (`name` is case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.header(name)
    }

    /// Every value of a header, in order.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.head.header_all(name)
    }

    /// The distinct header names present, lower-case.
    pub fn header_names(&self) -> Vec<String> {
        self.head.header_names()
    }

    /// Whether the header is present.
    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    /// Replaces every value of a header with this one.
    pub fn set_header(&self, name: &str, value: &str) -> Result<(), String> {
        self.head.set_header(name, value)
    }

    /// Sets a header only if the response does not have it yet; true if set.
    pub fn set_header_if_absent(&self, name: &str, value: &str) -> Result<bool, String> {
        if self.has_header(name) {
            return Ok(false);
        }
        self.set_header(name, value).map(|()| true)
    }

    /// Adds a value to a header, keeping those already there.
    pub fn append_header(&self, name: &str, value: &str) -> Result<(), String> {
        self.head.append_header(name, value)
    }

    /// Adds `token` to a comma-separated list header (such as `vary`) unless
    /// one of its values already lists it (compared case-insensitively).
    pub fn add_to_list_header(&self, name: &str, token: &str) -> Result<(), String> {
        let present = self
            .header_all(name)
            .iter()
            .any(|v| headers::list_contains(v, token));
        if present {
            return Ok(());
        }
        self.append_header(name, token)
    }

    /// Removes every value of a header.
    pub fn remove_header(&self, name: &str) {
        self.head.remove_header(name)
    }
}
