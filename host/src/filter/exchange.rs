//! The exchange: one request as it passes through the proxy, shared by
//! every phase of every 0.2 filter on it, whichever instance runs the
//! phase. It carries the request id, each filter's locals, the read-only
//! properties, and the response header edits filters deferred.
//!
//! It lives behind an `Arc<Mutex<_>>` for the request's life: a phase's
//! store holds a clone during the call, and every host call locks it for a
//! few field reads (uncontended: a request's phases run one at a time,
//! except a streaming request body beside the response phases).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use parking_lot::Mutex;

/// Bytes of locals (keys and values together) one filter may keep per
/// request.
pub const MAX_LOCALS_BYTES: usize = 4096;

/// `x-request-id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Is `v` a request id worth keeping: 1..=128 bytes of visible ASCII
/// letters, digits and `-_.:+=/` (UUIDs, ULIDs, Envoy's and nginx's ids,
/// base64 tokens). Anything else is replaced: the id goes into logs and
/// upstream requests, so it must not carry spaces, quotes or controls.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+=/".contains(b))
}

/// A fresh request id: 128 random bits as 32 lower-case hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    for (i, slot) in out.iter_mut().enumerate() {
        let word = if i < 16 { a } else { b };
        let shift = 60 - 4 * (i % 16);
        *slot = HEX[((word >> shift) & 0xf) as usize];
    }
    // 32 hex digits are always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The request's id: the client's if valid, else a new one. The header is
/// set (or replaced) so the upstream gets it.
pub fn ensure_request_id(headers: &mut http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        if valid_request_id(v.as_bytes()) && headers.get_all(&X_REQUEST_ID).iter().count() == 1 {
            return v.clone();
        }
    }
    let id = new_request_id();
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// TLS facts of the client's connection.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// The server name the client sent (SNI).
    pub sni: Option<String>,
    /// The protocol ALPN agreed.
    pub alpn: Option<String>,
}

/// What the answer was (response and log phases).
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// The endpoint that answered.
    pub endpoint: Option<Arc<str>>,
    /// From sending to the response head.
    pub latency: Duration,
    /// Attempts made.
    pub attempts: u32,
    /// `Some(true)` hit, `Some(false)` miss, `None` no cache.
    pub cache_hit: Option<bool>,
}

/// One response header edit a filter deferred.
#[derive(Debug, Clone)]
pub enum Deferred {
    /// Replace every value.
    Set(HeaderName, HeaderValue),
    /// Add a value.
    Append(HeaderName, HeaderValue),
    /// Remove the field.
    Remove(HeaderName),
}

/// One filter's locals on one request.
#[derive(Debug, Default)]
struct Locals {
    filter: Arc<str>,
    entries: Vec<(String, Vec<u8>)>,
    bytes: usize,
    /// What the filter's callouts have used on this request.
    callouts: super::callout::Spent,
}

/// The per-request state 0.2 filters share.
#[derive(Debug)]
pub struct Exchange {
    /// The request id (also in the upstream request's `x-request-id`).
    pub id: HeaderValue,
    /// The route's label.
    pub route: Arc<str>,
    /// The upstream chosen (a filter's `route` action changes it).
    pub upstream: Arc<str>,
    /// The client's HTTP version.
    pub version: http::Version,
    /// The client's address.
    pub client: SocketAddr,
    /// TLS facts, on a TLS listener.
    pub tls: Option<TlsInfo>,
    /// When the request arrived.
    pub start: SystemTime,
    /// The same, monotonic.
    pub started: Instant,
    /// What answered (set before the response phases).
    pub answer: Option<Answer>,
    /// Response header edits deferred by request phases, in order.
    pub deferred: Vec<Deferred>,
    locals: Vec<Locals>,
}

/// The exchange as phases hold it.
pub type SharedExchange = Arc<Mutex<Exchange>>;

impl Exchange {
    /// A new exchange for a request on `route` to `upstream`.
    pub fn new(
        id: HeaderValue,
        route: Arc<str>,
        upstream: Arc<str>,
        version: http::Version,
        client: SocketAddr,
        tls: Option<TlsInfo>,
        started: Instant,
    ) -> Exchange {
        Exchange {
            id,
            route,
            upstream,
            version,
            client,
            tls,
            start: SystemTime::now(),
            started,
            answer: None,
            deferred: Vec::new(),
            locals: Vec::new(),
        }
    }

    /// Shared, for the phases.
    pub fn shared(self) -> SharedExchange {
        Arc::new(Mutex::new(self))
    }

    /// The value `filter` stored under `key`.
    pub fn get_local(&self, filter: &str, key: &str) -> Option<&[u8]> {
        self.locals
            .iter()
            .find(|l| &*l.filter == filter)?
            .entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    /// Store `value` under `key` for `filter`; false past the cap (nothing
    /// is changed then).
    pub fn set_local(&mut self, filter: &Arc<str>, key: String, value: Vec<u8>) -> bool {
        let i = match self.locals.iter().position(|l| l.filter == *filter) {
            Some(i) => i,
            None => {
                self.locals.push(Locals {
                    filter: filter.clone(),
                    ..Locals::default()
                });
                self.locals.len() - 1
            }
        };
        let locals = &mut self.locals[i];
        let old = locals
            .entries
            .iter()
            .position(|(k, _)| *k == key)
            .map(|j| locals.entries[j].0.len() + locals.entries[j].1.len())
            .unwrap_or(0);
        let next = locals.bytes - old + key.len() + value.len();
        if next > MAX_LOCALS_BYTES {
            return false;
        }
        locals.bytes = next;
        match locals.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => locals.entries.push((key, value)),
        }
        true
    }

    /// What `filter`'s callouts have used on this request so far.
    pub fn callouts_spent(&self, filter: &str) -> super::callout::Spent {
        self.locals
            .iter()
            .find(|l| &*l.filter == filter)
            .map(|l| l.callouts)
            .unwrap_or_default()
    }

    /// Record what `filter`'s callouts have used (after a call that made some).
    pub fn set_callouts_spent(&mut self, filter: &Arc<str>, spent: super::callout::Spent) {
        match self.locals.iter_mut().find(|l| l.filter == *filter) {
            Some(l) => l.callouts = spent,
            None => self.locals.push(Locals {
                filter: filter.clone(),
                callouts: spent,
                ..Locals::default()
            }),
        }
    }

    /// Put back what `key` held before a failed call set it.
    pub fn restore_local(&mut self, filter: &Arc<str>, key: String, old: Option<Vec<u8>>) {
        let Some(locals) = self.locals.iter_mut().find(|l| l.filter == *filter) else {
            return;
        };
        if let Some(j) = locals.entries.iter().position(|(k, _)| *k == key) {
            let (k, v) = locals.entries.remove(j);
            locals.bytes -= k.len() + v.len();
        }
        if let Some(v) = old {
            locals.bytes += key.len() + v.len();
            locals.entries.push((key, v));
        }
    }

    /// Every local of `filter`, for `sluicegate filter test`.
    pub fn locals_of(&self, filter: &str) -> Vec<(String, Vec<u8>)> {
        self.locals
            .iter()
            .find(|l| &*l.filter == filter)
            .map(|l| l.entries.clone())
            .unwrap_or_default()
    }

    /// The request's start, ms since the Unix epoch.
    pub fn start_ms(&self) -> u64 {
        self.start
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Apply the deferred edits to a response's headers, in order.
    pub fn apply_deferred(&mut self, headers: &mut http::HeaderMap) {
        for edit in self.deferred.drain(..) {
            match edit {
                Deferred::Set(n, v) => {
                    headers.insert(n, v);
                }
                Deferred::Append(n, v) => {
                    headers.append(n, v);
                }
                Deferred::Remove(n) => {
                    headers.remove(n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex() -> Exchange {
        Exchange::new(
            new_request_id(),
            "r".into(),
            "u".into(),
            http::Version::HTTP_11,
            "127.0.0.1:1".parse().unwrap(),
            None,
            Instant::now(),
        )
    }

    #[test]
    fn request_ids_are_kept_only_when_valid() {
        let mut h = http::HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(ensure_request_id(&mut h), "abc-123");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("bad id\"x"));
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(h.get(X_REQUEST_ID), Some(&id));
        let mut h = http::HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert!(valid_request_id(id.as_bytes()));
        assert_ne!(id, new_request_id());
        assert!(!valid_request_id(&[b'a'; 129]));
    }

    #[test]
    fn locals_are_per_filter_and_capped() {
        let mut e = ex();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(e.set_local(&a, "k".into(), b"1".to_vec()));
        assert!(e.set_local(&b, "k".into(), b"2".to_vec()));
        assert_eq!(e.get_local("a", "k"), Some(&b"1"[..]));
        assert_eq!(e.get_local("b", "k"), Some(&b"2"[..]));
        assert!(!e.set_local(&a, "big".into(), vec![0; MAX_LOCALS_BYTES]));
        // Replacing a value frees its old bytes.
        assert!(e.set_local(&a, "k".into(), vec![0; MAX_LOCALS_BYTES - 1]));
        assert!(e.set_local(&a, "k".into(), b"3".to_vec()));
        assert_eq!(e.get_local("a", "k"), Some(&b"3"[..]));
    }
}
