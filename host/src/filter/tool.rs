//! `sluicegate filter test` and `sluicegate filter bench`: run one filter
//! component against a sample request without a proxy — a filter author's
//! fast loop, and the per-call cost measurement.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};

use super::action::{BodyAction, Local, RequestAction, ResponseAction};
use super::engine::FilterEngine;
use super::exchange::{Exchange, SharedExchange};
use super::host_api::{FilterContext, RequestHead, ResponseHead};
use super::instance::{Contract, FilterVersion};
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
    /// The client's `ip:port` (default `127.0.0.1:40000`).
    pub client: Option<String>,
    /// The request body, for a filter that asks for the request-body phase
    /// (empty when not given, as for a request without a body).
    pub body: Option<Vec<u8>>,
    /// A response status to run the response phase with.
    pub response_status: Option<u16>,
    /// `name: value` response headers.
    pub response_headers: Vec<String>,
    /// The response body, for a filter that asks for the response-body phase.
    pub response_body: Option<Vec<u8>>,
}

/// Where `filter test` and `filter bench` cache compiled artifacts: the
/// proxy's default, so a filter compiled once (an interpreted-language
/// component takes seconds) is mapped in milliseconds by the next run.
pub fn default_cache_dir() -> Option<std::path::PathBuf> {
    super::artifacts::default_dir()
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
            // The file may be a proxy config (its `[filters.config.<name>]`
            // table is used, as the help says) or the filter's table alone.
            let own = table
                .get("filters")
                .and_then(|f| f.get("config"))
                .and_then(|c| c.get(&name));
            match own {
                Some(t) => serde_json::to_string(t)?,
                None if table.contains_key("filters") => {
                    anyhow::bail!("{}: has no [filters.config.{name}] table", p.display())
                }
                None => serde_json::to_string(&table)?,
            }
        }
        None => "{}".to_string(),
    };
    let bytes = std::fs::read(wasm).with_context(|| format!("reading {}", wasm.display()))?;
    // Artifacts are written before this short-lived process exits.
    let engine = FilterEngine::new(default_cache_dir(), 1, 1)?.with_sync_cache();
    let hash = super::engine::content_hash(&bytes);
    let component = engine
        .compile(&bytes, &hash)
        .with_context(|| format!("{}: not a valid filter component", wasm.display()))?;
    // The proxy's default manifest, except that any upstream may be
    // named (there are none here) and the CPU share is the whole core.
    let defaults = crate::config::FiltersConfig::default().policy_for(&name);
    let mut grants = defaults.grants;
    grants.upstreams = crate::config::UpstreamGrant::Any;
    // A callout filter loads; its calls answer `unavailable` (no upstreams).
    grants.callouts = crate::config::UpstreamGrant::Any;
    let policy = FilterPolicy {
        timeout_ms: 1000,
        init_timeout_ms: 10_000,
        memory_mb: 256,
        on_error: OnError::FailClosed,
        isolation,
        max_requests_per_instance: u64::MAX,
        max_cpu_percent: 100.0,
        cpu_queue_ms: 0,
        callout: defaults.callout,
        grants,
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
    let client = sample.client.as_deref().unwrap_or("127.0.0.1:40000");
    Ok(RequestHead {
        parts: req.into_parts().0,
        client: client
            .parse()
            .with_context(|| format!("--client {client:?} is not ip:port"))?,
        scheme: "http",
    })
}

fn print_head(title: &str, first: String, headers: &http::HeaderMap) {
    println!("{title}: {first}");
    for (n, v) in headers {
        println!("  {n}: {}", String::from_utf8_lossy(v.as_bytes()));
    }
}

fn print_local(l: &Local) {
    println!("  status {}", l.status);
    for (n, v) in &l.headers {
        println!("  {n}: {}", String::from_utf8_lossy(v));
    }
    println!(
        "  body ({} bytes): {}",
        l.body.len(),
        String::from_utf8_lossy(&l.body).trim_end()
    );
}

fn print_body_action(phase: &str, action: &BodyAction) {
    match action {
        BodyAction::Continue => println!("{phase} action: continue"),
        BodyAction::Replace(bytes) => println!(
            "{phase} action: replace ({} bytes): {}",
            bytes.len(),
            String::from_utf8_lossy(bytes).trim_end()
        ),
        BodyAction::Respond(local) => {
            println!("{phase} action: respond");
            print_local(local);
        }
    }
}

/// The response head described by `sample` (status 200 when not given).
fn response_head(sample: &Sample) -> anyhow::Result<ResponseHead> {
    let mut resp = http::Response::new(());
    *resp.status_mut() = http::StatusCode::from_u16(sample.response_status.unwrap_or(200))?;
    *resp.headers_mut() = header_map(&sample.response_headers)?;
    Ok(ResponseHead {
        parts: resp.into_parts().0,
    })
}

/// A 0.2 filter's exchange for one sample request (none for 0.1).
fn sample_exchange(version: &FilterVersion, head: &RequestHead) -> Option<SharedExchange> {
    if version.contract != Contract::V2 {
        return None;
    }
    // The proxy makes a request id for every request, whatever its
    // filters; here it is made without touching the head.
    let id = super::exchange::new_request_id();
    Some(
        Exchange::new(
            id,
            Arc::from("sample"),
            Arc::from("sample"),
            head.parts.version,
            head.client,
            None,
            Instant::now(),
        )
        .shared(),
    )
}

/// Run the phases of `version` over `sample` and print what happened: the
/// request phase's action and the request head as the upstream would get
/// it, the request-body phase (if the filter asks for it), and, with a
/// sample response, the response phases and the response head.
pub fn test(version: &FilterVersion, sample: &Sample) -> anyhow::Result<()> {
    let caps = &version.caps;
    println!(
        "filter {} ({}, contract {}), phases: request={} request-body={} response={} response-body={} request-chunks={} response-chunks={} log={}",
        version.name,
        &version.hash[..12],
        version.contract.as_str(),
        caps.request_phase,
        caps.request_body,
        caps.response_phase,
        caps.response_body,
        caps.request_chunks,
        caps.response_chunks,
        caps.log,
    );
    let mut head = request_head(sample)?;
    let ex = sample_exchange(version, &head);
    let ex = ex.as_ref();
    if let Some(ex) = ex {
        let info = super::host_api::request_info_of(&ex.lock());
        println!("request id: {}", info.0);
        println!("properties: {}", info.1);
    }
    let mut answered = false;
    if caps.request_phase {
        let called = version.on_request_inline(head, ex);
        head = called.req;
        match called
            .result
            .map_err(|f| anyhow::anyhow!("request phase failed: {f}"))?
        {
            RequestAction::Continue => println!("action: continue"),
            RequestAction::Route(u) => println!("action: route to upstream {u:?}"),
            RequestAction::Respond(local) => {
                println!("action: respond");
                print_local(&local);
                answered = true;
            }
        }
    } else {
        println!("action: continue (no request phase)");
    }
    if caps.request_body && !answered {
        let body = sample.body.clone().unwrap_or_default();
        let called = version.on_request_body_inline(head, body.into(), ex);
        head = called.req;
        let action = called
            .result
            .map_err(|f| anyhow::anyhow!("request body phase failed: {f}"))?;
        answered = matches!(action, BodyAction::Respond(_));
        print_body_action("request body", &action);
    }
    let line = format!("{} {}", head.parts.method, head.parts.uri);
    print_head("request", line, &head.parts.headers);
    if let Some(ex) = ex {
        let ex = ex.lock();
        if !ex.deferred.is_empty() {
            println!("deferred response edits: {:?}", ex.deferred);
        }
    }
    if sample.response_status.is_some() && !answered {
        let mut resp = response_head(sample)?;
        if let Some(ex) = ex {
            ex.lock().apply_deferred(&mut resp.parts.headers);
        }
        if caps.response_phase {
            let called = version.on_response_inline(head, resp, ex);
            head = called.req;
            resp = called.resp.unwrap_or_else(empty_response);
            match called
                .result
                .map_err(|f| anyhow::anyhow!("response phase failed: {f}"))?
            {
                ResponseAction::Continue => println!("response action: continue"),
                ResponseAction::Respond(local) => {
                    println!("response action: respond");
                    print_local(&local);
                }
            }
        } else {
            println!("response action: continue (no response phase)");
        }
        if caps.response_body {
            let body = sample.response_body.clone().unwrap_or_default();
            let called = version.on_response_body_inline(head, resp, body.into(), ex);
            resp = called.resp.unwrap_or_else(empty_response);
            let action = called
                .result
                .map_err(|f| anyhow::anyhow!("response body phase failed: {f}"))?;
            print_body_action("response body", &action);
        }
        print_head(
            "response",
            resp.parts.status.to_string(),
            &resp.parts.headers,
        );
    }
    if let Some(ex) = ex {
        if caps.log {
            let entry = super::bindings_v2::sluicegate::filter::types::LogEntry {
                status: sample.response_status.unwrap_or(200),
                bytes_in: sample.body.as_ref().map_or(0, |b| b.len() as u64),
                bytes_out: sample.response_body.as_ref().map_or(0, |b| b.len() as u64),
                duration_us: ex.lock().started.elapsed().as_micros() as u64,
            };
            version
                .on_log_inline(entry, ex)
                .map_err(|f| anyhow::anyhow!("log phase failed: {f}"))?;
            println!("log phase: ran");
        }
        for (k, v) in ex.lock().locals_of(&version.name) {
            println!("local {k}: {}", String::from_utf8_lossy(&v));
        }
    }
    for series in version.metric_series() {
        println!("metric {series}");
    }
    Ok(())
}

/// One request through every phase `version` asks for (a local answer
/// ends it early, as in the proxy); the head comes back for the next round.
fn one_request(
    version: &FilterVersion,
    sample: &Sample,
    body: &bytes::Bytes,
    mut head: RequestHead,
) -> anyhow::Result<RequestHead> {
    let caps = &version.caps;
    let ex = sample_exchange(version, &head);
    let ex = ex.as_ref();
    if caps.request_phase {
        let called = version.on_request_inline(head, ex);
        head = called.req;
        if let RequestAction::Respond(_) = called.result.map_err(|f| anyhow::anyhow!("{f}"))? {
            return Ok(head);
        }
    }
    if caps.request_body {
        let called = version.on_request_body_inline(head, body.clone(), ex);
        head = called.req;
        if let BodyAction::Respond(_) = called.result.map_err(|f| anyhow::anyhow!("{f}"))? {
            return Ok(head);
        }
    }
    if caps.response_phase || caps.response_body {
        let mut resp = response_head(sample)?;
        if let Some(ex) = ex {
            ex.lock().apply_deferred(&mut resp.parts.headers);
        }
        if caps.response_phase {
            let called = version.on_response_inline(head, resp, ex);
            head = called.req;
            resp = called.resp.unwrap_or_else(empty_response);
            called.result.map_err(|f| anyhow::anyhow!("{f}"))?;
        }
        if caps.response_body {
            let body = sample.response_body.clone().unwrap_or_default();
            let called = version.on_response_body_inline(head, resp, body.into(), ex);
            head = called.req;
            called.result.map_err(|f| anyhow::anyhow!("{f}"))?;
        }
    }
    Ok(head)
}

/// Time `calls` requests through every phase the filter asks for and
/// return the cost per request in microseconds.
pub fn bench(version: &FilterVersion, sample: &Sample, calls: u64) -> anyhow::Result<f64> {
    let template = request_head(sample)?;
    let body = bytes::Bytes::from(sample.body.clone().unwrap_or_default());
    let mut head = RequestHead {
        parts: template.parts.clone(),
        client: template.client,
        scheme: template.scheme,
    };
    // Warm up.
    for _ in 0..(calls / 10).max(10) {
        head = one_request(version, sample, &body, head)?;
    }
    let started = Instant::now();
    for _ in 0..calls {
        head.parts.headers = template.parts.headers.clone();
        head.parts.uri = template.parts.uri.clone();
        head = one_request(version, sample, &body, head)?;
    }
    let per_call = started.elapsed().as_secs_f64() * 1e6 / calls as f64;
    Ok(per_call)
}

fn empty_response() -> ResponseHead {
    ResponseHead {
        parts: http::Response::new(()).into_parts().0,
    }
}
