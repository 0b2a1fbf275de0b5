//! The WIT boundary: the `fuzz-guest` filter runs the input as a program of
//! host calls with arbitrary arguments, in the request and the response
//! phase, through the host's real filter runtime (wasmtime, the host API,
//! the key-value store). Nothing may panic; every result is an action or a
//! contained filter failure. Needs `target/test-filters/fuzz-guest.wasm`
//! (`scripts/build-filters.sh fuzz-guest`) and `--features wit`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluicegate::config::Isolation;
use sluicegate::filter::host_api::ResponseHead;
use sluicegate::filter::instance::FilterVersion;
use sluicegate::filter::tool::{self, Sample};

fn filter() -> &'static FilterVersion {
    static F: OnceLock<FilterVersion> = OnceLock::new();
    F.get_or_init(|| {
        let wasm = std::env::var("FUZZ_GUEST_WASM").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/test-filters/fuzz-guest.wasm"
            )
            .to_string()
        });
        tool::load(std::path::Path::new(&wasm), None, Isolation::Pool)
            .expect("load fuzz-guest.wasm")
    })
}

fuzz_target!(|data: &[u8]| {
    let hex: String = data.iter().take(2048).map(|b| format!("{b:02x}")).collect();
    let sample = Sample {
        request: "POST /fuzz?q=1".into(),
        headers: vec![format!("x-fuzz: {hex}"), "host: fuzz.test".into()],
        ..Default::default()
    };
    let Ok(head) = tool::request_head(&sample) else {
        return;
    };
    let version = filter();
    let head = version.on_request_inline(head).req;
    let resp = ResponseHead {
        parts: http::Response::new(()).into_parts().0,
    };
    let called = version.on_response_inline(head, resp);
    let Some(resp) = called.resp else {
        return;
    };
    // Whatever the guest did, the head it leaves is still a valid one.
    for (name, value) in &resp.parts.headers {
        assert!(
            !name.as_str().is_empty() && value.as_bytes().iter().all(|&b| b != b'\n' && b != b'\r')
        );
    }
});
