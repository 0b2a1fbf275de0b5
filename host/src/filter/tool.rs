//! `sluicegate filter test` and `sluicegate filter bench`: run one filter
//! component against a sample request without a proxy — a filter author's
//! fast loop, and the per-call cost measurement.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};

use super::bindings::sluicegate::filter::types::{LocalResponse, RequestAction, ResponseAction};
use super::engine::FilterEngine;
use super::host_api::{FilterContext, RequestHead, ResponseHead};
use super::instance::FilterVersion;
use super::kv::KvStore;
use super::stats::FilterStats;
use crate::config::{FilterPolicy, Isolation, OnError};

/// A sample exchange to run a filter against.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// `METHOD /path?query`.
    pub request: String,
    /// `name: value` request headers.
    pub headers: Vec<String>,
    /// A response status to run the response phase with.
    pub response_status: Option<u16>,
    /// `name: value` response headers.
    pub response_headers: Vec<String>,
}

/// Load `wasm` with the filter config in `config_file` (a TOML table, the
/// same as `[filters.config.<name>]`), as a one-off version.
pub fn load(
    wasm: &Path,
    config_file: Option<&Path>,
    isolation: Isolation,
) -> anyhow::Result<FilterVersion> {
    let name = wasm
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("filter")
        .to_string();
    let init = match config_file {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let table: toml::Table =
                toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
            serde_json::to_string(&table)?
        }
        None => "{}".to_string(),
    };
    let bytes = std::fs::read(wasm).with_context(|| format!("reading {}", wasm.display()))?;
    let engine = FilterEngine::new(None)?;
    let hash = super::engine::content_hash(&bytes);
    let component = engine
        .compile(&bytes, &hash)
        .with_context(|| format!("{}: not a valid filter component", wasm.display()))?;
    let policy = FilterPolicy {
        timeout_ms: 1000,
        memory_mb: 256,
        on_error: OnError::FailClosed,
        isolation,
        max_requests_per_instance: u64::MAX,
    };
    let ctx = Arc::new(FilterContext::new(
        Arc::from(name.as_str()),
        Arc::new(KvStore::default()),
    ));
    FilterVersion::new(
        &engine,
        &component,
        hash,
        ctx,
        policy,
        init,
        Arc::new(FilterStats::new(&name)),
    )
    .with_context(|| format!("{}: filter failed to start", wasm.display()))
}

/// Parse `Name: value` lines into a header map.
fn header_map(lines: &[String]) -> anyhow::Result<http::HeaderMap> {
    let mut map = http::HeaderMap::new();
    for line in lines {
        let Some((n, v)) = line.split_once(':') else {
            bail!("header {line:?} is not 'name: value'")
        };
        map.append(
            http::HeaderName::from_bytes(n.trim().as_bytes())?,
            http::HeaderValue::from_str(v.trim())?,
        );
    }
    Ok(map)
}

/// The request head described by `sample`.
pub fn request_head(sample: &Sample) -> anyhow::Result<RequestHead> {
    let mut words = sample.request.split_whitespace();
    let (Some(method), Some(path)) = (words.next(), words.next()) else {
        bail!("--request must look like 'GET /path'")
    };
    let mut req = http::Request::builder().method(method).uri(path).body(())?;
    *req.headers_mut() = header_map(&sample.headers)?;
    Ok(RequestHead {
        parts: req.into_parts().0,
        client: "127.0.0.1:40000".parse()?,
        scheme: "http",
    })
}

fn print_head(title: &str, first: String, headers: &http::HeaderMap) {
    println!("{title}: {first}");
    for (n, v) in headers {
        println!("  {n}: {}", String::from_utf8_lossy(v.as_bytes()));
    }
}

fn print_local(l: &LocalResponse) {
    println!("  status {}", l.status);
    for (n, v) in &l.headers {
        println!("  {n}: {v}");
    }
    println!(
        "  body ({} bytes): {}",
        l.body.len(),
        String::from_utf8_lossy(&l.body).trim_end()
    );
}

/// Run the phases of `version` over `sample` and print what happened.
pub fn test(version: &FilterVersion, sample: &Sample) -> anyhow::Result<()> {
    println!(
        "filter {} ({}), phases {:?}",
        version.name,
        &version.hash[..12],
        version.caps
    );
    let head = request_head(sample)?;
    let (head, result) = version.on_request(head);
    match result.map_err(|f| anyhow::anyhow!("request phase failed: {f}"))? {
        RequestAction::Continue => println!("action: continue"),
        RequestAction::Route(u) => println!("action: route to upstream {u:?}"),
        RequestAction::Respond(local) => {
            println!("action: respond");
            print_local(&local);
        }
    }
    let line = format!("{} {}", head.parts.method, head.parts.uri);
    print_head("request", line, &head.parts.headers);
    if let Some(status) = sample.response_status {
        let mut resp = http::Response::new(());
        *resp.status_mut() = http::StatusCode::from_u16(status)?;
        *resp.headers_mut() = header_map(&sample.response_headers)?;
        let resp = ResponseHead {
            parts: resp.into_parts().0,
        };
        let (_, resp, result) = version.on_response(head, resp);
        match result.map_err(|f| anyhow::anyhow!("response phase failed: {f}"))? {
            ResponseAction::Continue => println!("response action: continue"),
            ResponseAction::Respond(local) => {
                println!("response action: respond");
                print_local(&local);
            }
        }
        print_head(
            "response",
            resp.parts.status.to_string(),
            &resp.parts.headers,
        );
    }
    Ok(())
}

/// Time `calls` request-phase calls and print the cost per call.
pub fn bench(version: &FilterVersion, sample: &Sample, calls: u64) -> anyhow::Result<f64> {
    let template = request_head(sample)?;
    let mut head = RequestHead {
        parts: template.parts.clone(),
        client: template.client,
        scheme: template.scheme,
    };
    // Warm up.
    for _ in 0..(calls / 10).max(10) {
        let (h, r) = version.on_request(head);
        r.map_err(|f| anyhow::anyhow!("{f}"))?;
        head = h;
    }
    let started = Instant::now();
    for _ in 0..calls {
        head.parts.headers = template.parts.headers.clone();
        let (h, r) = version.on_request(head);
        r.map_err(|f| anyhow::anyhow!("{f}"))?;
        head = h;
    }
    let per_call = started.elapsed().as_secs_f64() * 1e6 / calls as f64;
    Ok(per_call)
}
