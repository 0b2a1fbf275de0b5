//! `bad-init` (test fixture): `init` always fails, with the message
//! `bad-init refuses to start: this filter always fails init (test fixture)`,
//! so the host must keep it from going live and show the message. Any config
//! is accepted (and ignored).

use sluicegate_sdk::{export_filter, Capabilities, Filter};

struct BadInit;

/// The whole `init` error message.
pub const MESSAGE: &str = "bad-init refuses to start: this filter always fails init (test fixture)";

impl Filter for BadInit {
    const CAPABILITIES: Capabilities = Capabilities::REQUEST;

    fn init(_config: &str) -> Result<Self, String> {
        Err(MESSAGE.to_string())
    }
}

export_filter!(BadInit);
