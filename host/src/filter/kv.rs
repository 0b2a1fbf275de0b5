//! The key-value store filters share across instances: one namespace per
//! filter name, surviving reloads of that filter, bounded in entries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Entries one filter may hold; writes past it are dropped (and logged).
pub const MAX_ENTRIES: usize = 100_000;
/// Largest key plus value accepted, bytes.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;

#[derive(Debug)]
struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }
}

/// One filter's namespace.
#[derive(Debug, Default)]
pub struct KvStore {
    map: Mutex<HashMap<String, Entry>>,
}

fn deadline(ttl_ms: Option<u64>) -> Option<Instant> {
    ttl_ms.map(|ms| Instant::now() + Duration::from_millis(ms))
}

impl KvStore {
    /// The live value at `key`.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let now = Instant::now();
        let map = self.map.lock();
        map.get(key)
            .filter(|e| e.live(now))
            .map(|e| e.value.clone())
    }

    /// Write `value`; false when the namespace is full or the entry too big.
    pub fn set(&self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> bool {
        Self::insert(&mut self.map.lock(), key, value, ttl_ms)
    }

    /// Remove `key`; true if a live value was there.
    pub fn delete(&self, key: &str) -> bool {
        let now = Instant::now();
        self.map.lock().remove(key).is_some_and(|e| e.live(now))
    }

    /// Add `delta` to the decimal integer at `key` (absent = 0).
    pub fn increment(&self, key: String, delta: i64, ttl_ms: Option<u64>) -> Result<i64, String> {
        let now = Instant::now();
        let mut map = self.map.lock();
        if let Some(entry) = map.get_mut(&key).filter(|e| e.live(now)) {
            let current: i64 = std::str::from_utf8(&entry.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("value at {key:?} is not a decimal integer"))?;
            let next = current.checked_add(delta).ok_or("integer overflow")?;
            entry.value = next.to_string().into_bytes();
            return Ok(next);
        }
        if !Self::make_room(&mut map, &key) {
            return Err("key-value store full".into());
        }
        map.insert(
            key,
            Entry {
                value: delta.to_string().into_bytes(),
                expires: deadline(ttl_ms),
            },
        );
        Ok(delta)
    }

    /// Write `value` only if the live value equals `expected`.
    pub fn compare_and_swap(
        &self,
        key: String,
        expected: Option<&[u8]>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> bool {
        let now = Instant::now();
        let mut map = self.map.lock();
        let current = map
            .get(&key)
            .filter(|e| e.live(now))
            .map(|e| e.value.as_slice());
        if current != expected {
            return false;
        }
        Self::insert(&mut map, key, value, ttl_ms)
    }

    /// Insert within the entry-size and entry-count bounds; false if not.
    fn insert(
        map: &mut HashMap<String, Entry>,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> bool {
        if key.len() + value.len() > MAX_ENTRY_BYTES || !Self::make_room(map, &key) {
            return false;
        }
        map.insert(
            key,
            Entry {
                value,
                expires: deadline(ttl_ms),
            },
        );
        true
    }

    /// Live entries (for the admin API).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.map.lock().values().filter(|e| e.live(now)).count()
    }

    /// True when no live entry is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ensure a new key fits: sweep expired entries when full.
    fn make_room(map: &mut HashMap<String, Entry>, key: &str) -> bool {
        if map.len() < MAX_ENTRIES || map.contains_key(key) {
            return true;
        }
        let now = Instant::now();
        map.retain(|_, e| e.live(now));
        map.len() < MAX_ENTRIES
    }
}

/// Every filter's namespace, by filter name.
#[derive(Debug, Default)]
pub struct KvRegistry {
    stores: Mutex<HashMap<String, Arc<KvStore>>>,
}

impl KvRegistry {
    /// The namespace of `filter`, created on first use.
    pub fn namespace(&self, filter: &str) -> Arc<KvStore> {
        self.stores
            .lock()
            .entry(filter.to_string())
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increment_cas_and_ttl() {
        let kv = KvStore::default();
        assert_eq!(kv.increment("n".into(), 2, None), Ok(2));
        assert_eq!(kv.increment("n".into(), 3, None), Ok(5));
        kv.set("s".into(), b"x".to_vec(), None);
        assert!(kv.increment("s".into(), 1, None).is_err());
        assert!(kv.compare_and_swap("s".into(), Some(b"x"), b"y".to_vec(), None));
        assert!(!kv.compare_and_swap("s".into(), Some(b"x"), b"z".to_vec(), None));
        assert!(!kv.compare_and_swap("s".into(), None, b"z".to_vec(), None));
        assert!(kv.compare_and_swap("new".into(), None, b"z".to_vec(), None));
        kv.set("t".into(), b"1".to_vec(), Some(0));
        assert_eq!(kv.get("t"), None);
        assert!(kv.delete("s"));
        assert!(!kv.delete("s"));
    }
}
