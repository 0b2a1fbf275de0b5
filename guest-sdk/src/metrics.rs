//! Counters, exported with the proxy's Prometheus metrics as
//! `sluicegate_filter_counter_total{filter="..",name=".."}`.
//!
//! ```no_run
//! sluicegate_sdk::metrics::increment("denied");
//! sluicegate_sdk::metrics::counter_add("bytes_seen", 512);
//! ```

use crate::bindings::sluicegate::filter::metrics as host;

/// Adds `delta` to the named counter.
pub fn counter_add(name: &str, delta: u64) {
    host::counter_add(name, delta)
}

/// Adds one to the named counter.
pub fn increment(name: &str) {
    counter_add(name, 1)
}
