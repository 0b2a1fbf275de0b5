//! One loaded version of a filter: its pre-instantiated component, its pool
//! of warm instances, and the calls into it under a CPU deadline and a
//! memory cap. Any trap or timeout discards the instance that raised it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_queue::ArrayQueue;
use wasmtime::component::{Component, Resource};
use wasmtime::{Store, Trap};

use super::bindings::sluicegate::filter::types::{
    BodyAction, Capabilities, RequestAction, ResponseAction,
};
use super::bindings::{Filter, FilterPre};
use super::engine::FilterEngine;
use super::host_api::{
    FilterContext, HostState, Lent, RequestHead, ResponseHead, MEMORY_CAP_ERROR,
};
use super::stats::FilterStats;
use crate::config::{FilterPolicy, Isolation};

/// Warm instances kept per filter version.
const POOL_SIZE: usize = 64;
/// Recycle an instance whose memory grew past this share of its cap.
const MEMORY_MARK_DIVISOR: usize = 2;

/// Why a filter call did not produce an action.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FilterFailure {
    /// The call ran past its CPU deadline.
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// The instance hit its memory cap.
    #[error("exceeded its memory cap of {0} MiB")]
    OutOfMemory(u64),
    /// The guest trapped.
    #[error("trapped: {0}")]
    Trap(String),
    /// The filter returned something the host cannot apply.
    #[error("invalid action: {0}")]
    Invalid(String),
    /// The filter failed too often and is benched for a while.
    #[error("quarantined after repeated failures")]
    Quarantined,
    /// A route names a filter that is not loaded.
    #[error("not loaded")]
    Missing,
    /// A new instance could not be made or initialised.
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
}

/// Epoch ticks for a deadline of `ms`: the guest is cut between `ms` and
/// one tick past it (the first tick may come at once).
fn deadline_ticks(ms: u64) -> u64 {
    let tick = super::engine::EPOCH_TICK.as_millis() as u64;
    ms.max(1).div_ceil(tick) + 1
}

/// An instance ready to be called.
struct Warm {
    store: Store<HostState>,
    filter: Filter,
    uses: u64,
}

/// A filter version that instantiated and initialised successfully.
pub struct FilterVersion {
    /// Its name (the file stem).
    pub name: Arc<str>,
    /// SHA-256 of the component bytes.
    pub hash: String,
    /// When this version went live.
    pub loaded_at: SystemTime,
    /// The phases it asked for.
    pub caps: Capabilities,
    /// Limits and failure policy.
    pub policy: FilterPolicy,
    /// Counters shared by every version of this filter name.
    pub stats: Arc<FilterStats>,
    init_config: String,
    engine: FilterEngine,
    pre: FilterPre<HostState>,
    ctx: Arc<FilterContext>,
    pool: ArrayQueue<Warm>,
    created: AtomicU64,
}

impl FilterVersion {
    /// Pre-instantiate `component`, make one instance and run its init with
    /// `init_config`. Blocking; an error says why this version is unusable.
    pub fn new(
        engine: &FilterEngine,
        component: &Component,
        hash: String,
        ctx: Arc<FilterContext>,
        policy: FilterPolicy,
        init_config: String,
        stats: Arc<FilterStats>,
    ) -> anyhow::Result<FilterVersion> {
        let instance_pre = engine
            .linker
            .instantiate_pre(component)
            .map_err(anyhow::Error::from)?;
        let pre = FilterPre::new(instance_pre).map_err(anyhow::Error::from)?;
        let mut version = FilterVersion {
            name: ctx.name.clone(),
            hash,
            loaded_at: SystemTime::now(),
            caps: Capabilities {
                request_phase: false,
                response_phase: false,
                request_body: false,
                response_body: false,
            },
            policy,
            stats,
            init_config,
            engine: engine.clone(),
            pre,
            ctx,
            pool: ArrayQueue::new(POOL_SIZE),
            created: AtomicU64::new(0),
        };
        let (warm, caps) = version.instantiate().map_err(|f| match f {
            FilterFailure::Timeout(ms) => {
                anyhow::anyhow!("instantiating and init timed out after {ms} ms (init_timeout_ms)")
            }
            f => anyhow::anyhow!("{f}"),
        })?;
        version.caps = caps;
        version.release(warm);
        Ok(version)
    }

    /// The JSON config its instances are initialised with.
    pub fn init_config(&self) -> &str {
        &self.init_config
    }

    /// Instances created so far (the first one included).
    pub fn instances_created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    /// A fresh instance, initialised with the filter's config. Making it
    /// and running `init` share one deadline, `init_timeout_ms`, not the
    /// per-call `timeout_ms`: an interpreter image takes milliseconds to
    /// map and resume, and the epoch is wall-clock time, so a busy machine
    /// that preempts the thread must not fail a filter's start-up. It is
    /// still bounded: a guest that spins in `init` is cut off and the
    /// version refused (or, on the data path, the call fails by policy).
    fn instantiate(&self) -> Result<(Warm, Capabilities), FilterFailure> {
        let cap = (self.policy.memory_mb as usize) << 20;
        let mut store = Store::new(&self.engine.engine, HostState::new(self.ctx.clone(), cap));
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(deadline_ticks(self.policy.init_timeout_ms));
        store.epoch_deadline_trap();
        let filter = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.classify(&e, "instantiate"))?;
        let caps = filter
            .sluicegate_filter_handler()
            .call_init(&mut store, &self.init_config)
            .map_err(|e| self.classify(&e, "init"))?
            .map_err(|msg| FilterFailure::Instantiate(format!("init failed: {msg}")))?;
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok((
            Warm {
                store,
                filter,
                uses: 0,
            },
            caps,
        ))
    }

    fn acquire(&self) -> Result<Warm, FilterFailure> {
        if self.policy.isolation == Isolation::Pool {
            if let Some(warm) = self.pool.pop() {
                return Ok(warm);
            }
        }
        let (warm, _) = self.instantiate()?;
        Ok(warm)
    }

    fn release(&self, mut warm: Warm) {
        warm.uses += 1;
        let worn = warm.uses >= self.policy.max_requests_per_instance;
        let big =
            warm.store.data().limits.used > warm.store.data().limits.cap / MEMORY_MARK_DIVISOR;
        if self.policy.isolation == Isolation::Pool && !worn && !big {
            let _ = self.pool.push(warm);
        }
    }

    /// Turn a wasmtime error into a failure, logging it with the filter name.
    fn classify(&self, e: &wasmtime::Error, phase: &str) -> FilterFailure {
        let failure = if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            FilterFailure::Timeout(match phase {
                "instantiate" | "init" => self.policy.init_timeout_ms,
                _ => self.policy.timeout_ms,
            })
        } else if format!("{e:#}").contains(MEMORY_CAP_ERROR) {
            FilterFailure::OutOfMemory(self.policy.memory_mb)
        } else {
            // A trap's own words ("wasm `unreachable` instruction executed"),
            // not the backtrace context wasmtime wraps around it.
            let text = match e.downcast_ref::<Trap>() {
                Some(trap) => format!("wasm trap: {trap}"),
                None => format!("{e:#}"),
            };
            FilterFailure::Trap(
                text.lines()
                    .next()
                    .unwrap_or("trap")
                    .chars()
                    .take(300)
                    .collect(),
            )
        };
        tracing::warn!(filter = %self.name, hash = %&self.hash[..12], phase, error = %failure, "filter call failed");
        failure
    }

    /// Run one call on a pooled instance; `f` gets the store and bindings.
    fn call<R>(
        &self,
        phase: &'static str,
        f: impl FnOnce(&mut Store<HostState>, &Filter) -> wasmtime::Result<R>,
    ) -> Result<R, FilterFailure> {
        let started = Instant::now();
        let mut warm = self.acquire()?;
        warm.store
            .set_epoch_deadline(deadline_ticks(self.policy.timeout_ms));
        let result = f(&mut warm.store, &warm.filter);
        self.stats.record_call(phase, started.elapsed());
        match result {
            Ok(r) => {
                self.release(warm);
                Ok(r)
            }
            Err(e) => {
                let failure = self.classify(&e, phase);
                self.stats.record_failure(&failure);
                Err(failure)
            }
        }
    }

    /// Lend the request head to one call and always take it back.
    fn with_request<R>(
        &self,
        phase: &'static str,
        head: RequestHead,
        f: impl FnOnce(&mut Store<HostState>, &Filter, Resource<RequestHead>) -> wasmtime::Result<R>,
    ) -> (RequestHead, Result<R, FilterFailure>) {
        let mut slot = Some(head);
        let result = self.call(phase, |store, filter| {
            let res = lend(store, &mut slot)?;
            let out = f(store, filter, borrow(&res));
            take_back(store, res, &mut slot)?;
            out
        });
        finish(slot, result)
    }

    /// Lend both heads to one call and always take them back.
    fn with_both<R>(
        &self,
        phase: &'static str,
        req: RequestHead,
        resp: ResponseHead,
        f: impl FnOnce(
            &mut Store<HostState>,
            &Filter,
            Resource<RequestHead>,
            Resource<ResponseHead>,
        ) -> wasmtime::Result<R>,
    ) -> (RequestHead, ResponseHead, Result<R, FilterFailure>) {
        let mut req_slot = Some(req);
        let mut resp_slot = Some(resp);
        let result = self.call(phase, |store, filter| {
            let rq = lend(store, &mut req_slot)?;
            let rs = lend(store, &mut resp_slot)?;
            let out = f(store, filter, borrow(&rq), borrow(&rs));
            take_back(store, rs, &mut resp_slot)?;
            take_back(store, rq, &mut req_slot)?;
            out
        });
        finish2(req_slot, resp_slot, result)
    }

    /// The request phase. The head is lent to the guest and always handed
    /// back, whatever the outcome.
    pub fn on_request(
        &self,
        head: RequestHead,
    ) -> (RequestHead, Result<RequestAction, FilterFailure>) {
        self.with_request("request", head, |store, filter, req| {
            filter
                .sluicegate_filter_handler()
                .call_on_request(store, req)
        })
    }

    /// The request body phase.
    pub fn on_request_body(
        &self,
        head: RequestHead,
        body: &[u8],
    ) -> (RequestHead, Result<BodyAction, FilterFailure>) {
        self.with_request("request_body", head, |store, filter, req| {
            filter
                .sluicegate_filter_handler()
                .call_on_request_body(store, req, body)
        })
    }

    /// The response phase.
    pub fn on_response(
        &self,
        req: RequestHead,
        resp: ResponseHead,
    ) -> (
        RequestHead,
        ResponseHead,
        Result<ResponseAction, FilterFailure>,
    ) {
        self.with_both("response", req, resp, |store, filter, rq, rs| {
            filter
                .sluicegate_filter_handler()
                .call_on_response(store, rq, rs)
        })
    }

    /// The response body phase.
    pub fn on_response_body(
        &self,
        req: RequestHead,
        resp: ResponseHead,
        body: &[u8],
    ) -> (RequestHead, ResponseHead, Result<BodyAction, FilterFailure>) {
        self.with_both("response_body", req, resp, |store, filter, rq, rs| {
            filter
                .sluicegate_filter_handler()
                .call_on_response_body(store, rq, rs, body)
        })
    }
}

/// Lend the head in `slot` to the call about to run (see [`Lent`]).
fn lend<T: Lent>(
    store: &mut Store<HostState>,
    slot: &mut Option<T>,
) -> wasmtime::Result<Resource<T>> {
    let value = slot
        .take()
        .ok_or_else(|| wasmtime::format_err!("head already lent"))?;
    *T::slot(store.data_mut()) = Some(value);
    Ok(Resource::new_borrow(T::REP))
}

/// A borrow handle to pass a lent head as `borrow<..>`.
fn borrow<T: 'static>(res: &Resource<T>) -> Resource<T> {
    Resource::new_borrow(res.rep())
}

/// Move a lent head back out of the store into `slot`.
fn take_back<T: Lent>(
    store: &mut Store<HostState>,
    _res: Resource<T>,
    slot: &mut Option<T>,
) -> wasmtime::Result<()> {
    *slot = T::slot(store.data_mut()).take();
    match slot {
        Some(_) => Ok(()),
        None => Err(wasmtime::format_err!("lent head missing")),
    }
}

/// The head must come back even when the call failed. If a trap struck
/// between `lend` and `take_back`, the head is still in the (discarded)
/// instance's table; the caller gets a placeholder and a failure, and the
/// failure policy decides what the client sees.
fn finish<A>(
    slot: Option<RequestHead>,
    result: Result<A, FilterFailure>,
) -> (RequestHead, Result<A, FilterFailure>) {
    match slot {
        Some(head) => (head, result),
        None => (
            lost_request(),
            Err(result
                .err()
                .unwrap_or(FilterFailure::Trap("request head lost".into()))),
        ),
    }
}

fn finish2<A>(
    req: Option<RequestHead>,
    resp: Option<ResponseHead>,
    result: Result<A, FilterFailure>,
) -> (RequestHead, ResponseHead, Result<A, FilterFailure>) {
    match (req, resp) {
        (Some(rq), Some(rs)) => (rq, rs, result),
        (rq, rs) => (
            rq.unwrap_or_else(lost_request),
            rs.unwrap_or_else(|| ResponseHead {
                parts: http::Response::new(()).into_parts().0,
            }),
            Err(result
                .err()
                .unwrap_or(FilterFailure::Trap("head lost".into()))),
        ),
    }
}

fn lost_request() -> RequestHead {
    RequestHead {
        parts: http::Request::new(()).into_parts().0,
        client: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        scheme: "http",
    }
}
