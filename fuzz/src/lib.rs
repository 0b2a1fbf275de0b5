//! The host's input-facing parsers, compiled straight from their source
//! files (no wasmtime, so the fuzz build stays small): the config, route
//! matching, header rules, origin hiding and the strict HTTP/1.1 reader.

#![allow(dead_code, missing_docs)]

#[path = "../../host/src/config/mod.rs"]
pub mod config;

#[path = "../../host/src/route.rs"]
pub mod route;

#[path = "../../host/src/headers.rs"]
pub mod headers;

pub mod protect {
    //! The parts of `host/src/protect` that parse input.

    /// Rejections are counted by the host; not here.
    pub fn count_rejection(_reason: &'static str) {}

    #[path = "../../../host/src/protect/h1.rs"]
    pub mod h1;

    #[path = "../../../host/src/protect/origin.rs"]
    pub mod origin;
}
