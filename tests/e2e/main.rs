//! End-to-end tests of the real `sluicegate` binary.
//!
//! Run with `cargo test --release -p sluicegate --test e2e`. Each test starts
//! its own proxy process and in-process backends on 127.0.0.1 and tears
//! them down when it ends; see `common` for the helpers.

mod common;

mod balance;
mod balance_limits;
mod cache;
mod callout_examples;
mod callouts;
mod config;
mod deploy;
mod drain;
mod filters;
mod filters_v2;
mod fleet;
mod grpc;
mod isolation;
mod keepalive;
mod languages;
mod ops;
mod protect;
mod proxy;
mod proxy_errors;
mod proxy_streams;
mod reload;
mod smuggling;
mod soak;
mod telemetry;
mod tls;
mod trust;
mod upstream_keepalive;
