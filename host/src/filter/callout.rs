//! Outbound calls from filters (`upstream-client.call`, contract 0.2's
//! world `callout-filter`) and the budget that bounds them.
//!
//! A callout is a request like any other to an upstream of the proxy's
//! config: it goes through [`UpstreamClient::forward`], so the upstream's
//! balancer, health (ejected endpoints are skipped), limits
//! (`[upstream.limits]`) and retries apply. What a filter may do is
//! checked first, before anything is sent:
//!
//! 1. the upstream must be in the filter's `callouts` grant (else
//!    `not-allowed`), and defined in the live config (else
//!    `unknown-upstream`);
//! 2. the request's callout budget (calls, body bytes, wall time; per
//!    filter per request, or per tick) must not be spent (else
//!    `budget-exhausted`);
//! 3. the request must be well formed (else `invalid-request`).
//!
//! The call is then bounded by its timeout (the smaller of the filter's
//! `timeout-ms`, the policy's `callout_timeout_ms` and what is left of the
//! wall-time budget) and its response body by `callout_max_response_bytes`.
//!
//! A filter waiting on a callout holds no thread: the guest runs as a
//! wasmtime async call on its worker (see `instance`), and the host import
//! is an `async` function, so the worker serves other connections until
//! the answer comes. Waiting is not CPU: the CPU deadline (`timeout_ms`) is
//! measured inside the call's polls only (`compute::Metered`).

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request};
use http_body_util::BodyExt;

use crate::body;
use crate::config::{CalloutLimits, UpstreamGrant};
use crate::filter::bindings_v2_callout::sluicegate::filter::upstream_client::{
    CallError, IncomingResponse, OutgoingRequest,
};
use crate::proxy::Snapshot;
use crate::upstream::{error_chain, UpstreamClient};

/// What the proxy lends the filter runtime for callouts: the live
/// snapshot (upstreams by name). Set once the proxy is up; until then
/// (and in `sluicegate filter`) calls answer `unavailable`.
pub struct CalloutService {
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl CalloutService {
    /// Callouts to the upstreams of `snapshot`.
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>) -> CalloutService {
        CalloutService { snapshot }
    }
}

thread_local! {
    /// Each thread's callout client (its own keep-alive pool), made on
    /// first use: workers never share connections, as for proxied requests.
    static CLIENT: RefCell<Option<UpstreamClient>> = const { RefCell::new(None) };
}

fn client(snap: &Snapshot) -> UpstreamClient {
    CLIENT.with(|c| {
        c.borrow_mut()
            .get_or_insert_with(|| UpstreamClient::new(&snap.config))
            .clone()
    })
}

/// What a filter's callouts have used so far on one request (or tick).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    /// Calls made (sent or attempted).
    pub calls: u64,
    /// Body bytes sent and received.
    pub bytes: u64,
    /// Time spent waiting on answers.
    pub wall: Duration,
}

/// Hop-by-hop fields a filter may not send (RFC 9110 §7.6.1), and the
/// ones the host sets itself.
const DROPPED: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "proxy-authorization",
];

/// The label of a call's outcome in `sluicegate_filter_callouts_total`.
fn outcome(r: &Result<IncomingResponse, CallError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(CallError::NotAllowed) => "not_allowed",
        Err(CallError::UnknownUpstream) => "unknown_upstream",
        Err(CallError::Timeout) => "timeout",
        Err(CallError::BudgetExhausted) => "budget_exhausted",
        Err(CallError::TooLarge) => "too_large",
        Err(CallError::Unavailable(_)) => "unavailable",
        Err(CallError::InvalidRequest(_)) => "invalid_request",
    }
}

/// One call, from the filter `filter` with its grant and limits, charged
/// to `spent`. Counted and timed per filter and upstream.
pub async fn call(
    service: Option<Arc<CalloutService>>,
    filter: &str,
    grant: &UpstreamGrant,
    limits: CalloutLimits,
    spent: &mut Spent,
    upstream: String,
    request: OutgoingRequest,
) -> Result<IncomingResponse, CallError> {
    let started = Instant::now();
    let result = attempt(service, grant, limits, spent, &upstream, request).await;
    let label = outcome(&result);
    if !matches!(
        label,
        "not_allowed" | "unknown_upstream" | "invalid_request"
    ) {
        metrics::histogram!("sluicegate_filter_callout_seconds",
            "filter" => filter.to_string(), "upstream" => upstream.clone())
        .record(started.elapsed().as_secs_f64());
    }
    match &result {
        Err(CallError::NotAllowed) => {
            tracing::warn!(
                filter,
                upstream,
                "callout refused: the upstream is not in the filter's callouts grant"
            );
        }
        Err(e @ (CallError::Unavailable(_) | CallError::Timeout | CallError::TooLarge)) => {
            tracing::debug!(filter, upstream, error = ?e, "callout failed");
        }
        _ => {}
    }
    metrics::counter!("sluicegate_filter_callouts_total",
        "filter" => filter.to_string(), "upstream" => upstream, "result" => label)
    .increment(1);
    result
}

async fn attempt(
    service: Option<Arc<CalloutService>>,
    grant: &UpstreamGrant,
    limits: CalloutLimits,
    spent: &mut Spent,
    upstream: &str,
    request: OutgoingRequest,
) -> Result<IncomingResponse, CallError> {
    if !grant.allows(upstream) {
        return Err(CallError::NotAllowed);
    }
    let Some(service) = service else {
        return Err(CallError::Unavailable(
            "callouts are not available here (no proxy is running)".into(),
        ));
    };
    let snap = service.snapshot.load_full();
    let Some(up) = snap.upstreams.get(upstream).cloned() else {
        return Err(CallError::UnknownUpstream);
    };
    let wall_budget = Duration::from_millis(limits.max_wall_ms);
    let sent_bytes = request.body.len() as u64;
    if spent.calls >= limits.max_calls
        || spent.wall >= wall_budget
        || spent.bytes.saturating_add(sent_bytes) > limits.max_bytes
    {
        return Err(CallError::BudgetExhausted);
    }
    let timeout = Duration::from_millis(
        request
            .timeout_ms
            .map_or(limits.timeout_ms, |t| u64::from(t).min(limits.timeout_ms)),
    )
    .min(wall_budget - spent.wall);
    let req = build(upstream, request).map_err(CallError::InvalidRequest)?;
    // The call is charged once it is sent, whatever its outcome.
    spent.calls += 1;
    spent.bytes += sent_bytes;
    let left = limits.max_bytes.saturating_sub(spent.bytes);
    let body_limit = limits.max_response_bytes.min(left);
    let client = client(&snap);
    let started = Instant::now();
    let answer = tokio::time::timeout(timeout, async {
        let resp = client
            .forward(&up, req, None)
            .await
            .map_err(|e| CallError::Unavailable(error_chain(&e)))?;
        let (parts, mut body) = resp.into_parts();
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                CallError::Unavailable(format!("the response body broke: {}", error_chain(&*e)))
            })?;
            if let Ok(data) = frame.into_data() {
                if (buf.len() + data.len()) as u64 > body_limit {
                    return Err(match body_limit == limits.max_response_bytes {
                        true => CallError::TooLarge,
                        false => CallError::BudgetExhausted,
                    });
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(IncomingResponse {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
            body: buf.to_vec(),
        })
    })
    .await;
    spent.wall += started.elapsed();
    let answer = answer.map_err(|_| CallError::Timeout)?;
    if let Ok(r) = &answer {
        spent.bytes += r.body.len() as u64;
    }
    answer
}

/// The request a filter described, checked; `host` is the upstream's name
/// unless the filter set one.
fn build(upstream: &str, r: OutgoingRequest) -> Result<Request<body::ProxyBody>, String> {
    let method = Method::from_bytes(r.method.as_bytes())
        .map_err(|_| format!("{:?} is not a method", r.method))?;
    if !r.path.starts_with('/') {
        return Err(format!("the path {:?} does not start with '/'", r.path));
    }
    let uri: http::Uri = r
        .path
        .parse()
        .map_err(|_| format!("{:?} is not a valid path", r.path))?;
    let mut builder = Request::builder().method(method.clone()).uri(uri);
    let headers = builder
        .headers_mut()
        .ok_or_else(|| "the request head is invalid".to_string())?;
    for (name, value) in r.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not a header name"))?;
        if DROPPED.contains(&name.as_str()) {
            continue;
        }
        let value = HeaderValue::from_bytes(&value)
            .map_err(|_| format!("the value of {name} is not a valid header value"))?;
        headers.append(name, value);
    }
    if !headers.contains_key(header::HOST) {
        let host = HeaderValue::from_str(upstream)
            .map_err(|_| format!("{upstream:?} cannot be a host"))?;
        headers.insert(header::HOST, host);
    }
    if !r.body.is_empty() || matches!(method, Method::POST | Method::PUT | Method::PATCH) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(r.body.len()));
    }
    let body = match r.body.is_empty() {
        true => body::empty(),
        false => body::full(Bytes::from(r.body)),
    };
    builder.body(body).map_err(|e| e.to_string())
}

/// The smallest tick interval a filter may ask for.
pub const MIN_TICK_MS: u32 = 100;

impl crate::filter::bindings_v2_callout::sluicegate::filter::upstream_client::Host
    for crate::filter::host_api::HostState
{
    async fn call(
        &mut self,
        upstream: String,
        request: OutgoingRequest,
    ) -> wasmtime::Result<Result<IncomingResponse, CallError>> {
        if !self.callout.enabled {
            let why = match self.callout.initializing {
                true => "callouts are not allowed during init (use a tick)",
                false => "callouts are not allowed here (a shadow version)",
            };
            return Ok(Err(CallError::Unavailable(why.into())));
        }
        let service = self.callout.service.load_full();
        let limits = self.callout.limits;
        let mut spent = self.callout.spent;
        let result = call(
            service,
            &self.ctx.name,
            &self.grants.callouts,
            limits,
            &mut spent,
            upstream,
            request,
        )
        .await;
        self.callout.spent = spent;
        Ok(result)
    }
}

impl crate::filter::bindings_v2_callout::sluicegate::filter::timer::Host
    for crate::filter::host_api::HostState
{
    fn request_tick(&mut self, interval_ms: u32) -> wasmtime::Result<Result<(), String>> {
        if !self.callout.initializing {
            return Ok(Err("request-tick is only allowed during init".into()));
        }
        if interval_ms < MIN_TICK_MS {
            return Ok(Err(format!(
                "a tick interval of {interval_ms} ms is below the minimum of {MIN_TICK_MS} ms"
            )));
        }
        self.callout.tick_ms = Some(interval_ms);
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, headers: Vec<(&str, &[u8])>) -> OutgoingRequest {
        OutgoingRequest {
            method: method.into(),
            path: path.into(),
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            body: vec![],
            timeout_ms: None,
        }
    }

    #[test]
    fn a_callout_request_is_checked_and_hop_by_hop_fields_dropped() {
        let r = build(
            "authz",
            req(
                "GET",
                "/check?x=1",
                vec![("x-a", b"1"), ("connection", b"close"), ("te", b"trailers")],
            ),
        )
        .unwrap();
        assert_eq!(r.uri(), "/check?x=1");
        assert_eq!(r.headers()["host"], "authz");
        assert_eq!(r.headers()["x-a"], "1");
        assert!(!r.headers().contains_key("connection") && !r.headers().contains_key("te"));
        assert!(build("a", req("GET", "check", vec![])).is_err());
        assert!(build("a", req("G T", "/", vec![])).is_err());
        assert!(build("a", req("GET", "/", vec![("bad name", b"1")])).is_err());
        assert!(build("a", req("GET", "/", vec![("x", b"a\r\nb")])).is_err());
        let r = build("a", req("POST", "/", vec![("host", b"auth.internal")])).unwrap();
        assert_eq!(r.headers()["host"], "auth.internal");
        assert_eq!(r.headers()["content-length"], "0");
    }

    #[tokio::test]
    async fn grants_and_budgets_are_checked_before_anything_is_sent() {
        let limits = CalloutLimits {
            timeout_ms: 100,
            max_calls: 1,
            max_bytes: 10,
            max_wall_ms: 100,
            max_response_bytes: 10,
        };
        let grant = UpstreamGrant::Only(vec!["authz".into()]);
        let mut spent = Spent::default();
        let r = attempt(
            None,
            &grant,
            limits,
            &mut spent,
            "other",
            req("GET", "/", vec![]),
        )
        .await;
        assert!(matches!(r, Err(CallError::NotAllowed)));
        let r = attempt(
            None,
            &grant,
            limits,
            &mut spent,
            "authz",
            req("GET", "/", vec![]),
        )
        .await;
        assert!(matches!(r, Err(CallError::Unavailable(_))));
        assert_eq!(spent, Spent::default(), "nothing was sent, nothing charged");
    }
}
