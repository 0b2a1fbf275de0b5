//! Running a route's filter chain: the request phase in order, the response
//! phase in reverse over the filters that ran, and the body phases for the
//! filters that asked for them. Every failure goes through the filter's
//! policy: fail-closed answers 500, fail-open skips the filter.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};

use super::action::{BodyAction, Local, RequestAction, ResponseAction};
use super::exchange::SharedExchange;
use super::host_api::{RequestHead, ResponseHead, MAX_HEADER_FIELDS, MAX_HEADER_VALUE};
use super::instance::{placeholder, FilterFailure, FilterVersion};
use super::FilterSet;
use crate::body::{self, ProxyBody};
use crate::config::{FiltersConfig, Grants, OnError};

/// One filter of a chain, resolved against the live set.
pub struct Step {
    /// The name the route gives.
    pub name: Arc<str>,
    /// The live version, if loaded.
    pub version: Option<Arc<FilterVersion>>,
    /// Its failure policy.
    pub on_error: OnError,
}

/// A route's chain as resolved for one request: later reloads do not
/// change it mid-request.
pub struct Chain {
    /// The steps, in request order.
    pub steps: Vec<Step>,
    /// Largest body buffered for a body phase (from the same config).
    pub max_body_bytes: usize,
}

/// What the request phase decided.
pub enum RequestDecision {
    /// Go to the upstream (possibly one a filter chose).
    Forward {
        /// The upstream a filter routed to, if any.
        upstream: Option<String>,
    },
    /// Answer with this response.
    Respond(Response<ProxyBody>),
}

impl Chain {
    /// Resolve `names` against `set`. A filter with no file in the filter
    /// directory is left out (deleting a file removes the filter from every
    /// chain); one whose file is there but failed to load stays in, and its
    /// failure policy applies.
    pub fn resolve(set: &FilterSet, names: &[Arc<str>], config: &FiltersConfig) -> Chain {
        let steps = names
            .iter()
            .filter(|name| set.has_file(name))
            .map(|name| {
                let version = set.get(name).cloned();
                let on_error = version
                    .as_ref()
                    .map(|v| v.policy.on_error)
                    .unwrap_or_else(|| config.policy_for(name).on_error);
                Step {
                    name: name.clone(),
                    version,
                    on_error,
                }
            })
            .collect();
        Chain {
            steps,
            max_body_bytes: config.max_body_bytes,
        }
    }

    /// True if any filter wants the request body.
    pub fn wants_request_body(&self) -> bool {
        self.steps
            .iter()
            .any(|s| s.version.as_ref().is_some_and(|v| v.caps.request_body))
    }

    /// True if any of the first `ran` filters wants the response body.
    pub fn wants_response_body(&self, ran: usize) -> bool {
        self.steps[..ran]
            .iter()
            .any(|s| s.version.as_ref().is_some_and(|v| v.caps.response_body))
    }

    /// True if any filter speaks contract 0.2 (the request then gets an
    /// exchange).
    pub fn has_v2(&self) -> bool {
        self.steps.iter().any(|s| {
            s.version
                .as_ref()
                .is_some_and(|v| v.contract == super::instance::Contract::V2)
        })
    }

    /// The filters that stream the request body, in order.
    pub fn request_chunk_filters(&self) -> Vec<(Arc<FilterVersion>, OnError)> {
        self.steps
            .iter()
            .filter_map(|s| {
                let v = s.version.as_ref()?;
                v.caps.request_chunks.then(|| (v.clone(), s.on_error))
            })
            .collect()
    }

    /// The first `ran` filters that stream the response body, in the
    /// response order (reverse).
    pub fn response_chunk_filters(&self, ran: usize) -> Vec<(Arc<FilterVersion>, OnError)> {
        self.steps[..ran]
            .iter()
            .rev()
            .filter_map(|s| {
                let v = s.version.as_ref()?;
                v.caps.response_chunks.then(|| (v.clone(), s.on_error))
            })
            .collect()
    }

    /// The first `ran` filters with a log phase, in request order.
    pub fn log_filters(&self, ran: usize) -> Vec<Arc<FilterVersion>> {
        self.steps[..ran]
            .iter()
            .filter_map(|s| s.version.as_ref().filter(|v| v.caps.log).cloned())
            .collect()
    }

    /// True if any of the first `ran` filters reads the request again in a
    /// response phase (head or body). Decided on capabilities alone: a
    /// filter benched now may be usable again by the time the response
    /// comes.
    pub fn reads_request_in_response(&self, ran: usize) -> bool {
        self.steps.iter().take(ran).any(|s| {
            s.version
                .as_ref()
                .is_some_and(|v| v.caps.response_phase || v.caps.response_body)
        })
    }

    /// Run the request phase. Returns the decision and how many filters
    /// took part (their response phases run later).
    pub async fn on_request(
        &self,
        head: &mut RequestHead,
        upstream_exists: &(dyn Fn(&str) -> bool + Sync),
        ex: Option<&SharedExchange>,
    ) -> (RequestDecision, usize) {
        let mut upstream = None;
        for (i, step) in self.steps.iter().enumerate() {
            let Some(version) = usable(step) else {
                match fail(step, &FilterFailure::Missing) {
                    Some(resp) => return (RequestDecision::Respond(resp), i),
                    None => continue,
                }
            };
            if !version.caps.request_phase {
                continue;
            }
            let span = trace_span(&head.parts.extensions, version, "request");
            let taken = std::mem::replace(head, placeholder());
            let mut called = version.on_request(taken, ex).await;
            let grants = &version.policy.grants;
            let result = std::mem::replace(&mut called.result, Err(FilterFailure::Missing));
            let action = match &result {
                Ok(RequestAction::Respond(_)) => "respond",
                Ok(RequestAction::Route(_)) => "route",
                _ => "continue",
            };
            let failure = match result {
                Ok(RequestAction::Continue) => None,
                Ok(RequestAction::Respond(_)) if !grants.may_respond => Some(denied(
                    step,
                    "respond",
                    "answered locally, which its policy does not grant (may_respond = false)"
                        .into(),
                )),
                Ok(RequestAction::Respond(local)) => match local_response(local) {
                    Ok(resp) => {
                        version.stats.record_success();
                        crate::telemetry::filter_done(span, action);
                        *head = called.req;
                        return (RequestDecision::Respond(resp), i + 1);
                    }
                    Err(e) => Some(FilterFailure::Invalid(e)),
                },
                Ok(RequestAction::Route(name)) if !grants.upstreams.allows(&name) => Some(denied(
                    step,
                    "route",
                    format!("route to upstream {name:?}, which its policy does not grant"),
                )),
                Ok(RequestAction::Route(name)) if upstream_exists(&name) => {
                    upstream = Some(name);
                    None
                }
                Ok(RequestAction::Route(name)) => Some(FilterFailure::Invalid(format!(
                    "route to unknown upstream {name:?}"
                ))),
                Err(f) => Some(f),
            };
            let Some(failure) = failure else {
                version.stats.record_success();
                crate::telemetry::filter_done(span, action);
                *head = called.req;
                continue;
            };
            traced_failure(span, step, &failure);
            // A failed call leaves no trace on the head.
            called.revert();
            *head = called.req;
            if matches!(failure, FilterFailure::Invalid(_)) {
                version.stats.record_failure(&failure);
                tracing::warn!(filter = %step.name, error = %failure, "filter returned an invalid action");
            }
            if let Some(resp) = fail(step, &failure) {
                return (RequestDecision::Respond(resp), i + 1);
            }
        }
        (RequestDecision::Forward { upstream }, self.steps.len())
    }

    /// Run the request body phase over the buffered body.
    // The error is the response to send; it is built once per request on
    // a cold path, so boxing it would buy nothing.
    #[allow(clippy::result_large_err)]
    pub async fn on_request_body(
        &self,
        head: &mut RequestHead,
        mut body: Bytes,
        ex: Option<&SharedExchange>,
    ) -> Result<Bytes, Response<ProxyBody>> {
        for step in &self.steps {
            let Some(version) = usable(step).filter(|v| v.caps.request_body) else {
                continue;
            };
            let span = trace_span(&head.parts.extensions, version, "request_body");
            let taken = std::mem::replace(head, placeholder());
            let mut called = version.on_request_body(taken, body.clone(), ex).await;
            let result = std::mem::replace(&mut called.result, Err(FilterFailure::Missing));
            let outcome = result.and_then(|a| body_action(a, &version.policy.grants, step));
            traced_body(span, step, &outcome);
            if outcome.is_err() {
                called.revert();
            }
            *head = called.req;
            match outcome {
                Ok(BodyOutcome::Keep) => version.stats.record_success(),
                Ok(BodyOutcome::Replace(b)) => {
                    version.stats.record_success();
                    body = b
                }
                Ok(BodyOutcome::Respond(resp)) => return Err(resp),
                Err(f) => {
                    if let Some(resp) = fail(step, &f) {
                        return Err(resp);
                    }
                }
            }
        }
        Ok(body)
    }

    /// Run the response phase, in reverse, over the first `ran` filters.
    /// Returns a replacement body when a filter answered in its place.
    pub async fn on_response(
        &self,
        ran: usize,
        req: &mut RequestHead,
        resp: &mut ResponseHead,
        ex: Option<&SharedExchange>,
    ) -> Option<ProxyBody> {
        let mut replaced = None;
        for step in self.steps[..ran].iter().rev() {
            let Some(version) = usable(step).filter(|v| v.caps.response_phase) else {
                continue;
            };
            let span = trace_span(&req.parts.extensions, version, "response");
            let mut called = version
                .on_response(std::mem::replace(req, placeholder()), take_resp(resp), ex)
                .await;
            let grants = &version.policy.grants;
            let result = std::mem::replace(&mut called.result, Err(FilterFailure::Missing));
            let outcome = result.and_then(|a| match a {
                ResponseAction::Continue => Ok(None),
                ResponseAction::Respond(_) if !grants.may_respond => Err(denied(
                    step,
                    "respond",
                    "answered locally, which its policy does not grant (may_respond = false)"
                        .into(),
                )),
                ResponseAction::Respond(local) => local_response(local)
                    .map(Some)
                    .map_err(FilterFailure::Invalid),
            });
            match &outcome {
                Ok(r) => crate::telemetry::filter_done(
                    span,
                    if r.is_some() { "respond" } else { "continue" },
                ),
                Err(f) => traced_failure(span, step, f),
            }
            if outcome.is_err() {
                called.revert();
            }
            *req = called.req;
            if let Some(r) = called.resp {
                *resp = r;
            }
            match outcome {
                Ok(None) => version.stats.record_success(),
                Ok(Some(new)) => {
                    version.stats.record_success();
                    let (parts, b) = new.into_parts();
                    resp.parts = parts;
                    replaced = Some(b);
                }
                Err(f) => {
                    if matches!(f, FilterFailure::Invalid(_)) {
                        version.stats.record_failure(&f);
                    }
                    if let Some(err) = fail(step, &f) {
                        let (parts, b) = err.into_parts();
                        resp.parts = parts;
                        replaced = Some(b);
                    }
                }
            }
        }
        replaced
    }

    /// Run the response body phase, in reverse, over the first `ran` filters.
    pub async fn on_response_body(
        &self,
        ran: usize,
        req: &mut RequestHead,
        resp: &mut ResponseHead,
        mut body: Bytes,
        ex: Option<&SharedExchange>,
    ) -> Bytes {
        for step in self.steps[..ran].iter().rev() {
            let Some(version) = usable(step).filter(|v| v.caps.response_body) else {
                continue;
            };
            let span = trace_span(&req.parts.extensions, version, "response_body");
            let mut called = version
                .on_response_body(
                    std::mem::replace(req, placeholder()),
                    take_resp(resp),
                    body.clone(),
                    ex,
                )
                .await;
            let result = std::mem::replace(&mut called.result, Err(FilterFailure::Missing));
            let outcome = result.and_then(|a| body_action(a, &version.policy.grants, step));
            traced_body(span, step, &outcome);
            if outcome.is_err() {
                called.revert();
            }
            *req = called.req;
            if let Some(r) = called.resp {
                *resp = r;
            }
            let replacement = match outcome {
                Ok(BodyOutcome::Keep) => {
                    version.stats.record_success();
                    None
                }
                Ok(BodyOutcome::Replace(b)) => {
                    version.stats.record_success();
                    Some((None, b))
                }
                Ok(BodyOutcome::Respond(r)) => Some(split(r)),
                Err(f) => fail(step, &f).map(split),
            };
            if let Some((parts, b)) = replacement {
                if let Some(parts) = parts {
                    resp.parts = parts;
                }
                body = b;
            }
        }
        body
    }
}

/// An action the manifest does not grant: counted and logged with the
/// filter, then treated as an invalid action.
fn denied(step: &Step, what: &'static str, reason: String) -> FilterFailure {
    super::host_api::denied(&step.name, what);
    tracing::warn!(filter = %step.name, "filter action refused by its policy: {reason}");
    FilterFailure::Invalid(reason)
}

fn split(r: Response<ProxyBody>) -> (Option<http::response::Parts>, Bytes) {
    // Local responses built by `local_response` or `fail` carry a full body;
    // their bytes are kept beside the head so they need no async collect.
    let (parts, _) = r.into_parts();
    let text = parts
        .extensions
        .get::<LocalBody>()
        .map(|b| b.0.clone())
        .unwrap_or_default();
    (Some(parts), text)
}

/// The bytes of a local response, kept in its extensions for `split`.
#[derive(Clone)]
struct LocalBody(Bytes);

enum BodyOutcome {
    Keep,
    Replace(Bytes),
    Respond(Response<ProxyBody>),
}

fn body_action(a: BodyAction, grants: &Grants, step: &Step) -> Result<BodyOutcome, FilterFailure> {
    Ok(match a {
        BodyAction::Continue => BodyOutcome::Keep,
        BodyAction::Replace(b) => BodyOutcome::Replace(Bytes::from(b)),
        BodyAction::Respond(_) if !grants.may_respond => {
            return Err(denied(
                step,
                "respond",
                "answered locally, which its policy does not grant (may_respond = false)".into(),
            ))
        }
        BodyAction::Respond(local) => {
            BodyOutcome::Respond(local_response(local).map_err(FilterFailure::Invalid)?)
        }
    })
}

/// `[tracing]`: a span for this call of `version` (`None` when off).
fn trace_span(
    ext: &http::Extensions,
    version: &FilterVersion,
    phase: &'static str,
) -> Option<crate::telemetry::ChildSpan> {
    crate::telemetry::filter_span(ext, &version.name, &version.hash, phase)
}

/// End a call's span as failed, with what its policy did.
fn traced_failure(span: Option<crate::telemetry::ChildSpan>, step: &Step, f: &FilterFailure) {
    crate::telemetry::filter_failed(span, f, step.on_error == OnError::FailOpen);
}

/// End a body phase's span.
fn traced_body(
    span: Option<crate::telemetry::ChildSpan>,
    step: &Step,
    outcome: &Result<BodyOutcome, FilterFailure>,
) {
    match outcome {
        Ok(BodyOutcome::Keep) => crate::telemetry::filter_done(span, "continue"),
        Ok(BodyOutcome::Replace(_)) => crate::telemetry::filter_done(span, "replace"),
        Ok(BodyOutcome::Respond(_)) => crate::telemetry::filter_done(span, "respond"),
        Err(f) => traced_failure(span, step, f),
    }
}

/// The live version, unless quarantined.
fn usable(step: &Step) -> Option<&Arc<FilterVersion>> {
    step.version.as_ref().filter(|v| !v.stats.quarantined())
}

/// Apply the failure policy: `Some(500)` for fail-closed, `None` to skip.
pub(crate) fn fail(step: &Step, failure: &FilterFailure) -> Option<Response<ProxyBody>> {
    let failure = match (&step.version, failure) {
        (Some(v), FilterFailure::Missing) if v.stats.quarantined() => &FilterFailure::Quarantined,
        _ => failure,
    };
    match step.on_error {
        OnError::FailOpen => {
            tracing::debug!(filter = %step.name, error = %failure, "filter skipped (fail_open)");
            None
        }
        OnError::FailClosed => {
            // Shed for its CPU share: the filter is busy, not broken.
            let (status, text) = match failure {
                FilterFailure::Overloaded => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("filter {} is over its CPU share", step.name),
                ),
                _ => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("filter {} failed", step.name),
                ),
            };
            let mut resp = body::text_response(status, &text);
            resp.extensions_mut()
                .insert(LocalBody(Bytes::from(format!("{text}\n"))));
            Some(resp)
        }
    }
}

/// Build a response from a filter's local response, checking every part.
pub(crate) fn local_response(local: Local) -> Result<Response<ProxyBody>, String> {
    let status = StatusCode::from_u16(local.status)
        .map_err(|_| format!("invalid status {}", local.status))?;
    if local.headers.len() > MAX_HEADER_FIELDS {
        return Err(format!(
            "{} headers; the limit is {MAX_HEADER_FIELDS}",
            local.headers.len()
        ));
    }
    let bytes = Bytes::from(local.body);
    let mut resp = Response::new(body::full(bytes.clone()));
    *resp.status_mut() = status;
    for (name, value) in local.headers {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        if value.len() > MAX_HEADER_VALUE {
            return Err(format!("header {n} too long"));
        }
        let v =
            HeaderValue::from_bytes(&value).map_err(|_| format!("invalid value for header {n}"))?;
        resp.headers_mut().append(n, v);
    }
    resp.headers_mut().remove(http::header::CONTENT_LENGTH);
    resp.headers_mut().remove(http::header::TRANSFER_ENCODING);
    resp.extensions_mut().insert(LocalBody(bytes));
    Ok(resp)
}

fn take_resp(resp: &mut ResponseHead) -> ResponseHead {
    std::mem::replace(
        resp,
        ResponseHead {
            parts: http::Response::new(()).into_parts().0,
        },
    )
}
