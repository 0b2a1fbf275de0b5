//! Distributed tracing with OpenTelemetry, and the status page's series.
//!
//! With `[tracing]`, every request gets a server span, continuing the
//! client's W3C `traceparent` / `tracestate` or starting a new trace (kept
//! or not by `sampling_ratio`; a parent's decision is followed). Under it:
//! one span per filter call (name, version, phase, outcome), the cache
//! lookup, and one client span per upstream attempt (endpoint, status,
//! retry), whose id goes upstream in `traceparent`. Ended spans are batched
//! and sent over OTLP/HTTP (`export`). The trace id goes into the access
//! log line.
//!
//! How a span reaches the code that makes its children: [`begin`] puts a
//! [`TraceCx`] in the request's extensions, which travel with the head
//! through the filter chain and into each upstream attempt.
//!
//! No cost when off: every hook first reads one `OnceLock` (set only by
//! [`init`]) and returns `None`; nothing is allocated and no header is
//! touched (a client's `traceparent` then passes through as it came).

mod export;
pub mod series;

use std::borrow::Cow;
use std::fmt::Display;
use std::net::IpAddr;
use std::sync::OnceLock;

use http::{Extensions, HeaderMap, Method, Request, Response};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue, Value};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};

pub use opentelemetry::TraceId;

use crate::config::TracingConfig;

/// The process's tracer, set once at start when `[tracing]` is present.
static TRACING: OnceLock<Tracing> = OnceLock::new();

struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

/// Start exporting spans (call once, before serving; a second call is
/// ignored).
pub fn init(config: &TracingConfig) -> anyhow::Result<()> {
    let provider = export::provider(config)?;
    let scope = InstrumentationScope::builder("sluicegate")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let tracer = provider.tracer_with_scope(scope);
    let _ = TRACING.set(Tracing {
        provider,
        tracer,
        propagator: TraceContextPropagator::new(),
    });
    tracing::info!(
        endpoint = %config.traces_url(),
        sampling_ratio = config.sampling_ratio,
        "tracing: exporting spans over OTLP/HTTP"
    );
    Ok(())
}

/// Send the spans still queued and stop the exporter (at shutdown; blocks
/// up to the export timeout).
pub fn shutdown() {
    if let Some(t) = TRACING.get() {
        if let Err(e) = t.provider.shutdown() {
            tracing::warn!(error = %e, "tracing: the last spans may not all have been sent");
        }
    }
}

/// Is tracing on?
pub fn enabled() -> bool {
    TRACING.get().is_some()
}

/// The request's span as its children see it: carried in the request's
/// extensions (cloning it clones a reference).
#[derive(Clone)]
pub struct TraceCx(Context);

/// The server span of one request, ended by [`RequestSpan::finish`].
pub struct RequestSpan {
    cx: Context,
    method: Method,
}

/// Start the request's span, continuing the client's trace if its
/// `traceparent` is valid; `None` (and nothing done) when tracing is off.
/// Boxed: it lives across the whole request, and inline it would add its
/// size to every request's future, traced or not.
#[inline]
pub fn begin<B>(req: &mut Request<B>, client: IpAddr) -> Option<Box<RequestSpan>> {
    let t = TRACING.get()?;
    Some(Box::new(t.begin(req, client)))
}

impl Tracing {
    #[inline(never)]
    fn begin<B>(&self, req: &mut Request<B>, client: IpAddr) -> RequestSpan {
        let parent = self.propagator.extract(&HeaderExtractor(req.headers()));
        let method = req.method().clone();
        let builder =
            SpanBuilder::from_name(method.as_str().to_string()).with_kind(SpanKind::Server);
        let mut span = self.tracer.build_with_context(builder, &parent);
        if span.is_recording() {
            span.set_attribute(KeyValue::new("http.request.method", method.to_string()));
            span.set_attribute(KeyValue::new("url.path", req.uri().path().to_string()));
            span.set_attribute(KeyValue::new("client.address", client.to_string()));
            let version = match req.version() {
                http::Version::HTTP_2 => "2",
                http::Version::HTTP_10 => "1.0",
                _ => "1.1",
            };
            span.set_attribute(KeyValue::new("network.protocol.version", version));
            let host = req
                .uri()
                .host()
                .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok());
            if let Some(host) = host {
                span.set_attribute(KeyValue::new("server.address", host.to_string()));
            }
        }
        let cx = parent.with_span(span);
        req.extensions_mut().insert(TraceCx(cx.clone()));
        RequestSpan { cx, method }
    }
}

impl RequestSpan {
    /// The trace this request belongs to (for the access log).
    pub fn trace_id(&self) -> TraceId {
        self.cx.span().span_context().trace_id()
    }

    /// End the span with the response's status and the matched route
    /// (`none` when no route matched). The span ends when the response
    /// head is ready; a streamed body may take longer.
    pub fn finish<B>(self, resp: &Response<B>, route: &str) {
        let span = self.cx.span();
        if span.is_recording() {
            let status = resp.status().as_u16();
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            span.set_attribute(KeyValue::new("http.route", route.to_string()));
            span.update_name(format!("{} {route}", self.method));
            if let Some(cs) = resp
                .headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
            {
                span.set_attribute(KeyValue::new("sluicegate.cache_status", cs.to_string()));
            }
            if status >= 500 {
                span.set_status(Status::error(format!("HTTP {status}")));
            }
        }
        span.end();
    }
}

/// A child span of the request's (filter call, cache lookup, upstream
/// attempt), ended when dropped. Boxed: a future that holds one across an
/// await then grows by a pointer, traced or not.
pub struct ChildSpan(Box<Span>);

impl ChildSpan {
    /// A child of the span in `ext`, if tracing is on and there is one.
    #[inline]
    fn start(
        ext: &Extensions,
        name: impl FnOnce() -> Cow<'static, str>,
        kind: SpanKind,
    ) -> Option<ChildSpan> {
        let t = TRACING.get()?;
        let TraceCx(cx) = ext.get::<TraceCx>()?;
        let builder = SpanBuilder::from_name(name()).with_kind(kind);
        Some(ChildSpan(Box::new(
            t.tracer.build_with_context(builder, cx),
        )))
    }

    /// Set an attribute (if the span is recorded).
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if self.0.is_recording() {
            self.0.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Mark the span failed, saying why.
    pub fn error(&mut self, why: impl Display) {
        if self.0.is_recording() {
            self.0.set_status(Status::error(why.to_string()));
        }
    }

    /// Write `traceparent` (and `tracestate`) naming this span as the
    /// parent, replacing the client's.
    fn inject(&self, headers: &mut HeaderMap) {
        let Some(t) = TRACING.get() else { return };
        let cx = Context::new().with_remote_span_context(self.0.span_context().clone());
        t.propagator
            .inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// A span for one filter call: `phase` is `request`, `request_body`,
/// `response` or `response_body`; `hash` the version's content hash.
#[inline]
pub fn filter_span(
    ext: &Extensions,
    name: &str,
    hash: &str,
    phase: &'static str,
) -> Option<ChildSpan> {
    let mut span = ChildSpan::start(
        ext,
        || Cow::Owned(format!("filter {name}")),
        SpanKind::Internal,
    )?;
    span.set("sluicegate.filter.name", name.to_string());
    span.set(
        "sluicegate.filter.version",
        hash.get(..12).unwrap_or(hash).to_string(),
    );
    span.set("sluicegate.filter.phase", phase);
    Some(span)
}

/// End a filter call's span: `continue`, `respond`, `route`, `replace`.
#[inline]
pub fn filter_done(span: Option<ChildSpan>, outcome: &'static str) {
    if let Some(mut span) = span {
        span.set("sluicegate.filter.outcome", outcome);
    }
}

/// End a filter call's span as failed (`why`), then skipped (fail-open)
/// or answered with an error (fail-closed).
#[inline]
pub fn filter_failed(span: Option<ChildSpan>, why: &dyn Display, fail_open: bool) {
    if let Some(mut span) = span {
        let outcome = if fail_open {
            "failed_open"
        } else {
            "failed_closed"
        };
        span.set("sluicegate.filter.outcome", outcome);
        span.error(why);
    }
}

/// A span for the cache lookup; `hit` is recorded by [`cache_done`].
#[inline]
pub fn cache_span(ext: &Extensions) -> Option<ChildSpan> {
    ChildSpan::start(ext, || Cow::Borrowed("cache lookup"), SpanKind::Internal)
}

/// End the cache lookup's span.
#[inline]
pub fn cache_done(span: Option<ChildSpan>, hit: bool) {
    if let Some(mut span) = span {
        span.set("sluicegate.cache.result", if hit { "hit" } else { "miss" });
    }
}

/// A client span for one attempt (`attempt` counts from 0) to `endpoint`
/// of `upstream`; its id replaces the `traceparent` the request carries.
#[inline]
pub fn attempt_span<B>(
    req: &mut Request<B>,
    upstream: &str,
    endpoint: &str,
    attempt: usize,
) -> Option<ChildSpan> {
    let mut span = ChildSpan::start(
        req.extensions(),
        || Cow::Owned(format!("upstream {upstream}")),
        SpanKind::Client,
    )?;
    span.set("sluicegate.upstream", upstream.to_string());
    span.set("server.address", endpoint.to_string());
    span.set("sluicegate.attempt", attempt as i64 + 1);
    span.set("sluicegate.retry", attempt > 0);
    span.inject(req.headers_mut());
    Some(span)
}

/// End an attempt's span: the response status, or why there was none;
/// `retried`: another attempt follows.
#[inline]
pub fn attempt_done(span: Option<ChildSpan>, outcome: Result<u16, &dyn Display>, retried: bool) {
    if let Some(mut span) = span {
        match outcome {
            Ok(status) => {
                span.set("http.response.status_code", i64::from(status));
                if status >= 500 {
                    span.error(format_args!("HTTP {status}"));
                }
            }
            Err(why) => span.error(why),
        }
        span.set("sluicegate.retried", retried);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off (no `init` in unit tests), every hook is a no-op that leaves
    /// the request alone.
    #[test]
    fn hooks_do_nothing_when_off() {
        let mut req = Request::new(());
        req.headers_mut().insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        assert!(begin(&mut req, IpAddr::from([127, 0, 0, 1])).is_none());
        assert!(filter_span(req.extensions(), "f", "abc", "request").is_none());
        assert!(cache_span(req.extensions()).is_none());
        assert!(attempt_span(&mut req, "app", "127.0.0.1:1", 0).is_none());
        assert_eq!(
            req.headers()["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert!(req.extensions().get::<TraceCx>().is_none());
    }
}
