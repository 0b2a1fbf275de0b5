//! Active HTTP health checks: one task on the main runtime follows the live
//! snapshot (so a reload adds, changes or drops checks by itself) and, for
//! each upstream with `[upstream.health] path`, sends a plain HTTP/1.1
//! `GET` to every endpoint each `interval_ms`. A `2xx` within `timeout_ms`
//! passes; `healthy_threshold` passes in a row mark an endpoint healthy,
//! `unhealthy_threshold` failures in a row unhealthy. With `check = "grpc"`
//! the check is the gRPC health protocol instead (see [`super::grpc_health`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{EndpointState, Upstream};
use crate::proxy::Snapshot;

/// How often the checker looks at the live snapshot for new upstreams.
const RESCAN: Duration = Duration::from_millis(100);

/// Run the checks forever.
pub async fn run(snapshot: Arc<ArcSwap<Snapshot>>) {
    let mut due: HashMap<Arc<str>, Instant> = HashMap::new();
    loop {
        let snap = snapshot.load_full();
        let now = Instant::now();
        due.retain(|name, _| snap.upstreams.contains_key(name));
        for (name, up) in &snap.upstreams {
            if !up.health.active() {
                continue;
            }
            let next = due.entry(name.clone()).or_insert(now);
            if *next > now {
                continue;
            }
            *next = now + Duration::from_millis(up.health.interval_ms);
            check_upstream(up.clone());
        }
        let wake = due.values().min().copied().unwrap_or(now + RESCAN);
        tokio::time::sleep_until(wake.min(now + RESCAN)).await;
    }
}

/// Check every endpoint of `up` concurrently, in the background.
fn check_upstream(up: Arc<Upstream>) {
    if up.health.check == crate::config::HealthCheckKind::Grpc {
        for i in 0..up.endpoints.len() {
            let up = up.clone();
            tokio::spawn(async move {
                let Some(ep) = up.endpoint(i) else { return };
                let h = &up.health;
                let timeout = Duration::from_millis(h.timeout_ms);
                let checked = tokio::time::timeout(
                    timeout,
                    super::grpc_health::probe(&up, ep, &h.grpc_service, timeout),
                )
                .await;
                let ok = match checked {
                    Ok(Ok(())) => true,
                    Ok(Err(why)) => {
                        tracing::debug!(upstream = %up.name, endpoint = %ep.addr, why, "gRPC health check failed");
                        false
                    }
                    Err(_) => false,
                };
                apply(&ep.state, ok, h, &up.name, &ep.addr);
            });
        }
        return;
    }
    let Some(path) = up.health.path.clone() else {
        return;
    };
    for ep in up.endpoints.as_slice() {
        let (addr, state, path) = (ep.addr.clone(), ep.state.clone(), path.clone());
        let (up, h) = (up.name.clone(), up.health.clone());
        tokio::spawn(async move {
            let timeout = Duration::from_millis(h.timeout_ms);
            let ok = matches!(tokio::time::timeout(timeout, probe(&addr, &path)).await, Ok(Ok(s)) if (200..300).contains(&s));
            apply(&state, ok, &h, &up, &addr);
        });
    }
}

fn apply(
    state: &EndpointState,
    ok: bool,
    h: &crate::config::HealthConfig,
    upstream: &str,
    addr: &str,
) {
    match state.check_result(ok, h.healthy_threshold, h.unhealthy_threshold) {
        Some(true) => tracing::info!(upstream, endpoint = addr, "health check: endpoint healthy"),
        Some(false) => {
            tracing::warn!(
                upstream,
                endpoint = addr,
                "health check: endpoint unhealthy"
            )
        }
        None => {}
    }
}

/// `GET path` over a fresh connection; the response status.
async fn probe(addr: &str, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sluicegate-health\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_status(&buf).ok_or_else(|| std::io::Error::other("no HTTP status line"))
}

/// The status of an `HTTP/1.x NNN ...` status line.
fn parse_status(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 Nope\r\nx: y"), Some(503));
        assert_eq!(parse_status(b"SSH-2.0\r\n"), None);
    }

    #[test]
    fn thresholds() {
        let st = EndpointState::default();
        assert_eq!(st.check_result(false, 2, 2), None);
        assert_eq!(st.check_result(false, 2, 2), Some(false));
        assert_eq!(st.check_result(true, 2, 2), None);
        assert_eq!(st.check_result(true, 2, 2), Some(true));
    }
}
