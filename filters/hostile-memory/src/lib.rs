//! `hostile-memory` (test fixture): in the request phase, allocates 1 MiB
//! chunks forever and fills each with a non-zero byte (so every page is
//! written, not just reserved). It caps nothing itself: the host's memory
//! limit must stop it. When `memory.grow` fails, Rust's allocation-failure
//! handler tries to print to WASI stderr and then aborts, so the host sees
//! a trap (or, with unknown WASI imports defined as traps, that import's
//! trap). No config.

use std::hint::black_box;

use sluicegate_sdk::{export_filter, Capabilities, Filter, Request, RequestAction};

const CHUNK: usize = 1 << 20;

struct HostileMemory;

impl Filter for HostileMemory {
    const CAPABILITIES: Capabilities = Capabilities::REQUEST;

    fn init(_config: &str) -> Result<Self, String> {
        Ok(HostileMemory)
    }

    fn on_request(&mut self, _req: &Request) -> RequestAction {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Non-zero, so every byte (every page) is written, not just reserved.
            let chunk = vec![0xA5u8; CHUNK];
            hoard.push(black_box(chunk));
            black_box(&hoard);
        }
    }
}

export_filter!(HostileMemory);
