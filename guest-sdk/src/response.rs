//! Builders for [`LocalResponse`] and conversions into the actions.

use crate::{BodyAction, LocalResponse, RequestAction, ResponseAction};

impl LocalResponse {
    /// A response with this status, no headers and an empty body.
    ///
    /// ```
    /// use sluicegate_sdk::{LocalResponse, RequestAction};
    /// let action: RequestAction = LocalResponse::new(204)
    ///     .with_header("access-control-allow-origin", "*")
    ///     .into();
    /// assert!(matches!(action, RequestAction::Respond(r) if r.status == 204));
    /// ```
    pub fn new(status: u16) -> Self {
        LocalResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A `text/plain; charset=utf-8` response with this body.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        LocalResponse::new(status)
            .with_header("content-type", "text/plain; charset=utf-8")
            .with_body(body.into().into_bytes())
    }

    /// An `application/json` response with this body (already encoded).
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        LocalResponse::new(status)
            .with_header("content-type", "application/json")
            .with_body(body.into().into_bytes())
    }

    /// Adds a header (after those already there; names should be lower-case).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces the body (`content-length` is set by the host).
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
}

impl From<LocalResponse> for RequestAction {
    fn from(r: LocalResponse) -> Self {
        RequestAction::Respond(r)
    }
}

impl From<LocalResponse> for ResponseAction {
    fn from(r: LocalResponse) -> Self {
        ResponseAction::Respond(r)
    }
}

impl From<LocalResponse> for BodyAction {
    fn from(r: LocalResponse) -> Self {
        BodyAction::Respond(r)
    }
}

impl RequestAction {
    /// Send the request to the upstream with this name.
    pub fn route(upstream: impl Into<String>) -> Self {
        RequestAction::Route(upstream.into())
    }
}

impl BodyAction {
    /// Replace the body with these bytes.
    pub fn replace(body: impl Into<Vec<u8>>) -> Self {
        BodyAction::Replace(body.into())
    }
}
