//! `versioned` (test fixture): stamps every response with the version baked
//! into its binary, so hot-reload tests can tell versions apart.
//!
//! The binary holds the ASCII marker `SGVERSION:` followed by ten digits
//! (`0000000000` as built). Tests patch those digits in place to make new
//! versions with new content hashes without recompiling. The response phase
//! sets `x-version: <digits>`. No config.

use sluicegate_sdk::{export_filter, Capabilities, Filter, Request, Response, ResponseAction};

/// The marker tests patch; read through a volatile load so the compiler
/// keeps the bytes verbatim in the data segment.
static MARKER: [u8; 20] = *b"SGVERSION:0000000000";

struct Versioned {
    version: String,
}

impl Filter for Versioned {
    const CAPABILITIES: Capabilities = Capabilities::RESPONSE;

    fn init(_config: &str) -> Result<Self, String> {
        // SAFETY-free volatile read: copy the static byte by byte.
        let bytes: Vec<u8> = (0..MARKER.len())
            .map(|i| std::hint::black_box(MARKER[i]))
            .collect();
        let digits = String::from_utf8_lossy(&bytes[10..]).into_owned();
        Ok(Versioned { version: digits })
    }

    fn on_response(&mut self, _req: &Request, resp: &Response) -> ResponseAction {
        let _ = resp.set_header("x-version", &self.version);
        ResponseAction::Continue
    }
}

export_filter!(Versioned);
