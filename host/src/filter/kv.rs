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
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::{KvBackend, KvOnError};
use crate::fleet::RedisError;

/// Entries one filter may hold; writes past it are dropped (and logged).
pub const MAX_ENTRIES: usize = 100_000;
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

/// The in-memory backend: one filter's namespace in this process.
#[derive(Debug, Default)]
pub struct LocalKv {
    map: Mutex<HashMap<String, Entry>>,
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

fn deadline(ttl_ms: Option<u64>) -> Option<Instant> {
    ttl_ms.map(|ms| Instant::now() + Duration::from_millis(ms))
}

impl LocalKv {
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
