//! `hostile-trap` (test fixture): traps in every request phase (a panic,
//! which the `filter` profile's `panic = "abort"` turns into a wasm
//! `unreachable`). No config.

use sluicegate_sdk::{export_filter, Capabilities, Filter, Request, RequestAction};

struct HostileTrap;

impl Filter for HostileTrap {
    const CAPABILITIES: Capabilities = Capabilities::REQUEST;

    fn init(_config: &str) -> Result<Self, String> {
        Ok(HostileTrap)
    }

    fn on_request(&mut self, _req: &Request) -> RequestAction {
        #[cfg(target_arch = "wasm32")]
        core::arch::wasm32::unreachable();
        #[cfg(not(target_arch = "wasm32"))]
        panic!("hostile-trap traps on purpose");
    }
}

export_filter!(HostileTrap);
