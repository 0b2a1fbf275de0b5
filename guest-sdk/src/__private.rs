//! Glue used by [`export_filter!`](crate::export_filter); not public API.

use std::cell::RefCell;
use std::thread::LocalKey;

pub use crate::bindings::exports::sluicegate::filter::handler::Guest;
pub use crate::bindings::sluicegate::filter::types::{
    Capabilities as WitCapabilities, RequestHead, ResponseHead,
};
pub use std::string::String;
pub use std::vec::Vec;

use crate::{BodyAction, Filter, Request, RequestAction, Response, ResponseAction};

/// Where `export_filter!` keeps the instance.
pub type Slot<F> = LocalKey<RefCell<Option<F>>>;

fn with<F: Filter, R>(slot: &'static Slot<F>, f: impl FnOnce(&mut F) -> R) -> R {
    slot.with(|cell| {
        let mut guard = cell.borrow_mut();
        match guard.as_mut() {
            Some(filter) => f(filter),
            None => panic!("sluicegate filter called before a successful init"),
        }
    })
}

/// `handler.init`.
pub fn init<F: Filter>(slot: &'static Slot<F>, config: String) -> Result<WitCapabilities, String> {
    let filter = F::init(&config)?;
    let caps = filter.capabilities();
    slot.with(|cell| *cell.borrow_mut() = Some(filter));
    Ok(caps.into())
}

/// `handler.on-request`.
pub fn on_request<F: Filter>(slot: &'static Slot<F>, req: &RequestHead) -> RequestAction {
    with(slot, |f| f.on_request(&Request::new(req)))
}

/// `handler.on-request-body`.
pub fn on_request_body<F: Filter>(
    slot: &'static Slot<F>,
    req: &RequestHead,
    body: Vec<u8>,
) -> BodyAction {
    with(slot, |f| f.on_request_body(&Request::new(req), body))
}

/// `handler.on-response`.
pub fn on_response<F: Filter>(
    slot: &'static Slot<F>,
    req: &RequestHead,
    resp: &ResponseHead,
) -> ResponseAction {
    with(slot, |f| {
        f.on_response(&Request::new(req), &Response::new(resp))
    })
}

/// `handler.on-response-body`.
pub fn on_response_body<F: Filter>(
    slot: &'static Slot<F>,
    req: &RequestHead,
    resp: &ResponseHead,
    body: Vec<u8>,
) -> BodyAction {
    with(slot, |f| {
        f.on_response_body(&Request::new(req), &Response::new(resp), body)
    })
}
