//! The key-value store filters share across instances: one namespace per
//! filter name, surviving reloads of that filter, bounded in entries.
//!
//! Two backends behind one [`KvStore`]: this process's memory (default)
//! and, with `[filters.kv] backend = "redis"`, the fleet's Redis
//! ([`redis_kv::RedisKv`]), which every replica on the same `[redis]` shares.
//! Both keep the same bounds ([`MAX_ENTRIES`], [`MAX_ENTRY_BYTES`]).
//!
//! The operations are async (`get`, `set`, ...) and have a sync bridge
//! (`get_blocking`, ...) for today's sync host calls: with Redis it waits
//! on a channel while the fleet link's own runtime does the I/O, at most
//! the per-operation deadline. [`KvStore::answer`] applies `[filters.kv]
//! on_error` to an outcome: what the filter sees, or an error that traps.

mod redis_kv;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::{KvBackend, KvOnError};
use crate::fleet::RedisError;

/// Entries one filter may hold by default (`kv_max_entries`); writes past
/// it are dropped (and logged).
pub const MAX_ENTRIES: usize = 100_000;
/// Bytes (keys plus values) one filter may hold by default
/// (`kv_max_bytes`).
pub const MAX_BYTES: usize = 64 << 20;
/// Largest key plus value accepted, bytes.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// The backend did not answer: Redis is unreachable or slower than
/// `[filters.kv] timeout_ms`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key-value backend unavailable: {0}")]
pub struct KvError(#[from] pub RedisError);

/// One filter's namespace, in whichever backend is configured.
#[derive(Debug, Default)]
pub struct KvStore {
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Local(LocalKv),
    Redis(redis_kv::RedisKv),
}

impl Default for Backend {
    fn default() -> Self {
        Backend::Local(LocalKv::default())
    }
}

impl KvStore {
    /// Set the namespace's quotas from the filter's manifest. They bound
    /// the local backend; a Redis namespace keeps the per-entry limit and
    /// Redis's own memory policy (docs/operations.md, "Scaling out").
    pub fn set_limits(&self, max_entries: u64, max_bytes: u64) {
        if let Backend::Local(l) = &self.backend {
            l.set_limits(max_entries, max_bytes);
        }
    }

    /// The live value at `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        match &self.backend {
            Backend::Local(l) => Ok(l.get(key)),
            Backend::Redis(r) => Ok(r.get(key).await?),
        }
    }

    /// Write `value`; false when the namespace is full or the entry too big.
    pub async fn set(
        &self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        match &self.backend {
            Backend::Local(l) => Ok(l.set(key, value, ttl_ms)),
            Backend::Redis(r) => Ok(r.set(key, value, ttl_ms).await?),
        }
    }

    /// Remove `key`; true if a live value was there.
    pub async fn delete(&self, key: &str) -> Result<bool, KvError> {
        match &self.backend {
            Backend::Local(l) => Ok(l.delete(key)),
            Backend::Redis(r) => Ok(r.delete(key).await?),
        }
    }

    /// Add `delta` to the decimal integer at `key` (absent = 0); the inner
    /// error is the filter's (not an integer, overflow, store full).
    pub async fn increment(
        &self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<Result<i64, String>, KvError> {
        match &self.backend {
            Backend::Local(l) => Ok(l.increment(key, delta, ttl_ms)),
            Backend::Redis(r) => Ok(r.increment(key, delta, ttl_ms).await?),
        }
    }

    /// Write `value` only if the live value equals `expected` (`None`:
    /// only if absent).
    pub async fn compare_and_swap(
        &self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        match &self.backend {
            Backend::Local(l) => Ok(l.compare_and_swap(key, expected.as_deref(), value, ttl_ms)),
            Backend::Redis(r) => Ok(r.compare_and_swap(key, expected, value, ttl_ms).await?),
        }
    }

    /// [`KvStore::get`] from a sync caller.
    pub fn get_blocking(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        match &self.backend {
            Backend::Local(l) => Ok(l.get(key)),
            Backend::Redis(r) => Ok(r.get_blocking(key)?),
        }
    }

    /// [`KvStore::set`] from a sync caller.
    pub fn set_blocking(
        &self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        match &self.backend {
            Backend::Local(l) => Ok(l.set(key, value, ttl_ms)),
            Backend::Redis(r) => Ok(r.set_blocking(key, value, ttl_ms)?),
        }
    }

    /// [`KvStore::delete`] from a sync caller.
    pub fn delete_blocking(&self, key: &str) -> Result<bool, KvError> {
        match &self.backend {
            Backend::Local(l) => Ok(l.delete(key)),
            Backend::Redis(r) => Ok(r.delete_blocking(key)?),
        }
    }

    /// [`KvStore::increment`] from a sync caller.
    pub fn increment_blocking(
        &self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<Result<i64, String>, KvError> {
        match &self.backend {
            Backend::Local(l) => Ok(l.increment(key, delta, ttl_ms)),
            Backend::Redis(r) => Ok(r.increment_blocking(key, delta, ttl_ms)?),
        }
    }

    /// [`KvStore::compare_and_swap`] from a sync caller.
    pub fn compare_and_swap_blocking(
        &self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        match &self.backend {
            Backend::Local(l) => Ok(l.compare_and_swap(key, expected.as_deref(), value, ttl_ms)),
            Backend::Redis(r) => Ok(r.compare_and_swap_blocking(key, expected, value, ttl_ms)?),
        }
    }

    /// What the filter gets for `outcome` under `[filters.kv] on_error`:
    /// the answer; or, when the backend failed, `absent(error)` with
    /// `fail_open` and the error (for the host call to trap on) with
    /// `fail_closed`.
    pub fn answer<T>(
        &self,
        outcome: Result<T, KvError>,
        absent: impl FnOnce(&KvError) -> T,
    ) -> Result<T, KvError> {
        match (outcome, &self.backend) {
            (Ok(v), _) => Ok(v),
            (Err(e), Backend::Redis(r)) if r.on_error == KvOnError::FailClosed => Err(e),
            (Err(e), _) => Ok(absent(&e)),
        }
    }
}

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

/// The in-memory backend: one filter's namespace in this process,
/// bounded by its manifest's quotas.
#[derive(Debug)]
pub struct LocalKv {
    map: Mutex<Map>,
    max_entries: AtomicUsize,
    max_bytes: AtomicUsize,
}

impl Default for LocalKv {
    fn default() -> Self {
        LocalKv {
            map: Mutex::new(Map::default()),
            max_entries: AtomicUsize::new(MAX_ENTRIES),
            max_bytes: AtomicUsize::new(MAX_BYTES),
        }
    }
}

fn deadline(ttl_ms: Option<u64>) -> Option<Instant> {
    ttl_ms.map(|ms| Instant::now() + Duration::from_millis(ms))
}

impl LocalKv {
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
pub struct KvRegistry {
    stores: Mutex<HashMap<String, Arc<KvStore>>>,
    redis: Option<&'static Arc<crate::fleet::RedisLink>>,
}

impl std::fmt::Debug for KvRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvRegistry")
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for KvRegistry {
    /// The backend `[filters.kv]` named at start: Redis when the fleet
    /// link was installed with `backend = "redis"`, else local.
    fn default() -> Self {
        let redis = crate::fleet::link().filter(|l| l.kv.backend == KvBackend::Redis);
        KvRegistry {
            stores: Mutex::new(HashMap::new()),
            redis,
        }
    }
}

impl KvRegistry {
    /// The namespace of `filter`, created on first use.
    pub fn namespace(&self, filter: &str) -> Arc<KvStore> {
        self.stores
            .lock()
            .entry(filter.to_string())
            .or_insert_with(|| {
                let backend = match self.redis {
                    Some(link) => Backend::Redis(redis_kv::RedisKv::new(
                        link.clone(),
                        filter,
                        Duration::from_millis(link.kv.timeout_ms),
                        link.kv.on_error,
                    )),
                    None => Backend::Local(LocalKv::default()),
                };
                Arc::new(KvStore { backend })
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_bound_entries_and_bytes() {
        let kv = LocalKv::default();
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
        let kv = LocalKv::default();
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
