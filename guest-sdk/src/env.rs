//! Time and randomness, from the host (the filter has no other clock or
//! entropy source).

use crate::bindings::sluicegate::filter::env as host;

/// Wall-clock time, milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    host::now_ms()
}

/// Wall-clock time, whole seconds since the Unix epoch (as in JWT claims).
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// A monotonic clock in nanoseconds, for measuring durations.
pub fn monotonic_ns() -> u64 {
    host::monotonic_ns()
}

/// A random 64-bit number (not for keys; fine for sampling and weights).
pub fn random_u64() -> u64 {
    host::random_u64()
}

/// A random number in `0..n` (0 when `n` is 0), without modulo bias worth
/// mentioning.
pub fn random_below(n: u64) -> u64 {
    ((u128::from(random_u64()) * u128::from(n)) >> 64) as u64
}
