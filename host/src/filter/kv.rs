//! The key-value store filters share across instances: one namespace per
//! filter name, surviving reloads of that filter, bounded in entries and
//! bytes by the filter's manifest (`kv_max_entries`, `kv_max_bytes`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Entries one filter may hold by default; writes past it are dropped
/// (and logged).
pub const MAX_ENTRIES: usize = 100_000;
/// Bytes (keys plus values) one filter may hold by default.
pub const MAX_BYTES: usize = 64 << 20;
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

/// The entries and the bytes (keys plus values) they hold.
#[derive(Debug, Default)]
struct Map {
    entries: HashMap<String, Entry>,
    bytes: usize,
}

impl Map {
    fn remove(&mut self, key: &str) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.bytes -= key.len() + e.value.len();
        Some(e)
    }

    fn put(&mut self, key: String, entry: Entry) {
        let (key_len, value_len) = (key.len(), entry.value.len());
        match self.entries.insert(key, entry) {
            // The key was counted already; only the value changes.
            Some(old) => self.bytes = self.bytes - old.value.len() + value_len,
            None => self.bytes += key_len + value_len,
        }
    }
}

/// One filter's namespace.
#[derive(Debug)]
pub struct KvStore {
    map: Mutex<Map>,
    max_entries: AtomicUsize,
    max_bytes: AtomicUsize,
}

impl Default for KvStore {
    fn default() -> Self {
        KvStore {
            map: Mutex::new(Map::default()),
            max_entries: AtomicUsize::new(MAX_ENTRIES),
            max_bytes: AtomicUsize::new(MAX_BYTES),
        }
    }
}

fn deadline(ttl_ms: Option<u64>) -> Option<Instant> {
    ttl_ms.map(|ms| Instant::now() + Duration::from_millis(ms))
}

impl KvStore {
    /// Set the namespace's quotas (from the filter's manifest; the newest
    /// loaded version's apply). Entries already stored are kept.
    pub fn set_limits(&self, max_entries: u64, max_bytes: u64) {
        let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        self.max_entries
            .store(clamp(max_entries), Ordering::Relaxed);
        self.max_bytes.store(clamp(max_bytes), Ordering::Relaxed);
    }

    /// The live value at `key`.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let now = Instant::now();
        let map = self.map.lock();
        map.entries
            .get(key)
            .filter(|e| e.live(now))
            .map(|e| e.value.clone())
    }

    /// Write `value`; false when the namespace is full or the entry too big.
    pub fn set(&self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> bool {
        let mut map = self.map.lock();
        self.insert(&mut map, key, value, ttl_ms)
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
        let current = match map.entries.get(&key).filter(|e| e.live(now)) {
            Some(entry) => Some(
                std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .ok_or_else(|| format!("value at {key:?} is not a decimal integer"))?,
            ),
            None => None,
        };
        let next = match current {
            Some(c) => c.checked_add(delta).ok_or("integer overflow")?,
            None => delta,
        };
        let expires = match current {
            // An existing counter keeps its expiry.
            Some(_) => map.entries.get(&key).and_then(|e| e.expires),
            None => deadline(ttl_ms),
        };
        let value = next.to_string().into_bytes();
        if !self.fits(&mut map, &key, value.len()) {
            return Err("key-value store full".into());
        }
        map.put(key, Entry { value, expires });
        Ok(next)
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
            .entries
            .get(&key)
            .filter(|e| e.live(now))
            .map(|e| e.value.as_slice());
        if current != expected {
            return false;
        }
        self.insert(&mut map, key, value, ttl_ms)
    }

    /// Insert within the entry-size and quota bounds; false if not.
    fn insert(&self, map: &mut Map, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> bool {
        if key.len() + value.len() > MAX_ENTRY_BYTES || !self.fits(map, &key, value.len()) {
            return false;
        }
        map.put(
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
        self.map
            .lock()
            .entries
            .values()
            .filter(|e| e.live(now))
            .count()
    }

    /// Bytes held (keys plus values, expired entries not yet swept
    /// included).
    pub fn bytes(&self) -> usize {
        self.map.lock().bytes
    }

    /// True when no live entry is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Would writing `value_len` bytes at `key` stay within the quotas?
    /// Expired entries are swept when it would not.
    fn fits(&self, map: &mut Map, key: &str, value_len: usize) -> bool {
        let max_entries = self.max_entries.load(Ordering::Relaxed);
        let max_bytes = self.max_bytes.load(Ordering::Relaxed);
        let within = |map: &Map| {
            let (count, freed) = match map.entries.get(key) {
                Some(old) => (map.entries.len(), key.len() + old.value.len()),
                None => (map.entries.len() + 1, 0),
            };
            count <= max_entries && map.bytes - freed + key.len() + value_len <= max_bytes
        };
        if within(map) {
            return true;
        }
        let now = Instant::now();
        let expired: Vec<String> = map
            .entries
            .iter()
            .filter(|(_, e)| !e.live(now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            map.remove(&k);
        }
        within(map)
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
    fn quotas_bound_entries_and_bytes() {
        let kv = KvStore::default();
        kv.set_limits(2, 1000);
        assert!(kv.set("a".into(), vec![0; 10], None));
        assert!(kv.set("b".into(), vec![0; 10], None));
        assert!(!kv.set("c".into(), vec![0; 10], None), "a third entry");
        assert!(kv.set("a".into(), vec![0; 20], None), "overwriting fits");
        assert_eq!(kv.bytes(), 1 + 20 + 1 + 10);
        assert!(!kv.set("b".into(), vec![0; 990], None), "past the bytes");
        assert!(kv.delete("a"));
        assert_eq!(kv.bytes(), 11);
        assert!(kv.increment("n".into(), 5, None).is_ok());
        assert!(kv.increment("m".into(), 5, None).is_err(), "full");
    }

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
