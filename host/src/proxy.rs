//! One request's journey through the proxy, top to bottom:
//!
//! 1. match a route (host, longest path prefix) — 404 if none;
//! 2. strip hop-by-hop headers; run the route's request filters in order
//!    (they may edit the head, answer locally, or pick the upstream);
//! 3. buffer the body only if a filter asked for it;
//! 4. on a caching route, the cache answers (hit) or goes on to step 5 for
//!    it (miss, revalidation; see `cache`);
//! 5. add `X-Forwarded-*` and `Via`; the balancer picks an endpoint and the
//!    pooled client sends the request (502 refused/broken, 504 slow);
//! 6. run the response filters in reverse over the filters that ran
//!    (local answers, errors and cache hits included); strip hop-by-hop; add `Via`;
//! 7. stream the body back (or pass a WebSocket through after `101`).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::{Either, FutureExt};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::balance::{self, Upstream};
use crate::body::{self, ProxyBody};
use crate::cache::{CacheRequest, HttpCache, Origin, OriginFuture};
use crate::config::CacheRule;
use crate::config::Config;
use crate::filter::chain::{Chain, RequestDecision};
use crate::filter::exchange::{self, Exchange, SharedExchange, TlsInfo};
use crate::filter::host_api::{RequestHead, ResponseHead};
use crate::filter::stream::{ChunkBody, LocalSlot};
use crate::filter::FilterRuntime;
use crate::headers;
use crate::protect::{self, body::LimitedBody, origin, Protection};
use crate::route::RouteTable;
use crate::upstream::{error_chain, ForwardError, UpstreamClient};

/// Everything a request needs that a config reload replaces, swapped whole.
pub struct Snapshot {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Routes in match order.
    pub routes: RouteTable,
    /// Upstreams by name (names come from the operator's config, so FxHash:
    /// no DoS-resistant hasher needed).
    pub upstreams: rustc_hash::FxHashMap<Arc<str>, Arc<Upstream>>,
    /// The HTTP cache (its store outlives reloads that keep its bounds).
    pub cache: Arc<HttpCache>,
    /// Metric handles per route index; the last one counts unrouted requests.
    route_metrics: Vec<RouteMetrics>,
    /// What the endpoints given by name resolved to (see [`balance::dns`]).
    pub dns: Arc<balance::dns::DnsTable>,
    /// Connection limits and rate-limit buckets (carried across reloads).
    pub protection: Protection,
    /// `[proxy] via`, rendered.
    pub via: headers::Via,
}

/// Metric handles of one route, registered once per snapshot so a request
/// only touches atomics.
struct RouteMetrics {
    by_class: [metrics::Counter; 5],
    latency: Arc<crate::hist::Histogram>,
    label: Arc<str>,
}

impl RouteMetrics {
    fn new(label: &str) -> RouteMetrics {
        let c = |class: &'static str| metrics::counter!("sluicegate_requests_total", "route" => label.to_string(), "status" => class);
        RouteMetrics {
            by_class: [c("1xx"), c("2xx"), c("3xx"), c("4xx"), c("5xx")],
            latency: crate::hist::histogram("sluicegate_request_seconds", "route", label),
            label: Arc::from(label),
        }
    }
}

impl Snapshot {
    /// Build the runtime view of a validated config. Endpoints that
    /// `previous` (the running snapshot, on a reload) also has keep their
    /// live balancing state: in-flight counts, latency, ejections.
    pub fn new(config: Config, previous: Option<&Snapshot>) -> anyhow::Result<Snapshot> {
        let dns = previous.map(|p| p.dns.clone()).unwrap_or_default();
        Snapshot::with_dns(config, previous, dns)
    }

    /// [`Snapshot::new`] with these DNS answers for endpoints given by name.
    pub fn with_dns(
        config: Config,
        previous: Option<&Snapshot>,
        dns: Arc<balance::dns::DnsTable>,
    ) -> anyhow::Result<Snapshot> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                let name = u.name.get_ref().as_str();
                let old = previous.and_then(|p| p.upstreams.get(name));
                Ok((
                    Arc::from(name),
                    Arc::new(Upstream::new(u, old.map(|o| &**o), &dns)?),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        let routes = RouteTable::new(&config);
        let mut labels = vec![String::new(); config.routes.len()];
        for r in routes.iter() {
            labels[r.index] = r.label.to_string();
        }
        labels.push("none".to_string());
        let route_metrics = labels.iter().map(|l| RouteMetrics::new(l)).collect();
        let cache = HttpCache::new(&config.cache, previous.map(|p| &*p.cache));
        let protection = Protection::new(&config, previous.map(|p| &p.protection));
        Ok(Snapshot {
            via: headers::Via::new(&config.proxy.via),
            routes,
            upstreams,
            cache: Arc::new(cache),
            route_metrics,
            protection,
            config: Arc::new(config),
            dns,
        })
    }
}

/// How the client reached us.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub client: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// SNI and ALPN, set once the TLS handshake is done (TLS listeners).
    pub tls: Option<Arc<std::sync::OnceLock<TlsInfo>>>,
}

/// The proxy as one worker thread sees it: the shared live snapshot and
/// filter runtime, and the worker's own upstream connection pool.
pub struct Proxy {
    /// The live configuration snapshot, shared by every worker.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// This worker's pooled upstream client.
    pub client: UpstreamClient,
    /// The filter runtime (present when `[filters] dir` is set).
    pub filters: Option<Arc<FilterRuntime>>,
}

impl Proxy {
    /// Serve one request. Never fails: errors become 4xx/5xx responses.
    ///
    /// Not an `async fn`: the head's bookkeeping runs here, and the
    /// returned future is the journey's future and what its answer needs,
    /// not the request and connection it was made from (an `async fn`
    /// keeps its parameters' room for its whole life).
    pub fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        let started = Instant::now();
        // Kept from the client when valid, else made; it goes upstream and
        // into the access log.
        exchange::ensure_request_id(req.headers_mut());
        let mut log = crate::access_log::begin(&req, &conn);
        // gRPC: its deadline, its failures as gRPC statuses (see `grpc`).
        let grpc = crate::grpc::GrpcCall::begin(&mut req);
        // `[tracing]`: the request's span, carried on in its extensions
        // (`None`, and nothing done, when tracing is off).
        let trace = crate::telemetry::begin(&mut req, conn.client.ip());
        let snap = self.snapshot.load_full();
        // What follows the journey is synchronous: a `map`, not an `async`
        // block, which would hold the journey future twice (as its capture
        // and as the awaited future).
        self.journey(snap.clone(), req, conn)
            .map(move |(mut resp, route)| {
                if let Some(call) = &grpc {
                    resp = call.shape(resp, route.is_none());
                }
                let status = resp.status().as_u16();
                let class = (status / 100).clamp(1, 5) as usize - 1;
                let m = route
                    .and_then(|i| snap.route_metrics.get(i))
                    .or(snap.route_metrics.last());
                if let Some(m) = m {
                    m.by_class[class].increment(1);
                    m.latency.record(started.elapsed());
                    if let Some(t) = trace {
                        if let Some(entry) = log.as_mut() {
                            entry.trace_id = Some(t.trace_id());
                        }
                        t.finish(&resp, &m.label);
                    }
                    match (&grpc, log.take()) {
                        // A gRPC call is logged when it ends, with its status.
                        (Some(call), entry) => resp = call.watch(resp, m.label.clone(), entry),
                        (None, Some(entry)) => entry.finish(&resp, &m.label),
                        (None, None) => {}
                    }
                }
                crate::status::count_response(class);
                resp
            })
    }

    async fn journey(
        self: Arc<Self>,
        snap: Arc<Snapshot>,
        mut req: Request<Incoming>,
        conn: ConnInfo,
    ) -> (Response<ProxyBody>, Option<usize>) {
        let host = request_host(&req);
        let Some(route) = snap.routes.find(host, req.uri().path()) else {
            tracing::info!(
                host = host.unwrap_or("-"),
                path = req.uri().path(),
                "no route"
            );
            return (
                body::text_response(StatusCode::NOT_FOUND, "no route for this host and path"),
                None,
            );
        };
        let label = Some(route.index);
        let version = req.version();
        let limit = protect::body_limit(&snap.config, route.index);
        let refused = match snap
            .protection
            .check_rate(route.index, req.headers(), conn.client.ip())
            .await
        {
            Some(resp) => Some(resp),
            None => protect::check_content_length(req.headers(), version, limit),
        };
        if let Some(resp) = refused {
            return (resp, label);
        }
        let upgrade = headers::upgrade_request(req.headers());
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, incoming) = req.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        let mut head = RequestHead {
            parts,
            client: conn.client,
            scheme: conn.scheme,
        };

        let chain = match (&self.filters, route.filters.is_empty()) {
            (Some(rt), false) => Some(Chain::resolve(
                &rt.current(),
                &route.filters,
                &snap.config.filters,
            )),
            _ => None,
        };
        let mut ran = 0;
        let mut target = route.upstream.clone();
        let (limited, verdict) = LimitedBody::new(incoming, limit);
        let mut req_body = body::boxed(limited);
        // A 0.2 filter on the route: the request gets its exchange.
        let ex: Option<SharedExchange> = match &chain {
            Some(c) if c.has_v2() => Some(
                Exchange::new(
                    // Set by `handle` (the id travels in the head, not in
                    // this future: every request's future stays small).
                    head.parts
                        .headers
                        .get(&exchange::X_REQUEST_ID)
                        .cloned()
                        .unwrap_or_else(exchange::new_request_id),
                    route.label.clone(),
                    target.clone(),
                    version,
                    conn.client,
                    conn.tls.as_ref().and_then(|t| t.get().cloned()),
                    Instant::now(),
                )
                .shared(),
            ),
            _ => None,
        };
        let mut slot: Option<LocalSlot> = None;
        let mut bytes_in = None;
        if let Some(chain) = &chain {
            let exists = |name: &str| snap.upstreams.contains_key(name);
            // Boxed: only filtered requests carry the chain's future.
            let (decision, n) = Box::pin(chain.on_request(&mut head, &exists, ex.as_ref())).await;
            ran = n;
            let grpc = head
                .parts
                .extensions
                .get::<crate::grpc::GrpcCall>()
                .is_some();
            if grpc && (chain.wants_request_body() || chain.wants_response_body(ran)) {
                return (crate::grpc::body_phase_refused(&route.label), label);
            }
            match decision {
                RequestDecision::Respond(resp) => {
                    return (
                        self.finish_opt(Some(chain), ran, head, resp, ex.as_ref(), None)
                            .await,
                        label,
                    )
                }
                RequestDecision::Forward {
                    upstream: Some(name),
                } => {
                    target = Arc::from(name.as_str());
                    if let Some(ex) = &ex {
                        ex.lock().upstream = target.clone();
                    }
                }
                RequestDecision::Forward { upstream: None } => {}
            }
            if chain.wants_request_body() {
                // Boxed, as the request phase: the body phases' futures
                // are only carried by the requests that have them.
                match Box::pin(self.filter_request_body(chain, &mut head, req_body, ex.as_ref()))
                    .await
                {
                    Ok(b) => req_body = b,
                    Err(resp) => {
                        return (
                            self.finish_opt(Some(chain), ran, head, resp, ex.as_ref(), None)
                                .await,
                            label,
                        )
                    }
                }
            }
            if let Some(ex) = &ex {
                let filters = chain.request_chunk_filters();
                if !filters.is_empty() {
                    // The filters may change the length: what goes upstream
                    // is framed by the body alone (chunked).
                    head.parts.headers.remove(header::CONTENT_LENGTH);
                    let s = LocalSlot::default();
                    let streamed =
                        ChunkBody::request(req_body, filters.into(), ex.clone(), s.clone());
                    req_body = body::boxed(streamed);
                    slot = Some(s);
                }
                if !chain.log_filters(ran).is_empty() {
                    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
                    req_body = body::boxed(crate::filter::stream::Counted::new(
                        req_body,
                        counter.clone(),
                    ));
                    bytes_in = Some(counter);
                }
                head.parts.extensions.insert(crate::upstream::WantAnswer);
            }
        }

        let Some(upstream) = snap.upstreams.get(&target) else {
            let resp = body::text_response(StatusCode::BAD_GATEWAY, "upstream not configured");
            return (
                self.finish_opt(chain.as_ref(), ran, head, resp, ex.as_ref(), bytes_in)
                    .await,
                label,
            );
        };
        // The host the client used, for rewriting an origin's redirects.
        let public_host = head.parts.headers.get(header::HOST).cloned().or_else(|| {
            let authority = head.parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        // The head goes upstream; a copy is kept only if a response phase
        // will read it (a chain of request-only filters, such as auth or a
        // rate limit, never does).
        let mut parts = match &chain {
            Some(c) if c.reads_request_in_response(ran) => head.parts.clone(),
            _ => std::mem::replace(&mut head.parts, http::Request::new(()).into_parts().0),
        };
        let cache_rule = snap
            .config
            .routes
            .get(route.index)
            .and_then(|r| r.cache_rule(&snap.config.cache));
        // A fresh hit is answered here, without a future; its stored head
        // has no hop-by-hop fields to remove.
        let mut from_store = false;
        let resp = match cache_rule {
            Some(rule) if upgrade.is_none() => {
                let cr = CacheRequest {
                    rule,
                    scheme: head.scheme,
                    upstream: &upstream.name,
                };
                let body_empty = http_body::Body::is_end_stream(&req_body);
                let span = crate::telemetry::cache_span(&parts.extensions);
                let hit = snap.cache.try_hit(&cr, &mut parts, body_empty);
                crate::telemetry::cache_done(span, hit.is_some());
                match hit {
                    Some(hit) => {
                        from_store = true;
                        Ok(hit)
                    }
                    // Boxed: the cache path's future is twice the plain
                    // path's, and every request's future (moved to the heap
                    // by the server) would carry its size (5 KB of memcpy
                    // per plain request).
                    None => Ok(Box::pin(
                        self.through_cache(&snap, rule, upstream, parts, &head, req_body),
                    )
                    .await),
                }
            }
            // Boxed too: every layer above would otherwise carry (and copy
            // as it is built) the client's future.
            _ => {
                Box::pin(self.forward(&snap, upstream, parts, &head, req_body, upgrade.clone()))
                    .await
            }
        };
        let resp = match (resp, client_upgrade) {
            (Ok(mut resp), Some(on_client)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                tunnel(hyper::upgrade::on(&mut resp), on_client);
                let (parts, _) = resp.into_parts();
                let mut out = Response::from_parts(parts, body::empty());
                headers::add_via(out.headers_mut(), Version::HTTP_11, &snap.via);
                return (out, label);
            }
            (Err(_), _) if verdict.too_large() => protect::too_large(version),
            (Err(_), _) if verdict.broken() => protect::bad_body(version),
            (Ok(resp), _) => {
                let (mut parts, b) = resp.into_parts();
                if !from_store {
                    headers::remove_hop_by_hop(&mut parts.headers);
                }
                let is_endpoint = |authority: &str| {
                    let eps = upstream.endpoints.as_slice();
                    eps.iter()
                        .any(|e| origin::same_authority(authority, &e.addr))
                };
                origin::hide_origin(
                    &mut parts.headers,
                    is_endpoint,
                    public_host.as_ref().and_then(|h| h.to_str().ok()),
                    conn.scheme,
                    &snap.protection.hidden_headers,
                );
                headers::add_via(&mut parts.headers, parts.version, &snap.via);
                Response::from_parts(parts, b)
            }
            (Err(e), _) => error_response(&upstream.name, &e),
        };
        // A request-chunk filter that answered locally stopped the upload:
        // its answer replaces whatever the upstream said.
        let mut resp = match slot.and_then(|s| s.lock().take()) {
            Some(local) => local,
            None => resp,
        };
        if crate::access_log::enabled() {
            let name = crate::access_log::UpstreamName(upstream.name.clone());
            resp.extensions_mut().insert(name);
        }
        (
            self.finish_opt(chain.as_ref(), ran, head, resp, ex.as_ref(), bytes_in)
                .await,
            label,
        )
    }

    /// Add the forwarding headers and send the request upstream. Not an
    /// `async fn`: the headers are written now and the client's own future
    /// is returned, so no wrapper future (and no copy of it) is added.
    fn forward<'a>(
        &'a self,
        snap: &'a Snapshot,
        upstream: &'a Upstream,
        parts: http::request::Parts,
        head: &RequestHead,
        body: ProxyBody,
        upgrade: Option<HeaderValue>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ForwardError>> + Send + 'a {
        let from = (head.client.ip(), head.scheme);
        send_upstream(
            &self.client,
            upstream,
            &snap.via,
            from,
            parts,
            body,
            upgrade,
        )
    }

    /// A caching route: the cache answers, asking the upstream only when
    /// it must (the origin is built only then).
    async fn through_cache(
        &self,
        snap: &Snapshot,
        rule: CacheRule,
        upstream: &Arc<Upstream>,
        parts: http::request::Parts,
        head: &RequestHead,
        body: ProxyBody,
    ) -> Response<ProxyBody> {
        let origin = || -> Arc<dyn Origin> {
            Arc::new(UpstreamOrigin {
                client: self.client.clone(),
                upstream: upstream.clone(),
                via: snap.via.clone(),
                from: (head.client.ip(), head.scheme),
            })
        };
        let cr = CacheRequest {
            rule,
            scheme: head.scheme,
            upstream: &upstream.name,
        };
        let req = Request::from_parts(parts, body);
        snap.cache.serve(cr, req, &origin).await
    }

    /// Buffer the request body (up to the limit) and run the body phase.
    async fn filter_request_body(
        &self,
        chain: &Chain,
        head: &mut RequestHead,
        body: ProxyBody,
        ex: Option<&SharedExchange>,
    ) -> Result<ProxyBody, Response<ProxyBody>> {
        let limit = chain.max_body_bytes;
        let bytes = collect_limited(body, limit).await.map_err(|status| {
            body::text_response(status, "request body too large for the filter")
        })?;
        let bytes = chain.on_request_body(head, bytes, ex).await?;
        set_length(&mut head.parts.headers, bytes.len());
        Ok(body::full(bytes))
    }

    /// The response phases when filters ran, else the response as it is.
    /// Boxed when there is work: the plain path then carries (and copies,
    /// level by level) no filter future.
    fn finish_opt<'a>(
        &'a self,
        chain: Option<&'a Chain>,
        ran: usize,
        head: RequestHead,
        resp: Response<ProxyBody>,
        ex: Option<&'a SharedExchange>,
        bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'a {
        match chain {
            Some(c) if ran > 0 => {
                Either::Left(Box::pin(self.finish(c, ran, head, resp, ex, bytes_in)))
            }
            _ => Either::Right(std::future::ready(resp)),
        }
    }

    /// Run the response phases over the `ran` (> 0) filters that ran; only
    /// [`Proxy::finish_opt`] calls it.
    async fn finish(
        &self,
        chain: &Chain,
        ran: usize,
        mut req: RequestHead,
        resp: Response<ProxyBody>,
        ex: Option<&SharedExchange>,
        bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
    ) -> Response<ProxyBody> {
        let (parts, mut body) = resp.into_parts();
        let mut head = ResponseHead { parts };
        if let Some(ex) = ex {
            let mut ex = ex.lock();
            ex.answer = Some(crate::upstream::answer_of(&head.parts));
            // Deferred edits first: the response phases see them.
            ex.apply_deferred(&mut head.parts.headers);
        }
        if let Some(replaced) = chain.on_response(ran, &mut req, &mut head, ex).await {
            body = replaced;
        }
        if chain.wants_response_body(ran) {
            let limit = chain.max_body_bytes;
            let bytes = match collect_limited(body, limit).await {
                Ok(b) => b,
                Err(_) => {
                    return body::text_response(
                        StatusCode::BAD_GATEWAY,
                        "response body too large for the filter",
                    )
                }
            };
            let bytes = chain
                .on_response_body(ran, &mut req, &mut head, bytes, ex)
                .await;
            set_length(&mut head.parts.headers, bytes.len());
            body = body::full(bytes);
        }
        if let Some(ex) = ex {
            let filters = chain.response_chunk_filters(ran);
            if !filters.is_empty() {
                head.parts.headers.remove(header::CONTENT_LENGTH);
                match ChunkBody::response(body, filters.into(), ex.clone())
                    .prime()
                    .await
                {
                    Ok(streamed) => body = body::boxed(streamed),
                    Err(local) => {
                        let (parts, b) = local.into_parts();
                        head.parts = parts;
                        body = b;
                    }
                }
            }
            let logs = chain.log_filters(ran);
            if !logs.is_empty() {
                let status = head.parts.status.as_u16();
                body = body::boxed(crate::filter::stream::LogBody::new(
                    body,
                    logs,
                    ex.clone(),
                    status,
                    bytes_in,
                ));
            }
        }
        protect::normalise_response_framing(&mut head.parts.headers, &body);
        Response::from_parts(head.parts, body)
    }
}

/// Add the forwarding headers (`from`: the client's address and scheme)
/// and send the request to an endpoint of `upstream`. The headers are
/// written before the first poll; the future is the client's own.
fn send_upstream<'a>(
    client: &'a UpstreamClient,
    upstream: &'a Upstream,
    via: &headers::Via,
    from: (IpAddr, &str),
    mut parts: http::request::Parts,
    body: ProxyBody,
    upgrade: Option<HeaderValue>,
) -> impl Future<Output = Result<Response<ProxyBody>, ForwardError>> + Send + 'a {
    let key = upstream
        .hash_key
        .as_ref()
        .and_then(|k| balance::request_key(k, &parts.headers, parts.uri.path(), from.0));
    // Filters may have written framing or connection headers: what goes
    // upstream is framed by the body alone.
    protect::normalise_request_framing(&mut parts.headers, &body);
    // Room for the four names added below, at once: hyper sizes a parsed
    // head's map for the fields it came with, and growing it name by name
    // rebuilds its index more than once.
    parts.headers.reserve(4);
    let host = match parts.headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => {
            let h = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
            if let Some(h) = &h {
                parts.headers.insert(header::HOST, h.clone());
            }
            h
        }
    };
    headers::add_forwarded(&mut parts.headers, from.0, from.1, host.as_ref());
    headers::add_via(&mut parts.headers, parts.version, via);
    if let Some(proto) = upgrade {
        parts.headers.insert(header::UPGRADE, proto);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    parts.version = Version::HTTP_11;
    client.forward(upstream, Request::from_parts(parts, body), key)
}

/// The route's upstream as the cache's origin: owned, so a background
/// refresh can outlive the request.
struct UpstreamOrigin {
    client: UpstreamClient,
    upstream: Arc<Upstream>,
    via: headers::Via,
    from: (IpAddr, &'static str),
}

impl Origin for UpstreamOrigin {
    fn upstream(&self) -> &str {
        &self.upstream.name
    }

    fn fetch(self: Arc<Self>, req: Request<ProxyBody>) -> OriginFuture {
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let o = &*self;
            send_upstream(&o.client, &o.upstream, &o.via, o.from, parts, body, None).await
        })
    }
}

/// Collect a body up to `limit` bytes: 413 past it, 400 if it breaks.
async fn collect_limited(mut body: ProxyBody, limit: usize) -> Result<Bytes, StatusCode> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| StatusCode::BAD_REQUEST)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(StatusCode::PAYLOAD_TOO_LARGE);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn set_length(headers: &mut http::HeaderMap, len: usize) {
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

/// The host the client asked for: `:authority` / absolute URI, else `Host`.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.host()),
        None => req.headers().get(header::HOST)?.to_str().ok(),
    }
}

/// 502 or 504, with a log line giving the reason.
pub(crate) fn error_response(upstream: &str, e: &ForwardError) -> Response<ProxyBody> {
    tracing::warn!(upstream, error = %e, "upstream request failed");
    use crate::grpc::code;
    let grpc = match e {
        ForwardError::Timeout { .. } => code::DEADLINE_EXCEEDED,
        _ => code::UNAVAILABLE,
    };
    let mut resp = match e {
        ForwardError::Timeout { .. } => {
            body::text_response(StatusCode::GATEWAY_TIMEOUT, "upstream timed out")
        }
        ForwardError::Connect { .. } => {
            body::text_response(StatusCode::BAD_GATEWAY, "upstream unavailable")
        }
        ForwardError::Broken { .. } => {
            body::text_response(StatusCode::BAD_GATEWAY, "upstream connection failed")
        }
        ForwardError::Overloaded { .. } => {
            body::text_response(StatusCode::SERVICE_UNAVAILABLE, "upstream overloaded")
        }
    };
    // For a gRPC call, the status this failure stands for.
    resp.extensions_mut()
        .insert(crate::grpc::ProxyFailure(grpc));
    resp
}

/// After both sides switched protocols, copy bytes both ways until either
/// side closes.
fn tunnel(upstream: hyper::upgrade::OnUpgrade, client: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (up, down) = match tokio::try_join!(upstream, client) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "upgrade failed");
                return;
            }
        };
        let mut up = hyper_util::rt::TokioIo::new(up);
        let mut down = hyper_util::rt::TokioIo::new(down);
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            tracing::debug!(error = %e, "tunnel closed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, from the fn alone.
    fn size3<F: FnOnce(A, B, C) -> R, A, B, C, R>(_: F) -> usize {
        std::mem::size_of::<R>()
    }
    fn size4<F: FnOnce(A, B, C, D) -> R, A, B, C, D, R>(_: F) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every request's future is built on the stack and copied as it is
    /// awaited at each level (and once more to the heap by the server), so
    /// its size is paid per request. Rare paths (connecting, the cache,
    /// admission) are boxed to keep it small; this catches a regression.
    #[test]
    fn the_request_future_stays_small() {
        let handle = size3(Proxy::handle);
        let journey = size4(Proxy::journey);
        let forward = size4(UpstreamClient::forward);
        eprintln!("future sizes: handle {handle}, journey {journey}, forward {forward}");
        // 6,200 bytes before the rare paths were boxed.
        assert!(handle <= 3072, "the request future grew to {handle} bytes");
    }
}
