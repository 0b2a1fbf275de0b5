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

#[path = "../../host/src/ticker.rs"]
pub mod ticker;

pub mod protect {
    //! The parts of `host/src/protect` that parse input.

    /// Rejections are counted by the host; not here.
    pub fn count_rejection(_reason: &'static str) {}

    #[path = "../../../host/src/protect/h1/mod.rs"]
    pub mod h1;

    #[path = "../../../host/src/protect/origin.rs"]
    pub mod origin;
}

#[path = "../../host/src/cache/rfc.rs"]
#[doc(hidden)]
pub mod cache_rfc;

pub mod cache {
    //! The cache's field reader: the cache config names its settings.
    pub use super::cache_rfc as rfc;
}

pub mod tls {
    //! The host loads certificate files with rustls; the config target
    //! fuzzes the TOML and its validator, not PEM files on disk, so loading
    //! a named pair is only a check that both files exist here.

    use crate::config::{CertConfig, UpstreamTlsConfig};

    /// Both files exist (the host also parses them and checks they match).
    pub fn load_certified_key(c: &CertConfig) -> Result<((), Vec<String>), String> {
        for f in [&c.cert, &c.key] {
            std::fs::metadata(f).map_err(|e| format!("{}: {e}", f.display()))?;
        }
        Ok(((), Vec::new()))
    }

    /// Stands in for the host's TLS client settings.
    pub struct UpstreamTls;

    impl UpstreamTls {
        /// Always accepted here (the host reads the CA file).
        pub fn new(_t: &UpstreamTlsConfig) -> Result<UpstreamTls, String> {
            Ok(UpstreamTls)
        }
    }
}
