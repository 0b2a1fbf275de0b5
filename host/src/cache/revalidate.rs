//! A stale entry: serve it at once and refresh in the background
//! (stale-while-revalidate), or revalidate it with a conditional request
//! (`If-None-Match` / `If-Modified-Since`, merged on `304`), serving it
//! stale if the origin fails (stale-if-error).
//!
//! A `304` is matched to the entry and merged here, not by the crate
//! (RFC 9111 §4.3.4, §3.2; see [`selects`] and [`merge_304`]): the crate
//! took a `304` without a validator for a changed resource, dropped the
//! entry and asked the origin again without validators, so the origin saw
//! two requests where one was due.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};

use super::flight::{FlightGuard, Join};
use super::serve::{ttl, with_status, CacheRequest, MakeOrigin, Origin};
use super::status::{CacheStatus, Fwd};
use super::store::CachedResponse;
use super::tee::drain;
use super::{policy, HttpCache};
use crate::body::{self, ProxyBody};
use crate::config::CacheRule;

impl HttpCache {
    /// A matching stored variant is stale. `conditional` is the request
    /// with the entry's validators added.
    pub(super) async fn stale(
        self: &Arc<Self>,
        cr: &CacheRequest<'_>,
        key: Arc<str>,
        entry: Arc<CachedResponse>,
        (parts, conditional): (http::request::Parts, http::request::Parts),
        method: &Method,
        origin: MakeOrigin<'_>,
    ) -> Response<ProxyBody> {
        // `parts` and `conditional` are GETs even for a HEAD, so a changed
        // answer can be stored; the HEAD gets its head.
        let windows = Windows::of(&entry, &cr.rule);
        let stale_for = stale_for(&entry);
        // A request that asked for a fresh answer (`no-cache`) is never
        // served stale, and says so in `Cache-Status` (`fwd=request`).
        let wants_fresh = policy::request_wants_fresh(&parts.headers);
        if !wants_fresh && windows.while_revalidate.is_some_and(|w| stale_for <= w) {
            // Serve now; one background refresh per key at a time.
            if let Some(guard) = self.flights.try_lead(&key) {
                let cache = self.clone();
                let origin = origin();
                let (entry, rule) = (entry.clone(), cr.rule);
                tokio::spawn(async move {
                    cache
                        .refresh(rule, key, entry, parts, conditional, guard, origin)
                        .await
                });
            }
            self.stats.stale();
            let status = CacheStatus {
                detail: Some("stale-while-revalidate"),
                ..CacheStatus::hit(ttl(&entry))
            };
            return entry.respond_stale(method, status);
        }
        let guard = match self.flights.join(&key) {
            Join::Leader(g) => Some(g),
            Join::Follower(wait) => {
                if wait.wait(self.settings.lock_timeout).await {
                    if let Some(resp) = self.fresh_after_wait(cr, &key, &parts, method) {
                        return resp;
                    }
                }
                None
            }
        };
        let origin = origin();
        let fwd = if wants_fresh {
            Fwd::Request
        } else {
            Fwd::Stale
        };
        let (resp, _) = self
            .revalidate(cr, key, &entry, (parts, conditional), fwd, guard, &origin)
            .await;
        if *method == Method::HEAD {
            // Drain the GET's body in the background so it can be stored.
            let (head, body) = resp.into_parts();
            tokio::spawn(drain(body));
            return Response::from_parts(head, body::empty());
        }
        resp
    }

    /// After waiting for another request's revalidation: the fresh entry.
    fn fresh_after_wait(
        &self,
        cr: &CacheRequest<'_>,
        key: &str,
        parts: &http::request::Parts,
        method: &Method,
    ) -> Option<Response<ProxyBody>> {
        let variants = self.store.get(key)?;
        let now = SystemTime::now();
        variants.iter().find_map(|e| {
            if &*e.upstream != cr.upstream {
                return None;
            }
            match e.policy.before_request(parts, now) {
                http_cache_semantics::BeforeRequest::Fresh(_) => {
                    let status = CacheStatus {
                        collapsed: true,
                        fwd_status: Some(304),
                        ..CacheStatus::fwd(Fwd::Stale)
                    };
                    Some(e.respond_dated(e.head_at(now), method, status))
                }
                _ => None,
            }
        })
    }

    /// Stale-while-revalidate's background refresh: revalidate and drain
    /// the answer so a changed response is stored in full.
    #[allow(clippy::too_many_arguments)]
    async fn refresh(
        self: Arc<Self>,
        rule: CacheRule,
        key: Arc<str>,
        entry: Arc<CachedResponse>,
        parts: http::request::Parts,
        conditional: http::request::Parts,
        guard: FlightGuard,
        origin: Arc<dyn Origin>,
    ) {
        let upstream = origin.upstream().to_string();
        let cr = CacheRequest {
            rule,
            scheme: "",
            upstream: &upstream,
        };
        let (resp, _) = self
            .revalidate(
                &cr,
                key,
                &entry,
                (parts, conditional),
                Fwd::Stale,
                Some(guard),
                &origin,
            )
            .await;
        drain(resp.into_body()).await;
    }

    /// Send the conditional request: `304` refreshes the entry (headers
    /// merged, body kept), another answer replaces it, a failure serves it
    /// stale within stale-if-error. True in the second slot when the
    /// origin's answer was used.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn revalidate(
        self: &Arc<Self>,
        cr: &CacheRequest<'_>,
        key: Arc<str>,
        entry: &Arc<CachedResponse>,
        (parts, conditional): (http::request::Parts, http::request::Parts),
        fwd: Fwd,
        guard: Option<FlightGuard>,
        origin: &Arc<dyn Origin>,
    ) -> (Response<ProxyBody>, bool) {
        self.stats.revalidation();
        let windows = Windows::of(entry, &cr.rule);
        let stale_for = stale_for(entry);
        let may_serve_stale = windows.if_error.is_some_and(|w| stale_for <= w);
        let req = Request::from_parts(conditional.clone(), body::empty());
        let result = origin.clone().fetch(req).await;
        let mut status = CacheStatus::fwd(fwd);
        match result {
            Ok(resp) if resp.status() == StatusCode::NOT_MODIFIED => {
                let (head, _) = resp.into_parts();
                if selects(&entry.head.headers, &head.headers) {
                    let merged = merge_304(&entry.head, &head);
                    let refreshed = entry.refreshed(&parts, merged, &self.settings.rules);
                    self.put(key, refreshed.clone());
                    drop(guard);
                    status.fwd_status = Some(304);
                    status.stored = true;
                    status.ttl = Some(ttl(&refreshed));
                    (refreshed.respond_stale(&Method::GET, status), true)
                } else {
                    // The 304 names another representation than the one
                    // we hold: drop ours and ask again without validators.
                    self.invalidate(&key);
                    let r = self
                        .fetch_and_admit(cr, key, parts, status, guard, origin)
                        .await;
                    (r, true)
                }
            }
            Ok(resp) if resp.status().is_server_error() && may_serve_stale => {
                self.stats.stale();
                status.fwd_status = Some(resp.status().as_u16());
                status.detail = Some("stale-if-error");
                status.ttl = Some(ttl(entry));
                (entry.respond_stale(&Method::GET, status), false)
            }
            Ok(resp) => (self.admit(cr, key, &parts, resp, status, guard), true),
            Err(_) if may_serve_stale => {
                self.stats.stale();
                status.detail = Some("stale-if-error");
                status.ttl = Some(ttl(entry));
                (entry.respond_stale(&Method::GET, status), false)
            }
            Err(e) => {
                let resp = crate::proxy::error_response(cr.upstream, &e);
                (with_status(resp, &status), true)
            }
        }
    }
}

/// How long past its freshness an entry may still be served.
struct Windows {
    while_revalidate: Option<Duration>,
    if_error: Option<Duration>,
}

impl Windows {
    /// The response's own directives, else the route's defaults; none when
    /// the response forbids serving it stale.
    fn of(entry: &CachedResponse, rule: &CacheRule) -> Windows {
        if entry.stale.never_stale {
            return Windows {
                while_revalidate: None,
                if_error: None,
            };
        }
        let or_rule =
            |own: Option<Duration>, dflt: Duration| own.or((!dflt.is_zero()).then_some(dflt));
        Windows {
            while_revalidate: or_rule(entry.stale.while_revalidate, rule.stale_while_revalidate),
            if_error: or_rule(entry.stale.if_error, rule.stale_if_error),
        }
    }
}

/// How long the entry has been stale.
fn stale_for(entry: &CachedResponse) -> Duration {
    SystemTime::now()
        .duration_since(entry.fresh_until)
        .unwrap_or_default()
}

/// Does a `304` (its fields `fresh`) select the stored response (`stored`)
/// we revalidated (RFC 9111 §4.3.4)? A strong `ETag` must equal the stored
/// one, a weak one match it weakly; without an `ETag`, a `Last-Modified`
/// must equal the stored one. A `304` with no validator at all answers the
/// conditional request we built from this very entry's validators, so it
/// selects it.
pub fn selects(stored: &HeaderMap, fresh: &HeaderMap) -> bool {
    let get = |h: &HeaderMap, n: header::HeaderName| {
        h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string)
    };
    if let Some(tag) = get(fresh, header::ETAG) {
        let Some(ours) = get(stored, header::ETAG) else {
            return false;
        };
        return if tag.starts_with("W/") {
            super::conditional::weak_eq(&tag, &ours)
        } else {
            super::conditional::strong_eq(&tag, &ours)
        };
    }
    if let Some(lm) = fresh.get(header::LAST_MODIFIED) {
        let ours = stored
            .get(header::LAST_MODIFIED)
            .and_then(super::rfc::parse_date);
        return ours.is_some() && ours == super::rfc::parse_date(lm);
    }
    true
}

/// The stored head updated by a `304` (RFC 9111 §3.2): every field the
/// `304` carries replaces the stored one, except the framing and content
/// fields that describe the stored body (`Content-Length`,
/// `Content-Encoding`, `Content-Range`, `Transfer-Encoding`) and hop-by-hop
/// fields. The stored status stays.
pub fn merge_304(
    stored: &http::response::Parts,
    not_modified: &http::response::Parts,
) -> http::response::Parts {
    let mut merged = stored.clone();
    let mut fresh = not_modified.headers.clone();
    crate::headers::remove_hop_by_hop(&mut fresh);
    for name in [
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::CONTENT_RANGE,
        header::TRANSFER_ENCODING,
    ] {
        fresh.remove(name);
    }
    for name in fresh.keys() {
        merged.headers.remove(name);
    }
    for (name, value) in fresh.iter() {
        merged.headers.append(name, value.clone());
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

    #[test]
    fn a_304_selects_by_validator_or_without_one() {
        let stored = h(&[("etag", "\"v1\""), ("last-modified", LM)]);
        assert!(selects(&stored, &h(&[])), "no validator: ours");
        assert!(selects(&stored, &h(&[("etag", "\"v1\"")])));
        assert!(selects(&stored, &h(&[("etag", "W/\"v1\"")])));
        assert!(!selects(&stored, &h(&[("etag", "\"v2\"")])));
        assert!(selects(&stored, &h(&[("last-modified", LM)])));
        assert!(!selects(
            &stored,
            &h(&[("last-modified", "Mon, 07 Nov 1994 08:49:37 GMT")])
        ));
        assert!(!selects(
            &h(&[("etag", "W/\"v1\"")]),
            &h(&[("etag", "\"v1\"")])
        ));
        assert!(!selects(&h(&[]), &h(&[("etag", "\"v1\"")])));
    }

    #[test]
    fn a_304_updates_all_but_the_body_fields() {
        let mut b = Response::builder()
            .status(203)
            .header("cache-control", "max-age=1")
            .header("content-length", "5")
            .header("x-a", "old");
        b = b
            .header("x-keep", "1")
            .header("set", "a")
            .header("set", "b");
        let stored = b.body(()).unwrap().into_parts().0;
        let nm = Response::builder()
            .status(304)
            .header("cache-control", "max-age=60")
            .header("content-length", "0")
            .header("x-a", "new")
            .header("set", "c")
            .header("connection", "close")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let m = merge_304(&stored, &nm);
        assert_eq!(m.status, 203);
        assert_eq!(m.headers["cache-control"], "max-age=60");
        assert_eq!(m.headers["content-length"], "5");
        assert_eq!(m.headers["x-a"], "new");
        assert_eq!(m.headers["x-keep"], "1");
        assert_eq!(m.headers.get_all("set").iter().collect::<Vec<_>>(), ["c"]);
        assert!(!m.headers.contains_key("connection"));
    }
}
