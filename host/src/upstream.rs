//! The pooled upstream client: sends a request to an endpoint of an
//! upstream, retrying on another endpoint when a connection cannot be made.

use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::balance::Upstream;
use crate::body::{self, ProxyBody};
use crate::config::Config;

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No endpoint accepted a connection.
    #[error("connect to {endpoint} failed: {reason}")]
    Connect {
        /// The last endpoint tried.
        endpoint: String,
        /// The connect error.
        reason: String,
    },
    /// The response head did not arrive in time.
    #[error("no response from {endpoint} within {ms} ms")]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The configured limit.
        ms: u64,
    },
    /// The connection broke or the response was malformed.
    #[error("upstream {endpoint} failed: {reason}")]
    Broken {
        /// The endpoint.
        endpoint: String,
        /// What hyper said.
        reason: String,
    },
}

/// The shared HTTP client with a keep-alive pool per endpoint.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpConnector, ProxyBody>,
    response_timeout: Duration,
}

/// Attempts per request when connects fail (each to another endpoint).
const MAX_CONNECT_ATTEMPTS: usize = 3;

impl UpstreamClient {
    /// A client configured from `[proxy]`.
    pub fn new(config: &Config) -> UpstreamClient {
        let t = &config.proxy.timeouts;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(t.connect_ms)));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(config.proxy.limits.upstream_idle_per_host)
            .set_host(false)
            .build(connector);
        UpstreamClient {
            client,
            response_timeout: Duration::from_millis(t.upstream_response_ms),
        }
    }

    /// Send `req` (whose URI holds only the path and query) to an endpoint
    /// of `upstream`. A request with an empty body is retried on another
    /// endpoint when the connection fails; one with a body is not, since its
    /// body may be gone.
    pub async fn forward(
        &self,
        upstream: &Upstream,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let replayable = http_body::Body::is_end_stream(req.body());
        let attempts = if replayable {
            MAX_CONNECT_ATTEMPTS.min(upstream.endpoints.len())
        } else {
            1
        };
        let (parts, body) = req.into_parts();
        let mut body = Some(body);
        let mut parts = Some(parts);
        let mut last = None;
        for attempt in 0..attempts {
            let endpoint = upstream.pick(attempt);
            // Keep a copy of the head only while another attempt may follow.
            let this = match (attempt + 1 < attempts, parts.as_ref()) {
                (true, Some(p)) => p.clone(),
                _ => match parts.take() {
                    Some(p) => p,
                    None => break,
                },
            };
            let target = endpoint_uri(&endpoint.authority, &this.uri);
            let mut req = Request::from_parts(this, body.take().unwrap_or_else(body::empty));
            *req.uri_mut() = target;
            let result =
                tokio::time::timeout(self.response_timeout, self.client.request(req)).await;
            match result {
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e)) if e.is_connect() => {
                    tracing::warn!(upstream = %upstream.name, endpoint = %endpoint.addr, error = %error_chain(&e), "upstream connect failed");
                    last = Some(ForwardError::Connect {
                        endpoint: endpoint.addr.to_string(),
                        reason: error_chain(&e),
                    });
                }
                Ok(Err(e)) => {
                    return Err(ForwardError::Broken {
                        endpoint: endpoint.addr.to_string(),
                        reason: error_chain(&e),
                    })
                }
                Err(_) => {
                    return Err(ForwardError::Timeout {
                        endpoint: endpoint.addr.to_string(),
                        ms: self.response_timeout.as_millis() as u64,
                    })
                }
            }
        }
        Err(last.unwrap_or(ForwardError::Connect {
            endpoint: upstream.name.to_string(),
            reason: "no endpoint".into(),
        }))
    }
}

/// `http://<endpoint><path-and-query>`.
fn endpoint_uri(authority: &http::uri::Authority, original: &Uri) -> Uri {
    let pq = original.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Uri::builder()
        .scheme("http")
        .authority(authority.clone())
        .path_and_query(pq)
        .build()
        .unwrap_or_else(|_| Uri::from_static("/"))
}

/// An error and its sources, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}
