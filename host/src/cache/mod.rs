//! The native HTTP cache: an RFC 9111 shared cache in front of a route's
//! upstream, with coalesced misses and stale serving.
//!
//! Where it sits in a request's journey (see `proxy.rs`): after the route
//! match and the request filters (so a hit never skips authentication),
//! before the balancer; the response filters run on whatever it answers,
//! hits included. It stores the origin's response, before any response
//! filter touched it. The life of an entry is told in `docs/cache.md`.
//!
//! - [`serve`]: the proxy-facing lookup / store flow and [`Origin`];
//! - [`revalidate`]: stale entries (stale-while-revalidate, conditional
//!   revalidation and `304` merge, stale-if-error);
//! - [`policy`]: RFC 9111 decisions beyond `http-cache-semantics`;
//! - [`rfc`]: the corrected view of a response the crate decides on;
//! - [`conditional`], [`range`]: `304`, `206` and `416` from the store;
//! - [`key`]: the cache key, unkeyed headers, invalidation targets;
//! - [`store`]: the byte-bounded store and [`store::CachedResponse`];
//! - [`disk`]: the disk tier (`[cache.disk]`), under the memory store;
//! - [`flight`]: coalescing; [`tee`]: store while streaming;
//! - [`status`]: `Cache-Status`; [`admin`]: purge and statistics.

pub mod admin;
pub mod conditional;
pub mod disk;
pub mod flight;
pub mod key;
pub mod policy;
pub mod range;
pub mod revalidate;
pub mod rfc;
pub mod serve;
pub mod status;
pub mod store;
pub mod tee;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use serve::{CacheRequest, MakeOrigin, Origin, OriginFuture};

use crate::config::CacheConfig;
use flight::Flights;
use store::{CachedResponse, Store};

/// The process's cache: one store shared by every worker and kept across
/// reloads (rebuilt, empty, only when its bounds change).
pub struct HttpCache {
    store: Arc<Store>,
    /// The disk tier, when `[cache.disk]` is set.
    disk: Option<Arc<disk::Disk>>,
    flights: Arc<Flights>,
    stats: Arc<Stats>,
    settings: Settings,
}

/// The `[cache]` settings read on the request path.
#[derive(Debug, Clone)]
struct Settings {
    max_variants: usize,
    lock_timeout: Duration,
    rules: policy::Rules,
}

impl HttpCache {
    /// The cache for `config`, keeping `previous`'s store and counters
    /// when the bounds did not change.
    pub fn new(config: &CacheConfig, previous: Option<&HttpCache>) -> HttpCache {
        let bounds = (
            *config.max_bytes.get_ref(),
            *config.max_object_bytes.get_ref(),
        );
        let store = match previous {
            Some(p) if p.store.bounds() == bounds => p.store.clone(),
            _ => {
                if previous.is_some() {
                    tracing::info!(
                        max_bytes = bounds.0,
                        max_object_bytes = bounds.1,
                        "cache bounds changed: starting an empty store"
                    );
                }
                Arc::new(Store::new(bounds.0, bounds.1))
            }
        };
        let rules = policy::Rules::new(config.heuristic_percent, config.reading());
        let disk = config.disk.as_ref().and_then(|d| {
            let want = (d.path.clone(), d.max_bytes(), d.max_object_bytes());
            if let Some(p) = previous.and_then(|p| p.disk.as_ref()) {
                if p.settings() == want {
                    return Some(p.clone());
                }
            }
            match disk::Disk::open(&want.0, want.1, want.2, &rules) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::error!(path = %want.0.display(), error = %e, "cache: disk tier not opened; memory only");
                    None
                }
            }
        });
        let stats = previous
            .map(|p| p.stats.clone())
            .unwrap_or_else(|| Arc::new(Stats::new()));
        stats.bytes.set(store.bytes() as f64);
        HttpCache {
            store,
            disk,
            flights: previous.map(|p| p.flights.clone()).unwrap_or_default(),
            stats,
            settings: Settings {
                max_variants: config.max_variants,
                lock_timeout: Duration::from_millis(config.lock_timeout_ms),
                rules,
            },
        }
    }

    /// Store `entry` as a variant of `key`: in memory when it fits there,
    /// and on disk (written in the background) when there is a disk tier.
    fn put(&self, key: Arc<str>, entry: Arc<CachedResponse>) {
        if let Some(disk) = &self.disk {
            disk.write(key.clone(), &entry, &self.settings.rules);
        }
        if entry.body_len() <= self.store.bounds().1 || entry.body.disk().is_some() {
            self.store.put(key, entry, self.settings.max_variants);
            self.stats.bytes.set(self.store.bytes() as f64);
        }
    }

    /// Drop every variant of `key` (memory and disk).
    fn invalidate(&self, key: &str) {
        if self.store.remove(key) {
            self.stats.bytes.set(self.store.bytes() as f64);
        }
        if let Some(disk) = &self.disk {
            disk.forget(key, None);
        }
    }

    /// The largest body this cache stores for a route whose memory limit
    /// is `route_limit` (the disk tier may take larger ones).
    fn object_limit(&self, route_limit: u64) -> u64 {
        match &self.disk {
            Some(d) => route_limit.max(d.max_object_bytes()),
            None => route_limit,
        }
    }

    /// Every stored variant of `key`: the memory store's, else the disk
    /// tier's.
    fn variants(&self, key: &str) -> Option<store::Variants> {
        self.store
            .get(key)
            .or_else(|| self.disk.as_ref().and_then(|d| d.get(key)))
    }
}

/// Counters since start (kept across reloads), mirrored as metrics.
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
    revalidations: AtomicU64,
    purged: AtomicU64,
    m_hits: metrics::Counter,
    m_misses: metrics::Counter,
    m_stale: metrics::Counter,
    m_revalidations: metrics::Counter,
    m_purged: metrics::Counter,
    bytes: metrics::Gauge,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            revalidations: AtomicU64::new(0),
            purged: AtomicU64::new(0),
            m_hits: metrics::counter!("sluicegate_cache_hits_total"),
            m_misses: metrics::counter!("sluicegate_cache_misses_total"),
            m_stale: metrics::counter!("sluicegate_cache_stale_total"),
            m_revalidations: metrics::counter!("sluicegate_cache_revalidations_total"),
            m_purged: metrics::counter!("sluicegate_cache_purged_total"),
            bytes: metrics::gauge!("sluicegate_cache_bytes"),
        }
    }

    fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.m_hits.increment(1);
    }

    fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.m_misses.increment(1);
    }

    /// A stale response was served (stale-while-revalidate or -if-error).
    fn stale(&self) {
        self.stale.fetch_add(1, Ordering::Relaxed);
        self.m_stale.increment(1);
    }

    fn revalidation(&self) {
        self.revalidations.fetch_add(1, Ordering::Relaxed);
        self.m_revalidations.increment(1);
    }
}
