//! Sending spans: opentelemetry-otlp's span exporter (OTLP/HTTP, protobuf)
//! behind the SDK's batch processor, over a hyper client of our own.
//!
//! The batch processor exports from a plain thread of its own with
//! `block_on`, where hyper (which needs a tokio reactor) cannot run, so the
//! client hands each export to a one-thread tokio runtime and waits for it.
//! Nothing here runs on a worker thread: a worker only queues ended spans.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;

use crate::config::{TracingConfig, UpstreamTlsConfig};

/// Largest collector response read (it is a small protobuf message).
const MAX_RESPONSE: usize = 64 * 1024;

/// The tracer provider for `config`: ratio sampling under the parent's
/// decision, batched OTLP/HTTP export.
pub(super) fn provider(config: &TracingConfig) -> anyhow::Result<SdkTracerProvider> {
    let timeout = Duration::from_millis(config.timeout_ms);
    let client = OtlpClient::new(config, timeout)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(config.traces_url())
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(timeout)
        .build()
        .context("tracing: building the OTLP exporter")?;
    let batch = BatchConfigBuilder::default()
        .with_scheduled_delay(Duration::from_millis(config.batch_delay_ms))
        .with_max_queue_size(config.max_queue)
        .build();
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch)
        .build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sampling_ratio)));
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler)
        .with_resource(resource)
        .build())
}

/// POSTs the exporter's requests from a runtime of its own.
#[derive(Debug)]
struct OtlpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: tokio::runtime::Runtime,
    timeout: Duration,
    /// The last export failed (logged once per run of failures).
    failing: Arc<AtomicBool>,
}

impl OtlpClient {
    fn new(config: &TracingConfig, timeout: Duration) -> anyhow::Result<OtlpClient> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sluicegate-otlp")
            .enable_all()
            .build()
            .context("tracing: starting the exporter's runtime")?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let tls = if config.traces_url().starts_with("https://") {
            let t = UpstreamTlsConfig {
                ca: config.ca.clone(),
                sni: None,
            };
            (*crate::tls::client_config(&t).map_err(|e| anyhow::anyhow!("tracing.ca: {e}"))?)
                .clone()
        } else {
            // Plain http: no certificate is ever checked.
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .context("tracing: TLS versions")?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(OtlpClient {
            client,
            runtime,
            timeout,
            failing: Arc::default(),
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let job = self.runtime.spawn(async move {
            let sent = tokio::time::timeout(timeout, client.request(request.map(Full::new)));
            let resp = sent.await.map_err(|_| "timed out")??;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE).collect().await?.to_bytes();
            Ok::<_, HttpError>(http::Response::from_parts(parts, body))
        });
        let result = job.await.map_err(HttpError::from).and_then(|r| r);
        let ok = matches!(&result, Ok(r) if r.status().is_success());
        metrics::counter!("sluicegate_tracing_exports_total",
            "result" => if ok { "ok" } else { "error" })
        .increment(1);
        let was_failing = self.failing.swap(!ok, Ordering::Relaxed);
        match &result {
            Ok(_) if ok && was_failing => {
                tracing::info!("tracing: exports to the collector work again")
            }
            Ok(r) if !ok && !was_failing => {
                tracing::warn!(status = %r.status(), "tracing: the collector refused spans")
            }
            Err(e) if !was_failing => {
                tracing::warn!(error = %crate::upstream::error_chain(&**e), "tracing: cannot send spans to the collector")
            }
            _ => {}
        }
        result
    }
}
