//! The [`Filter`] trait and the [`Capabilities`] a filter declares.

use crate::bindings::sluicegate::filter::types::Capabilities as WitCapabilities;
use crate::{BodyAction, Request, RequestAction, Response, ResponseAction};

/// The phases a filter takes part in.
///
/// The host calls only the phases declared here, and buffers a body only for
/// a filter that asks for it: declare as little as you need. Build one from
/// the constants and the `with_*` methods, which are `const`:
///
/// ```
/// use sluicegate_sdk::Capabilities;
/// const CAPS: Capabilities = Capabilities::REQUEST.with_response_body();
/// assert!(CAPS.request && CAPS.response_body && !CAPS.response);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// Call [`Filter::on_request`] for every request.
    pub request: bool,
    /// Call [`Filter::on_response`] for every response.
    pub response: bool,
    /// Buffer the request body and call [`Filter::on_request_body`].
    pub request_body: bool,
    /// Buffer the response body and call [`Filter::on_response_body`].
    pub response_body: bool,
}

impl Capabilities {
    /// No phase at all (the filter is loaded but never called).
    pub const NONE: Capabilities = Capabilities {
        request: false,
        response: false,
        request_body: false,
        response_body: false,
    };
    /// The request phase only.
    pub const REQUEST: Capabilities = Capabilities::NONE.with_request();
    /// The response phase only.
    pub const RESPONSE: Capabilities = Capabilities::NONE.with_response();
    /// Every phase, both bodies included (the most expensive choice).
    pub const ALL: Capabilities = Capabilities {
        request: true,
        response: true,
        request_body: true,
        response_body: true,
    };

    /// These capabilities plus the request phase.
    pub const fn with_request(mut self) -> Self {
        self.request = true;
        self
    }

    /// These capabilities plus the response phase.
    pub const fn with_response(mut self) -> Self {
        self.response = true;
        self
    }

    /// These capabilities plus the request body phase.
    pub const fn with_request_body(mut self) -> Self {
        self.request_body = true;
        self
    }

    /// These capabilities plus the response body phase.
    pub const fn with_response_body(mut self) -> Self {
        self.response_body = true;
        self
    }
}

impl From<Capabilities> for WitCapabilities {
    fn from(c: Capabilities) -> Self {
        WitCapabilities {
            request_phase: c.request,
            response_phase: c.response,
            request_body: c.request_body,
            response_body: c.response_body,
        }
    }
}

/// A Sluicegate filter. Export it with [`export_filter!`](crate::export_filter).
///
/// Only [`init`](Filter::init) and [`CAPABILITIES`](Filter::CAPABILITIES) are
/// required; every phase defaults to "change nothing, go on". A phase runs
/// only if the capabilities ask for it.
///
/// The value built by `init` is reused for every call this instance gets, and
/// the host reuses warm instances across requests: fields may keep state
/// between requests (a cache, say), but the phases of one request may run in
/// different instances, so `self` is no place for per-request state. Contract
/// 0.1 has no per-request store: a filter that needs state from its request
/// phase in its response phase should be written against 0.2
/// (`sluicegate-sdk-v2`), whose per-request locals the host keeps for it.
pub trait Filter: Sized + 'static {
    /// The phases this filter takes part in, when they do not depend on the
    /// configuration (override [`capabilities`](Filter::capabilities) when
    /// they do).
    const CAPABILITIES: Capabilities;

    /// Builds the filter from its configuration: the operator's
    /// `[filters.config.<name>]` table as JSON, `{}` when there is none.
    /// Use [`parse_config`](crate::parse_config) for a typed config. An error
    /// keeps this filter version from going live; the message is shown to
    /// the operator.
    fn init(config: &str) -> Result<Self, String>;

    /// The phases this instance takes part in, asked once, right after
    /// `init`. Defaults to [`CAPABILITIES`](Filter::CAPABILITIES).
    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES
    }

    /// The request phase: read or edit the request head, then decide.
    fn on_request(&mut self, req: &Request) -> RequestAction {
        let _ = req;
        RequestAction::Continue
    }

    /// The request body phase: the whole body, buffered by the host.
    fn on_request_body(&mut self, req: &Request, body: Vec<u8>) -> BodyAction {
        let _ = (req, body);
        BodyAction::Continue
    }

    /// The response phase: read the request, read or edit the response head.
    fn on_response(&mut self, req: &Request, resp: &Response) -> ResponseAction {
        let _ = (req, resp);
        ResponseAction::Continue
    }

    /// The response body phase: the whole body, buffered by the host.
    fn on_response_body(&mut self, req: &Request, resp: &Response, body: Vec<u8>) -> BodyAction {
        let _ = (req, resp, body);
        BodyAction::Continue
    }
}
