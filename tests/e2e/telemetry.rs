//! Observability end to end: OpenTelemetry traces received by an OTLP/HTTP
//! collector inside the test, the Grafana dashboard checked against what
//! `/metrics` exports, and the status page's charts drawn in headless
//! Chromium.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{
    span::SpanKind, status::StatusCode as OtlpStatus, Span,
};
use prost::Message;

use crate::common::backend::full;
use crate::common::{start_with_filters, within, Backend, Cfg, Proxy, Resp};

/// An OTLP/HTTP collector: decodes every `POST /v1/traces` body as an
/// `ExportTraceServiceRequest` and keeps the spans (with their resource's
/// `service.name`).
struct Collector {
    backend: Backend,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Collector {
    async fn start() -> Collector {
        let spans: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
        let kept = spans.clone();
        let backend = Backend::serve("collector", move |req| {
            let kept = kept.clone();
            async move {
                let path = req.uri().path().to_string();
                let ctype = req
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap_or("").to_string());
                let body = req.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(path, "/v1/traces");
                assert_eq!(ctype.as_deref(), Some("application/x-protobuf"));
                let export = ExportTraceServiceRequest::decode(body).expect("an OTLP export");
                let mut kept = kept.lock().unwrap();
                for rs in export.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        kept.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                    }
                }
                let mut resp = Response::new(full(Vec::new()));
                resp.headers_mut()
                    .insert("content-type", "application/x-protobuf".parse().unwrap());
                resp
            }
        })
        .await;
        Collector { backend, spans }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.backend.addr())
    }

    /// The spans of `trace` (hex), once at least `n` arrived (≤ 15 s).
    async fn wait_trace(&self, trace: &str, n: usize) -> Vec<(String, Span)> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got: Vec<_> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, s)| hex(&s.trace_id) == trace)
                .cloned()
                .collect();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} spans of trace {trace} after 15 s: {:#?}",
                got.len(),
                self.spans.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn all(&self) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }
}

/// `GET path` through the proxy within 10 s, expecting a 200.
async fn get_ok(p: &Proxy, path: &str, headers: &[(&str, &str)]) -> Resp {
    let resp = within(10, path, p.get(path, headers)).await;
    assert_eq!(resp.status, StatusCode::OK, "GET {path}");
    resp
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A span's attributes, rendered as text.
fn attrs(s: &Span) -> HashMap<String, String> {
    s.attributes
        .iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

fn failed(s: &Span) -> bool {
    s.status
        .as_ref()
        .is_some_and(|st| st.code == OtlpStatus::Error as i32)
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_retried_request_arrives_as_one_span_tree_under_the_clients_parent() {
    let collector = Collector::start().await;
    let live = Backend::echo("live").await;
    // The refusing endpoint weighs most, so smooth round robin tries it
    // first; the retry goes to the endpoint not tried yet.
    let cfg = Cfg::new().extra(&format!(
        r#"[[upstream]]
name = "app"
endpoints = [{{ addr = "127.0.0.1:1", weight = 1000 }}, {{ addr = "{live}", weight = 1 }}]
retries = 1

[[route]]
path_prefix = "/"
upstream = "app"
filters = ["add-header", "probe"]

[proxy.access_log]
path = "@DIR@/access.log"

[tracing]
endpoint = "{endpoint}"
service_name = "edge-test"
batch_delay_ms = 100
"#,
        live = live.addr(),
        endpoint = collector.endpoint(),
    ));
    let filters =
        "[filters.config.add-header]\nrequest_headers = { \"x-from\" = \"sluicegate\" }\n";
    let p = start_with_filters(cfg, &["add-header", "probe"], filters);

    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let resp = within(
        10,
        "the traced request",
        p.get(
            "/traced",
            &[
                ("traceparent", &traceparent),
                ("tracestate", "vendor=opaque"),
            ],
        ),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", p.output());
    let echo = resp.echo();
    assert_eq!(echo.one("x-from"), "sluicegate");

    // Server span + add-header (request) + probe (request, response) + two attempts.
    let spans = collector.wait_trace(TRACE, 5).await;
    assert!(
        spans.iter().all(|(svc, _)| svc == "edge-test"),
        "{spans:#?}"
    );
    let spans: Vec<Span> = spans.into_iter().map(|(_, s)| s).collect();
    let server: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(server.len(), 1, "{spans:#?}");
    let server = server[0];
    assert_eq!(
        hex(&server.parent_span_id),
        PARENT,
        "the client's span is the parent"
    );
    assert_eq!(server.name, "GET */");
    let a = attrs(server);
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(a["http.route"], "*/");
    assert_eq!(a["url.path"], "/traced");

    let children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == server.span_id)
        .collect();
    for filter in ["add-header", "probe"] {
        let calls: Vec<&&Span> = children
            .iter()
            .filter(|s| attrs(s).get("sluicegate.filter.name").map(String::as_str) == Some(filter))
            .collect();
        let request: Vec<_> = calls
            .iter()
            .filter(|s| attrs(s)["sluicegate.filter.phase"] == "request")
            .collect();
        assert_eq!(
            request.len(),
            1,
            "{filter}: one request-phase span: {calls:#?}"
        );
        let a = attrs(request[0]);
        assert_eq!(request[0].name, format!("filter {filter}"));
        assert_eq!(a["sluicegate.filter.outcome"], "continue");
        assert_eq!(a["sluicegate.filter.version"].len(), 12, "{a:?}");
    }
    // probe also has a response phase.
    assert!(children.iter().any(|s| {
        let a = attrs(s);
        a.get("sluicegate.filter.name").map(String::as_str) == Some("probe")
            && a["sluicegate.filter.phase"] == "response"
    }));

    let mut attempts: Vec<&&Span> = children
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    attempts.sort_by_key(|s| attrs(s)["sluicegate.attempt"].clone());
    assert_eq!(attempts.len(), 2, "two upstream attempts: {children:#?}");
    let (first, second) = (attrs(attempts[0]), attrs(attempts[1]));
    assert_eq!(attempts[0].name, "upstream app");
    assert_eq!(first["server.address"], "127.0.0.1:1");
    assert_eq!(first["sluicegate.attempt"], "1");
    assert_eq!(first["sluicegate.retry"], "false");
    assert_eq!(first["sluicegate.retried"], "true");
    assert!(failed(attempts[0]), "the refused attempt failed");
    assert_eq!(second["server.address"], live.addr().to_string());
    assert_eq!(second["sluicegate.attempt"], "2");
    assert_eq!(second["sluicegate.retry"], "true");
    assert_eq!(second["sluicegate.retried"], "false");
    assert_eq!(second["http.response.status_code"], "200");
    assert!(!failed(attempts[1]));

    // The origin saw the same trace, with the second attempt as its parent,
    // and the client's tracestate.
    let sent = format!("00-{TRACE}-{}-01", hex(&attempts[1].span_id));
    assert_eq!(echo.one("traceparent"), sent);
    assert_eq!(echo.one("tracestate"), "vendor=opaque");

    // The trace id is in the access log line.
    let log = p.dir().join("access.log");
    let line = within(10, "the access log line", async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains("/traced")) {
                return l.to_string();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(line.ends_with(&format!(" trace={TRACE}")), "{line}");
    assert!(line.contains("\" 200 "), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_traces_follow_the_ratio_and_a_sampled_parent_is_always_followed() {
    let collector = Collector::start().await;
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(None, "/", "app")
        .extra(&format!(
            "[tracing]\nendpoint = \"{}/v1/traces\"\nsampling_ratio = 0.0\nbatch_delay_ms = 100\n",
            collector.endpoint()
        ))
        .toml();
    let p = Proxy::start(&cfg);

    // No traceparent: a new trace, not sampled at ratio 0, still
    // propagated (flags 00) so the origin can join its logs to it.
    let resp = get_ok(&p, "/new", &[]).await;
    let sent = resp.echo().one("traceparent").to_string();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!((parts[0], parts[3]), ("00", "00"), "{sent}");
    let new_trace = parts[1].to_string();
    assert_eq!(new_trace.len(), 32);
    assert_ne!(new_trace, "0".repeat(32));

    // A sampled parent is followed whatever the ratio.
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    get_ok(&p, "/kept", &[("traceparent", &traceparent)]).await;
    let spans = collector.wait_trace(TRACE, 2).await;
    assert!(
        spans.iter().any(|(svc, _)| svc == "sluicegate"),
        "default service.name"
    );
    // The unsampled trace's spans were never recorded (they would have
    // been sent first).
    assert!(
        collector
            .all()
            .iter()
            .all(|s| hex(&s.trace_id) != new_trace),
        "{:#?}",
        collector.all()
    );

    // An invalid traceparent starts a new trace instead.
    let resp = get_ok(&p, "/bad", &[("traceparent", "00-xyz-01")]).await;
    let sent = resp.echo().one("traceparent").to_string();
    assert!(sent.starts_with("00-") && !sent.contains("xyz"), "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tracing_traceparent_passes_through_untouched() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .route(None, "/", "app")
        .toml();
    let p = Proxy::start(&cfg);
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let resp = get_ok(&p, "/", &[("traceparent", &traceparent)]).await;
    assert_eq!(resp.echo().one("traceparent"), traceparent);
    assert!(!resp.echo().has("tracestate"));
}

/// The Grafana dashboard in deploy/.
fn dashboard() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/sluicegate.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON: {e}"))
}

/// Every `expr` of every panel target, with the panel's title.
fn queries(dash: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = stack.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            stack.extend(inner);
        }
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((
                    panel["title"].as_str().unwrap_or("?").to_string(),
                    expr.to_string(),
                ));
            }
        }
    }
    out
}

/// The metric names a PromQL expression uses (`sluicegate_…` words).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("sluicegate_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(expr[start..end].to_string());
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_names_a_metric_the_proxy_exports() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream_raw("down", &["127.0.0.1:1"])
        .route_with_filters(None, "/", "app", &["add-header"])
        .route_with_filters(None, "/trap", "app", &["hostile-trap"])
        .route(None, "/down", "down")
        .extra(
            "[[route]]\npath_prefix = \"/cached\"\nupstream = \"app\"\ncache = true\n\n\
             [[route]]\npath_prefix = \"/limited\"\nupstream = \"app\"\n\
             rate_limit = { rps = 1, burst = 1, key = \"client\" }\n",
        );
    let filters = "[filters.policy.hostile-trap]\non_error = \"fail_open\"\n";
    let p = start_with_filters(cfg, &["add-header", "hostile-trap"], filters);
    for path in [
        "/",
        "/",
        "/cached/a",
        "/cached/a",
        "/down",
        "/limited",
        "/limited",
        "/limited",
    ] {
        within(10, path, p.get(path, &[])).await;
    }
    // Five failures in a row quarantine the filter.
    for _ in 0..6 {
        within(10, "/trap", p.get("/trap", &[])).await;
    }
    let page = p.admin_get("/metrics").await.text();
    let exported: BTreeSet<String> = page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();

    let dash = dashboard();
    let queries = queries(&dash);
    assert!(queries.len() >= 12, "{queries:#?}");
    let mut missing = Vec::new();
    let mut used = BTreeSet::new();
    for (title, expr) in &queries {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "panel {title:?}: no sluicegate metric in {expr}"
        );
        for name in names {
            if !exported.contains(&name) {
                missing.push(format!("panel {title:?}: {name} (in {expr})"));
            }
            used.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "dashboard queries name metrics /metrics does not export:\n{}\n\nexported: {exported:#?}",
        missing.join("\n")
    );
    // What the issue asks the dashboard to cover.
    for needed in [
        "sluicegate_requests_total",
        "sluicegate_request_seconds_bucket",
        "sluicegate_endpoint_healthy",
        "sluicegate_endpoint_ejections_total",
        "sluicegate_filter_calls_total",
        "sluicegate_filter_failures_total",
        "sluicegate_filter_quarantined",
        "sluicegate_cache_hits_total",
        "sluicegate_rejected_total",
    ] {
        assert!(used.contains(needed), "no panel uses {needed}");
    }
    // The quarantine gauge says what happened.
    assert!(
        page.contains("sluicegate_filter_quarantined{filter=\"hostile-trap\"} 1"),
        "{page}"
    );
    // Every panel reads the same data source variable.
    for panel in dash["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        }
    }
}

/// The value of `attr` on the element with `id` in a dumped DOM.
fn attr_of(dom: &str, id: &str, attr: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the DOM:\n{dom}"));
    let open = dom[..at].rfind('<').unwrap_or(0);
    let tag = &dom[open..open + dom[open..].find('>').unwrap_or(0)];
    let key = format!("{attr}=\"");
    let start = tag
        .find(&key)
        .unwrap_or_else(|| panic!("#{id} has no {attr}: {tag}"))
        + key.len();
    tag[start..start + tag[start..].find('"').unwrap_or(0)].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_draws_traffic_charts_in_chromium() {
    let app = Backend::echo("app").await;
    let cfg = Cfg::new()
        .upstream("app", &[app.addr()])
        .upstream_raw("down", &["127.0.0.1:1"])
        .route_with_filters(None, "/", "app", &["add-header"])
        .route(None, "/down", "down");
    let filters =
        "[filters.config.add-header]\nrequest_headers = { \"x-from\" = \"sluicegate\" }\n";
    let p = start_with_filters(cfg, &["add-header"], filters);
    // Traffic over three sampling intervals (two seconds each), some of it
    // failing, until the series holds three samples with requests.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for _ in 0..20 {
            p.get("/", &[]).await;
        }
        p.get("/down", &[]).await;
        let series: serde_json::Value =
            serde_json::from_slice(&p.admin_get("/series").await.body).unwrap();
        let busy = series["samples"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["rps"].as_f64().unwrap_or(0.0) > 0.0)
            .count();
        if busy >= 3 {
            let last = series["samples"]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .clone();
            assert!(last["p99_ms"].as_f64().unwrap() > 0.0, "{last}");
            assert!(
                last["filter_ms"]["add-header"].as_f64().unwrap() > 0.0,
                "{last}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no samples with traffic: {series}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let admin = p.admin_addr();
    let dom = crate::ops::render(&format!("http://{admin}/"), None).await;
    for chart in [
        "chart-rps",
        "chart-latency",
        "chart-errors",
        "chart-filters",
    ] {
        let points: usize = attr_of(&dom, chart, "data-points").parse().unwrap();
        let max: f64 = attr_of(&dom, chart, "data-max").parse().unwrap();
        assert!(points >= 3, "{chart}: {points} points\n{dom}");
        assert!(max > 0.0, "{chart}: max {max}\n{dom}");
    }
    assert!(dom.contains("<polyline"), "{dom}");
    assert!(dom.contains("add-header"), "the filter is in the legend");
    assert_eq!(crate::ops::text_of(&dom, "error"), "", "{dom}");

    // The screenshot in docs/img/status-charts.png is made this way.
    let dir = crate::common::TempDir::new("charts");
    let png = dir.path().join("status.png");
    crate::ops::render(&format!("http://{admin}/"), Some(&png)).await;
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000);
    if let Ok(dest) = std::env::var("SLUICEGATE_CHARTS_SCREENSHOT") {
        std::fs::copy(&png, dest).expect("copy the screenshot");
    }
}
