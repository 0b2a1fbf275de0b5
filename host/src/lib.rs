//! Sluicegate: a reverse proxy and load balancer whose request and response
//! filters are sandboxed WebAssembly components.
//!
//! Read [`proxy`] first: it walks one request through the host. Each stage
//! lives in the module named for it.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod admin_ops;
pub mod app;
pub mod balance;
pub mod body;
pub mod cache;
pub mod config;
pub mod demo;
pub mod filter;
pub mod fleet;
pub mod headers;
pub mod hist;
pub mod protect;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod server;
pub mod status;
pub mod telemetry;
pub mod ticker;
pub mod tls;
pub mod upstream;
