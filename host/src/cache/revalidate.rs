//! A stale entry: serve it at once and refresh in the background
//! (stale-while-revalidate), or revalidate it with a conditional request
//! (`If-None-Match` / `If-Modified-Since`, merged on `304`), serving it
//! stale if the origin fails (stale-if-error).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_cache_semantics::AfterResponse;

use super::flight::{FlightGuard, Join};
use super::serve::{ttl, with_status, CacheRequest, MakeOrigin, Origin};
use super::status::{CacheStatus, Fwd};
use super::store::CachedResponse;
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
                http_cache_semantics::BeforeRequest::Fresh(head) => {
                    let status = CacheStatus {
                        collapsed: true,
                        fwd_status: Some(304),
                        ..CacheStatus::fwd(Fwd::Stale)
                    };
                    Some(e.respond(head, method, status))
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
                let now = SystemTime::now();
                match entry.policy.after_response(&conditional, &head, now) {
                    AfterResponse::NotModified(policy, merged) => {
                        let date = head.headers.get(http::header::DATE).cloned();
                        let refreshed = entry.refreshed(policy, merged, date);
                        self.put(key, refreshed.clone());
                        drop(guard);
                        status.fwd_status = Some(304);
                        status.stored = true;
                        status.ttl = Some(ttl(&refreshed));
                        (refreshed.respond_stale(&Method::GET, status), true)
                    }
                    AfterResponse::Modified(..) => {
                        // The 304 does not match what we hold: drop it and
                        // ask again without validators.
                        self.invalidate(&key);
                        let r = self
                            .fetch_and_admit(cr, key, parts, status, guard, origin)
                            .await;
                        (r, true)
                    }
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

/// Read a body to its end (so a tee stores it), discarding it.
async fn drain(mut body: ProxyBody) {
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
}
