//! Live changes without a restart: the filter directory and the config file
//! are watched (debounced), and SIGHUP re-reads the config. Work happens off
//! the async runtime; the result swaps in whole, or the running state stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};

use crate::config::Config;
use crate::proxy::{Proxy, Snapshot};

/// How long file events settle before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(30);

/// Keeps the watchers alive; dropping it stops watching.
pub type Watcher = Debouncer<notify::RecommendedWatcher, RecommendedCache>;

/// Watch the filter directory and the config file's directory.
pub fn watch(proxy: Arc<Proxy>, config_file: Option<PathBuf>) -> Option<Watcher> {
    let handle = tokio::runtime::Handle::current();
    let snap = proxy.snapshot.load_full();
    let filter_dir = snap.config.filters.dir.clone();
    let config_file = config_file.and_then(|p| std::fs::canonicalize(&p).ok().or(Some(p)));
    let (fd, cf) = (filter_dir.clone(), config_file.clone());
    let p = proxy.clone();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let touches = |dir: &Path| {
            events
                .iter()
                .any(|e| e.paths.iter().any(|p| p.starts_with(dir)))
        };
        let config_changed = cf
            .as_ref()
            .is_some_and(|f| events.iter().any(|e| e.paths.iter().any(|p| p == f)));
        if config_changed {
            if let Some(path) = cf.clone() {
                handle.spawn(reload_config(p.clone(), path));
            }
        } else if fd.as_deref().is_some_and(touches) {
            handle.spawn(reload_filters(p.clone()));
        }
    })
    .map_err(|e| tracing::error!(error = %e, "cannot watch files; reload with SIGHUP"))
    .ok()?;
    if let Some(dir) = &filter_dir {
        if let Err(e) = debouncer.watch(dir, RecursiveMode::NonRecursive) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot watch the filter directory");
        }
    }
    if let Some(dir) = config_file.as_ref().and_then(|f| f.parent()) {
        if let Err(e) = debouncer.watch(dir, RecursiveMode::NonRecursive) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot watch the config directory");
        }
    }
    Some(debouncer)
}

/// Reload every filter against the live config.
pub async fn reload_filters(proxy: Arc<Proxy>) {
    let Some(rt) = proxy.filters.clone() else {
        return;
    };
    let filters = proxy.snapshot.load().config.filters.clone();
    let started = std::time::Instant::now();
    let errors = tokio::task::spawn_blocking(move || rt.reload(&filters))
        .await
        .unwrap_or_default();
    metrics::counter!("sluicegate_reloads_total", "kind" => "filters").increment(1);
    if !errors.is_empty() {
        metrics::counter!("sluicegate_reload_failures_total", "kind" => "filters").increment(1);
    }
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        errors = errors.len(),
        "filters reloaded"
    );
}

/// Re-read the config; swap it in if valid, else keep the running one.
pub async fn reload_config(proxy: Arc<Proxy>, path: PathBuf) {
    let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
    metrics::counter!("sluicegate_reloads_total", "kind" => "config").increment(1);
    let config = match loaded {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            metrics::counter!("sluicegate_reload_failures_total", "kind" => "config").increment(1);
            tracing::error!("config reload rejected, keeping the running config: {e}");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload task failed");
            return;
        }
    };
    let old = proxy.snapshot.load_full();
    let filters_changed = format!("{:?}", old.config.filters) != format!("{:?}", config.filters);
    if config.filters.dir.is_some() && proxy.filters.is_none() {
        tracing::warn!("[filters] was added to the config; enabling filters needs a restart");
    }
    match Snapshot::new(config) {
        Ok(snap) => proxy.snapshot.store(Arc::new(snap)),
        Err(e) => {
            tracing::error!("config reload rejected: {e:#}");
            return;
        }
    }
    tracing::info!("configuration reloaded");
    if filters_changed {
        reload_filters(proxy).await;
    }
}
