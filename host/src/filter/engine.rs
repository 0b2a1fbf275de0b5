//! The one wasmtime `Engine` of the process: its settings, the linker with
//! the host imports, the epoch ticker behind CPU deadlines, and compilation
//! with an on-disk cache of precompiled artifacts.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::artifacts::ArtifactCache;
use super::bindings::Filter;
use super::compute::ComputePool;
use super::host_api::HostState;

/// One epoch tick: the granularity of CPU deadlines. 2 ms, not 1: the
/// ticker wakes 500 times a second instead of 1,000 (each wake-up is a
/// context switch on a core that is serving requests), and a deadline is
/// still kept to within 2 ms.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

/// The engine, the linker, and where compiled artifacts are cached.
#[derive(Clone)]
pub struct FilterEngine {
    /// The process-wide engine.
    pub engine: Engine,
    /// Host imports: the WIT interfaces and an empty WASI.
    pub linker: std::sync::Arc<Linker<HostState>>,
    cache: Option<Arc<ArtifactCache>>,
    compat: String,
    sync_cache: bool,
    /// Where slow filters' calls run (see `compute`).
    pub compute: Arc<ComputePool>,
    /// The proxy's upstreams for filters' callouts, once it runs (see
    /// `callout`).
    pub callouts: Arc<arc_swap::ArcSwapOption<super::callout::CalloutService>>,
    workers: usize,
}

/// The pooling allocator, or (`SLUICEGATE_WASM_ON_DEMAND` set, for
/// profiling only) wasmtime's on-demand one: the pool reserves terabytes of
/// address space up front, which valgrind refuses, so `bench/callgrind.py
/// --filter` runs the proxy with this set. Limits are the same either way
/// (the memory cap is the store's limiter, the CPU deadline the epoch).
fn allocation_strategy(pool: PoolingAllocationConfig) -> InstanceAllocationStrategy {
    if std::env::var_os("SLUICEGATE_WASM_ON_DEMAND").is_some() {
        tracing::warn!(
            "SLUICEGATE_WASM_ON_DEMAND is set: filters use the on-demand allocator (for profiling)"
        );
        InstanceAllocationStrategy::OnDemand
    } else {
        InstanceAllocationStrategy::Pooling(pool)
    }
}

impl FilterEngine {
    /// Build the engine and start its epoch ticker thread. `cache_dir` is
    /// opened as an [`ArtifactCache`]; one that is refused (not private to
    /// the proxy's user) is logged and filters are compiled in memory.
    /// `compute_threads` run slow filters' calls; `workers` is the number
    /// of worker threads CPU shares are reckoned against.
    pub fn new(
        cache_dir: Option<PathBuf>,
        compute_threads: usize,
        workers: usize,
    ) -> anyhow::Result<FilterEngine> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(1000)
            .total_core_instances(2000)
            .total_memories(1000)
            .total_tables(1000)
            .max_core_instances_per_component(64)
            .max_memories_per_component(8)
            .max_tables_per_component(64)
            .table_elements(100_000)
            .max_memory_size(1 << 30)
            .linear_memory_keep_resident(64 * 1024)
            .table_keep_resident(16 * 1024);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .memory_init_cow(true)
            .wasm_component_model(true)
            .allocation_strategy(allocation_strategy(pool));
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(anyhow::Error::from)?;
        // Its blocking io methods would `block_on` a worker's runtime.
        super::stdio::nonblocking::add_to_linker(&mut linker).map_err(anyhow::Error::from)?;
        Filter::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(anyhow::Error::from)?;
        // Contract 0.2 beside 0.1: a component imports one or the other
        // (or, built with both SDK modules, both).
        super::bindings_v2::Filter::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(anyhow::Error::from)?;
        // The optional interfaces of `callout-filter` (a component that
        // does not import them links as before).
        use super::bindings_v2_callout::sluicegate::filter::{timer, upstream_client};
        upstream_client::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(anyhow::Error::from)?;
        timer::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(anyhow::Error::from)?;

        let weak = engine.weak();
        std::thread::Builder::new()
            .name("sluicegate-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            })
            .context("starting the epoch thread")?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = format!(
            "{:016x}-wasmtime48-{}",
            hasher.finish(),
            env!("CARGO_PKG_VERSION")
        );
        let cache = cache_dir.and_then(|dir| match ArtifactCache::open(&dir) {
            Ok(cache) => Some(Arc::new(cache)),
            Err(reason) => {
                tracing::warn!(
                    dir = %dir.display(),
                    "refusing the filter artifact cache ({reason}); filters are compiled in memory"
                );
                None
            }
        });
        Ok(FilterEngine {
            engine,
            linker: std::sync::Arc::new(linker),
            cache,
            compat,
            sync_cache: false,
            compute: Arc::new(ComputePool::new(compute_threads)?),
            callouts: Arc::default(),
            workers: workers.max(1),
        })
    }

    /// Write new artifacts before `compile` returns (for short-lived
    /// processes such as `sluicegate filter test`, which would exit before
    /// a background write).
    pub fn with_sync_cache(mut self) -> FilterEngine {
        self.sync_cache = true;
        self
    }

    /// Compile a component, or map its cached artifact. Blocking: call it
    /// off the async runtime. `hash` is the bytes' [`content_hash`], which
    /// names the cached artifact.
    pub fn compile(&self, wasm: &[u8], hash: &str) -> anyhow::Result<Component> {
        let Some(cache) = &self.cache else {
            let component = Component::new(&self.engine, wasm).map_err(anyhow::Error::from)?;
            return Ok(component);
        };
        match cache.load(&self.engine, hash, &self.compat) {
            Ok(Some(component)) => return Ok(component),
            Ok(None) => {}
            Err(reason) => {
                metrics::counter!("sluicegate_filter_artifacts_refused_total").increment(1);
                tracing::warn!(
                    "refusing a cached filter artifact ({reason}); compiling the component in memory"
                );
            }
        }
        // Compile in memory (a reload waits on this), then cache the artifact
        // for the next start on another thread.
        let component = Component::new(&self.engine, wasm).map_err(anyhow::Error::from)?;
        match component.serialize() {
            Ok(bytes) if self.sync_cache => store(cache, hash, &self.compat, &bytes),
            Ok(bytes) => {
                let (cache, hash, compat) = (cache.clone(), hash.to_string(), self.compat.clone());
                std::thread::spawn(move || store(&cache, &hash, &compat, &bytes));
            }
            Err(e) => tracing::warn!(error = %e, "cannot serialize compiled filter"),
        }
        Ok(component)
    }

    /// Worker threads that CPU shares are reckoned against.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The artifact cache in use, if any (for `/filters` and tests).
    pub fn cache_dir(&self) -> Option<&std::path::Path> {
        self.cache.as_deref().map(ArtifactCache::dir)
    }
}

fn store(cache: &ArtifactCache, hash: &str, compat: &str, bytes: &[u8]) {
    if let Err(e) = cache.store(hash, compat, bytes) {
        tracing::warn!(dir = %cache.dir().display(), error = %e, "cannot cache compiled filter");
    }
}

/// The SHA-256 of a component's bytes, hex: its identity everywhere (cache
/// key, `/filters`, logs).
pub fn content_hash(wasm: &[u8]) -> String {
    hex::encode(Sha256::digest(wasm))
}
