//! The pooled upstream client: sends a request to an endpoint of an
//! upstream chosen by its balancer, retrying on other endpoints when that
//! is safe, and reports each attempt's outcome to the balancer.
//!
//! Plain-HTTP requests go through this worker's own keep-alive [`pool`],
//! whose connections are driven by the request that uses them. TLS
//! upstreams and upgrade (WebSocket) requests go through hyper-util's
//! pooled client. HTTP/2 upstreams (`protocol = "h2"` or `"h2c"`) go
//! through the process-wide multiplexed [`h2`] pool.

pub mod h2;
mod pool;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use std::collections::HashMap;
use std::sync::Arc;

use crate::balance::limits::{RetryTicket, Slot};
use crate::balance::{InFlight, Upstream};
use crate::body::{self, ProxyBody};
use crate::config::{Config, MAX_RETRIES};
use crate::tls::UpstreamTls;

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No endpoint accepted a connection.
    #[error("connect to {endpoint} failed: {reason}")]
    Connect {
        /// The last endpoint tried.
        endpoint: String,
        /// The connect error.
        reason: String,
    },
    /// The response head did not arrive in time.
    #[error("no response from {endpoint} within {ms} ms")]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The configured limit.
        ms: u64,
    },
    /// The connection broke or the response was malformed.
    #[error("upstream {endpoint} failed: {reason}")]
    Broken {
        /// The endpoint.
        endpoint: String,
        /// What hyper said.
        reason: String,
    },
    /// `[upstream.limits]`: every slot busy and the queue full or too slow.
    #[error("upstream {upstream} over its limits ({reason})")]
    Overloaded {
        /// The upstream.
        upstream: String,
        /// `max_pending` or `pending_timeout`.
        reason: &'static str,
    },
}

/// A pooled client that speaks TLS to its endpoints.
type TlsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

/// A request extension: record [`Answered`] on the response.
#[derive(Debug, Clone, Copy)]
pub struct WantAnswer;

/// A response extension: which endpoint answered, after how many attempts
/// and how long (set when the request carried [`WantAnswer`]).
#[derive(Debug, Clone)]
pub struct Answered {
    /// The endpoint's address.
    pub endpoint: Arc<str>,
    /// Attempts made.
    pub attempts: u32,
    /// From sending to the response head.
    pub latency: std::time::Duration,
}

/// What a response head says of its answer, for the exchange: the
/// endpoint (none for a local answer or a cache hit) and the cache's
/// verdict from its `Cache-Status` member.
pub fn answer_of(parts: &http::response::Parts) -> crate::filter::exchange::Answer {
    let cache_hit = parts
        .headers
        .get_all(crate::cache::status::CACHE_STATUS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find(|m| m.trim_start().starts_with("sluicegate"))
        .map(|m| m.split(';').any(|p| p.trim() == "hit"));
    let answered = parts.extensions.get::<Answered>();
    crate::filter::exchange::Answer {
        endpoint: answered.map(|a| a.endpoint.clone()),
        latency: answered.map(|a| a.latency).unwrap_or_default(),
        attempts: answered.map(|a| a.attempts).unwrap_or(0),
        cache_hit,
    }
}

/// The upstream client of one worker, with a keep-alive pool per endpoint.
#[derive(Clone)]
pub struct UpstreamClient {
    /// Plain HTTP/1.1, driven inline (see [`pool`]).
    pool: pool::Pool,
    /// Plain upgrade requests (the connection becomes a tunnel).
    client: Client<HttpConnector, ProxyBody>,
    response_timeout: Duration,
    connect_timeout: Duration,
    idle_per_host: usize,
    idle_timeout: Duration,
    /// One client per `[upstream.tls]` version, made on first use (no I/O:
    /// the TLS config was built with the snapshot).
    tls: Arc<parking_lot::Mutex<HashMap<u64, TlsClient>>>,
}

impl UpstreamClient {
    /// A client configured from `[proxy]`.
    pub fn new(config: &Config) -> UpstreamClient {
        let t = &config.proxy.timeouts;
        let connect_timeout = Duration::from_millis(t.connect_ms);
        let idle_per_host = config.proxy.limits.upstream_idle_per_host;
        let idle_timeout = Duration::from_millis(t.upstream_idle_ms);
        let connector = http_connector(connect_timeout, true);
        UpstreamClient {
            pool: pool::Pool::new(idle_per_host, connect_timeout, idle_timeout),
            client: pooled(idle_per_host, idle_timeout).build(connector),
            idle_timeout,
            response_timeout: Duration::from_millis(t.upstream_response_ms),
            connect_timeout,
            idle_per_host,
            tls: Arc::default(),
        }
    }

    /// The TLS client for `tls` (made once per worker and TLS version).
    fn tls_client(&self, tls: &UpstreamTls) -> TlsClient {
        let mut map = self.tls.lock();
        if let Some(c) = map.get(&tls.id) {
            return c.clone();
        }
        // Old versions (before a reload) are dropped once there are many.
        if map.len() >= 64 {
            map.clear();
        }
        let connector = tls.connector(http_connector(self.connect_timeout, false));
        let client = pooled(self.idle_per_host, self.idle_timeout).build(connector);
        map.insert(tls.id, client.clone());
        client
    }

    /// Send `req` (whose URI holds only the path and query) to an endpoint
    /// of `upstream` chosen by its balancer (`key`: the consistent-hash key).
    ///
    /// Up to `retries` more attempts follow, each on an endpoint not tried
    /// yet, but only for a request without a body (a body may have reached
    /// the upstream and cannot be replayed): after a failed connect always,
    /// and after a `502`/`503`/`504` or a broken connection only for
    /// idempotent methods. A timeout is not retried. Retries also need the
    /// upstream's retry budget; with `[upstream.limits]`, the request first
    /// waits for a slot (503 when the queue is full or the wait too long).
    pub async fn forward(
        &self,
        upstream: &Upstream,
        req: Request<ProxyBody>,
        key: Option<u64>,
    ) -> Result<Response<ProxyBody>, ForwardError> {
        let replayable = http_body::Body::is_end_stream(req.body());
        // A 0.2 filter's response and log phases read what answered.
        let want_answer = req.extensions().get::<WantAnswer>().is_some();
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        );
        let mut slot = match &upstream.admission {
            // Boxed (only upstreams with limits wait here): the wait
            // would otherwise add its size to every request's future.
            Some(a) => match Box::pin(a.admit()).await {
                Ok(slot) => Some(slot),
                Err(o) => {
                    metrics::counter!("sluicegate_upstream_overflow_total",
                        "upstream" => upstream.name.to_string(), "reason" => o.label())
                    .increment(1);
                    return Err(ForwardError::Overloaded {
                        upstream: upstream.name.to_string(),
                        reason: o.label(),
                    });
                }
            },
            None => None,
        };
        let mut _ticket = None;
        // gRPC: `grpc-timeout` is the deadline for the response head too.
        let response_timeout = req
            .extensions()
            .get::<crate::grpc::GrpcCall>()
            .and_then(crate::grpc::GrpcCall::remaining)
            .unwrap_or(self.response_timeout);
        let http2 = upstream.protocol.is_http2();
        // The inline pool for plain HTTP; an upgrade needs hyper-util's
        // client, which hands the connection over to the tunnel.
        let inline =
            !http2 && upstream.tls.is_none() && !req.headers().contains_key(header::UPGRADE);
        // Each attempt goes to an endpoint not tried yet: with one endpoint
        // there is no retry, and no copy of the head to keep for one.
        let others = upstream.endpoints.len().saturating_sub(1);
        let attempts = 1 + upstream.retries.min(MAX_RETRIES).min(others);
        let mut tried = [0usize; MAX_RETRIES + 1];
        let (parts, body) = req.into_parts();
        // HTTP/2: the body is kept (while small) so that a stream the
        // upstream refused, or a failed connect, can be sent again.
        let (mut body, replay) = match http2 {
            true => (None, Some(h2::Replayable::new(body))),
            false => (Some(body), None),
        };
        let mut parts = Some(parts);
        let mut last: Option<Result<Response<ProxyBody>, ForwardError>> = None;
        for attempt in 0..attempts {
            let Some(i) = upstream.pick(key, &tried[..attempt]) else {
                break;
            };
            tried[attempt] = i;
            let (Some(endpoint), Some(guard)) = (upstream.endpoint(i), upstream.begin(i)) else {
                break;
            };
            let may_retry = (replayable || replay.is_some()) && attempt + 1 < attempts;
            // Keep a copy of the head only while another attempt may follow.
            let this = match (may_retry, parts.as_ref()) {
                (true, Some(p)) => p.clone(),
                _ => match parts.take() {
                    Some(p) => p,
                    None => break,
                },
            };
            let this_body = match &replay {
                Some(r) => match r.reader() {
                    Some(b) => b,
                    // Too much of the body went to the last attempt.
                    None => break,
                },
                None => body.take().unwrap_or_else(body::empty),
            };
            let mut req = Request::from_parts(this, this_body);
            // `[tracing]`: this attempt's span, named upstream in `traceparent`.
            let span =
                crate::telemetry::attempt_span(&mut req, &upstream.name, &endpoint.addr, attempt);
            let started = Instant::now();
            let sent = async {
                if let Some(replay) = &replay {
                    let scheme = if upstream.tls.is_some() {
                        "https"
                    } else {
                        "http"
                    };
                    h2_head(&mut req, scheme, &endpoint.authority);
                    let target = h2::Target {
                        addr: &endpoint.addr,
                        host: endpoint.authority.host(),
                        tls: upstream.tls.as_ref(),
                        settings: &upstream.http2,
                        connect_timeout: self.connect_timeout,
                    };
                    // Boxed: the pool's future is large, and only HTTP/2
                    // requests should carry it.
                    let sent = Box::pin(h2::H2Pool::global().send(&target, req, replay));
                    let (resp, stream) = sent.await?;
                    return Ok((resp, None, Some(stream)));
                }
                if inline {
                    *req.uri_mut() = origin_form(req.uri());
                    let (resp, conn) = self.pool.send(&endpoint.addr, req).await?;
                    let lease = pool::Lease::new(conn, self.pool.clone(), endpoint.addr.clone());
                    return Ok((resp, Some(lease), None));
                }
                let scheme = if upstream.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                *req.uri_mut() = endpoint_uri(scheme, &endpoint.authority, req.uri());
                let sent = match &upstream.tls {
                    Some(tls) => self.tls_client(tls).request(req).await,
                    None => self.client.request(req).await,
                };
                match sent {
                    Ok(resp) => Ok((resp, None, None)),
                    Err(e) if e.is_connect() => Err(Failed::Connect(error_chain(&e))),
                    Err(e) => Err(Failed::Broken(error_chain(&e))),
                }
            };
            // Pinned in place: `timeout` then holds a reference, and the
            // attempt's future is not copied into it.
            let sent = std::pin::pin!(sent);
            let result = tokio::time::timeout(response_timeout, sent).await;
            let rtt = started.elapsed();
            upstream.latency.record(rtt);
            let failure = match result {
                Ok(Ok((resp, lease, stream))) => {
                    let status = resp.status();
                    upstream.record(i, Some(status), rtt);
                    let again = matches!(status.as_u16(), 502..=504) && idempotent && may_retry;
                    let ticket = if again { retry_ticket(upstream) } else { None };
                    crate::telemetry::attempt_done(span, Ok(status.as_u16()), ticket.is_some());
                    let resp = resp.map(|b| {
                        body::boxed(Tracked {
                            inner: b,
                            lease,
                            _stream: stream,
                            _guard: guard,
                            _slot: if ticket.is_none() { slot.take() } else { None },
                        })
                    });
                    if ticket.is_none() {
                        let mut resp = resp;
                        if want_answer {
                            resp.extensions_mut().insert(Answered {
                                endpoint: endpoint.addr.clone(),
                                attempts: attempt as u32 + 1,
                                latency: rtt,
                            });
                        }
                        return Ok(resp);
                    }
                    _ticket = ticket;
                    tracing::info!(upstream = %upstream.name, endpoint = %endpoint.addr, %status, "retrying on another endpoint");
                    last = Some(Ok(resp));
                    continue;
                }
                Ok(Err(Failed::Connect(reason))) => {
                    tracing::warn!(upstream = %upstream.name, endpoint = %endpoint.addr, error = %reason, "upstream connect failed");
                    let err = ForwardError::Connect {
                        endpoint: endpoint.addr.to_string(),
                        reason,
                    };
                    (err, may_retry)
                }
                Ok(Err(Failed::Refused(reason))) => {
                    tracing::info!(upstream = %upstream.name, endpoint = %endpoint.addr, error = %reason, "upstream refused the stream");
                    let err = ForwardError::Connect {
                        endpoint: endpoint.addr.to_string(),
                        reason: format!("stream refused: {reason}"),
                    };
                    (err, may_retry)
                }
                Ok(Err(Failed::Broken(reason))) => {
                    let err = ForwardError::Broken {
                        endpoint: endpoint.addr.to_string(),
                        reason,
                    };
                    (err, may_retry && idempotent)
                }
                Err(_) => {
                    let err = ForwardError::Timeout {
                        endpoint: endpoint.addr.to_string(),
                        ms: response_timeout.as_millis() as u64,
                    };
                    (err, false)
                }
            };
            upstream.record(i, None, rtt);
            let (err, again) = failure;
            let ticket = if again { retry_ticket(upstream) } else { None };
            crate::telemetry::attempt_done(
                span,
                Err(&err as &dyn std::fmt::Display),
                ticket.is_some(),
            );
            if ticket.is_none() {
                return Err(err);
            }
            _ticket = ticket;
            tracing::info!(upstream = %upstream.name, error = %err, "retrying on another endpoint");
            last = Some(Err(err));
        }
        last.unwrap_or(Err(ForwardError::Connect {
            endpoint: upstream.name.to_string(),
            reason: "no endpoint".into(),
        }))
    }
}

/// Why one attempt got no response head.
#[derive(Debug)]
enum Failed {
    /// No connection (always safe to retry elsewhere).
    Connect(String),
    /// The connection broke or the response was malformed.
    Broken(String),
    /// HTTP/2: the upstream refused the stream and never processed it
    /// (as safe to retry elsewhere as a failed connect).
    Refused(String),
}

/// A retry, if the upstream's retry budget allows one now.
fn retry_ticket(upstream: &Upstream) -> Option<RetryTicket> {
    let ticket = upstream.retry_budget.try_retry(upstream.in_flight());
    if ticket.is_none() {
        metrics::counter!("sluicegate_upstream_retry_budget_exhausted_total",
            "upstream" => upstream.name.to_string())
        .increment(1);
        tracing::info!(upstream = %upstream.name, "retry budget exhausted; not retrying");
    }
    ticket
}

/// An upstream response body that keeps its endpoint's in-flight count
/// (and the upstream slot, with `[upstream.limits]`) until it ends or is
/// dropped. From the inline pool, it also drives its connection, and
/// returns it to the pool once the body has ended.
struct Tracked {
    // Dropped before the lease: hyper then sees the body's reader gone.
    inner: Incoming,
    lease: Option<pool::Lease>,
    /// HTTP/2: the stream's place on its connection.
    _stream: Option<h2::StreamGuard>,
    _guard: InFlight,
    _slot: Option<Slot>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // hyper's server stops reading a body whose length it has written.
        if http_body::Body::is_end_stream(&self.inner) {
            if let Some(lease) = self.lease.as_mut() {
                lease.ended();
            }
        }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(lease) = this.lease.as_mut() {
            // The connection first, so what it reads reaches the body.
            lease.drive(cx);
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Poll::Ready(None), Some(lease)) = (&frame, this.lease.as_mut()) {
            lease.ended();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A TCP connector with the proxy's settings (`plain_only`: refuse
/// `https` URIs; the TLS connector wraps one that allows them).
fn http_connector(connect_timeout: Duration, plain_only: bool) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.enforce_http(plain_only);
    connector
}

/// A client builder with the pool settings shared by plain and TLS clients.
fn pooled(idle_per_host: usize, idle: Duration) -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle)
        .pool_max_idle_per_host(idle_per_host)
        .set_host(false);
    b
}

/// `<scheme>://<endpoint><path-and-query>`.
fn endpoint_uri(scheme: &str, authority: &http::uri::Authority, original: &Uri) -> Uri {
    let pq = original.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Uri::builder()
        .scheme(scheme)
        .authority(authority.clone())
        .path_and_query(pq)
        .build()
        .unwrap_or_else(|_| Uri::from_static("/"))
}

/// An HTTP/2 request head: `:authority` is the client's `Host` (else the
/// endpoint), which leaves the fields; a gRPC call says it takes trailers.
fn h2_head(req: &mut Request<ProxyBody>, scheme: &str, endpoint: &http::uri::Authority) {
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| endpoint.clone());
    *req.uri_mut() = endpoint_uri(scheme, &authority, req.uri());
    *req.version_mut() = http::Version::HTTP_2;
    if crate::grpc::is_grpc(req.headers()) {
        req.headers_mut()
            .insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// The path and query of `uri` alone (what goes on an HTTP/1.1 request
/// line to an origin).
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(_) if uri.scheme().is_none() && uri.authority().is_none() => uri.clone(),
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

/// An error and its sources, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}
