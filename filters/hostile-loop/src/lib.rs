//! `hostile-loop` (test fixture): spins, so the host's time limits (epoch
//! interruption) must stop it.
//!
//! Config (all keys optional):
//!
//! ```toml
//! [filters.config.hostile-loop]
//! init_spin_ms = 40      # busy-wait this long in init first (default 0)
//! request_spin = false   # continue instead of spinning forever (default true)
//! ```
//!
//! With no config it spins forever in the request phase (the per-call
//! `timeout_ms` test). A huge `init_spin_ms` spins in `init` until the
//! host's `init_timeout_ms` cuts it off; a small one is a slow start-up
//! that must still load.

use std::hint::black_box;

use serde::Deserialize;
use sluicegate_sdk::{env, export_filter, Capabilities, Filter, Request, RequestAction};

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    init_spin_ms: u64,
    request_spin: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            init_spin_ms: 0,
            request_spin: true,
        }
    }
}

struct HostileLoop {
    request_spin: bool,
}

/// Burn CPU (not sleep: the guest has nothing to sleep with) for `ms`.
fn busy_wait(ms: u64) {
    let until = env::monotonic_ns().saturating_add(ms.saturating_mul(1_000_000));
    let mut counter: u64 = 0;
    while env::monotonic_ns() < until {
        counter = black_box(counter.wrapping_add(1));
    }
}

impl Filter for HostileLoop {
    const CAPABILITIES: Capabilities = Capabilities::REQUEST;

    fn init(config: &str) -> Result<Self, String> {
        let c: Config = sluicegate_sdk::parse_config(config)?;
        busy_wait(c.init_spin_ms);
        Ok(HostileLoop {
            request_spin: c.request_spin,
        })
    }

    fn on_request(&mut self, _req: &Request) -> RequestAction {
        if !self.request_spin {
            return RequestAction::Continue;
        }
        // `black_box` keeps the optimizer from proving the loop useless.
        let mut counter: u64 = 0;
        loop {
            counter = black_box(counter.wrapping_add(1));
        }
    }
}

export_filter!(HostileLoop);
