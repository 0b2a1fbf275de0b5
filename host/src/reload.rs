//! Live changes without a restart: the filter directory and the config file
//! are watched (debounced), and SIGHUP re-reads the config. Work happens off
//! the async runtime; the result swaps in whole, or the running state stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::proxy::{Proxy, Snapshot};

/// How long file events must stay quiet before a reload: editors and
/// `kubectl` touch several files in a burst.
pub const DEBOUNCE: Duration = Duration::from_millis(10);

/// Keeps the watcher alive; dropping it stops watching.
pub type Watcher = notify::RecommendedWatcher;

/// What changed, as far as a reload is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Change {
    Filters,
    Config,
}

/// Changes seen before the proxy exists, waiting for [`Pending::apply`].
pub struct Pending {
    rx: mpsc::UnboundedReceiver<Change>,
    config_file: Option<PathBuf>,
}

impl Pending {
    /// From now on, reload `proxy` after each burst of events has been
    /// quiet for [`DEBOUNCE`] (events seen since [`watch`] included).
    pub fn apply(self, proxy: Arc<Proxy>) {
        tokio::spawn(debounced(proxy, self.rx, self.config_file));
    }
}

/// Watch the filter directory and the config file's directory.
///
/// Called before the filters and the listeners are set up: a filter
/// replaced while the proxy starts (after its first load read the
/// directory, before the watch began) would otherwise go unnoticed until
/// the next change. Its event waits in [`Pending`] and causes one reload.
pub fn watch(config: &Config, config_file: Option<PathBuf>) -> Option<(Watcher, Pending)> {
    let filter_dir = config.filters.dir.clone();
    let config_file = config_file.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    let filter_dir_abs = filter_dir
        .as_ref()
        .map(|d| std::fs::canonicalize(d).unwrap_or(d.clone()));
    let (tx, rx) = mpsc::unbounded_channel();
    let (fd, cf) = (filter_dir_abs.clone(), config_file.clone());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        for path in &event.paths {
            if cf.as_deref() == Some(path.as_path()) {
                let _ = tx.send(Change::Config);
            } else if fd.as_deref().is_some_and(|d| path.starts_with(d)) {
                let _ = tx.send(Change::Filters);
            }
        }
    })
    .map_err(|e| tracing::error!(error = %e, "cannot watch files; reload with SIGHUP"))
    .ok()?;
    if let Some(dir) = &filter_dir_abs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot watch the filter directory");
        }
    }
    if let Some(dir) = config_file.as_ref().and_then(|f| f.parent()) {
        if filter_dir_abs.as_deref() != Some(dir) {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::error!(dir = %dir.display(), error = %e, "cannot watch the config directory");
            }
        }
    }
    Some((watcher, Pending { rx, config_file }))
}

/// Collect a burst of changes, then apply them once.
async fn debounced(
    proxy: Arc<Proxy>,
    mut rx: mpsc::UnboundedReceiver<Change>,
    config_file: Option<PathBuf>,
) {
    while let Some(first) = rx.recv().await {
        let mut config = first == Change::Config;
        loop {
            match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                Ok(Some(c)) => config |= c == Change::Config,
                Ok(None) => return,
                Err(_) => break,
            }
        }
        match (&config_file, config) {
            (Some(path), true) => {
                let _ = reload_config(proxy.clone(), path.clone()).await;
            }
            _ => reload_filters(proxy.clone()).await,
        }
    }
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

/// Re-read the config; swap it in if valid, else keep the running one
/// (and say why).
pub async fn reload_config(proxy: Arc<Proxy>, path: PathBuf) -> Result<(), String> {
    let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
    metrics::counter!("sluicegate_reloads_total", "kind" => "config").increment(1);
    let mut config = match loaded {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            metrics::counter!("sluicegate_reload_failures_total", "kind" => "config").increment(1);
            tracing::error!("config reload rejected, keeping the running config: {e}");
            return Err(e.to_string());
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload task failed");
            return Err(e.to_string());
        }
    };
    let old = proxy.snapshot.load_full();
    let filters_changed = format!("{:?}", old.config.filters) != format!("{:?}", config.filters);
    if config.filters.dir.is_some() && proxy.filters.is_none() {
        tracing::warn!("[filters] was added to the config; enabling filters needs a restart");
    }
    config.pin_restart_only(&old.config);
    if !config.pending_restart.is_empty() {
        let keys: Vec<&str> = config
            .pending_restart
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        tracing::warn!(
            "{} changed in the config; they apply after a restart (the running values are kept, and /config lists them under pending_restart; certificate files reload by themselves)",
            keys.join(", ")
        );
    }
    if old.config.redis != config.redis || old.config.filters.kv != config.filters.kv {
        tracing::warn!("[redis] or [filters.kv] changed in the config; they apply after a restart");
    }
    // Names are resolved before the swap, so new endpoints take traffic at once.
    let dns = Arc::new(crate::balance::dns::resolve(&config, &old.dns).await);
    let swapped = swap_snapshot(&proxy, |old| {
        Snapshot::with_dns(config, Some(old), dns).map(Some)
    })
    .await;
    if let Err(e) = swapped {
        metrics::counter!("sluicegate_reload_failures_total", "kind" => "config").increment(1);
        tracing::error!("config reload rejected: {e:#}");
        return Err(format!("{e:#}"));
    }
    tracing::info!("configuration reloaded");
    if filters_changed {
        reload_filters(proxy).await;
    }
    Ok(())
}

/// Replace the live snapshot with what `build` makes of it (`None`: keep
/// it). Config reloads and DNS updates go through here one at a time, so
/// neither builds on a snapshot the other is replacing. Requests never
/// wait on this: they load whichever snapshot is live.
pub async fn swap_snapshot(
    proxy: &Proxy,
    build: impl FnOnce(&Snapshot) -> anyhow::Result<Option<Snapshot>>,
) -> anyhow::Result<bool> {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let old = proxy.snapshot.load_full();
    match build(&old)? {
        Some(new) => {
            proxy.snapshot.store(Arc::new(new));
            Ok(true)
        }
        None => Ok(false),
    }
}
