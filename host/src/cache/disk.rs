//! The disk tier: every stored response that fits `[cache.disk]
//! max_object_mb` is also written to a directory on disk, bounded by
//! `max_size_mb`. A lookup that misses the memory store looks here; a hit
//! streams its body from the file, never reading it whole into memory.
//!
//! Built on `cacache` (content-addressed files, each checked against its
//! SHA-256 integrity as it is read; an append-only index of keys with JSON
//! metadata; atomic writes through a temporary file). What this module adds:
//! the bound (least recently used first), an index in memory rebuilt from
//! the crate's on start, and what to do with a file that fails its check.
//!
//! Why `cacache` and not `foyer`'s hybrid cache: foyer reads a disk entry
//! back whole into memory (its values are decoded objects), which is what a
//! disk tier for large objects must not do; cacache hands out a reader, so a
//! hit streams.
//!
//! Integrity: an entry found on start is not trusted until its file has been
//! read through once and matched its hash; that happens before the first
//! hit answers (a mismatch drops the entry, logs, and the request goes to
//! the origin). Every streamed hit checks the hash again at its end: a file
//! that went bad while the process ran is dropped and the response is cut
//! short with an error (hyper closes the connection), so a client never gets
//! a complete corrupted body.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use cacache::{Algorithm, Integrity, WriteOpts};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode, Uri};
use http_body::Frame;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::policy::Rules;
use super::store::{CachedResponse, StoredBody, Variants};
use crate::body::{BoxError, ProxyBody};

/// Metadata format version written with each entry.
const META_VERSION: u8 = 1;

/// Bytes read from a file per body frame.
const CHUNK: usize = 64 * 1024;

/// A body stored on disk (see the module doc).
pub struct DiskBody {
    disk: Weak<Disk>,
    dir: Arc<Path>,
    /// Its `cacache` index key (primary key and variant).
    name: Arc<str>,
    primary: Arc<str>,
    pub(super) sri: Integrity,
    pub(super) len: u64,
    /// Read through and matched its hash in this process (or written by it).
    verified: AtomicBool,
}

impl DiskBody {
    /// Checked in this process already?
    pub fn verified(&self) -> bool {
        self.verified.load(Ordering::Acquire)
    }

    /// Read the whole file and check it against its hash (no copy kept);
    /// a mismatch drops the entry. True if it can be served.
    pub async fn verify(&self) -> bool {
        if self.verified() {
            return true;
        }
        let result = async {
            let mut r = cacache::Reader::open_hash(&*self.dir, self.sri.clone()).await?;
            let n = tokio::io::copy(&mut r, &mut tokio::io::sink()).await?;
            r.check()?;
            Ok::<u64, BoxError>(n)
        }
        .await;
        match result {
            Ok(n) if n == self.len => {
                self.verified.store(true, Ordering::Release);
                true
            }
            Ok(n) => {
                self.corrupt(&format!("{n} bytes, {} expected", self.len));
                false
            }
            Err(e) => {
                self.corrupt(&e.to_string());
                false
            }
        }
    }

    /// The file failed its check: log, drop the entry, never serve it.
    fn corrupt(&self, why: &str) {
        tracing::warn!(
            key = %self.primary,
            file = %self.sri,
            reason = why,
            "cache: corrupt disk entry dropped, not served"
        );
        if let Some(disk) = self.disk.upgrade() {
            disk.stats.corrupt.fetch_add(1, Ordering::Relaxed);
            disk.stats.m_corrupt.increment(1);
            disk.forget(&self.primary, Some(&self.name));
        }
    }

    /// The body, streamed from the file (`CHUNK` bytes at a time), its hash
    /// checked at the end.
    pub fn stream(self: &Arc<Self>) -> ProxyBody {
        if let Some(disk) = self.disk.upgrade() {
            disk.stats.hits.fetch_add(1, Ordering::Relaxed);
            disk.stats.m_hits.increment(1);
            disk.touch(&self.primary);
        }
        enum St {
            Open(Arc<DiskBody>),
            /// The reader, bytes read, and the last chunk read, held back
            /// until the next read (or the hash check at the end) allows it.
            Reading(Arc<DiskBody>, Box<cacache::Reader>, u64, Option<Bytes>),
            Done,
        }
        // The last chunk is sent only after the hash matched, so a body
        // that fails its check never reaches the client whole (hyper ends
        // a response once `Content-Length` bytes are written).
        let stream = futures_util::stream::unfold(St::Open(self.clone()), |st| async move {
            let (d, mut r, mut read, mut held) = match st {
                St::Done => return None,
                St::Reading(d, r, read, held) => (d, r, read, held),
                St::Open(d) => match cacache::Reader::open_hash(&*d.dir, d.sri.clone()).await {
                    Ok(r) => (d, Box::new(r), 0, None),
                    Err(e) => {
                        d.corrupt(&e.to_string());
                        let err: BoxError = Box::new(e);
                        return Some((Err(err), St::Done));
                    }
                },
            };
            use tokio::io::AsyncReadExt;
            loop {
                let mut buf = BytesMut::with_capacity(CHUNK);
                match r.read_buf(&mut buf).await {
                    Ok(0) => {
                        let whole = read == d.len;
                        return match r.check() {
                            Ok(_) if whole => held.map(|h| (Ok(Frame::data(h)), St::Done)),
                            Ok(_) => {
                                d.corrupt(&format!("{read} bytes, {} expected", d.len));
                                Some((Err("disk cache entry is short".into()), St::Done))
                            }
                            Err(e) => {
                                d.corrupt(&e.to_string());
                                Some((Err(Box::new(e) as BoxError), St::Done))
                            }
                        };
                    }
                    Ok(n) => {
                        read += n as u64;
                        if read > d.len {
                            d.corrupt("longer than stored");
                            return Some((Err("disk cache entry is long".into()), St::Done));
                        }
                        if let Some(prev) = held.replace(buf.freeze()) {
                            return Some((Ok(Frame::data(prev)), St::Reading(d, r, read, held)));
                        }
                    }
                    Err(e) => {
                        d.corrupt(&e.to_string());
                        return Some((Err(Box::new(e) as BoxError), St::Done));
                    }
                }
            }
        });
        crate::body::boxed(http_body_util::StreamBody::new(stream))
    }
}

/// What is kept with each file in the `cacache` index (JSON): enough to
/// build the [`CachedResponse`] again on start.
#[derive(Serialize, Deserialize)]
struct Meta {
    v: u8,
    primary: String,
    upstream: String,
    /// When the response was received (Unix milliseconds).
    at_ms: u64,
    uri: String,
    /// The request fields the entry depends on (see `CachedResponse::request`).
    req: Vec<(String, Vec<u8>)>,
    status: u16,
    head: Vec<(String, Vec<u8>)>,
    tags: Vec<String>,
}

fn fields(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn header_map(fields: &[(String, Vec<u8>)]) -> Option<HeaderMap> {
    let mut h = HeaderMap::with_capacity(fields.len());
    for (k, v) in fields {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).ok()?,
            HeaderValue::from_bytes(v).ok()?,
        );
    }
    Some(h)
}

/// Index keys and files to remove (see [`Disk::remove_files`]).
type Gone = Vec<(Option<Arc<str>>, Option<Integrity>)>;

/// One stored variant.
struct Slot {
    entry: Arc<CachedResponse>,
    name: Arc<str>,
    sri: Integrity,
    size: u64,
    used: u64,
}

#[derive(Default)]
struct Index {
    keys: HashMap<Arc<str>, Vec<Slot>>,
    bytes: u64,
    clock: u64,
}

impl Index {
    /// Is `sri`'s file named by any slot?
    fn refers(&self, sri: &Integrity) -> bool {
        self.keys.values().flatten().any(|s| &s.sri == sri)
    }

    /// Remove `name` under `primary` (every variant when `None`); the files
    /// no slot names any more.
    fn take(&mut self, primary: &str, name: Option<&str>) -> Gone {
        let Some(slots) = self.keys.get_mut(primary) else {
            return Vec::new();
        };
        let (gone, kept): (Vec<Slot>, Vec<Slot>) = slots
            .drain(..)
            .partition(|s| name.is_none_or(|n| *s.name == *n));
        *slots = kept;
        if slots.is_empty() {
            self.keys.remove(primary);
        }
        let mut out = Vec::new();
        for s in gone {
            self.bytes = self.bytes.saturating_sub(s.size);
            let file = (!self.refers(&s.sri)).then_some(s.sri);
            out.push((Some(s.name), file));
        }
        out
    }
}

/// Counters of the disk tier, mirrored as metrics.
struct DiskStats {
    hits: AtomicU64,
    writes: AtomicU64,
    evictions: AtomicU64,
    corrupt: AtomicU64,
    m_hits: metrics::Counter,
    m_writes: metrics::Counter,
    m_evictions: metrics::Counter,
    m_corrupt: metrics::Counter,
    bytes: metrics::Gauge,
}

/// See the module doc.
pub struct Disk {
    dir: Arc<Path>,
    max_bytes: u64,
    max_object_bytes: u64,
    index: Mutex<Index>,
    stats: DiskStats,
    me: Weak<Disk>,
}

impl Disk {
    /// The disk tier in `dir` (created if missing), bounded by `max_bytes`,
    /// holding objects up to `max_object_bytes`; what the directory already
    /// holds is indexed (read by `rules`), over the bound evicted.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        max_object_bytes: u64,
        rules: &Rules,
    ) -> std::io::Result<Arc<Disk>> {
        std::fs::create_dir_all(dir)?;
        let disk = Arc::new_cyclic(|me| Disk {
            dir: Arc::from(dir),
            max_bytes,
            max_object_bytes,
            index: Mutex::new(Index::default()),
            stats: DiskStats {
                hits: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                evictions: AtomicU64::new(0),
                corrupt: AtomicU64::new(0),
                m_hits: metrics::counter!("sluicegate_cache_disk_hits_total"),
                m_writes: metrics::counter!("sluicegate_cache_disk_writes_total"),
                m_evictions: metrics::counter!("sluicegate_cache_disk_evictions_total"),
                m_corrupt: metrics::counter!("sluicegate_cache_disk_corrupt_total"),
                bytes: metrics::gauge!("sluicegate_cache_disk_bytes"),
            },
            me: me.clone(),
        });
        disk.load(rules);
        Ok(disk)
    }

    /// The directory and bounds (a reload with others opens it again).
    pub fn settings(&self) -> (PathBuf, u64, u64) {
        (
            self.dir.to_path_buf(),
            self.max_bytes,
            self.max_object_bytes,
        )
    }

    /// Largest object written.
    pub fn max_object_bytes(&self) -> u64 {
        self.max_object_bytes
    }

    /// Index what the directory holds: every entry whose metadata reads
    /// and whose file exists with the recorded size. The files' hashes are
    /// checked later, before each entry's first hit.
    fn load(&self, rules: &Rules) {
        let mut loaded = Vec::new();
        let mut dropped = Vec::new();
        for md in cacache::index::ls(&self.dir) {
            let md = match md {
                Ok(md) => md,
                Err(e) => {
                    tracing::warn!(error = %e, "cache: unreadable disk index entry skipped");
                    continue;
                }
            };
            let path = content_file(&self.dir, &md.integrity);
            let on_disk = std::fs::metadata(&path).map(|m| m.len()).ok();
            let entry = serde_json::from_value::<Meta>(md.metadata.clone())
                .ok()
                .filter(|_| on_disk == Some(md.size as u64))
                .and_then(|meta| self.rebuild(meta, &md, rules));
            match entry {
                Some(e) => loaded.push((md, e)),
                None => {
                    tracing::warn!(
                        key = %md.key,
                        "cache: disk entry dropped on load (missing file, size or metadata)"
                    );
                    dropped.push(md);
                }
            }
        }
        // Oldest first, so the newest are kept when over the bound.
        loaded.sort_by_key(|(md, _)| md.time);
        let mut ix = self.index.lock();
        for (md, (primary, entry)) in loaded {
            ix.clock += 1;
            let used = ix.clock;
            ix.bytes += md.size as u64;
            ix.keys.entry(primary).or_default().push(Slot {
                entry,
                name: Arc::from(md.key.as_str()),
                sri: md.integrity,
                size: md.size as u64,
                used,
            });
        }
        for slots in ix.keys.values_mut() {
            slots.reverse();
        }
        let evicted = self.make_room(&mut ix, 0);
        let (n, bytes) = (ix.keys.values().map(Vec::len).sum::<usize>(), ix.bytes);
        drop(ix);
        for md in dropped {
            let _ = cacache::index::delete(&self.dir, &md.key);
        }
        self.remove_files(evicted);
        self.stats.bytes.set(bytes as f64);
        tracing::info!(dir = %self.dir.display(), entries = n, bytes, "cache: disk tier loaded");
    }

    /// The [`CachedResponse`] `meta` describes, its body on disk
    /// (unverified), and its primary key.
    fn rebuild(
        &self,
        meta: Meta,
        md: &cacache::Metadata,
        rules: &Rules,
    ) -> Option<(Arc<str>, Arc<CachedResponse>)> {
        if meta.v != META_VERSION {
            return None;
        }
        let (mut req, ()) = http::Request::get(meta.uri.parse::<Uri>().ok()?)
            .body(())
            .ok()?
            .into_parts();
        req.headers = header_map(&meta.req)?;
        let (mut head, ()) = http::Response::new(()).into_parts();
        head.status = StatusCode::from_u16(meta.status).ok()?;
        head.headers = header_map(&meta.head)?;
        let primary: Arc<str> = Arc::from(meta.primary.as_str());
        let body = StoredBody::Disk(Arc::new(DiskBody {
            disk: self.me.clone(),
            dir: self.dir.clone(),
            name: Arc::from(md.key.as_str()),
            primary: primary.clone(),
            sri: md.integrity.clone(),
            len: md.size as u64,
            verified: AtomicBool::new(false),
        }));
        let at = UNIX_EPOCH + Duration::from_millis(meta.at_ms);
        let tags = meta.tags.into_iter().map(Box::from).collect();
        let entry = CachedResponse::with_body(
            req,
            head,
            body,
            Arc::from(meta.upstream.as_str()),
            at,
            rules,
            Some(tags),
        );
        Some((primary, entry))
    }

    /// Every variant of `primary` on disk, newest first (no I/O).
    pub fn get(&self, primary: &str) -> Option<Variants> {
        let mut ix = self.index.lock();
        ix.clock += 1;
        let now = ix.clock;
        let slots = ix.keys.get_mut(primary)?;
        for s in slots.iter_mut() {
            s.used = now;
        }
        Some(slots.iter().map(|s| s.entry.clone()).collect())
    }

    /// Mark `primary` as just used (eviction is least recently used first).
    fn touch(&self, primary: &str) {
        let mut ix = self.index.lock();
        ix.clock += 1;
        let now = ix.clock;
        if let Some(slots) = ix.keys.get_mut(primary) {
            for s in slots.iter_mut() {
                s.used = now;
            }
        }
    }

    /// Evict least recently used slots until `incoming` more bytes fit;
    /// the index keys and files to remove.
    fn make_room(&self, ix: &mut Index, incoming: u64) -> Gone {
        let mut out = Vec::new();
        while ix.bytes + incoming > self.max_bytes && !ix.keys.is_empty() {
            let Some((primary, name)) = ix
                .keys
                .iter()
                .flat_map(|(k, v)| v.iter().map(move |s| (k, s)))
                .min_by_key(|(_, s)| s.used)
                .map(|(k, s)| (k.clone(), s.name.clone()))
            else {
                break;
            };
            let gone = ix.take(&primary, Some(&name));
            self.stats
                .evictions
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
            self.stats.m_evictions.increment(gone.len() as u64);
            out.extend(gone);
        }
        out
    }

    /// Remove index keys and files (after they left the index); a key
    /// of `None` only removes its file.
    fn remove_files(&self, gone: Vec<(Option<Arc<str>>, Option<Integrity>)>) {
        for (name, file) in gone {
            if let Some(name) = name {
                if let Err(e) = cacache::index::delete(&self.dir, &name) {
                    tracing::debug!(error = %e, "cache: disk index delete");
                }
            }
            if let Some(sri) = file {
                let _ = cacache::remove_hash_sync(&self.dir, &sri);
            }
        }
    }

    /// Drop `name` (every variant when `None`) of `primary` from the index
    /// and the directory.
    pub fn forget(&self, primary: &str, name: Option<&str>) {
        let (gone, bytes) = {
            let mut ix = self.index.lock();
            let gone = ix.take(primary, name);
            (gone, ix.bytes)
        };
        if !gone.is_empty() {
            self.stats.bytes.set(bytes as f64);
            let me = self.me.clone();
            let blocking = move || {
                if let Some(d) = me.upgrade() {
                    d.remove_files(gone)
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(blocking)),
                Err(_) => blocking(),
            }
        }
    }

    /// Remove every primary key `purge` selects; how many.
    pub fn purge(&self, purge: impl Fn(&str, &Variants) -> bool) -> usize {
        let keys: Vec<Arc<str>> = {
            let ix = self.index.lock();
            ix.keys
                .iter()
                .filter(|(k, slots)| {
                    let v: Variants = slots.iter().map(|s| s.entry.clone()).collect();
                    purge(k, &v)
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        for k in &keys {
            self.forget(k, None);
        }
        keys.len()
    }

    /// Write `entry` (stored under `primary`, `request` being what it
    /// depends on) to disk in the background: its body if it is in memory,
    /// else only its new metadata (a refreshed entry whose body is on disk).
    pub fn write(&self, primary: Arc<str>, entry: &Arc<CachedResponse>, rules: &Rules) {
        let len = entry.body_len();
        if len > self.max_object_bytes || len > self.max_bytes {
            return;
        }
        let name: Arc<str> = Arc::from(format!("{primary}\n{}", entry.variant));
        let req = entry.request();
        let meta = Meta {
            v: META_VERSION,
            primary: primary.to_string(),
            upstream: entry.upstream.to_string(),
            at_ms: entry
                .received
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            uri: req.uri.to_string(),
            req: fields(&req.headers),
            status: entry.head.status.as_u16(),
            head: fields(&entry.head.headers),
            tags: entry.tags.iter().map(|t| t.to_string()).collect(),
        };
        let Ok(meta) = serde_json::to_value(meta) else {
            return;
        };
        let Some(me) = self.me.upgrade() else { return };
        let entry = entry.clone();
        let rules = rules.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            if let Err(e) = me.write_now(primary, name, &entry, meta, &rules).await {
                tracing::warn!(error = %e, "cache: disk write failed");
            }
        });
    }

    async fn write_now(
        &self,
        primary: Arc<str>,
        name: Arc<str>,
        entry: &Arc<CachedResponse>,
        meta: serde_json::Value,
        rules: &Rules,
    ) -> Result<(), BoxError> {
        let len = entry.body_len();
        let opts = WriteOpts::new()
            .algorithm(Algorithm::Sha256)
            .size(len as usize)
            .metadata(meta);
        let (sri, verified) = match &entry.body {
            StoredBody::Mem(bytes) => {
                let sri = write_file(&self.dir, &name, bytes.clone(), opts).await?;
                (sri, true)
            }
            StoredBody::Disk(d) => {
                let sri = d.sri.clone();
                cacache::index::insert_async(&self.dir, &name, opts.integrity(sri.clone())).await?;
                (sri, d.verified())
            }
        };
        // The entry as the disk tier serves it: its body in the file.
        let body = StoredBody::Disk(Arc::new(DiskBody {
            disk: self.me.clone(),
            dir: self.dir.clone(),
            name: name.clone(),
            primary: primary.clone(),
            sri: sri.clone(),
            len,
            verified: AtomicBool::new(verified),
        }));
        let on_disk = entry.with_stored_body(body, rules);
        let (gone, bytes) = {
            let mut ix = self.index.lock();
            let mut gone = ix.take(&primary, Some(&name));
            // The key just written stays in the crate's index (only an old
            // file of it may go).
            for g in gone.iter_mut() {
                if g.0.as_deref() == Some(&*name) {
                    g.0 = None;
                }
            }
            gone.extend(self.make_room(&mut ix, len));
            ix.clock += 1;
            let used = ix.clock;
            ix.bytes += len;
            let slots = ix.keys.entry(primary).or_default();
            slots.insert(
                0,
                Slot {
                    entry: on_disk,
                    name: name.clone(),
                    sri,
                    size: len,
                    used,
                },
            );
            // Files evicted that the new slot names are kept.
            let keep: Vec<bool> = gone
                .iter()
                .map(|(_, f)| f.as_ref().is_some_and(|f| ix.refers(f)))
                .collect();
            for (g, k) in gone.iter_mut().zip(keep) {
                if k {
                    g.1 = None;
                }
            }
            (gone, ix.bytes)
        };
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.m_writes.increment(1);
        self.stats.bytes.set(bytes as f64);
        if !gone.is_empty() {
            let me = self.me.clone();
            tokio::task::spawn_blocking(move || {
                if let Some(d) = me.upgrade() {
                    d.remove_files(gone)
                }
            });
        }
        Ok(())
    }

    /// `GET /cache`'s `disk` object.
    pub fn stats_json(&self) -> serde_json::Value {
        let (entries, bytes) = {
            let ix = self.index.lock();
            (ix.keys.values().map(Vec::len).sum::<usize>(), ix.bytes)
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "path": self.dir.display().to_string(),
            "entries": entries,
            "bytes": bytes,
            "max_bytes": self.max_bytes,
            "max_object_bytes": self.max_object_bytes,
            "hits": load(&self.stats.hits),
            "writes": load(&self.stats.writes),
            "evictions": load(&self.stats.evictions),
            "corrupt": load(&self.stats.corrupt),
        })
    }
}

/// Write `bytes` as the file of index key `name`, off the runtime's threads.
async fn write_file(
    dir: &Path,
    name: &str,
    bytes: Bytes,
    opts: WriteOpts,
) -> Result<Integrity, BoxError> {
    let (dir, name) = (dir.to_path_buf(), name.to_string());
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut w = opts.open_sync(&dir, &name)?;
        w.write_all(&bytes)?;
        Ok::<_, BoxError>(w.commit()?)
    })
    .await?
}

/// Where `cacache` keeps the file of `sri` (its `content-v2` layout: the
/// algorithm, then the hex digest split 2/2/rest).
fn content_file(dir: &Path, sri: &Integrity) -> PathBuf {
    let (algo, hex) = sri.to_hex();
    let mut p = dir.join("content-v2").join(algo.to_string());
    if hex.len() > 4 {
        p.push(&hex[0..2]);
        p.push(&hex[2..4]);
        p.push(&hex[4..]);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_content_path_is_cacaches() {
        let dir = std::env::temp_dir().join(format!("sg-disk-{}", std::process::id()));
        let sri = cacache::write_hash_sync(&dir, b"hello").unwrap();
        assert!(content_file(&dir, &sri).is_file(), "{sri}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
