//! gRPC calls through the proxy (see docs/grpc.md).
//!
//! A request whose `content-type` is `application/grpc` (or
//! `application/grpc+proto`, `+json`, …; not gRPC-Web) is a gRPC call. The
//! proxy forwards it like any other request (to an `h2`/`h2c` upstream;
//! trailers pass), and adds what a gRPC client expects of it:
//!
//! - **Its own failures are gRPC statuses**, in a trailers-only response
//!   (HTTP 200, `grpc-status` and `grpc-message` in the head, no body):
//!   upstream unavailable (refused, broken, overloaded) → 14 `UNAVAILABLE`,
//!   upstream timeout → 4 `DEADLINE_EXCEEDED`, no route → 12
//!   `UNIMPLEMENTED` (the method is not served here; gRPC maps HTTP 404 so),
//!   other answers by the HTTP-to-gRPC table of the gRPC spec
//!   ([`code_for_http`]).
//! - **`grpc-timeout` is the call's deadline**: the upstream's response head
//!   must come before it (instead of `[proxy.timeouts] upstream_response_ms`),
//!   and a call still streaming when it passes is ended with status 4
//!   (the upstream stream is reset).
//! - **A stream that breaks** (the upstream reset it or went away mid-call)
//!   ends with status 14 in trailers, not a reset client stream.
//! - **The access log and metrics carry the gRPC status**, taken at the end
//!   of the call (trailers), so a line is written when the call ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::access_log::Entry;
use crate::body::{self, BoxError, ProxyBody};

/// `grpc-status` codes the proxy itself uses.
pub mod code {
    /// The call succeeded.
    pub const OK: u32 = 0;
    /// The client went away.
    pub const CANCELLED: u32 = 1;
    /// No better code.
    pub const UNKNOWN: u32 = 2;
    /// The deadline (`grpc-timeout`, or the proxy's timeout) passed.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// Denied (HTTP 403).
    pub const PERMISSION_DENIED: u32 = 7;
    /// A limit (body size) was exceeded.
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// No route serves the method, or a feature the route needs is missing.
    pub const UNIMPLEMENTED: u32 = 12;
    /// The proxy failed for a reason of its own.
    pub const INTERNAL: u32 = 13;
    /// The upstream is down, refused, broke, or is over its limits.
    pub const UNAVAILABLE: u32 = 14;
    /// No credentials (HTTP 401).
    pub const UNAUTHENTICATED: u32 = 16;
}

/// The names of the status codes, for metric labels.
const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Is this a gRPC request or response (`application/grpc`, with or without
/// a `+format` suffix; gRPC-Web is not)?
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let ct = ct.as_bytes();
    let base = b"application/grpc";
    ct.len() >= base.len()
        && ct[..base.len()].eq_ignore_ascii_case(base)
        && matches!(ct.get(base.len()), None | Some(b'+') | Some(b';'))
}

/// Parse a `grpc-timeout` value: 1 to 8 digits and a unit (`H`, `M`, `S`,
/// `m`, `u`, `n`).
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A gRPC call in flight: a request extension, set before the journey.
#[derive(Debug, Clone, Copy)]
pub struct GrpcCall {
    /// When `grpc-timeout` runs out (`None`: no deadline).
    pub deadline: Option<Instant>,
}

impl GrpcCall {
    /// Mark `req` as a gRPC call (with its deadline) if it is one.
    pub fn begin<B>(req: &mut Request<B>) -> Option<GrpcCall> {
        if !is_grpc(req.headers()) {
            return None;
        }
        let deadline = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| parse_timeout(v.as_bytes()))
            .map(|d| Instant::now() + d);
        let call = GrpcCall { deadline };
        req.extensions_mut().insert(call);
        Some(call)
    }

    /// Time left before the deadline (`None`: no deadline).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The journey's answer as a gRPC client needs it: a gRPC response
    /// passes; anything else (the proxy's own errors, a filter's local
    /// answer) becomes a trailers-only response with a gRPC status.
    pub fn shape(&self, resp: Response<ProxyBody>, no_route: bool) -> Response<ProxyBody> {
        if is_grpc(resp.headers()) {
            return resp;
        }
        let (parts, mut b) = resp.into_parts();
        let code = match parts.extensions.get::<ProxyFailure>() {
            Some(f) => f.0,
            None if no_route && parts.status == StatusCode::NOT_FOUND => code::UNIMPLEMENTED,
            None => code_for_http(parts.status),
        };
        // The proxy's own answers are short texts, ready at once.
        let text = match b.size_hint().exact() {
            Some(n) if n <= 512 => match b.frame().now_or_never() {
                Some(Some(Ok(f))) => f.into_data().ok(),
                _ => None,
            },
            _ => None,
        };
        let text = text
            .map(|t| String::from_utf8_lossy(&t).trim().to_string())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| parts.status.to_string());
        let message = format!("sluicegate: {text} (HTTP {})", parts.status.as_u16());
        let mut out = trailers_only(code, &message);
        *out.extensions_mut() = parts.extensions;
        out
    }

    /// The response body, watched until the call ends: the deadline ends
    /// it with status 4, a broken upstream stream with 14, and the status
    /// it ended with goes to the metrics and (with `log`) the access log.
    pub fn watch(
        &self,
        resp: Response<ProxyBody>,
        route: Arc<str>,
        log: Option<Box<Entry>>,
    ) -> Response<ProxyBody> {
        let head_status = status_of(resp.headers());
        let upstream = resp
            .extensions()
            .get::<crate::access_log::UpstreamName>()
            .map(|u| u.0.clone());
        let http_status = resp.status().as_u16();
        let deadline = self
            .deadline
            .map(|d| Box::pin(tokio::time::sleep_until(d.into())));
        resp.map(|inner| {
            body::boxed(Watched {
                inner,
                deadline,
                head_status,
                done: false,
                end: Some(End {
                    route,
                    log,
                    http_status,
                    upstream,
                }),
            })
        })
    }
}

/// The gRPC status the proxy's own failure maps to (a response extension
/// set by the proxy's error response).
#[derive(Debug, Clone, Copy)]
pub struct ProxyFailure(pub u32);

/// The gRPC status for an HTTP status that is not a gRPC response (the
/// gRPC spec's table, with 413 as `RESOURCE_EXHAUSTED`).
pub fn code_for_http(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => code::INTERNAL,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 => code::UNIMPLEMENTED,
        413 => code::RESOURCE_EXHAUSTED,
        429 | 502 | 503 | 504 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

/// A trailers-only response: HTTP 200, the status in the head, no body.
pub fn trailers_only(code: u32, message: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(body::empty());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(GRPC_STATUS, HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
    resp
}

/// The answer to a gRPC call on a route whose filters want a buffered body.
pub fn body_phase_refused(route: &str) -> Response<ProxyBody> {
    tracing::warn!(route, "a filter on this route wants a buffered body phase, which a gRPC call cannot have (its messages stream); refused");
    trailers_only(
        code::UNIMPLEMENTED,
        "sluicegate: a filter on this route asks for the whole request or response body, \
         which a gRPC call cannot give (its messages stream); use a head-only filter",
    )
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `grpc-status` of a head or trailers.
fn status_of(h: &HeaderMap) -> Option<u32> {
    h.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// What is left to do when the call ends.
struct End {
    route: Arc<str>,
    log: Option<Box<Entry>>,
    http_status: u16,
    upstream: Option<Arc<str>>,
}

impl End {
    fn finish(self, code: Option<u32>) {
        let name = code.and_then(|c| NAMES.get(c as usize)).copied();
        metrics::counter!("sluicegate_grpc_calls_total",
            "route" => self.route.to_string(), "code" => name.unwrap_or("none"))
        .increment(1);
        if let Some(entry) = self.log {
            entry.finish_grpc(
                self.http_status,
                &self.route,
                self.upstream.as_deref(),
                code,
            );
        }
    }
}

/// A gRPC response body with its deadline and its end recorded.
struct Watched {
    inner: ProxyBody,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    head_status: Option<u32>,
    done: bool,
    end: Option<End>,
}

impl Watched {
    /// End the call here with `code`: trailers, then the end of the body.
    fn fail(&mut self, code: u32, message: &str) -> Frame<Bytes> {
        self.done = true;
        self.inner = body::empty();
        self.deadline = None;
        if let Some(end) = self.end.take() {
            end.finish(Some(code));
        }
        let mut t = HeaderMap::new();
        t.insert(GRPC_STATUS, HeaderValue::from(code));
        if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
            t.insert(GRPC_MESSAGE, v);
        }
        Frame::trailers(t)
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(d) = this.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                tracing::info!("gRPC call past its grpc-timeout; ended with DEADLINE_EXCEEDED");
                let f = this.fail(code::DEADLINE_EXCEEDED, "sluicegate: deadline exceeded");
                return Poll::Ready(Some(Ok(f)));
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    this.done = true;
                    if let Some(end) = this.end.take() {
                        end.finish(status_of(t));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let reason = crate::upstream::error_chain(&*e);
                tracing::warn!(error = %reason, "gRPC response stream broke; ended with UNAVAILABLE");
                let message = format!("sluicegate: upstream stream broke: {reason}");
                let f = this.fail(code::UNAVAILABLE, &message);
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(None) => {
                this.done = true;
                if let Some(end) = this.end.take() {
                    end.finish(this.head_status);
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(end) = self.end.take() {
            // A trailers-only head, or the client went away mid-call.
            let code = match self.head_status {
                Some(c) => Some(c),
                None if self.inner.is_end_stream() => None,
                None => Some(code::CANCELLED),
            };
            end.finish(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types() {
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(CONTENT_TYPE, HeaderValue::from_static(v));
            is_grpc(&m)
        };
        assert!(h("application/grpc"));
        assert!(h("application/grpc+proto"));
        assert!(h("Application/GRPC+json"));
        assert!(!h("application/grpc-web"));
        assert!(!h("application/grpc-web+proto"));
        assert!(!h("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(parse_timeout(b"123456789S"), None, "at most 8 digits");
        assert_eq!(parse_timeout(b"S"), None);
        assert_eq!(parse_timeout(b"10x"), None);
        assert_eq!(parse_timeout(b"-1S"), None);
        assert_eq!(parse_timeout(b""), None);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("a b%c"), "a b%25c");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }

    #[tokio::test]
    async fn proxy_errors_become_trailers_only() {
        let call = GrpcCall { deadline: None };
        let resp = body::text_response(StatusCode::GATEWAY_TIMEOUT, "upstream timed out");
        let mut resp = resp;
        resp.extensions_mut()
            .insert(ProxyFailure(code::DEADLINE_EXCEEDED));
        let out = call.shape(resp, false);
        assert_eq!(out.status(), StatusCode::OK);
        assert_eq!(out.headers()["grpc-status"], "4");
        assert_eq!(
            out.headers()["grpc-message"],
            "sluicegate: upstream timed out (HTTP 504)"
        );
        assert!(out.body().is_end_stream());
        let nf = body::text_response(StatusCode::NOT_FOUND, "no route");
        assert_eq!(call.shape(nf, true).headers()["grpc-status"], "12");
        let bad = body::text_response(StatusCode::BAD_GATEWAY, "x");
        assert_eq!(call.shape(bad, false).headers()["grpc-status"], "14");
    }

    #[tokio::test]
    async fn a_broken_stream_ends_with_unavailable() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01x"))),
            Err("reset".into()),
        ];
        let mut resp = Response::new(body::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        )));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let call = GrpcCall { deadline: None };
        let out = call.watch(resp, Arc::from("r"), None);
        let got = out.into_body().collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["grpc-status"], "14");
    }

    #[tokio::test]
    async fn the_deadline_ends_a_stalled_call() {
        let mut resp = Response::new(body::boxed(http_body_util::StreamBody::new(
            futures_util::stream::pending::<Result<Frame<Bytes>, BoxError>>(),
        )));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let call = GrpcCall {
            deadline: Some(Instant::now() + Duration::from_millis(30)),
        };
        let got = call
            .watch(resp, Arc::from("r"), None)
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!(got.trailers().unwrap()["grpc-status"], "4");
    }
}
