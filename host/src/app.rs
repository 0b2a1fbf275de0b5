//! Process wiring: the runtime, the listeners, the admin API, signals,
//! reloads and shutdown.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::filter::FilterRuntime;
use crate::proxy::{Proxy, Snapshot};
use crate::reload;
use crate::server;
use crate::upstream::UpstreamClient;

/// Install the Prometheus recorder (once per process).
fn metrics_handle() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
        ])
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")
}

/// Build the tokio runtime the config asks for.
pub fn runtime(config: &Config) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.proxy.workers {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .thread_name("sluicegate-worker")
        .build()
        .context("starting the runtime")
}

/// Serve `config` until SIGTERM/SIGINT, then drain. `source` is the file to
/// re-read on SIGHUP or when it changes (none for an embedded config).
pub async fn serve(config: Config, source: Option<PathBuf>) -> anyhow::Result<()> {
    let metrics = metrics_handle()?;
    let filters = match &config.filters.dir {
        Some(_) => {
            let fc = config.filters.clone();
            let rt = tokio::task::spawn_blocking(move || -> anyhow::Result<Arc<FilterRuntime>> {
                let rt = Arc::new(FilterRuntime::new(&fc)?);
                for e in rt.reload(&fc) {
                    tracing::error!("{e}");
                }
                Ok(rt)
            })
            .await??;
            warn_missing_filters(&config, &rt);
            Some(rt)
        }
        None => None,
    };
    let proxy = Arc::new(Proxy {
        client: UpstreamClient::new(&config),
        snapshot: ArcSwap::from_pointee(Snapshot::new(config.clone())?),
        filters,
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    let mut servers = Vec::new();
    for addr in config.listen_addrs() {
        let listener = server::bind(addr)?;
        tracing::info!(%addr, "listening");
        servers.push(tokio::spawn(server::serve(
            proxy.clone(),
            listener,
            stop_rx.clone(),
            open.clone(),
        )));
    }
    let admin_state = Arc::new(AdminState {
        proxy: proxy.clone(),
        metrics,
        ready: AtomicBool::new(true),
        open_connections: open,
    });
    if let Some(addr) = config.admin_addr() {
        let listener = server::bind(addr)?;
        tracing::info!(%addr, "admin listening");
        tokio::spawn(admin::serve(admin_state.clone(), listener));
    }
    let _watcher = reload::watch(proxy.clone(), source.clone());

    wait_for_stop(&proxy, source).await;
    admin_state.ready.store(false, Ordering::Relaxed);
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Block until SIGTERM or SIGINT; reload on SIGHUP meanwhile.
async fn wait_for_stop(proxy: &Arc<Proxy>, source: Option<PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                if let Some(path) = &source {
                    tracing::info!("SIGHUP: reloading configuration");
                    reload::reload_config(proxy.clone(), path.clone()).await;
                }
            }
        }
    }
}

/// A route naming a filter that did not load is worth a loud warning.
pub fn warn_missing_filters(config: &Config, rt: &FilterRuntime) {
    let set = rt.current();
    for (i, route) in config.routes.iter().enumerate() {
        for f in &route.filters {
            if !set.has_file(f.get_ref()) {
                tracing::warn!(route = i, filter = %f.get_ref(), "route names a filter with no file in the filter directory: it is skipped until one appears");
            } else if set.get(f.get_ref()).is_none() {
                tracing::warn!(route = i, filter = %f.get_ref(), "route uses a filter that failed to load; its on_error policy applies");
            }
        }
    }
}
