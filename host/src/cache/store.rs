//! The store: stored responses by primary key, bounded by bytes.
//!
//! Backed by `quick_cache` (a sharded, concurrent cache with a CLOCK-Pro
//! style eviction policy and a weigher): a key's weight is the size of its
//! variants' bodies and heads, and inserting past the bound evicts at once,
//! so the total never exceeds `max_bytes`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, Uri};
use http_cache_semantics::{BeforeRequest, CachePolicy};
use quick_cache::sync::Cache;
use quick_cache::{Lifecycle, OptionsBuilder, Weighter};

use super::policy::{self, Rules, StaleRules};
use super::status::CacheStatus;
use crate::body::{self, ProxyBody};

/// One stored response (one variant of a URL).
pub struct CachedResponse {
    /// The RFC 9111 view of it: freshness, validators, `Vary` matching.
    pub policy: CachePolicy,
    /// The stored head: the origin's, without hop-by-hop fields or tag
    /// fields, `Content-Length` set. Hits are answered with it (and `Age`),
    /// not with the policy's view of it (see `rfc.rs`).
    pub head: http::response::Parts,
    /// Purge tags (`Surrogate-Key`, `Cache-Tag`).
    pub tags: Box<[Box<str>]>,
    /// The whole body: in memory, or a file of the disk tier.
    pub body: StoredBody,
    /// When the response was received (the policy's response time).
    pub received: SystemTime,
    /// The request fields the entry depends on (URI, `Host`, the fields
    /// `Vary` names, `Cache-Control`, `Pragma`), for the disk tier.
    request: http::request::Parts,
    /// The upstream that answered.
    pub upstream: Arc<str>,
    /// Upstream and `Vary`-named request values: see [`policy::variant_id`].
    pub variant: String,
    /// When it stops being fresh.
    pub fresh_until: SystemTime,
    /// What it allows once stale.
    pub stale: StaleRules,
    /// Bytes it is accounted for.
    pub weight: u64,
    /// The precomputed answer to plain requests (see [`QuickHit`]).
    quick: Option<QuickHit>,
}

/// A fresh hit's head, worked out once when the response is stored.
///
/// For each fresh hit, `CachePolicy::before_request` parses the request's
/// and the response's `Cache-Control` and compares `Vary` headers by string
/// name. That was about a sixth of the CPU time of a cache hit. For a
/// request that carries no `Cache-Control` or `Pragma` of its own, to a
/// response without `Vary`, the policy's answer depends only on the time:
/// fresh until `fresh_until`, with an `Age` that grows with the clock. So
/// the policy is asked once here, and a hit only clones the stored head and
/// sets `Age`. Any other request goes through the policy.
struct QuickHit {
    /// The stored request's URI and `Host` (the policy's `request_matches`).
    uri: Uri,
    host: Option<HeaderValue>,
    /// The stored head, with room for `Age`.
    head: http::response::Parts,
    /// When `head` was computed, and the response's age then.
    at: SystemTime,
    age_at: Duration,
}

impl QuickHit {
    /// The quick answer for `policy` and `head`, stored for a request to
    /// `uri` with `host`, at `now` — none if the policy must see each request.
    fn new(
        policy: &CachePolicy,
        head: &http::response::Parts,
        (uri, host): (Uri, Option<HeaderValue>),
        now: SystemTime,
    ) -> Option<QuickHit> {
        if head.headers.contains_key(header::VARY) {
            return None;
        }
        let age_at = policy.age(now);
        // The plainest request for this URI: is it fresh for it?
        let (mut plain, ()) = http::Request::get(uri.clone()).body(()).ok()?.into_parts();
        if let Some(h) = &host {
            plain.headers.insert(header::HOST, h.clone());
        }
        let BeforeRequest::Fresh(_) = policy.before_request(&plain, now) else {
            return None;
        };
        let mut fresh = head.clone();
        // Each hit clones this head and adds to it (`Age`, `Cache-Status`,
        // `Via`). A clone keeps the hash index's size but not the entries'
        // spare room, so: `Age` holds a slot to be overwritten, and the
        // index has room for a few more names, so that adding them does not
        // rebuild it on every hit.
        fresh
            .headers
            .insert(header::AGE, HeaderValue::from_static("0"));
        fresh.headers.reserve(8);
        Some(QuickHit {
            uri,
            host,
            head: fresh,
            at: now,
            age_at,
        })
    }
}

/// Where a stored body is.
#[derive(Clone)]
pub enum StoredBody {
    /// In memory, shared by every hit.
    Mem(Bytes),
    /// In a file of the disk tier, streamed for each hit.
    Disk(Arc<super::disk::DiskBody>),
}

impl StoredBody {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            StoredBody::Mem(b) => b.len() as u64,
            StoredBody::Disk(d) => d.len,
        }
    }

    /// Empty?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The disk file, if that is where it is.
    pub fn disk(&self) -> Option<&Arc<super::disk::DiskBody>> {
        match self {
            StoredBody::Disk(d) => Some(d),
            StoredBody::Mem(_) => None,
        }
    }
}

/// The request fields a stored entry depends on (see `CachedResponse`).
fn kept_request(req: &http::request::Parts, head: &http::response::Parts) -> http::request::Parts {
    let (mut kept, ()) = http::Request::get(req.uri.clone())
        .body(())
        .expect("a GET with a valid URI")
        .into_parts();
    let mut names = vec![header::HOST, header::CACHE_CONTROL, header::PRAGMA];
    for v in head.headers.get_all(header::VARY) {
        if let Ok(v) = v.to_str() {
            names.extend(
                v.split(',')
                    .filter_map(|n| header::HeaderName::from_bytes(n.trim().as_bytes()).ok()),
            );
        }
    }
    for n in names {
        for v in req.headers.get_all(&n) {
            kept.headers.append(n.clone(), v.clone());
        }
    }
    kept
}

/// Every variant of a key, newest first (cheap to clone).
pub type Variants = Arc<[Arc<CachedResponse>]>;

impl CachedResponse {
    /// A response the origin sent for `req` at `now` (its head without
    /// hop-by-hop fields), read by `rules`.
    pub fn new(
        req: http::request::Parts,
        head: http::response::Parts,
        body: Bytes,
        upstream: Arc<str>,
        now: SystemTime,
        rules: &Rules,
    ) -> Arc<CachedResponse> {
        Self::with_body(req, head, StoredBody::Mem(body), upstream, now, rules, None)
    }

    /// [`Self::new`] for a body anywhere; `tags` given (the head has no tag
    /// fields) or taken from the head.
    pub fn with_body(
        req: http::request::Parts,
        mut head: http::response::Parts,
        body: StoredBody,
        upstream: Arc<str>,
        now: SystemTime,
        rules: &Rules,
        tags: Option<Vec<Box<str>>>,
    ) -> Arc<CachedResponse> {
        let tags = match tags {
            Some(t) => t,
            None => policy::take_tags(&mut head.headers),
        };
        let request = kept_request(&req, &head);
        let view = rules.view(&head).unwrap_or_else(|| head.clone());
        let policy = CachePolicy::new_options(&req, &view, now, rules.opts);
        let variant = policy::variant_id(&upstream, &req.headers, &head.headers);
        let identity = (req.uri, req.headers.get(header::HOST).cloned());
        let fresh_until = now + policy.time_to_live(now);
        let quick = QuickHit::new(&policy, &head, identity, now);
        let stale = StaleRules::of(&view.headers);
        let head_bytes: usize = head
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        // The policy keeps the view and the request's head.
        let policy_bytes = head_bytes + 512;
        let quick_bytes = if quick.is_some() { head_bytes } else { 0 };
        let tag_bytes: usize = tags.iter().map(|t| t.len() + 16).sum();
        let in_memory = match &body {
            StoredBody::Mem(b) => b.len(),
            StoredBody::Disk(_) => 0,
        };
        let weight = (in_memory
            + head_bytes * 2
            + policy_bytes
            + quick_bytes
            + tag_bytes
            + variant.len()
            + 256) as u64;
        Arc::new(CachedResponse {
            policy,
            head,
            tags: tags.into(),
            body,
            received: now,
            request,
            upstream,
            variant,
            fresh_until,
            stale,
            weight,
            quick,
        })
    }

    /// The request fields this entry depends on.
    pub fn request(&self) -> &http::request::Parts {
        &self.request
    }

    /// Its body's length.
    pub fn body_len(&self) -> u64 {
        self.body.len()
    }

    /// The same entry with its body at `body` (the disk tier's copy).
    pub fn with_stored_body(&self, body: StoredBody, rules: &Rules) -> Arc<CachedResponse> {
        let (mut head, ()) = Response::new(()).into_parts();
        head.status = self.head.status;
        head.version = self.head.version;
        head.headers = self.head.headers.clone();
        Self::with_body(
            self.request.clone(),
            head,
            body,
            self.upstream.clone(),
            self.received,
            rules,
            Some(self.tags.to_vec()),
        )
    }

    /// The head of a fresh hit for `req` (a `GET` without `Cache-Control`
    /// or `Pragma`) at `now`, without asking the policy; `None` when the
    /// policy must decide (see [`QuickHit`]).
    pub fn quick_hit(
        &self,
        req: &http::request::Parts,
        now: SystemTime,
    ) -> Option<http::response::Parts> {
        let q = self.quick.as_ref()?;
        if now >= self.fresh_until
            || req.uri != q.uri
            || req.headers.get(header::HOST) != q.host.as_ref()
        {
            return None;
        }
        let age = q.age_at + now.duration_since(q.at).unwrap_or_default();
        let mut head = q.head.clone();
        head.headers
            .insert(header::AGE, HeaderValue::from(age.as_secs()));
        Some(head)
    }

    /// This entry after a `304` to `req`: `merged` (the stored head updated
    /// by the `304`; see `revalidate::merge_304`), the same body, its
    /// freshness starting over now.
    pub fn refreshed(
        &self,
        req: &http::request::Parts,
        mut merged: http::response::Parts,
        rules: &Rules,
    ) -> Arc<CachedResponse> {
        crate::headers::remove_hop_by_hop(&mut merged.headers);
        merged
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        let mut entry = Self::with_body(
            req.clone(),
            merged,
            self.body.clone(),
            self.upstream.clone(),
            SystemTime::now(),
            rules,
            None,
        );
        // A 304 without tag fields keeps the entry's tags.
        if entry.tags.is_empty() && !self.tags.is_empty() {
            if let Some(e) = Arc::get_mut(&mut entry) {
                e.tags = self.tags.clone();
            }
        }
        entry
    }

    /// The stored head with `Age` as of `now`.
    pub fn head_at(&self, now: SystemTime) -> http::response::Parts {
        let mut head = self.head.clone();
        let age = self.policy.age(now).as_secs();
        head.headers.insert(header::AGE, HeaderValue::from(age));
        head
    }

    /// Answer with `head` (the stored head with `Age` set: a quick hit's or
    /// [`Self::head_at`]) and the stored body (none for `HEAD`). The body
    /// is shared, not copied.
    pub fn respond_dated(
        &self,
        mut head: http::response::Parts,
        method: &Method,
        status: CacheStatus,
    ) -> Response<ProxyBody> {
        status.apply(&mut head.headers);
        let body = match &self.body {
            _ if *method == Method::HEAD => body::empty(),
            StoredBody::Mem(b) => body::full(b.clone()),
            StoredBody::Disk(d) => d.stream(),
        };
        Response::from_parts(head, body)
    }

    /// Answer with the stored head, `Age` computed now.
    pub fn respond_stale(&self, method: &Method, status: CacheStatus) -> Response<ProxyBody> {
        self.respond_dated(self.head_at(SystemTime::now()), method, status)
    }
}

/// Weighs a key: the sum of its variants.
#[derive(Clone)]
struct ByBytes;

impl Weighter<Arc<str>, Variants> for ByBytes {
    fn weight(&self, key: &Arc<str>, val: &Variants) -> u64 {
        key.len() as u64 + val.iter().map(|v| v.weight).sum::<u64>()
    }
}

/// Counts evictions.
#[derive(Clone, Default)]
struct CountEvictions(Arc<AtomicU64>);

impl Lifecycle<Arc<str>, Variants> for CountEvictions {
    type RequestState = ();

    fn begin_request(&self) -> Self::RequestState {}

    fn on_evict(&self, _state: &mut Self::RequestState, _key: Arc<str>, _val: Variants) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// See the module doc.
pub struct Store {
    cache: Cache<Arc<str>, Variants, ByBytes, quick_cache::DefaultHashBuilder, CountEvictions>,
    evictions: Arc<AtomicU64>,
    max_bytes: u64,
    max_object_bytes: u64,
}

impl Store {
    /// A store of at most `max_bytes`, holding objects up to `max_object_bytes`.
    pub fn new(max_bytes: u64, max_object_bytes: u64) -> Store {
        // The bound is split over shards; each must hold the largest object
        // (with a margin for its head), so small stores get fewer shards.
        let per_object = max_object_bytes.saturating_mul(2).max(64 * 1024);
        let fit = (max_bytes / per_object).clamp(1, 16);
        let shards = 1u64 << (63 - fit.leading_zeros());
        let evictions = CountEvictions::default();
        let count = evictions.0.clone();
        let opts = OptionsBuilder::new()
            .estimated_items_capacity((max_bytes / 4096).clamp(16, 1 << 20) as usize)
            .weight_capacity(max_bytes)
            .shards(shards as usize)
            .build()
            .unwrap_or_else(|_| {
                OptionsBuilder::new()
                    .estimated_items_capacity(1024)
                    .weight_capacity(max_bytes)
                    .build()
                    .expect("static cache options are valid")
            });
        Store {
            cache: Cache::with_options(opts, ByBytes, Default::default(), evictions),
            evictions: count,
            max_bytes,
            max_object_bytes,
        }
    }

    /// The bound this store was built for (a reload with other bounds
    /// builds a new store).
    pub fn bounds(&self) -> (u64, u64) {
        (self.max_bytes, self.max_object_bytes)
    }

    /// Every variant stored under `key`.
    pub fn get(&self, key: &str) -> Option<Variants> {
        self.cache.get(key)
    }

    /// Store `entry` under `key`, replacing the variant with the same
    /// identity and keeping at most `max_variants`.
    pub fn put(&self, key: Arc<str>, entry: Arc<CachedResponse>, max_variants: usize) {
        let mut list: Vec<Arc<CachedResponse>> = vec![entry.clone()];
        if let Some(old) = self.cache.get(&*key) {
            list.extend(
                old.iter()
                    .filter(|v| v.variant != entry.variant)
                    .take(max_variants.saturating_sub(1))
                    .cloned(),
            );
        }
        self.cache.insert(key, Arc::from(list));
    }

    /// Remove every variant of `key`; true if there were any.
    pub fn remove(&self, key: &str) -> bool {
        self.cache.remove(key).is_some()
    }

    /// Remove every key `purge` selects (given the key and its variants);
    /// how many.
    pub fn purge(&self, purge: impl Fn(&str, &Variants) -> bool) -> usize {
        let n = std::sync::atomic::AtomicUsize::new(0);
        self.cache.retain(|k, v| {
            let hit = purge(k, v);
            n.fetch_add(hit as usize, Ordering::Relaxed);
            !hit
        });
        n.into_inner()
    }

    /// Keys stored.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Nothing stored?
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Bytes accounted.
    pub fn bytes(&self) -> u64 {
        self.cache.weight()
    }

    /// Keys evicted to stay within the bound so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, host: &str) -> http::request::Parts {
        let (mut parts, ()) = http::Request::get(uri).body(()).unwrap().into_parts();
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_str(host).unwrap());
        parts
    }

    fn stored(extra: &[(&str, &str)], now: SystemTime) -> Arc<CachedResponse> {
        let mut b = Response::builder()
            .status(200)
            .header("cache-control", "public, max-age=3600")
            .header("date", httpdate::fmt_http_date(now))
            .header("content-type", "text/plain")
            .header("etag", "\"v1\"");
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        let (head, ()) = b.body(()).unwrap().into_parts();
        CachedResponse::new(
            request("/a?b=1", "example.com"),
            head,
            Bytes::from_static(b"hello"),
            Arc::from("app"),
            now,
            &Rules::new(10, Default::default()),
        )
    }

    /// Sorted fields, for comparing heads.
    fn fields(head: &http::response::Parts) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = head
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_quick_hit_is_the_policys_answer() {
        let t0 = SystemTime::now();
        for extra in [&[][..], &[("age", "10")][..]] {
            let entry = stored(extra, t0);
            let req = request("/a?b=1", "example.com");
            for later in [0, 1, 100, 3000] {
                let now = t0 + Duration::from_millis(later * 1000 + 250);
                let quick = entry.quick_hit(&req, now).expect("quick hit");
                let BeforeRequest::Fresh(_) = entry.policy.before_request(&req, now) else {
                    panic!("the policy says stale at +{later}s");
                };
                // What a hit through the policy answers.
                let slow = entry.head_at(now);
                assert_eq!(quick.status, slow.status);
                assert_eq!(fields(&quick), fields(&slow), "+{later}s, {extra:?}");
            }
        }
    }

    #[test]
    fn the_policy_decides_everything_else() {
        let t0 = SystemTime::now();
        let entry = stored(&[], t0);
        let soon = t0 + Duration::from_secs(5);
        // Another host or URI, or stale: no quick answer.
        assert!(entry
            .quick_hit(&request("/a?b=1", "other.example"), soon)
            .is_none());
        assert!(entry
            .quick_hit(&request("/a?b=2", "example.com"), soon)
            .is_none());
        let late = t0 + Duration::from_secs(3600);
        assert!(entry
            .quick_hit(&request("/a?b=1", "example.com"), late)
            .is_none());
        // A response that varies: never quick.
        let entry = stored(&[("vary", "accept-encoding")], t0);
        assert!(entry
            .quick_hit(&request("/a?b=1", "example.com"), soon)
            .is_none());
    }
}
