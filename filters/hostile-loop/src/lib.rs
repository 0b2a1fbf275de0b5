//! `hostile-loop` (test fixture): spins forever in the request phase, so the
//! host's time limit (epoch interruption) must stop it. No config.

use std::hint::black_box;

use sluicegate_sdk::{export_filter, Capabilities, Filter, Request, RequestAction};

struct HostileLoop;

impl Filter for HostileLoop {
    const CAPABILITIES: Capabilities = Capabilities::REQUEST;

    fn init(_config: &str) -> Result<Self, String> {
        Ok(HostileLoop)
    }

    fn on_request(&mut self, _req: &Request) -> RequestAction {
        // `black_box` keeps the optimizer from proving the loop useless.
        let mut counter: u64 = 0;
        loop {
            counter = black_box(counter.wrapping_add(1));
        }
    }
}

export_filter!(HostileLoop);
