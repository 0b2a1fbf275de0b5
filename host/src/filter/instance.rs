//! One loaded version of a filter: its pre-instantiated component, its pool
//! of warm instances, and the calls into it under a CPU deadline, a memory
//! cap and a CPU share. Any trap or timeout discards the instance that
//! raised it. Where a call runs (the worker, or the compute pool once the
//! version proved slow) is explained in `compute`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use wasmtime::component::{
    Component, ComponentExportIndex, Func, Instance, InstancePre, Resource, TypedFunc,
};
use wasmtime::{Store, Trap, UpdateDeadline};

use super::bindings::sluicegate::filter::types::{
    BodyAction, Capabilities, RequestAction, ResponseAction,
};
use super::bindings::FilterPre;
use super::compute::{CallMeter, Demotion, Metered, Verdict};
use super::engine::FilterEngine;
use super::host_api::{
    Edits, FilterContext, HostState, Lent, RequestHead, ResponseHead, MEMORY_CAP_ERROR,
};
use super::stats::FilterStats;
use crate::config::{FilterPolicy, Isolation};

/// Warm instances kept per filter version.
const POOL_SIZE: usize = 64;
/// Recycle an instance whose memory grew past this share of its cap.
const MEMORY_MARK_DIVISOR: usize = 2;
/// The handler interface every 0.1 filter exports.
const HANDLER: &str = "sluicegate:filter/handler@0.1.0";

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
    /// The filter returned something the host cannot apply, or that its
    /// manifest does not grant.
    #[error("invalid action: {0}")]
    Invalid(String),
    /// The filter failed too often and is benched for a while.
    #[error("quarantined after repeated failures")]
    Quarantined,
    /// The filter is over its CPU share (`max_cpu_percent`); the call was
    /// shed.
    #[error("over its CPU share; call shed")]
    Overloaded,
    /// A route names a filter that is not loaded.
    #[error("not loaded")]
    Missing,
    /// A new instance could not be made or initialised.
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
}

/// The handler's exports, looked up once per version.
struct Exports {
    init: ComponentExportIndex,
    on_request: ComponentExportIndex,
    on_request_body: ComponentExportIndex,
    on_response: ComponentExportIndex,
    on_response_body: ComponentExportIndex,
}

impl Exports {
    fn new(component: &Component) -> anyhow::Result<Exports> {
        let iface = component
            .get_export_index(None, HANDLER)
            .ok_or_else(|| anyhow::anyhow!("the component does not export {HANDLER}"))?;
        let get = |name: &str| {
            component
                .get_export_index(Some(&iface), name)
                .ok_or_else(|| anyhow::anyhow!("{HANDLER} has no {name:?}"))
        };
        Ok(Exports {
            init: get("init")?,
            on_request: get("on-request")?,
            on_request_body: get("on-request-body")?,
            on_response: get("on-response")?,
            on_response_body: get("on-response-body")?,
        })
    }
}

type InitFunc = TypedFunc<(String,), (Result<Capabilities, String>,)>;
type RequestFunc = TypedFunc<(Resource<RequestHead>,), (RequestAction,)>;
type ResponseFunc = TypedFunc<(Resource<RequestHead>, Resource<ResponseHead>), (ResponseAction,)>;

/// One instance's entry points. The body phases take a borrowed list, so
/// they are typed at the call (a cheap check, on the rare body path).
struct Funcs {
    on_request: RequestFunc,
    on_response: ResponseFunc,
    on_request_body: Func,
    on_response_body: Func,
}

/// An instance ready to be called.
struct Warm {
    store: Store<HostState>,
    funcs: Funcs,
    uses: u64,
}

/// What one call runs, with what it owns.
enum Args {
    Request,
    RequestBody(Bytes),
    Response,
    ResponseBody(Bytes),
}

impl Args {
    fn phase(&self) -> &'static str {
        match self {
            Args::Request => "request",
            Args::RequestBody(_) => "request_body",
            Args::Response => "response",
            Args::ResponseBody(_) => "response_body",
        }
    }
}

/// What one call returned.
enum Output {
    Request(RequestAction),
    Response(ResponseAction),
    Body(BodyAction),
}

fn req_handle() -> Resource<RequestHead> {
    Resource::new_borrow(RequestHead::REP)
}

fn resp_handle() -> Resource<ResponseHead> {
    Resource::new_borrow(ResponseHead::REP)
}

type BodyParams<'a> = (Resource<RequestHead>, &'a [u8]);
type BothBodyParams<'a> = (Resource<RequestHead>, Resource<ResponseHead>, &'a [u8]);

/// Make the call, synchronously, on this thread.
fn run_sync(warm: &mut Warm, args: &Args) -> wasmtime::Result<Output> {
    let store = &mut warm.store;
    let f = &warm.funcs;
    Ok(match args {
        Args::Request => Output::Request(f.on_request.call(store, (req_handle(),))?.0),
        Args::Response => {
            Output::Response(f.on_response.call(store, (req_handle(), resp_handle()))?.0)
        }
        Args::RequestBody(body) => {
            let func = f
                .on_request_body
                .typed::<BodyParams<'_>, (BodyAction,)>(&*store)?;
            Output::Body(func.call(store, (req_handle(), body))?.0)
        }
        Args::ResponseBody(body) => {
            let func = f
                .on_response_body
                .typed::<BothBodyParams<'_>, (BodyAction,)>(&*store)?;
            Output::Body(func.call(store, (req_handle(), resp_handle(), body))?.0)
        }
    })
}

/// Make the call as an async call (it yields at every epoch tick).
async fn run_async(warm: &mut Warm, args: &Args) -> wasmtime::Result<Output> {
    let store = &mut warm.store;
    let f = &warm.funcs;
    Ok(match args {
        Args::Request => Output::Request(f.on_request.call_async(store, (req_handle(),)).await?.0),
        Args::Response => Output::Response(
            f.on_response
                .call_async(store, (req_handle(), resp_handle()))
                .await?
                .0,
        ),
        Args::RequestBody(body) => {
            let func = f
                .on_request_body
                .typed::<BodyParams<'_>, (BodyAction,)>(&*store)?;
            Output::Body(func.call_async(store, (req_handle(), body)).await?.0)
        }
        Args::ResponseBody(body) => {
            let func = f
                .on_response_body
                .typed::<BothBodyParams<'_>, (BodyAction,)>(&*store)?;
            Output::Body(
                func.call_async(store, (req_handle(), resp_handle(), body))
                    .await?
                    .0,
            )
        }
    })
}

/// Epoch ticks for a deadline of `ms`: the guest is cut between `ms` and
/// one tick past it (the first tick may come at once).
fn deadline_ticks(ms: u64) -> u64 {
    let tick = super::engine::EPOCH_TICK.as_millis() as u64;
    ms.max(1).div_ceil(tick) + 1
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
    /// Limits, failure policy and grants.
    pub policy: FilterPolicy,
    /// Counters shared by every version of this filter name.
    pub stats: Arc<FilterStats>,
    init_config: String,
    engine: FilterEngine,
    pre: InstancePre<HostState>,
    exports: Exports,
    ctx: Arc<FilterContext>,
    grants: Arc<crate::config::Grants>,
    pool: Arc<ArrayQueue<Warm>>,
    created: AtomicU64,
    /// Set once a call outlived a tick on the worker: calls then run on
    /// the compute pool (see `compute`).
    slow: Arc<AtomicBool>,
    demotion: Demotion,
}

/// The heads a call works on, and how to undo its edits.
pub struct Called<A> {
    /// The request head, handed back.
    pub req: RequestHead,
    /// The response head, handed back (response phases only).
    pub resp: Option<ResponseHead>,
    /// The call's head edits, to revert if its result is not applied.
    pub edits: Edits,
    /// The action, or why there is none.
    pub result: Result<A, FilterFailure>,
}

impl<A> Called<A> {
    /// Undo the call's head edits (a failed call must leave no trace).
    pub fn revert(&mut self) {
        let edits = std::mem::take(&mut self.edits);
        edits.revert(Some(&mut self.req), self.resp.as_mut());
    }
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
        // Checks every export against the world (names and types).
        FilterPre::new(instance_pre.clone()).map_err(anyhow::Error::from)?;
        let exports = Exports::new(component)?;
        ctx.kv
            .set_limits(policy.grants.kv_max_entries, policy.grants.kv_max_bytes);
        stats
            .cpu
            .set_limit(policy.max_cpu_percent, engine.workers());
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
            grants: Arc::new(policy.grants.clone()),
            policy,
            stats,
            init_config,
            engine: engine.clone(),
            pre: instance_pre,
            exports,
            ctx,
            pool: Arc::new(ArrayQueue::new(POOL_SIZE)),
            created: AtomicU64::new(0),
            slow: Arc::new(AtomicBool::new(false)),
            demotion: Demotion::default(),
        };
        let (warm, caps) = version.instantiate().map_err(|f| match f {
            FilterFailure::Timeout(ms) => {
                anyhow::anyhow!("instantiating and init timed out after {ms} ms (init_timeout_ms)")
            }
            f => anyhow::anyhow!("{f}"),
        })?;
        version.caps = caps;
        release(&version.pool, &version.policy, warm);
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

    /// True while its calls run on the compute pool.
    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
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
        let meter = CallMeter::new(self.slow.clone());
        let state = HostState::new(self.ctx.clone(), self.grants.clone(), cap, meter);
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|ctx| {
            Ok(match ctx.data().meter.on_tick() {
                Verdict::Interrupt => UpdateDeadline::Interrupt,
                Verdict::Continue => UpdateDeadline::Continue(1),
                Verdict::Yield => {
                    UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))
                }
            })
        });
        store
            .data()
            .meter
            .start_sync(deadline_ticks(self.policy.init_timeout_ms));
        store.set_epoch_deadline(1);
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.classify(&e, "instantiate"))?;
        let funcs = self
            .funcs(&mut store, &instance)
            .map_err(|e| self.classify(&e, "instantiate"))?;
        let init: InitFunc = instance
            .get_typed_func(&mut store, self.exports.init)
            .map_err(|e| self.classify(&e, "instantiate"))?;
        let caps = init
            .call(&mut store, (self.init_config.clone(),))
            .map_err(|e| self.classify(&e, "init"))?
            .0
            .map_err(|msg| FilterFailure::Instantiate(format!("init failed: {msg}")))?;
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok((
            Warm {
                store,
                funcs,
                uses: 0,
            },
            caps,
        ))
    }

    fn funcs(&self, store: &mut Store<HostState>, instance: &Instance) -> wasmtime::Result<Funcs> {
        let e = &self.exports;
        let func = |store: &mut Store<HostState>, idx| {
            instance
                .get_func(&mut *store, idx)
                .ok_or_else(|| wasmtime::format_err!("missing export"))
        };
        Ok(Funcs {
            on_request: instance.get_typed_func(&mut *store, e.on_request)?,
            on_response: instance.get_typed_func(&mut *store, e.on_response)?,
            on_request_body: func(store, e.on_request_body)?,
            on_response_body: func(store, e.on_response_body)?,
        })
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

    /// Make one call: lend the heads, run it where it belongs (the worker,
    /// or the compute pool for a slow version; `inline` forces the worker),
    /// take the heads back with the call's undo log.
    async fn call(
        &self,
        args: Args,
        req: RequestHead,
        resp: Option<ResponseHead>,
        inline: bool,
    ) -> Called<Output> {
        let phase = args.phase();
        let queue = Duration::from_millis(self.policy.cpu_queue_ms);
        // (Inline calls are the CLI's, with the whole core as their share.)
        if !inline && !self.stats.cpu.admit(queue).await {
            return Called {
                req,
                resp,
                edits: Edits::default(),
                result: Err(FilterFailure::Overloaded),
            };
        }
        let started = Instant::now();
        let mut warm = match self.acquire() {
            Ok(w) => w,
            Err(f) => {
                self.stats.record_failure(&f);
                return Called {
                    req,
                    resp,
                    edits: Edits::default(),
                    result: Err(f),
                };
            }
        };
        {
            let state = warm.store.data_mut();
            state.lend(req, resp);
        }
        let (mut warm, result, cpu) = if inline || !self.is_slow() {
            warm.store
                .data()
                .meter
                .start_sync(deadline_ticks(self.policy.timeout_ms));
            // The first tick may come at once; `on_tick` counts from here.
            warm.store.set_epoch_deadline(1);
            let result = run_sync(&mut warm, &args);
            (warm, result, started.elapsed())
        } else {
            // Boxed: a cheap call's future does not carry the pool path.
            match Box::pin(self.call_on_pool(warm, args)).await {
                Ok(done) => done,
                Err(failure) => {
                    // The task was lost with the instance and the heads.
                    self.stats.record_failure(&failure);
                    return Called {
                        req: placeholder(),
                        resp: None,
                        edits: Edits::default(),
                        result: Err(failure),
                    };
                }
            }
        };
        self.stats.record_call(phase, started.elapsed());
        self.stats.cpu.charge(cpu);
        let state = warm.store.data_mut();
        let (req, resp, edits) = state.take_back();
        let result = match result {
            Ok(out) => {
                release(&self.pool, &self.policy, warm);
                Ok(out)
            }
            Err(e) => {
                let failure = self.classify(&e, phase);
                self.stats.record_failure(&failure);
                Err(failure)
            }
        };
        Called {
            req: req.unwrap_or_else(placeholder),
            resp,
            edits,
            result,
        }
    }

    /// Run the call as an async call on the compute pool; the worker
    /// awaits it without blocking. Returns the instance, the result and the
    /// CPU the call used.
    async fn call_on_pool(
        &self,
        mut warm: Warm,
        args: Args,
    ) -> Result<(Warm, wasmtime::Result<Output>, Duration), FilterFailure> {
        let timeout = Duration::from_millis(self.policy.timeout_ms);
        let meter = warm.store.data().meter.clone();
        meter.start_async(timeout);
        warm.store.set_epoch_deadline(1);
        let job = Metered::new(
            async move {
                let result = run_async(&mut warm, &args).await;
                (warm, result)
            },
            meter.clone(),
        );
        let handle = self
            .engine
            .compute
            .spawn(job)
            .ok_or_else(|| FilterFailure::Trap("the compute pool is gone".into()))?;
        let (warm, result) = handle
            .await
            .map_err(|e| FilterFailure::Trap(format!("compute task failed: {e}")))?;
        let spent = meter.spent();
        if self.demotion.record(spent) {
            self.slow.store(false, Ordering::Relaxed);
            tracing::info!(filter = %self.name, "filter calls are cheap again: back on the worker");
        }
        Ok((warm, result, spent))
    }

    /// The request phase.
    pub async fn on_request(&self, head: RequestHead) -> Called<RequestAction> {
        let c = self.call(Args::Request, head, None, false).await;
        map(c, |o| match o {
            Output::Request(a) => Some(a),
            _ => None,
        })
    }

    /// The request body phase.
    pub async fn on_request_body(&self, head: RequestHead, body: Bytes) -> Called<BodyAction> {
        let c = self.call(Args::RequestBody(body), head, None, false).await;
        map(c, body_output)
    }

    /// The response phase.
    pub async fn on_response(
        &self,
        req: RequestHead,
        resp: ResponseHead,
    ) -> Called<ResponseAction> {
        let c = self.call(Args::Response, req, Some(resp), false).await;
        map(c, |o| match o {
            Output::Response(a) => Some(a),
            _ => None,
        })
    }

    /// The response body phase.
    pub async fn on_response_body(
        &self,
        req: RequestHead,
        resp: ResponseHead,
        body: Bytes,
    ) -> Called<BodyAction> {
        let c = self
            .call(Args::ResponseBody(body), req, Some(resp), false)
            .await;
        map(c, body_output)
    }

    /// The request phase, always on this thread (for `sluicegate filter`).
    pub fn on_request_inline(&self, head: RequestHead) -> Called<RequestAction> {
        let c = block_inline(self.call(Args::Request, head, None, true));
        map(c, |o| match o {
            Output::Request(a) => Some(a),
            _ => None,
        })
    }

    /// The request body phase, always on this thread.
    pub fn on_request_body_inline(&self, head: RequestHead, body: Bytes) -> Called<BodyAction> {
        let c = block_inline(self.call(Args::RequestBody(body), head, None, true));
        map(c, body_output)
    }

    /// The response phase, always on this thread.
    pub fn on_response_inline(
        &self,
        req: RequestHead,
        resp: ResponseHead,
    ) -> Called<ResponseAction> {
        let c = block_inline(self.call(Args::Response, req, Some(resp), true));
        map(c, |o| match o {
            Output::Response(a) => Some(a),
            _ => None,
        })
    }

    /// The response body phase, always on this thread.
    pub fn on_response_body_inline(
        &self,
        req: RequestHead,
        resp: ResponseHead,
        body: Bytes,
    ) -> Called<BodyAction> {
        let c = block_inline(self.call(Args::ResponseBody(body), req, Some(resp), true));
        map(c, body_output)
    }
}

/// Drive a call made with `inline = true`: it never awaits anything, so
/// one poll finishes it.
fn block_inline<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        // Ready at the first poll by construction; kept total rather than
        // panicking.
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}

fn body_output(o: Output) -> Option<BodyAction> {
    match o {
        Output::Body(a) => Some(a),
        _ => None,
    }
}

fn map<A>(c: Called<Output>, f: impl FnOnce(Output) -> Option<A>) -> Called<A> {
    let result = c.result.and_then(|o| {
        f(o).ok_or_else(|| FilterFailure::Trap("the call returned another phase's action".into()))
    });
    Called {
        req: c.req,
        resp: c.resp,
        edits: c.edits,
        result,
    }
}

/// Back to the pool, unless worn out, grown large, or the version runs a
/// fresh instance per request.
fn release(pool: &ArrayQueue<Warm>, policy: &FilterPolicy, mut warm: Warm) {
    warm.uses += 1;
    let worn = warm.uses >= policy.max_requests_per_instance;
    let big = warm.store.data().limits.used > warm.store.data().limits.cap / MEMORY_MARK_DIVISOR;
    if policy.isolation == Isolation::Pool && !worn && !big {
        let _ = pool.push(warm);
    }
}

/// A request head standing in for one lost with a failed call (the
/// failure policy decides what the client sees).
pub fn placeholder() -> RequestHead {
    RequestHead {
        parts: http::Request::new(()).into_parts().0,
        client: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        scheme: "http",
    }
}
