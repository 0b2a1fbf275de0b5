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

use super::action::{BodyAction, Caps, RequestAction, ResponseAction};
use super::bindings::sluicegate::filter::types as v1;
use super::bindings::FilterPre;
use super::bindings_v2::sluicegate::filter::types as v2;
use super::compute::{CallMeter, Demotion, Metered, Verdict};
use super::engine::FilterEngine;
use super::exchange::SharedExchange;
use super::host_api::{
    CalloutState, Edits, ExchangeHandle, FilterContext, HostState, Lent, RequestHead, ResponseHead,
    EXCHANGE_REP, MEMORY_CAP_ERROR,
};
use super::stats::FilterStats;
use crate::config::{FilterPolicy, Isolation};

/// Warm instances kept per filter version.
const POOL_SIZE: usize = 64;
/// Recycle an instance whose memory grew past this share of its cap.
const MEMORY_MARK_DIVISOR: usize = 2;
/// The handler interface every 0.1 filter exports.
const HANDLER: &str = "sluicegate:filter/handler@0.1.0";
/// The handler interface every 0.2 filter exports.
const HANDLER_V2: &str = "sluicegate:filter/handler@0.2.0";
/// The tick entry point a `callout-filter` exports.
const TICK_HANDLER: &str = "sluicegate:filter/tick-handler@0.2.0";
/// The import that makes a component a callout filter (any 0.2.x).
const UPSTREAM_CLIENT: &str = "sluicegate:filter/upstream-client@0.2";

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

/// Which contract a component speaks, told by the handler it exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Contract {
    /// `sluicegate:filter/handler@0.1.0`.
    #[serde(rename = "0.1")]
    V1,
    /// `sluicegate:filter/handler@0.2.0`.
    #[serde(rename = "0.2")]
    V2,
}

impl Contract {
    /// `0.1` or `0.2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Contract::V1 => "0.1",
            Contract::V2 => "0.2",
        }
    }
}

/// The handler's exports, looked up once per version.
struct Exports {
    contract: Contract,
    init: ComponentExportIndex,
    /// In the order of [`PHASES_V1`] or [`PHASES_V2`].
    phases: Vec<ComponentExportIndex>,
    /// `tick-handler.on-tick`, for a `callout-filter` (0.2).
    on_tick: Option<ComponentExportIndex>,
}

const PHASES_V1: [&str; 4] = [
    "on-request",
    "on-request-body",
    "on-response",
    "on-response-body",
];
const PHASES_V2: [&str; 7] = [
    "on-request",
    "on-request-body",
    "on-response",
    "on-response-body",
    "on-request-chunk",
    "on-response-chunk",
    "on-log",
];

impl Exports {
    fn new(component: &Component) -> anyhow::Result<Exports> {
        // 0.2 first: a component built with both SDK modules exports the
        // newer handler.
        let (contract, handler, names): (_, _, &[&str]) =
            if component.get_export_index(None, HANDLER_V2).is_some() {
                (Contract::V2, HANDLER_V2, &PHASES_V2)
            } else {
                (Contract::V1, HANDLER, &PHASES_V1)
            };
        let iface = component.get_export_index(None, handler).ok_or_else(|| {
            anyhow::anyhow!("the component exports neither {HANDLER_V2} nor {HANDLER}")
        })?;
        let get = |name: &str| {
            component
                .get_export_index(Some(&iface), name)
                .ok_or_else(|| anyhow::anyhow!("{handler} has no {name:?}"))
        };
        let on_tick = match contract {
            Contract::V2 => component
                .get_export_index(None, TICK_HANDLER)
                .and_then(|t| component.get_export_index(Some(&t), "on-tick")),
            Contract::V1 => None,
        };
        Ok(Exports {
            contract,
            on_tick,
            init: get("init")?,
            phases: names
                .iter()
                .map(|n| get(n))
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

type InitFunc = TypedFunc<(String,), (Result<v1::Capabilities, String>,)>;
type InitFunc2 = TypedFunc<(String,), (Result<v2::Phases, String>,)>;
type RequestFunc = TypedFunc<(Resource<RequestHead>,), (v1::RequestAction,)>;
type ResponseFunc =
    TypedFunc<(Resource<RequestHead>, Resource<ResponseHead>), (v1::ResponseAction,)>;
type RequestFunc2 =
    TypedFunc<(Resource<ExchangeHandle>, Resource<RequestHead>), (v2::RequestAction,)>;
type ResponseFunc2 = TypedFunc<
    (
        Resource<ExchangeHandle>,
        Resource<RequestHead>,
        Resource<ResponseHead>,
    ),
    (v2::ResponseAction,),
>;
type LogFunc2 = TypedFunc<(Resource<ExchangeHandle>, v2::LogEntry), ()>;

/// One instance's entry points. The phases that take a borrowed list are
/// typed at the call (a cheap check, on the rarer body paths).
enum Funcs {
    V1 {
        on_request: RequestFunc,
        on_response: ResponseFunc,
        on_request_body: Func,
        on_response_body: Func,
    },
    V2 {
        on_request: RequestFunc2,
        on_response: ResponseFunc2,
        on_request_body: Func,
        on_response_body: Func,
        on_request_chunk: Func,
        on_response_chunk: Func,
        on_log: LogFunc2,
        on_tick: Option<TypedFunc<(), ()>>,
    },
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
    RequestChunk(Bytes, bool),
    ResponseChunk(Bytes, bool),
    Log(v2::LogEntry),
    Tick,
}

impl Args {
    fn phase(&self) -> &'static str {
        match self {
            Args::Request => "request",
            Args::RequestBody(_) => "request_body",
            Args::Response => "response",
            Args::ResponseBody(_) => "response_body",
            Args::RequestChunk(..) => "request_chunk",
            Args::ResponseChunk(..) => "response_chunk",
            Args::Log(_) => "log",
            Args::Tick => "tick",
        }
    }
}

/// What one call returned.
enum Output {
    Request(RequestAction),
    Response(ResponseAction),
    Body(BodyAction),
    Log,
}

fn req_handle() -> Resource<RequestHead> {
    Resource::new_borrow(RequestHead::REP)
}

fn resp_handle() -> Resource<ResponseHead> {
    Resource::new_borrow(ResponseHead::REP)
}

fn ex_handle() -> Resource<ExchangeHandle> {
    Resource::new_borrow(EXCHANGE_REP)
}

type BodyParams<'a> = (Resource<RequestHead>, &'a [u8]);
type BothBodyParams<'a> = (Resource<RequestHead>, Resource<ResponseHead>, &'a [u8]);
type BodyParams2<'a> = (Resource<ExchangeHandle>, Resource<RequestHead>, &'a [u8]);
type BothBodyParams2<'a> = (
    Resource<ExchangeHandle>,
    Resource<RequestHead>,
    Resource<ResponseHead>,
    &'a [u8],
);
type ChunkParams<'a> = (Resource<ExchangeHandle>, &'a [u8], bool);

/// The call for `args` on `warm`'s functions, made with `$invoke` (the
/// sync or the async call); one table for both paths.
macro_rules! dispatch {
    ($warm:expr, $args:expr, $invoke:ident) => {{
        let store = &mut $warm.store;
        match (&$warm.funcs, $args) {
            (Funcs::V1 { on_request, .. }, Args::Request) => {
                Output::Request($invoke!(on_request, store, (req_handle(),)).0.into())
            }
            (Funcs::V1 { on_response, .. }, Args::Response) => Output::Response(
                $invoke!(on_response, store, (req_handle(), resp_handle()))
                    .0
                    .into(),
            ),
            (
                Funcs::V1 {
                    on_request_body, ..
                },
                Args::RequestBody(body),
            ) => {
                let func = on_request_body.typed::<BodyParams<'_>, (v1::BodyAction,)>(&*store)?;
                Output::Body(
                    $invoke!(func, store, (req_handle(), body.as_ref()))
                        .0
                        .into(),
                )
            }
            (
                Funcs::V1 {
                    on_response_body, ..
                },
                Args::ResponseBody(body),
            ) => {
                let func =
                    on_response_body.typed::<BothBodyParams<'_>, (v1::BodyAction,)>(&*store)?;
                Output::Body(
                    $invoke!(func, store, (req_handle(), resp_handle(), body.as_ref()))
                        .0
                        .into(),
                )
            }
            (Funcs::V2 { on_request, .. }, Args::Request) => Output::Request(
                $invoke!(on_request, store, (ex_handle(), req_handle()))
                    .0
                    .into(),
            ),
            (Funcs::V2 { on_response, .. }, Args::Response) => Output::Response(
                $invoke!(
                    on_response,
                    store,
                    (ex_handle(), req_handle(), resp_handle())
                )
                .0
                .into(),
            ),
            (
                Funcs::V2 {
                    on_request_body, ..
                },
                Args::RequestBody(body),
            ) => {
                let func = on_request_body.typed::<BodyParams2<'_>, (v2::BodyAction,)>(&*store)?;
                Output::Body(
                    $invoke!(func, store, (ex_handle(), req_handle(), body.as_ref()))
                        .0
                        .into(),
                )
            }
            (
                Funcs::V2 {
                    on_response_body, ..
                },
                Args::ResponseBody(body),
            ) => {
                let func =
                    on_response_body.typed::<BothBodyParams2<'_>, (v2::BodyAction,)>(&*store)?;
                Output::Body(
                    $invoke!(
                        func,
                        store,
                        (ex_handle(), req_handle(), resp_handle(), body.as_ref())
                    )
                    .0
                    .into(),
                )
            }
            (
                Funcs::V2 {
                    on_request_chunk, ..
                },
                Args::RequestChunk(chunk, end),
            ) => {
                let func =
                    on_request_chunk.typed::<ChunkParams<'_>, (v2::ChunkAction,)>(&*store)?;
                Output::Body(
                    $invoke!(func, store, (ex_handle(), chunk.as_ref(), *end))
                        .0
                        .into(),
                )
            }
            (
                Funcs::V2 {
                    on_response_chunk, ..
                },
                Args::ResponseChunk(chunk, end),
            ) => {
                let func =
                    on_response_chunk.typed::<ChunkParams<'_>, (v2::ChunkAction,)>(&*store)?;
                Output::Body(
                    $invoke!(func, store, (ex_handle(), chunk.as_ref(), *end))
                        .0
                        .into(),
                )
            }
            (Funcs::V2 { on_log, .. }, Args::Log(entry)) => {
                $invoke!(on_log, store, (ex_handle(), *entry));
                Output::Log
            }
            (
                Funcs::V2 {
                    on_tick: Some(on_tick),
                    ..
                },
                Args::Tick,
            ) => {
                $invoke!(on_tick, store, ());
                Output::Log
            }
            (Funcs::V2 { on_tick: None, .. }, Args::Tick) => {
                return Err(wasmtime::format_err!("the filter exports no tick-handler"))
            }
            (Funcs::V1 { .. }, _) => {
                return Err(wasmtime::format_err!(
                    "a 0.1 filter has no {} phase",
                    $args.phase()
                ))
            }
        }
    }};
}

macro_rules! sync_call {
    ($f:expr, $store:expr, $params:expr) => {
        $f.call(&mut *$store, $params)?
    };
}

macro_rules! async_call {
    ($f:expr, $store:expr, $params:expr) => {
        $f.call_async(&mut *$store, $params).await?
    };
}

/// Make the call, synchronously, on this thread.
fn run_sync(warm: &mut Warm, args: &Args) -> wasmtime::Result<Output> {
    Ok(dispatch!(warm, args, sync_call))
}

/// Make the call as an async call (it yields at every epoch tick).
async fn run_async(warm: &mut Warm, args: &Args) -> wasmtime::Result<Output> {
    Ok(dispatch!(warm, args, async_call))
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
    pub caps: Caps,
    /// The contract it speaks.
    pub contract: Contract,
    /// Limits, failure policy and grants.
    pub policy: FilterPolicy,
    /// Counters shared by every version of this filter name.
    pub stats: Arc<FilterStats>,
    /// Does its component import `upstream-client`? Then every call is a
    /// wasmtime async call on the worker (see `call`).
    pub callouts: bool,
    /// The tick interval its init asked for (`timer.request-tick`).
    pub tick: Option<Duration>,
    /// Set when the version leaves the live set: its ticks stop.
    retired: AtomicBool,
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
        let exports = Exports::new(component)?;
        // Checks every export against its world (names and types).
        match exports.contract {
            Contract::V1 => {
                drop(FilterPre::new(instance_pre.clone()).map_err(anyhow::Error::from)?)
            }
            Contract::V2 if exports.on_tick.is_some() => drop(
                super::bindings_v2_callout::CalloutFilterPre::new(instance_pre.clone())
                    .map_err(anyhow::Error::from)?,
            ),
            Contract::V2 => drop(
                super::bindings_v2::FilterPre::new(instance_pre.clone())
                    .map_err(anyhow::Error::from)?,
            ),
        }
        let callouts = component
            .component_type()
            .imports(&engine.engine)
            .any(|(name, _)| name.starts_with(UPSTREAM_CLIENT));
        if callouts && policy.grants.callouts.is_empty() {
            anyhow::bail!(
                "the component imports sluicegate:filter/upstream-client, but its policy grants \
                 no callouts: set callouts = [\"<upstream>\", ...] in [filters.policy.{}]",
                ctx.name
            );
        }
        ctx.kv
            .set_limits(policy.grants.kv_max_entries, policy.grants.kv_max_bytes);
        stats
            .cpu
            .set_limit(policy.max_cpu_percent, engine.workers());
        let mut version = FilterVersion {
            name: ctx.name.clone(),
            hash,
            loaded_at: SystemTime::now(),
            caps: Caps::default(),
            contract: exports.contract,
            grants: Arc::new(policy.grants.clone()),
            policy,
            stats,
            callouts,
            tick: None,
            retired: AtomicBool::new(false),
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
        // Blocking: the caller is off the async runtime. A callout
        // version's init is an async call too, but nothing in it waits
        // (callouts are refused during init), so polling finishes it.
        let (warm, caps) = block_inline(version.instantiate()).map_err(|f| match f {
            FilterFailure::Timeout(ms) => {
                anyhow::anyhow!("instantiating and init timed out after {ms} ms (init_timeout_ms)")
            }
            f => anyhow::anyhow!("{f}"),
        })?;
        version.caps = caps;
        version.tick = warm
            .store
            .data()
            .callout
            .tick_ms
            .map(|ms| Duration::from_millis(u64::from(ms)));
        if version.tick.is_some() && version.exports.on_tick.is_none() {
            anyhow::bail!("init asked for ticks, but the component exports no {TICK_HANDLER}");
        }
        release(&version.pool, &version.policy, warm);
        Ok(version)
    }

    /// The metric series its calls have made (see `FilterContext`).
    pub fn metric_series(&self) -> Vec<String> {
        self.ctx.series_names()
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
    ///
    /// A callout version's instance is made and initialised as async calls
    /// (wasmtime requires it once a component imports an async host
    /// function); anything else synchronously (the future is then ready at
    /// its first poll).
    async fn instantiate(&self) -> Result<(Warm, Caps), FilterFailure> {
        let cap = (self.policy.memory_mb as usize) << 20;
        let meter = CallMeter::new(self.slow.clone());
        let callout = CalloutState {
            imported: self.callouts,
            limits: self.policy.callout,
            spent: Default::default(),
            service: self.engine.callouts.clone(),
            enabled: false,
            initializing: true,
            tick_ms: None,
        };
        let state = HostState::new(self.ctx.clone(), self.grants.clone(), cap, meter, callout);
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
        let instance = match self.callouts {
            true => self.pre.instantiate_async(&mut store).await,
            false => self.pre.instantiate(&mut store),
        }
        .map_err(|e| self.classify(&e, "instantiate"))?;
        let funcs = self
            .funcs(&mut store, &instance)
            .map_err(|e| self.classify(&e, "instantiate"))?;
        let config = (self.init_config.clone(),);
        let caps: Caps = match self.exports.contract {
            Contract::V1 => {
                let init: InitFunc = instance
                    .get_typed_func(&mut store, self.exports.init)
                    .map_err(|e| self.classify(&e, "instantiate"))?;
                init.call(&mut store, config)
                    .map_err(|e| self.classify(&e, "init"))?
                    .0
                    .map(Caps::from)
            }
            Contract::V2 => {
                let init: InitFunc2 = instance
                    .get_typed_func(&mut store, self.exports.init)
                    .map_err(|e| self.classify(&e, "instantiate"))?;
                match self.callouts {
                    true => init.call_async(&mut store, config).await,
                    false => init.call(&mut store, config),
                }
                .map_err(|e| self.classify(&e, "init"))?
                .0
                .map(Caps::from)
            }
        }
        .map_err(|msg| FilterFailure::Instantiate(format!("init failed: {msg}")))?;
        let callout = &mut store.data_mut().callout;
        callout.initializing = false;
        callout.enabled = true;
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
        let p = &self.exports.phases;
        let func = |store: &mut Store<HostState>, idx| {
            instance
                .get_func(&mut *store, idx)
                .ok_or_else(|| wasmtime::format_err!("missing export"))
        };
        Ok(match self.exports.contract {
            Contract::V1 => Funcs::V1 {
                on_request: instance.get_typed_func(&mut *store, p[0])?,
                on_request_body: func(store, p[1])?,
                on_response: instance.get_typed_func(&mut *store, p[2])?,
                on_response_body: func(store, p[3])?,
            },
            Contract::V2 => Funcs::V2 {
                on_request: instance.get_typed_func(&mut *store, p[0])?,
                on_request_body: func(store, p[1])?,
                on_response: instance.get_typed_func(&mut *store, p[2])?,
                on_response_body: func(store, p[3])?,
                on_request_chunk: func(store, p[4])?,
                on_response_chunk: func(store, p[5])?,
                on_log: instance.get_typed_func(&mut *store, p[6])?,
                on_tick: match self.exports.on_tick {
                    Some(idx) => Some(instance.get_typed_func(&mut *store, idx)?),
                    None => None,
                },
            },
        })
    }

    fn acquire(&self) -> Result<Warm, FilterFailure> {
        if self.policy.isolation == Isolation::Pool {
            if let Some(warm) = self.pool.pop() {
                return Ok(warm);
            }
        }
        // Not a callout version (see `acquire_async`): ready at once.
        let (warm, _) = block_inline(self.instantiate())?;
        Ok(warm)
    }

    /// [`Self::acquire`] for a callout version (async instantiation).
    async fn acquire_async(&self) -> Result<Warm, FilterFailure> {
        if self.policy.isolation == Isolation::Pool {
            if let Some(warm) = self.pool.pop() {
                return Ok(warm);
            }
        }
        let (warm, _) = self.instantiate().await?;
        Ok(warm)
    }

    /// Mark the version as out of the live set: its ticks stop.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Has it left the live set?
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
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
        ex: Option<&SharedExchange>,
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
        let acquired = match self.callouts {
            true => Box::pin(self.acquire_async()).await,
            false => self.acquire(),
        };
        let mut warm = match acquired {
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
            // Only a 0.2 call takes the exchange (a clone of its Arc).
            let ex = match self.contract {
                Contract::V2 => ex.cloned(),
                Contract::V1 => None,
            };
            state.lend(req, resp, ex);
        }
        let (mut warm, result, cpu) = if self.callouts {
            // A callout version: an async call on this task, so a guest
            // waiting on a callout leaves the worker free (boxed: only
            // these calls carry the async call's future).
            let (result, cpu) = Box::pin(self.call_async_here(&mut warm, &args)).await;
            (warm, result, cpu)
        } else if inline || !self.is_slow() {
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

    /// Run the call as an async call on this task (a callout version): it
    /// yields at every epoch tick and while it waits on a callout; its CPU
    /// deadline counts the CPU of its polls only. Returns the result and
    /// that CPU.
    async fn call_async_here(
        &self,
        warm: &mut Warm,
        args: &Args,
    ) -> (wasmtime::Result<Output>, Duration) {
        let meter = warm.store.data().meter.clone();
        meter.start_async(Duration::from_millis(self.policy.timeout_ms));
        warm.store.set_epoch_deadline(1);
        let result = Metered::new(run_async(warm, args), meter.clone()).await;
        (result, meter.spent())
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
    pub async fn on_request(
        &self,
        head: RequestHead,
        ex: Option<&SharedExchange>,
    ) -> Called<RequestAction> {
        let c = self.call(Args::Request, head, None, ex, false).await;
        map(c, request_output)
    }

    /// The request body phase.
    pub async fn on_request_body(
        &self,
        head: RequestHead,
        body: Bytes,
        ex: Option<&SharedExchange>,
    ) -> Called<BodyAction> {
        let c = self
            .call(Args::RequestBody(body), head, None, ex, false)
            .await;
        map(c, body_output)
    }

    /// The response phase.
    pub async fn on_response(
        &self,
        req: RequestHead,
        resp: ResponseHead,
        ex: Option<&SharedExchange>,
    ) -> Called<ResponseAction> {
        let c = self.call(Args::Response, req, Some(resp), ex, false).await;
        map(c, response_output)
    }

    /// The response body phase.
    pub async fn on_response_body(
        &self,
        req: RequestHead,
        resp: ResponseHead,
        body: Bytes,
        ex: Option<&SharedExchange>,
    ) -> Called<BodyAction> {
        let c = self
            .call(Args::ResponseBody(body), req, Some(resp), ex, false)
            .await;
        map(c, body_output)
    }

    /// One chunk of a streaming body (0.2): `response` picks the phase.
    /// No head is lent; a failed call's edits (locals) are undone here.
    pub async fn on_chunk(
        &self,
        response: bool,
        chunk: Bytes,
        end: bool,
        ex: &SharedExchange,
    ) -> Result<BodyAction, FilterFailure> {
        let args = if response {
            Args::ResponseChunk(chunk, end)
        } else {
            Args::RequestChunk(chunk, end)
        };
        let mut c = map(
            self.call(args, placeholder(), None, Some(ex), false).await,
            body_output,
        );
        if c.result.is_err() {
            c.revert();
        }
        c.result
    }

    /// The log phase (0.2), once the response body has ended.
    pub async fn on_log(
        &self,
        entry: v2::LogEntry,
        ex: &SharedExchange,
    ) -> Result<(), FilterFailure> {
        let c = self
            .call(Args::Log(entry), placeholder(), None, Some(ex), false)
            .await;
        c.result.map(|_| ())
    }

    /// One tick (`tick-handler.on-tick`), with a budget of its own.
    pub async fn on_tick(&self) -> Result<(), FilterFailure> {
        let c = self
            .call(Args::Tick, placeholder(), None, None, false)
            .await;
        c.result.map(|_| ())
    }

    /// The request phase, always on this thread (for `sluicegate filter`).
    pub fn on_request_inline(
        &self,
        head: RequestHead,
        ex: Option<&SharedExchange>,
    ) -> Called<RequestAction> {
        let c = block_inline(self.call(Args::Request, head, None, ex, true));
        map(c, request_output)
    }

    /// The request body phase, always on this thread.
    pub fn on_request_body_inline(
        &self,
        head: RequestHead,
        body: Bytes,
        ex: Option<&SharedExchange>,
    ) -> Called<BodyAction> {
        let c = block_inline(self.call(Args::RequestBody(body), head, None, ex, true));
        map(c, body_output)
    }

    /// The response phase, always on this thread.
    pub fn on_response_inline(
        &self,
        req: RequestHead,
        resp: ResponseHead,
        ex: Option<&SharedExchange>,
    ) -> Called<ResponseAction> {
        let c = block_inline(self.call(Args::Response, req, Some(resp), ex, true));
        map(c, response_output)
    }

    /// The response body phase, always on this thread.
    pub fn on_response_body_inline(
        &self,
        req: RequestHead,
        resp: ResponseHead,
        body: Bytes,
        ex: Option<&SharedExchange>,
    ) -> Called<BodyAction> {
        let c = block_inline(self.call(Args::ResponseBody(body), req, Some(resp), ex, true));
        map(c, body_output)
    }

    /// The log phase, always on this thread.
    pub fn on_log_inline(
        &self,
        entry: v2::LogEntry,
        ex: &SharedExchange,
    ) -> Result<(), FilterFailure> {
        let c = block_inline(self.call(Args::Log(entry), placeholder(), None, Some(ex), true));
        c.result.map(|_| ())
    }
}

fn request_output(o: Output) -> Option<RequestAction> {
    match o {
        Output::Request(a) => Some(a),
        _ => None,
    }
}

fn response_output(o: Output) -> Option<ResponseAction> {
    match o {
        Output::Response(a) => Some(a),
        _ => None,
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
