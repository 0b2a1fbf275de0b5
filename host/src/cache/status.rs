//! The `Cache-Status` response header (RFC 9211): what the cache did with
//! this request, one list member named `sluicegate`, appended after any
//! member an upstream cache added.

use http::header::{Entry, HeaderMap, HeaderName, HeaderValue};

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
    /// Built by pushing pieces (no formatting machinery): a hit renders it
    /// on every request.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(48);
        s.push_str("sluicegate");
        if self.hit {
            s.push_str("; hit");
        }
        if let Some(f) = self.fwd {
            s.push_str("; fwd=");
            s.push_str(f.as_str());
        }
        let mut num = itoa::Buffer::new();
        if let Some(st) = self.fwd_status {
            s.push_str("; fwd-status=");
            s.push_str(num.format(st));
        }
        if let Some(t) = self.ttl {
            s.push_str("; ttl=");
            s.push_str(num.format(t));
        }
        if self.stored {
            s.push_str("; stored");
        }
        if self.collapsed {
            s.push_str("; collapsed");
        }
        if let Some(d) = self.detail {
            s.push_str("; detail=");
            s.push_str(d);
        }
        s
    }

    /// Append this member to the response's `Cache-Status` (one lookup).
    pub fn apply(&self, headers: &mut HeaderMap) {
        let ours = self.render();
        match headers.entry(CACHE_STATUS) {
            Entry::Occupied(mut e) => {
                let value = match e.get().to_str() {
                    Ok(prev) if !prev.trim().is_empty() => format!("{prev}, {ours}"),
                    _ => ours,
                };
                if let Ok(v) = HeaderValue::try_from(value) {
                    e.insert(v);
                }
            }
            Entry::Vacant(e) => {
                if let Ok(v) = HeaderValue::try_from(ours) {
                    e.insert(v);
                }
            }
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
        let mut h = HeaderMap::new();
        h.insert(CACHE_STATUS, HeaderValue::from_static(" "));
        CacheStatus::hit(-3).apply(&mut h);
        assert_eq!(h[CACHE_STATUS], "sluicegate; hit; ttl=-3");
        let all = CacheStatus {
            hit: false,
            fwd: Some(Fwd::UriMiss),
            fwd_status: Some(200),
            ttl: Some(60),
            stored: true,
            collapsed: true,
            detail: Some("too-big"),
        };
        assert_eq!(
            all.render(),
            "sluicegate; fwd=uri-miss; fwd-status=200; ttl=60; stored; collapsed; detail=too-big"
        );
    }
}
