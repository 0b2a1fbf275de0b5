//! `sluicegate demo`: two local backends and the proxy in front of them,
//! with the example filters, from an embedded config.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::body::{self, ProxyBody};
use crate::config::Config;

/// The embedded demo configuration.
pub const DEMO_CONFIG: &str = include_str!("demo.toml");

/// The demo config with its filter directory set to `filters_dir`; without
/// that directory the routes run with no filters.
pub fn demo_config(filters_dir: &Path) -> anyhow::Result<Config> {
    let mut config =
        Config::parse(DEMO_CONFIG, Path::new("demo.toml")).context("embedded demo config")?;
    if filters_dir.is_dir() {
        config.filters.dir = Some(filters_dir.to_path_buf());
    } else {
        tracing::warn!(dir = %filters_dir.display(), "no filter directory: the demo runs without filters (build them with scripts/build-filters.sh)");
        config.filters.dir = None;
        for r in &mut config.routes {
            r.filters.clear();
        }
    }
    Ok(config)
}

/// Start the two demo backends of the embedded config.
pub async fn start_backends() -> anyhow::Result<()> {
    for (i, port) in [9001u16, 9002].into_iter().enumerate() {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("demo backend on {addr}"))?;
        let name = format!("backend-{}", i + 1);
        tracing::info!(%addr, name, "demo backend listening");
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let name = name.clone();
                        async move { Ok::<_, Infallible>(answer(&name, req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    Ok(())
}

/// A backend's answer: who answered, and what arrived.
fn answer(name: &str, req: Request<Incoming>) -> Response<ProxyBody> {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let text = serde_json::json!({
        "backend": name,
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "headers": headers,
    });
    let mut resp = Response::new(body::full(format!("{text:#}\n")));
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = http::HeaderValue::from_str(name) {
        resp.headers_mut().insert("x-backend", v);
    }
    resp
}

/// The default filter directory: `target/filters` of the workspace.
pub fn default_filters_dir() -> PathBuf {
    PathBuf::from("target/filters")
}
