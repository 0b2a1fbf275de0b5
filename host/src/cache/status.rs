//! The `Cache-Status` response header (RFC 9211): what the cache did with
//! this request, one list member named `sluicegate`, appended after any
//! member an upstream cache added.

use std::fmt::Write;

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// `cache-status`.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Why a request was forwarded (the `fwd` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    /// Configured or defined not to use the cache (e.g. `Range`, a body).
    Bypass,
    /// The method is not cacheable.
    Method,
    /// Nothing stored for this URL.
    UriMiss,
    /// Stored for this URL, but no variant matches the request's `Vary` headers.
    VaryMiss,
    /// A stored response was stale and had to be revalidated.
    Stale,
    /// The request itself asked to skip the store (e.g. `no-cache`).
    Request,
}

impl Fwd {
    fn as_str(self) -> &'static str {
        match self {
            Fwd::Bypass => "bypass",
            Fwd::Method => "method",
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Stale => "stale",
            Fwd::Request => "request",
        }
    }
}

/// One `Cache-Status` member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStatus {
    /// Served from the store without going to the origin.
    pub hit: bool,
    /// Went to the origin, and why.
    pub fwd: Option<Fwd>,
    /// The status the origin answered with.
    pub fwd_status: Option<u16>,
    /// Remaining freshness in seconds (negative: stale).
    pub ttl: Option<i64>,
    /// The origin's response was stored.
    pub stored: bool,
    /// This request waited for another one's forward.
    pub collapsed: bool,
    /// Extra detail: `stale-while-revalidate`, `stale-if-error`, `too-big`, …
    pub detail: Option<&'static str>,
}

impl CacheStatus {
    /// A hit with this much freshness left.
    pub fn hit(ttl: i64) -> CacheStatus {
        CacheStatus {
            hit: true,
            ttl: Some(ttl),
            ..CacheStatus::default()
        }
    }

    /// Forwarded for this reason.
    pub fn fwd(fwd: Fwd) -> CacheStatus {
        CacheStatus {
            fwd: Some(fwd),
            ..CacheStatus::default()
        }
    }

    /// The member's text, e.g. `sluicegate; fwd=uri-miss; fwd-status=200; stored`.
    pub fn render(&self) -> String {
        let mut s = String::from("sluicegate");
        if self.hit {
            s.push_str("; hit");
        }
        if let Some(f) = self.fwd {
            let _ = write!(s, "; fwd={}", f.as_str());
        }
        if let Some(st) = self.fwd_status {
            let _ = write!(s, "; fwd-status={st}");
        }
        if let Some(t) = self.ttl {
            let _ = write!(s, "; ttl={t}");
        }
        if self.stored {
            s.push_str("; stored");
        }
        if self.collapsed {
            s.push_str("; collapsed");
        }
        if let Some(d) = self.detail {
            let _ = write!(s, "; detail={d}");
        }
        s
    }

    /// Append this member to the response's `Cache-Status`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let ours = self.render();
        let value = match headers.get(&CACHE_STATUS).and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ours}"),
            _ => ours,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(CACHE_STATUS, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc_9211_members() {
        assert_eq!(CacheStatus::hit(42).render(), "sluicegate; hit; ttl=42");
        let s = CacheStatus {
            fwd: Some(Fwd::Stale),
            fwd_status: Some(304),
            stored: true,
            ..CacheStatus::default()
        };
        assert_eq!(s.render(), "sluicegate; fwd=stale; fwd-status=304; stored");
        let mut h = HeaderMap::new();
        h.insert(CACHE_STATUS, HeaderValue::from_static("origin-cdn; hit"));
        CacheStatus::fwd(Fwd::Method).apply(&mut h);
        assert_eq!(h[CACHE_STATUS], "origin-cdn; hit, sluicegate; fwd=method");
    }
}
