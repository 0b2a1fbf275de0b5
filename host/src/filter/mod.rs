//! The WebAssembly filter runtime: loading components from the filter
//! directory, keeping the live set in an atomically swapped snapshot, and
//! running a route's chain (see `chain`).
//!
//! Lifecycle of a filter version: file read → content hash → compiled (or
//! its cached artifact mapped) off the async runtime → pre-instantiated →
//! one instance made and `init` called with its config → live. A version
//! that fails any step never goes live; the last good one stays.

pub mod action;
pub mod artifacts;
pub mod callout;
pub mod chain;
pub mod compute;
pub mod engine;
pub mod exchange;
pub mod host_api;
pub mod instance;
pub mod kv;
pub mod stats;
pub mod stdio;
pub mod stream;
pub mod tool;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::config::{valid_filter_name, FiltersConfig};
use engine::FilterEngine;
use host_api::FilterContext;
use instance::FilterVersion;
use stats::FilterStats;

/// Host bindings generated from `wit/filter.wit`.
#[allow(missing_docs)]
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "filter",
        with: {
            "sluicegate:filter/types.request-head": super::host_api::RequestHead,
            "sluicegate:filter/types.response-head": super::host_api::ResponseHead,
        },
        imports: { default: trappable },
    });
}

/// Host bindings generated from `wit/v0.2/filter.wit` (contract 0.2).
#[allow(missing_docs)]
pub mod bindings_v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2",
        world: "filter",
        with: {
            "sluicegate:filter/types.request": super::host_api::RequestHead,
            "sluicegate:filter/types.response": super::host_api::ResponseHead,
            "sluicegate:filter/types.fields": super::host_api::Fields,
            "sluicegate:filter/types.exchange": super::host_api::ExchangeHandle,
        },
        imports: { default: trappable },
    });
}

/// Host bindings of the optional interfaces of contract 0.2's world
/// `callout-filter` (`upstream-client`, `timer`, `tick-handler`); the
/// interfaces it shares with `filter` are the ones of [`bindings_v2`].
/// `upstream-client.call` is an async import: a component that imports it
/// runs as a wasmtime async call (see `instance`).
#[allow(missing_docs)]
pub mod bindings_v2_callout {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2",
        world: "callout-filter",
        with: {
            "sluicegate:filter/types": super::bindings_v2::sluicegate::filter::types,
            "sluicegate:filter/log": super::bindings_v2::sluicegate::filter::log,
            "sluicegate:filter/kv": super::bindings_v2::sluicegate::filter::kv,
            "sluicegate:filter/metrics": super::bindings_v2::sluicegate::filter::metrics,
            "sluicegate:filter/env": super::bindings_v2::sluicegate::filter::env,
        },
        imports: {
            "sluicegate:filter/upstream-client.call": async | trappable,
            default: trappable,
        },
    });
}

/// What the admin API shows for one filter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FilterStatus {
    /// The filter's name.
    pub name: String,
    /// The file it comes from.
    pub file: PathBuf,
    /// Content hash of the live version (or of the failed file if none is live).
    pub hash: String,
    /// When the live version was loaded, seconds since the Unix epoch.
    pub loaded_at: Option<u64>,
    /// `active`, `failed` (the last load failed; an older version may still
    /// be live) or `quarantined`.
    pub state: &'static str,
    /// The most recent error, if any.
    pub last_error: Option<String>,
    /// The live version's capability manifest.
    pub grants: Option<crate::config::Grants>,
    /// True while the live version's calls run on the compute pool.
    pub slow: bool,
    /// Calls made, every phase.
    pub calls: u64,
    /// Calls shed for being over `max_cpu_percent`.
    pub shed: u64,
    /// CPU the filter's calls have used, seconds.
    pub cpu_seconds: f64,
    /// Its CPU share, percent of all worker threads.
    pub max_cpu_percent: Option<f64>,
}

/// The live filters: an immutable snapshot, swapped whole.
#[derive(Default)]
pub struct FilterSet {
    /// FxHash: looked up for every request of a filtered route, by names
    /// from the operator's own config.
    active: rustc_hash::FxHashMap<Arc<str>, Arc<FilterVersion>>,
    failed: BTreeMap<String, (PathBuf, String, String)>,
    files: BTreeMap<String, PathBuf>,
}

impl FilterSet {
    /// The live version of `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<FilterVersion>> {
        self.active.get(name)
    }

    /// Is there a file for `name` in the filter directory (loaded or not)?
    pub fn has_file(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    /// Status of every filter, for the admin API.
    pub fn status(&self) -> Vec<FilterStatus> {
        let mut names: Vec<&String> = self.files.keys().chain(self.failed.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                let live = self.active.get(name.as_str());
                let failed = self.failed.get(name);
                let state = match (live, failed) {
                    (Some(v), _) if v.stats.quarantined() => "quarantined",
                    (_, Some(_)) => "failed",
                    _ => "active",
                };
                let last_error = failed
                    .map(|(_, _, e)| e.clone())
                    .or_else(|| live.and_then(|v| v.stats.last_error.lock().clone()));
                FilterStatus {
                    name: name.clone(),
                    file: self
                        .files
                        .get(name)
                        .cloned()
                        .or_else(|| failed.map(|f| f.0.clone()))
                        .unwrap_or_default(),
                    hash: live
                        .map(|v| v.hash.clone())
                        .or_else(|| failed.map(|f| f.1.clone()))
                        .unwrap_or_default(),
                    loaded_at: live.map(|v| unix_secs(v.loaded_at)),
                    state,
                    last_error,
                    grants: live.map(|v| v.policy.grants.clone()),
                    slow: live.is_some_and(|v| v.is_slow()),
                    calls: live.map_or(0, |v| v.stats.calls.load(Relaxed)),
                    shed: live.map_or(0, |v| v.stats.cpu.shed.load(Relaxed)),
                    cpu_seconds: live
                        .map_or(0.0, |v| v.stats.cpu.used_ns.load(Relaxed) as f64 / 1e9),
                    max_cpu_percent: live.map(|v| v.policy.max_cpu_percent),
                }
            })
            .collect()
    }

    /// Names of the live filters.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.active.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Loads filters and holds the live set.
pub struct FilterRuntime {
    engine: FilterEngine,
    /// Where ticks run (the runtime that made this one; none in
    /// `sluicegate check`).
    ticks: Option<tokio::runtime::Handle>,
    kv: kv::KvRegistry,
    stats: Mutex<HashMap<String, Arc<FilterStats>>>,
    current: ArcSwap<FilterSet>,
    load_lock: Mutex<()>,
}

impl FilterRuntime {
    /// A runtime with no filters loaded yet; CPU shares are reckoned
    /// against `workers` worker threads.
    pub fn new(config: &FiltersConfig, workers: usize) -> anyhow::Result<FilterRuntime> {
        let cache = config.cache_dir.clone().or_else(artifacts::default_dir);
        Ok(FilterRuntime {
            engine: FilterEngine::new(cache, config.compute_threads, workers)?,
            ticks: tokio::runtime::Handle::try_current().ok(),
            kv: kv::KvRegistry::default(),
            stats: Mutex::new(HashMap::new()),
            current: ArcSwap::from_pointee(FilterSet::default()),
            load_lock: Mutex::new(()),
        })
    }

    /// Let filters call out to the upstreams of the proxy's live snapshot.
    pub fn enable_callouts(&self, service: callout::CalloutService) {
        self.engine.callouts.store(Some(Arc::new(service)));
    }

    /// The live set (cheap; never blocks on a reload).
    pub fn current(&self) -> Arc<FilterSet> {
        self.current.load_full()
    }

    fn stats_for(&self, name: &str) -> Arc<FilterStats> {
        self.stats
            .lock()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(FilterStats::new(name)))
            .clone()
    }

    /// (Re)load every `*.wasm` in the configured directory and swap the live
    /// set. Unchanged files (same hash, policy and config) keep their live
    /// version; a file that fails keeps its previous version live. Blocking.
    /// Returns the errors, each naming the file.
    pub fn reload(&self, config: &FiltersConfig) -> Vec<String> {
        let _serial = self.load_lock.lock();
        let previous = self.current();
        let mut next = FilterSet::default();
        let mut errors = Vec::new();
        for (name, path) in scan_dir(config.dir.as_deref(), &mut errors) {
            next.files.insert(name.clone(), path.clone());
            match self.load_one(&name, &path, config, previous.get(&name)) {
                Ok(version) => {
                    next.active.insert(Arc::from(name.as_str()), version);
                }
                Err((hash, e)) => {
                    let msg = format!("filter {name:?} ({}): {e:#}", path.display());
                    tracing::error!("{msg}");
                    metrics::counter!("sluicegate_filter_load_failures_total", "filter" => name.clone()).increment(1);
                    if let Some(old) = previous.get(&name) {
                        next.active.insert(Arc::from(name.as_str()), old.clone());
                    }
                    next.failed
                        .insert(name.clone(), (path.clone(), hash, msg.clone()));
                    errors.push(msg);
                }
            }
        }
        // Versions that left the live set stop ticking; new ones start.
        for (name, old) in &previous.active {
            if !next.active.get(name).is_some_and(|v| Arc::ptr_eq(v, old)) {
                old.retire();
            }
        }
        for (name, v) in &next.active {
            if !previous.active.get(name).is_some_and(|p| Arc::ptr_eq(p, v)) {
                self.start_ticks(v);
            }
        }
        self.current.store(Arc::new(next));
        errors
    }

    /// Run `version`'s ticks, if its init asked for them, until it retires
    /// (or is dropped): one tick at a time, the first at once.
    fn start_ticks(&self, version: &Arc<FilterVersion>) {
        let (Some(every), Some(handle)) = (version.tick, &self.ticks) else {
            return;
        };
        let weak = Arc::downgrade(version);
        let name = version.name.clone();
        tracing::info!(filter = %name, every_ms = every.as_millis() as u64, "filter ticks start");
        handle.spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(v) = weak.upgrade() else { break };
                if v.is_retired() {
                    break;
                }
                match v.on_tick().await {
                    Ok(()) => metrics::counter!("sluicegate_filter_ticks_total", "filter" => name.to_string(), "result" => "ok").increment(1),
                    Err(e) => {
                        metrics::counter!("sluicegate_filter_ticks_total", "filter" => name.to_string(), "result" => "error").increment(1);
                        tracing::warn!(filter = %name, error = %e, "filter tick failed");
                    }
                }
            }
            tracing::info!(filter = %name, "filter ticks stop: the version left the live set");
        });
    }

    fn load_one(
        &self,
        name: &str,
        path: &Path,
        config: &FiltersConfig,
        previous: Option<&Arc<FilterVersion>>,
    ) -> Result<Arc<FilterVersion>, (String, anyhow::Error)> {
        let bytes = std::fs::read(path)
            .map_err(|e| (String::new(), anyhow::Error::from(e).context("cannot read")))?;
        let policy = config.policy_for(name);
        let init = config.init_json(name);
        let hash = engine::content_hash(&bytes);
        if let Some(old) = previous {
            if old.hash == hash && old.policy == policy && old.init_config() == init {
                return Ok(old.clone());
            }
        }
        let timeout = std::time::Duration::from_millis(config.compile_timeout_ms);
        let component = compile_with_timeout(&self.engine, bytes, hash.clone(), timeout)
            .map_err(|e| (hash.clone(), e.context("not a valid filter component")))?;
        let ctx = Arc::new(FilterContext::new(Arc::from(name), self.kv.namespace(name)));
        let version = FilterVersion::new(
            &self.engine,
            &component,
            hash.clone(),
            ctx,
            policy,
            init,
            self.stats_for(name),
        )
        .map_err(|e| (hash.clone(), e))?;
        tracing::info!(filter = name, hash = &hash[..12], caps = ?version.caps, "filter loaded");
        Ok(Arc::new(version))
    }
}

/// `sluicegate check --filters`: load every filter the config's routes
/// name, with its config and policy, exactly as the proxy would. Returns
/// how many loaded; the error lists every failure with its file and
/// reason (one per line).
pub fn check_filters(config: &crate::config::Config) -> anyhow::Result<usize> {
    let fc = &config.filters;
    let runtime = FilterRuntime::new(fc, config.proxy.worker_threads())?;
    let mut errors = runtime.reload(fc);
    let set = runtime.current();
    let mut named = std::collections::BTreeSet::new();
    for (i, route) in config.routes.iter().enumerate() {
        for name in &route.filters {
            let name = name.get_ref();
            if named.insert(name.clone()) && !set.has_file(name) {
                let dir = fc.dir.as_deref().unwrap_or(Path::new("?"));
                errors.push(format!(
                    "route[{i}] names filter {name:?}, but {} has no {name}.wasm",
                    dir.display()
                ));
            }
        }
    }
    if errors.is_empty() {
        return Ok(set.names().len());
    }
    anyhow::bail!(
        "{} filter problem(s):\n  {}",
        errors.len(),
        errors.join("\n  ")
    )
}

/// Compile on a helper thread, giving up after `timeout` (the thread is
/// left to finish and its result dropped).
fn compile_with_timeout(
    engine: &FilterEngine,
    bytes: Vec<u8>,
    hash: String,
    timeout: std::time::Duration,
) -> anyhow::Result<wasmtime::component::Component> {
    let (tx, rx) = std::sync::mpsc::channel();
    let engine = engine.clone();
    std::thread::Builder::new()
        .name("sluicegate-compile".into())
        .spawn(move || {
            let _ = tx.send(engine.compile(&bytes, &hash));
        })?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => anyhow::bail!(
            "compiling took longer than compile_timeout_ms ({} ms)",
            timeout.as_millis()
        ),
    }
}

/// `*.wasm` files of `dir`, by name. Hidden and temporary files are skipped
/// (editors and `kubectl` write those before renaming).
fn scan_dir(dir: Option<&Path>, errors: &mut Vec<String>) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let Some(dir) = dir else { return found };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(format!("filter directory {}: {e}", dir.display()));
            return found;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        if file.starts_with('.') || path.extension().and_then(|e| e.to_str()) != Some("wasm") {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if !valid_filter_name(stem) {
            errors.push(format!(
                "{}: {stem:?} is not a valid filter name",
                path.display()
            ));
            continue;
        }
        if path.is_file() {
            found.insert(stem.to_string(), path);
        }
    }
    found
}
