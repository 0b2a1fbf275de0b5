//! The key-value store shared by every instance of this filter.
//!
//! Keys are namespaced by filter name by the host, so two filters never see
//! each other's keys. TTLs are in milliseconds; `None` means no expiry.
//!
//! ```no_run
//! use sluicegate_sdk::kv;
//! let hits = kv::increment("hits:/index", 1, Some(60_000)).unwrap_or(0);
//! kv::set("last-path", "/index", None);
//! assert_eq!(kv::get_string("last-path").as_deref(), Some("/index"));
//! // Take a lock only if nobody holds it.
//! let mine = kv::compare_and_swap("lock", None, "me", Some(5_000));
//! # let _ = (hits, mine);
//! ```

use crate::bindings::sluicegate::filter::kv as host;

/// Reads a value; `None` if absent or expired.
pub fn get(key: &str) -> Option<Vec<u8>> {
    host::get(key)
}

/// Reads a value as UTF-8 text; `None` if absent, expired or not UTF-8.
pub fn get_string(key: &str) -> Option<String> {
    get(key).and_then(|v| String::from_utf8(v).ok())
}

/// Reads a value as a decimal integer (as written by [`increment`]); `None`
/// if absent, expired or not an integer.
pub fn get_i64(key: &str) -> Option<i64> {
    get_string(key).and_then(|s| s.trim().parse().ok())
}

/// Writes a value, with an optional time to live in milliseconds.
pub fn set(key: &str, value: impl AsRef<[u8]>, ttl_ms: Option<u64>) {
    host::set(key, value.as_ref(), ttl_ms)
}

/// Removes a key; true if it was present.
pub fn delete(key: &str) -> bool {
    host::delete(key)
}

/// Adds `delta` to the integer at `key` (absent counts as 0) and returns the
/// new value, atomically. The TTL applies only when this call creates the
/// key. Fails if the stored value is not a decimal integer.
pub fn increment(key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, String> {
    host::increment(key, delta, ttl_ms)
}

/// Writes `value` only if the current value equals `expected` (`None`: only
/// if the key is absent); true if the write happened.
pub fn compare_and_swap(
    key: &str,
    expected: Option<&[u8]>,
    value: impl AsRef<[u8]>,
    ttl_ms: Option<u64>,
) -> bool {
    host::compare_and_swap(key, expected, value.as_ref(), ttl_ms)
}
