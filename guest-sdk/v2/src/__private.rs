//! Glue used by [`export_filter!`](crate::export_filter); not public API.

use std::cell::RefCell;
use std::thread::LocalKey;

pub use crate::bindings::exports::sluicegate::filter::handler::Guest;
#[cfg(feature = "callouts")]
pub use crate::bindings::exports::sluicegate::filter::tick_handler::Guest as TickGuest;
pub use crate::bindings::sluicegate::filter::types::{Exchange, Request, Response};

use crate::{Filter, Phases};

/// Where `export_filter!` keeps the instance.
pub type Slot<F> = LocalKey<RefCell<Option<F>>>;

/// Run `f` on the instance (traps before a successful `init`).
pub fn with<F: Filter, R>(slot: &'static Slot<F>, f: impl FnOnce(&mut F) -> R) -> R {
    slot.with(|cell| {
        let mut guard = cell.borrow_mut();
        match guard.as_mut() {
            Some(filter) => f(filter),
            None => panic!("sluicegate filter called before a successful init"),
        }
    })
}

/// `handler.init`.
pub fn init<F: Filter>(slot: &'static Slot<F>, config: String) -> Result<Phases, String> {
    let filter = F::init(&config)?;
    let phases = filter.phases();
    slot.with(|cell| *cell.borrow_mut() = Some(filter));
    Ok(phases)
}
