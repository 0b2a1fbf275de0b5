//! What a filter call decides, in the host's own terms, whichever contract
//! (0.1 or 0.2) the filter speaks. Each contract's generated types convert
//! into these once, at the call's return; the chain, the proxy and the CLI
//! work on these alone.

use super::bindings::sluicegate::filter::types as v1;
use super::bindings_v2::sluicegate::filter::types as v2;

/// A response a filter answers with itself. Header values are bytes (a
/// 0.1 filter's text values convert without loss).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// The status code (checked by the chain).
    pub status: u16,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

/// What the request phase decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestAction {
    /// Go on.
    Continue,
    /// Answer locally.
    Respond(Local),
    /// Send to this upstream.
    Route(String),
}

/// What the response phase decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseAction {
    /// Send the response on.
    Continue,
    /// Replace it.
    Respond(Local),
}

/// What a body phase (buffered or one chunk) decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyAction {
    /// Keep the bytes.
    Continue,
    /// Put these in their place.
    Replace(Vec<u8>),
    /// Answer locally instead.
    Respond(Local),
}

/// The phases a filter takes part in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Caps {
    /// `on-request`.
    pub request_phase: bool,
    /// `on-response`.
    pub response_phase: bool,
    /// `on-request-body` (buffered).
    pub request_body: bool,
    /// `on-response-body` (buffered).
    pub response_body: bool,
    /// `on-request-chunk` (0.2).
    pub request_chunks: bool,
    /// `on-response-chunk` (0.2).
    pub response_chunks: bool,
    /// `on-log` (0.2).
    pub log: bool,
}

impl From<v1::Capabilities> for Caps {
    fn from(c: v1::Capabilities) -> Caps {
        Caps {
            request_phase: c.request_phase,
            response_phase: c.response_phase,
            request_body: c.request_body,
            response_body: c.response_body,
            ..Caps::default()
        }
    }
}

impl From<v2::Phases> for Caps {
    fn from(p: v2::Phases) -> Caps {
        Caps {
            request_phase: p.contains(v2::Phases::REQUEST),
            response_phase: p.contains(v2::Phases::RESPONSE),
            request_body: p.contains(v2::Phases::REQUEST_BODY),
            response_body: p.contains(v2::Phases::RESPONSE_BODY),
            request_chunks: p.contains(v2::Phases::REQUEST_CHUNKS),
            response_chunks: p.contains(v2::Phases::RESPONSE_CHUNKS),
            log: p.contains(v2::Phases::LOG),
        }
    }
}

impl From<v1::LocalResponse> for Local {
    fn from(l: v1::LocalResponse) -> Local {
        Local {
            status: l.status,
            headers: l
                .headers
                .into_iter()
                .map(|(n, v)| (n, v.into_bytes()))
                .collect(),
            body: l.body,
        }
    }
}

impl From<v2::LocalResponse> for Local {
    fn from(l: v2::LocalResponse) -> Local {
        Local {
            status: l.status,
            headers: l.headers,
            body: l.body,
        }
    }
}

impl From<v1::RequestAction> for RequestAction {
    fn from(a: v1::RequestAction) -> RequestAction {
        match a {
            v1::RequestAction::Continue => RequestAction::Continue,
            v1::RequestAction::Respond(l) => RequestAction::Respond(l.into()),
            v1::RequestAction::Route(u) => RequestAction::Route(u),
        }
    }
}

impl From<v2::RequestAction> for RequestAction {
    fn from(a: v2::RequestAction) -> RequestAction {
        match a {
            v2::RequestAction::Continue => RequestAction::Continue,
            v2::RequestAction::Respond(l) => RequestAction::Respond(l.into()),
            v2::RequestAction::Route(u) => RequestAction::Route(u),
        }
    }
}

impl From<v1::ResponseAction> for ResponseAction {
    fn from(a: v1::ResponseAction) -> ResponseAction {
        match a {
            v1::ResponseAction::Continue => ResponseAction::Continue,
            v1::ResponseAction::Respond(l) => ResponseAction::Respond(l.into()),
        }
    }
}

impl From<v2::ResponseAction> for ResponseAction {
    fn from(a: v2::ResponseAction) -> ResponseAction {
        match a {
            v2::ResponseAction::Continue => ResponseAction::Continue,
            v2::ResponseAction::Respond(l) => ResponseAction::Respond(l.into()),
        }
    }
}

impl From<v1::BodyAction> for BodyAction {
    fn from(a: v1::BodyAction) -> BodyAction {
        match a {
            v1::BodyAction::Continue => BodyAction::Continue,
            v1::BodyAction::Replace(b) => BodyAction::Replace(b),
            v1::BodyAction::Respond(l) => BodyAction::Respond(l.into()),
        }
    }
}

impl From<v2::BodyAction> for BodyAction {
    fn from(a: v2::BodyAction) -> BodyAction {
        match a {
            v2::BodyAction::Continue => BodyAction::Continue,
            v2::BodyAction::Replace(b) => BodyAction::Replace(b),
            v2::BodyAction::Respond(l) => BodyAction::Respond(l.into()),
        }
    }
}

impl From<v2::ChunkAction> for BodyAction {
    fn from(a: v2::ChunkAction) -> BodyAction {
        match a {
            v2::ChunkAction::Continue => BodyAction::Continue,
            v2::ChunkAction::Replace(b) => BodyAction::Replace(b),
            v2::ChunkAction::Respond(l) => BodyAction::Respond(l.into()),
        }
    }
}
