//! The admin listener: `/healthz`, `/readyz`, `/metrics` (Prometheus text),
//! `/filters`, `/upstreams`, `/cache`, `/stats`, `/series` and `/config` (JSON),
//! `POST /reload`, `POST /cache/purge`, and the HTML status page at `/`.
//! Bind it to loopback; with an admin token, everything but `/healthz` and
//! `/readyz` asks for it.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::balance::{self, Upstream};
use crate::body::{self, ProxyBody};
use crate::proxy::Proxy;

/// What the admin endpoints read.
pub struct AdminState {
    /// The proxy, for its snapshot and filters.
    pub proxy: Arc<Proxy>,
    /// Renders the Prometheus exposition.
    pub metrics: PrometheusHandle,
    /// False once draining: `/readyz` fails first.
    pub ready: AtomicBool,
    /// Open client connections.
    pub open_connections: Arc<AtomicUsize>,
    /// The config file `POST /reload` re-reads (none for an embedded config).
    pub source: Option<std::path::PathBuf>,
}

/// Serve the admin API on `listener` forever.
pub async fn serve(state: Arc<AdminState>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(crate::admin_ops::handle(&state, req, route).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<ProxyBody> {
    if let Some(resp) = crate::admin_ops::route(state, &req) {
        return resp;
    }
    if req.method() != Method::GET {
        return body::text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "admin endpoints are GET only",
        );
    }
    match req.uri().path() {
        "/healthz" => body::text_response(StatusCode::OK, "ok"),
        "/readyz" if state.ready.load(Ordering::Relaxed) => match crate::fleet::degraded() {
            None => body::text_response(StatusCode::OK, "ready"),
            // A dependency is down: still ready unless `[redis]
            // required_for_ready` (the fail policies keep serving).
            Some((fail, why)) => {
                let (status, text) = if fail {
                    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}"))
                } else {
                    (StatusCode::OK, format!("ready, degraded: {why}"))
                };
                body::text_response(status, &text)
            }
        },
        "/readyz" => body::text_response(StatusCode::SERVICE_UNAVAILABLE, "draining"),
        "/metrics" => {
            metrics::gauge!("sluicegate_open_connections")
                .set(state.open_connections.load(Ordering::Relaxed) as f64);
            crate::admin_ops::endpoint_gauges(&state.proxy.snapshot.load());
            crate::admin_ops::filter_gauges(state.proxy.filters.as_deref());
            let mut text = state.metrics.render();
            crate::hist::render(&mut text);
            let mut resp = Response::new(body::full(text));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        "/filters" => {
            let list = state
                .proxy
                .filters
                .as_ref()
                .map(|f| f.current().status())
                .unwrap_or_default();
            json(&serde_json::json!({ "filters": list }))
        }
        "/upstreams" => {
            let snap = state.proxy.snapshot.load();
            let mut ups: Vec<_> = snap.upstreams.values().map(|u| upstream_json(u)).collect();
            ups.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            json(&serde_json::json!({ "upstreams": ups }))
        }
        "/cache" => json(&state.proxy.snapshot.load().cache.stats_json()),
        "/series" => json(&crate::telemetry::series::json()),
        _ => body::text_response(StatusCode::NOT_FOUND, "unknown admin endpoint"),
    }
}

/// One upstream and the live state of each endpoint.
fn upstream_json(u: &Upstream) -> serde_json::Value {
    let now = balance::now_ns();
    let endpoints: Vec<_> = u
        .endpoints
        .as_slice()
        .iter()
        .map(|e| {
            let st = &e.state;
            let (requests, failures, ejections) = st.counters();
            serde_json::json!({
                "addr": &*e.addr,
                "name": e.name.as_deref(),
                "weight": e.weight,
                "healthy": st.healthy(now),
                "ejected": st.ejected(now),
                "active_healthy": st.active_healthy(),
                "in_flight": st.in_flight(),
                "ewma_ms": st.ewma_ns() / 1e6,
                "requests": requests,
                "failures": failures,
                "ejections": ejections,
            })
        })
        .collect();
    let limits = u.admission.as_ref().map(|a| {
        let (in_use, pending, refused) = a.stats();
        serde_json::json!({
            "max_connections": a.config.max_connections,
            "max_pending": a.config.max_pending,
            "in_use": in_use,
            "pending": pending,
            "refused": refused,
        })
    });
    let (retries_active, retries_refused) = u.retry_budget.stats();
    serde_json::json!({
        "name": &*u.name,
        "balance": u.balance,
        "retries": u.retries,
        "retry_budget": {
            "percent": u.retry_budget.config.percent,
            "min_concurrent": u.retry_budget.config.min_concurrent,
            "active": retries_active,
            "refused": retries_refused,
        },
        "limits": limits,
        "endpoints": endpoints,
    })
}

pub(crate) fn json(value: &serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(value.to_string()));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
