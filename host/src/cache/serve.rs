//! The proxy-facing side of the cache: one request on a caching route,
//! from lookup to the response the response filters will see.
//!
//! ```text
//! GET/HEAD ─▶ take If-None-Match / If-Modified-Since / Range / If-Range
//!          ─▶ key ─▶ variants ─▶ fresh?  ── yes ─▶ hit (Age, ttl)
//!                        │          stale ─▶ see `revalidate`
//!                        └─ none ─▶ coalesce ─▶ origin ─▶ admit (tee to store)
//!          ─▶ the whole 200 answers what was taken: 304, 206, 416 (`conditional`)
//! safe methods (OPTIONS, TRACE, …) ─▶ origin (fwd=method)
//! any other method ─▶ origin ─▶ 2xx/3xx: invalidate URL, Location, Content-Location
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_cache_semantics::{BeforeRequest, CachePolicy};

use super::conditional::{self, Asks};
use super::key;
use super::status::{CacheStatus, Fwd};
use super::store::CachedResponse;
use super::HttpCache;
use super::{flight::Join, policy, rfc};
use crate::body::{self, ProxyBody};
use crate::config::{CacheRule, SetCookiePolicy};
use crate::upstream::ForwardError;

/// What an origin fetch resolves to.
pub type OriginFuture =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ForwardError>> + Send>>;

/// The route's upstream as the cache sees it. `'static`, so a background
/// refresh can outlive the request that started it.
pub trait Origin: Send + Sync + 'static {
    /// The upstream's name (part of a variant's identity; error messages).
    fn upstream(&self) -> &str;
    /// Send this request (URI: path and query) to the upstream.
    fn fetch(self: Arc<Self>, req: Request<ProxyBody>) -> OriginFuture;
}

/// Builds the origin only when the request needs one (a hit does not).
pub type MakeOrigin<'a> = &'a (dyn Fn() -> Arc<dyn Origin> + Send + Sync);

/// One request on a caching route, with what the cache needs to serve it.
pub struct CacheRequest<'a> {
    /// The route's cache rule.
    pub rule: CacheRule,
    /// `http` or `https` (part of the key).
    pub scheme: &'static str,
    /// The upstream the request goes to (after the request filters).
    pub upstream: &'a str,
}

impl HttpCache {
    /// Serve `req` (its head after the request filters) on a caching route.
    /// The response is the stored one or the origin's (being stored as it
    /// streams), with `Cache-Status`; never an error.
    pub async fn serve(
        self: &Arc<Self>,
        cr: CacheRequest<'_>,
        req: Request<ProxyBody>,
        origin: MakeOrigin<'_>,
    ) -> Response<ProxyBody> {
        let method = req.method().clone();
        match method {
            Method::GET | Method::HEAD => {
                if http_body::Body::is_end_stream(req.body()) {
                    let (mut parts, _) = req.into_parts();
                    let asks = Asks::take(&mut parts.headers, &method);
                    let resp = self.lookup(&cr, parts, origin).await;
                    if asks.is_empty() {
                        resp
                    } else {
                        asks.answer(resp, cr.rule.max_object_bytes).await
                    }
                } else {
                    pass(
                        origin().fetch(req).await,
                        &cr,
                        CacheStatus::fwd(Fwd::Bypass),
                    )
                }
            }
            ref m if policy::is_safe(m) => pass(
                origin().fetch(req).await,
                &cr,
                CacheStatus::fwd(Fwd::Method),
            ),
            _ => self.unsafe_request(&cr, req, origin).await,
        }
    }

    /// The cache-hit fast path: a fresh stored answer to `parts` (a request
    /// on a caching route, `body_empty` if it has no body), worked out
    /// synchronously, so a hit builds no future, no origin and no boxed
    /// lookup. `None` for anything else (not a plain `GET`/`HEAD`, stale,
    /// missing): then [`Self::serve`] decides, looking the key up again.
    /// `parts` may come back with its unkeyed overrides removed and its URI
    /// in origin form, as `serve` would make them.
    pub fn try_hit(
        &self,
        cr: &CacheRequest<'_>,
        parts: &mut http::request::Parts,
        body_empty: bool,
    ) -> Option<Response<ProxyBody>> {
        let head = match parts.method {
            Method::GET => false,
            Method::HEAD => true,
            _ => return None,
        };
        if !body_empty || conditional::any(&parts.headers) {
            return None;
        }
        let key = prepare(cr.scheme, parts)?;
        // A HEAD is looked up as the GET it mirrors (see `lookup`).
        let found = if head {
            parts.method = Method::GET;
            let found = self.find(&key, cr.upstream, parts);
            parts.method = Method::HEAD;
            found
        } else {
            self.find(&key, cr.upstream, parts)
        };
        let Found::Fresh(fresh) = found else {
            return None;
        };
        // A disk entry not yet checked in this process: `lookup` checks it.
        if fresh.entry.body.disk().is_some_and(|d| !d.verified()) {
            return None;
        }
        self.stats.hit();
        let status = CacheStatus::hit(fresh.ttl());
        Some(fresh.respond(&parts.method, status))
    }

    /// GET or HEAD without a body: hit, stale or miss.
    async fn lookup(
        self: &Arc<Self>,
        cr: &CacheRequest<'_>,
        mut parts: http::request::Parts,
        origin: MakeOrigin<'_>,
    ) -> Response<ProxyBody> {
        let Some(key) = prepare(cr.scheme, &mut parts) else {
            let req = Request::from_parts(parts, body::empty());
            return pass(origin().fetch(req).await, cr, CacheStatus::fwd(Fwd::Bypass));
        };
        let key: Arc<str> = Arc::from(key);
        // Entries are GET responses; a HEAD is looked up as the GET it
        // mirrors and answered with the head only.
        let method = std::mem::replace(&mut parts.method, Method::GET);
        let mut found = self.find(&key, cr.upstream, &parts);
        // A disk entry's file is read through and checked before its first
        // hit in this process; a corrupt one is dropped (and the request
        // goes on as a miss).
        let unchecked = match &found {
            Found::Fresh(f) => f.entry.body.disk().filter(|d| !d.verified()).cloned(),
            Found::Stale(e, _) => e.body.disk().filter(|d| !d.verified()).cloned(),
            _ => None,
        };
        if let Some(d) = unchecked {
            if !d.verify().await {
                self.store.remove(&key);
                found = self.find(&key, cr.upstream, &parts);
            }
        }
        let fwd = match found {
            Found::Fresh(fresh) => {
                self.stats.hit();
                let status = CacheStatus::hit(fresh.ttl());
                return fresh.respond(&method, status);
            }
            Found::Stale(entry, conditional) => {
                return self
                    .stale(cr, key, entry, (parts, conditional), &method, origin)
                    .await
            }
            Found::Nothing => Fwd::UriMiss,
            Found::OtherVariants => Fwd::VaryMiss,
        };
        self.stats.miss();
        let status = CacheStatus::fwd(fwd);
        // A HEAD miss is only forwarded: its answer has no body to store.
        if method == Method::HEAD {
            parts.method = method;
            let req = Request::from_parts(parts, body::empty());
            return pass(origin().fetch(req).await, cr, status);
        }
        match self.flights.join(&key) {
            Join::Leader(guard) => {
                let origin = origin();
                self.fetch_and_admit(cr, key, parts, status, Some(guard), &origin)
                    .await
            }
            Join::Follower(wait) => {
                if wait.wait(self.settings.lock_timeout).await {
                    if let Found::Fresh(fresh) = self.find(&key, cr.upstream, &parts) {
                        let status = CacheStatus {
                            collapsed: true,
                            ..status
                        };
                        return fresh.respond(&method, status);
                    }
                }
                // The leader stored nothing this request can use: ask too.
                let origin = origin();
                self.fetch_and_admit(cr, key, parts, status, None, &origin)
                    .await
            }
        }
    }

    /// Look for a stored variant that can answer this request.
    fn find(&self, key: &str, upstream: &str, parts: &http::request::Parts) -> Found {
        let Some(variants) = self.variants(key) else {
            return Found::Nothing;
        };
        let now = SystemTime::now();
        // No cache directives of its own: a fresh entry may answer without
        // the policy's per-request work.
        let plain = !parts.headers.contains_key(header::CACHE_CONTROL)
            && !parts.headers.contains_key(header::PRAGMA);
        let mut stale = None;
        for entry in variants.iter() {
            if &*entry.upstream != upstream {
                continue;
            }
            if plain {
                if let Some(head) = entry.quick_hit(parts, now) {
                    return Found::Fresh(Fresh {
                        entry: entry.clone(),
                        head,
                        now,
                    });
                }
            }
            match entry.policy.before_request(parts, now) {
                BeforeRequest::Fresh(_) => {
                    return Found::Fresh(Fresh {
                        entry: entry.clone(),
                        head: entry.head_at(now),
                        now,
                    })
                }
                BeforeRequest::Stale {
                    request,
                    matches: true,
                } if stale.is_none() => stale = Some((entry.clone(), request)),
                BeforeRequest::Stale { .. } => {}
            }
        }
        match stale {
            Some((entry, request)) => Found::Stale(entry, request),
            None => Found::OtherVariants,
        }
    }

    /// Send `parts` to the origin and admit the answer (see [`Self::admit`]).
    pub(super) async fn fetch_and_admit(
        self: &Arc<Self>,
        cr: &CacheRequest<'_>,
        key: Arc<str>,
        parts: http::request::Parts,
        status: CacheStatus,
        guard: Option<super::flight::FlightGuard>,
        origin: &Arc<dyn Origin>,
    ) -> Response<ProxyBody> {
        let req = Request::from_parts(parts.clone(), body::empty());
        match origin.clone().fetch(req).await {
            Ok(resp) => self.admit(cr, key, &parts, resp, status, guard),
            Err(e) => with_status(crate::proxy::error_response(cr.upstream, &e), &status),
        }
    }

    /// Decide whether the origin's response to `req` is stored; if so, tee
    /// its body into the store while it streams to the client. The stored
    /// head has no hop-by-hop fields (nor, with `set_cookie = "strip"`,
    /// `Set-Cookie`); tag fields are kept by the store, not sent on.
    /// `guard` (the coalescing flight) ends when the body is stored or
    /// abandoned.
    pub(super) fn admit(
        self: &Arc<Self>,
        cr: &CacheRequest<'_>,
        key: Arc<str>,
        req: &http::request::Parts,
        resp: Response<ProxyBody>,
        mut status: CacheStatus,
        guard: Option<super::flight::FlightGuard>,
    ) -> Response<ProxyBody> {
        let (mut head, body) = resp.into_parts();
        crate::headers::remove_hop_by_hop(&mut head.headers);
        status.fwd_status = Some(head.status.as_u16());
        let now = SystemTime::now();
        let mut stored_head = head.clone();
        policy::take_tags(&mut head.headers);
        let storable = self.storable(cr, req, &mut stored_head, now);
        let length = head
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let limit = self.object_limit(cr.rule.max_object_bytes);
        if !storable {
            status.apply(&mut head.headers);
            return Response::from_parts(head, body);
        }
        if length.is_some_and(|n| n > limit) {
            status.detail = Some("too-big");
            status.apply(&mut head.headers);
            return Response::from_parts(head, body);
        }
        status.stored = true;
        status.apply(&mut head.headers);
        let cache = self.clone();
        let req = req.clone();
        let upstream: Arc<str> = Arc::from(cr.upstream);
        let on_complete = Box::new(move |bytes: bytes::Bytes| {
            stored_head.headers.remove(header::TRANSFER_ENCODING);
            stored_head
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            let rules = &cache.settings.rules;
            let entry = CachedResponse::new(req, stored_head, bytes, upstream, now, rules);
            cache.put(key, entry);
            drop(guard);
        });
        let tee = super::tee::TeeBody::new(body, limit, on_complete);
        let mut resp = Response::from_parts(head, body::boxed(tee));
        resp.extensions_mut().insert(super::tee::Storing);
        resp
    }

    /// May the origin's answer `head` to `req` be stored? `head` (the copy
    /// to store) loses its `Set-Cookie` under `set_cookie = "strip"`.
    fn storable(
        &self,
        cr: &CacheRequest<'_>,
        req: &http::request::Parts,
        head: &mut http::response::Parts,
        now: SystemTime,
    ) -> bool {
        if req.method != Method::GET
            || head.status.is_informational()
            || head.status == StatusCode::PARTIAL_CONTENT
            || policy::vary_star(&head.headers)
        {
            return false;
        }
        // Never share one client's cookie with another.
        if head.headers.contains_key(header::SET_COOKIE) {
            match cr.rule.set_cookie {
                SetCookiePolicy::Never => return false,
                SetCookiePolicy::Strip => {
                    head.headers.remove(header::SET_COOKIE);
                }
            }
        }
        let rules = &self.settings.rules;
        rules
            .view(head)
            .is_some_and(|view| CachePolicy::new_options(req, &view, now, rules.opts).is_storable())
    }

    /// An unsafe method (POST, PUT, DELETE, PATCH and any extension
    /// method): forward; a `2xx`/`3xx` answer invalidates the URL and the
    /// same-host `Location` / `Content-Location`.
    async fn unsafe_request(
        self: &Arc<Self>,
        cr: &CacheRequest<'_>,
        req: Request<ProxyBody>,
        origin: MakeOrigin<'_>,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let kept = parts.clone();
        let result = origin().fetch(Request::from_parts(parts, body)).await;
        if let Ok(resp) = &result {
            if resp.status().is_success() || resp.status().is_redirection() {
                for k in key::invalidated_keys(cr.scheme, &kept, resp.headers()) {
                    self.invalidate(&k);
                }
            }
        }
        pass(result, cr, CacheStatus::fwd(Fwd::Method))
    }
}

/// Ready a GET or HEAD for the store: its unkeyed overrides removed, its
/// `Cache-Control` and `Accept-*` normalised, its primary key (`None`
/// without a host), its URI in origin form.
fn prepare(scheme: &str, parts: &mut http::request::Parts) -> Option<String> {
    key::strip_unkeyed_overrides(&mut parts.headers);
    rfc::normalise_request(&mut parts.headers);
    policy::normalise_vary_fields(&mut parts.headers);
    let key = key::primary_key(scheme, parts)?;
    key::origin_form(parts);
    Some(key)
}

/// A fresh variant found for a request.
struct Fresh {
    entry: Arc<CachedResponse>,
    /// The head to send: the stored one, `Age` set.
    head: http::response::Parts,
    /// When it was found.
    now: SystemTime,
}

impl Fresh {
    /// Seconds of freshness left.
    fn ttl(&self) -> i64 {
        ttl_at(&self.entry, self.now)
    }

    fn respond(self, method: &Method, status: CacheStatus) -> Response<ProxyBody> {
        self.entry.respond_dated(self.head, method, status)
    }
}

/// What the store holds for a request.
enum Found {
    /// A fresh variant.
    Fresh(Fresh),
    /// A stale matching variant, and the conditional request to revalidate it.
    Stale(Arc<CachedResponse>, http::request::Parts),
    /// Nothing under this URL.
    Nothing,
    /// Variants under this URL, none for this request.
    OtherVariants,
}

/// Seconds of freshness left (negative once stale).
pub(super) fn ttl(entry: &CachedResponse) -> i64 {
    ttl_at(entry, SystemTime::now())
}

/// Seconds of freshness left at `now`.
fn ttl_at(entry: &CachedResponse, now: SystemTime) -> i64 {
    match entry.fresh_until.duration_since(now) {
        Ok(left) => left.as_secs() as i64,
        Err(past) => -(past.duration().as_secs() as i64),
    }
}

/// An origin result passed through as is, with `Cache-Status`.
pub(super) fn pass(
    result: Result<Response<ProxyBody>, ForwardError>,
    cr: &CacheRequest<'_>,
    mut status: CacheStatus,
) -> Response<ProxyBody> {
    match result {
        Ok(resp) => {
            status.fwd_status = Some(resp.status().as_u16());
            with_status(resp, &status)
        }
        Err(e) => with_status(crate::proxy::error_response(cr.upstream, &e), &status),
    }
}

/// Add `Cache-Status` to a response.
pub(super) fn with_status(
    mut resp: Response<ProxyBody>,
    status: &CacheStatus,
) -> Response<ProxyBody> {
    status.apply(resp.headers_mut());
    resp
}
