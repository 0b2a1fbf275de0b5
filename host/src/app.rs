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
        .set_buckets(&crate::hist::BOUNDS)
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")
}

/// The runtime of the main thread: signals, admin API, reloads. Request
/// traffic runs on the worker threads (see [`serve`]).
pub fn runtime(_config: &Config) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("sluicegate-main")
        .build()
        .context("starting the runtime")
}

/// Serve `config` until SIGTERM/SIGINT, then drain. `source` is the file to
/// re-read on SIGHUP or when it changes (none for an embedded config).
///
/// Threading: `[proxy] workers` threads (default: one per core), each with
/// its own single-threaded runtime, its own `SO_REUSEPORT` listener per
/// address and its own upstream connection pool — the kernel spreads
/// connections over them and nothing on the request path is shared but
/// the atomically swapped snapshot and the filter runtime.
pub async fn serve(config: Config, source: Option<PathBuf>) -> anyhow::Result<()> {
    crate::protect::raise_fd_limit();
    // Watch before anything is read from the watched directories.
    let watching = reload::watch(&config, source.clone());
    let metrics = metrics_handle()?;
    // The exporter's histograms keep raw samples until drained: drain them
    // on a timer so memory stays flat even if nobody scrapes /metrics. (The
    // per-request latency histograms are `hist`'s own and need none.)
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    // Before the filter runtime: its KV namespaces pick their backend
    // from the link (see `filter::kv`).
    if let Some(redis) = &config.redis {
        crate::fleet::install(redis, &config.filters.kv)?;
    }
    let filters = match &config.filters.dir {
        Some(_) => {
            let fc = config.filters.clone();
            let workers = config.proxy.worker_threads();
            let rt = tokio::task::spawn_blocking(move || -> anyhow::Result<Arc<FilterRuntime>> {
                let rt = Arc::new(FilterRuntime::new(&fc, workers)?);
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
    let dns = crate::balance::dns::resolve(&config, &Default::default()).await;
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::with_dns(
        config.clone(),
        None,
        Arc::new(dns),
    )?));
    crate::fleet::purge::subscribe(snapshot.clone());
    // Filters' callouts go to the upstreams of the live snapshot.
    if let Some(rt) = &filters {
        rt.enable_callouts(crate::filter::callout::CalloutService::new(
            snapshot.clone(),
        ));
    }
    let make_proxy = || {
        Arc::new(Proxy {
            client: UpstreamClient::new(&config),
            snapshot: snapshot.clone(),
            filters: filters.clone(),
        })
    };

    crate::status::mark_start();
    if let Some(t) = &config.tracing {
        crate::telemetry::init(t)?;
    }
    // The status page's charts.
    tokio::spawn(crate::telemetry::series::run());
    if let Some(log) = &config.proxy.access_log {
        crate::access_log::init(log)?;
    }
    let tls = config
        .proxy
        .tls
        .iter()
        .map(crate::tls::TlsListener::new)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let workers = config.proxy.worker_threads();
    // Plain listeners, then TLS ones (with their acceptors).
    let addrs: Vec<_> = config
        .listen_addrs()
        .into_iter()
        .map(|a| (a, None))
        .chain(
            config
                .tls_addrs()
                .into_iter()
                .zip(tls.iter().map(|t| Some(t.acceptor.clone()))),
        )
        .collect();
    // Bind everything before serving, so a taken port fails the start:
    // one socket per worker for each address.
    let mut bound: Vec<Vec<_>> = (0..workers).map(|_| Vec::new()).collect();
    for (addr, tls) in &addrs {
        for (worker, listener) in bound.iter_mut().zip(server::bind_workers(*addr, workers)?) {
            worker.push((listener, tls.clone()));
        }
    }
    for (addr, tls) in &addrs {
        tracing::info!(%addr, workers, tls = tls.is_some(), "listening");
    }
    let _cert_watcher = crate::tls::watch(&tls);
    let (stop_tx, stop_rx) = watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for (i, listeners) in bound.into_iter().enumerate() {
        let proxy = make_proxy();
        let stop = stop_rx.clone();
        let open = open.clone();
        let thread = std::thread::Builder::new()
            .name(format!("sluicegate-worker-{i}"))
            .spawn(move || worker(proxy, listeners, stop, open))
            .context("starting a worker thread")?;
        threads.push(thread);
    }

    let main_proxy = make_proxy();
    let admin_state = Arc::new(AdminState {
        proxy: main_proxy.clone(),
        metrics,
        ready: AtomicBool::new(true),
        open_connections: open,
        source: source.clone(),
    });
    if let Some(addr) = config.admin_addr() {
        if !addr.ip().is_loopback() && config.proxy.admin_token.is_none() {
            tracing::warn!(%addr, "the admin API listens beyond loopback without admin_token: anyone who reaches it can read /config and trigger reloads");
        }
        let listener = tokio::net::TcpListener::from_std(server::bind_std(addr, false)?)?;
        tracing::info!(%addr, "admin listening");
        tokio::spawn(admin::serve(admin_state.clone(), listener));
    }
    // Active health checks follow the live snapshot across reloads.
    tokio::spawn(crate::balance::health::run(snapshot.clone()));
    tokio::spawn(crate::balance::dns::run(main_proxy.clone()));
    let _watcher = watching.map(|(watcher, pending)| {
        pending.apply(main_proxy.clone());
        watcher
    });

    wait_for_stop(&main_proxy, source).await;
    // Drain in order: readiness fails first, then (after drain_delay_ms,
    // time for load balancers to notice) the listeners close, then
    // in-flight requests finish within drain_ms.
    admin_state.ready.store(false, Ordering::Relaxed);
    let delay = main_proxy
        .snapshot
        .load()
        .config
        .proxy
        .timeouts
        .drain_delay_ms;
    if delay > 0 {
        tracing::info!(
            ms = delay,
            "shutting down: not ready; still accepting for drain_delay_ms"
        );
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    tracing::info!("shutting down: listeners closed, draining in-flight requests");
    let _ = stop_tx.send(true);
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    // The spans of the last requests.
    let _ = tokio::task::spawn_blocking(crate::telemetry::shutdown).await;
    tracing::info!("stopped");
    Ok(())
}

/// One worker thread: a single-threaded runtime serving its listeners.
fn worker(
    proxy: Arc<Proxy>,
    listeners: Vec<(std::net::TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    stop: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a worker runtime");
            return;
        }
    };
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for (l, tls) in listeners {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => tasks.push(tokio::spawn(server::serve(
                    proxy.clone(),
                    l,
                    stop.clone(),
                    open.clone(),
                    tls,
                ))),
                Err(e) => tracing::error!(error = %e, "cannot register a listener"),
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    });
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
                    let _ = reload::reload_config(proxy.clone(), path.clone()).await;
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
