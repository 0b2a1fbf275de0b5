//! A small HTTP client on hyper: HTTP/1.1 and h2c (prior knowledge), one
//! connection per handle so tests control connection reuse exactly.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::within;

/// A response with its body collected.
#[derive(Debug, Clone)]
pub struct Resp {
    /// The status.
    pub status: StatusCode,
    /// The protocol version of the response.
    pub version: Version,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Resp {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first value of a header, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// The `x-backend` that answered.
    pub fn backend(&self) -> String {
        self.header("x-backend")
            .unwrap_or_else(|| panic!("no x-backend header in {self:?}"))
    }

    /// The body parsed as the echo backend's JSON.
    pub fn echo(&self) -> Echo {
        Echo::parse(&self.body).unwrap_or_else(|e| panic!("not an echo body ({e}): {self:?}"))
    }

    /// Collect a streamed response.
    pub async fn collect(resp: Response<Incoming>) -> Result<Resp, hyper::Error> {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }
}

/// What the echo backend saw, as it reported it.
#[derive(Debug, Clone)]
pub struct Echo {
    /// Backend id.
    pub backend: String,
    /// Method.
    pub method: String,
    /// Request target as received.
    pub uri: String,
    /// `HTTP/1.1` etc.
    pub version: String,
    /// Every header in order, names lower-case.
    pub headers: Vec<(String, String)>,
    /// Body bytes received.
    pub body_len: u64,
    /// FNV checksum of the body.
    pub body_hash: String,
}

impl Echo {
    fn parse(body: &[u8]) -> Result<Echo, String> {
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let s = |k: &str| v[k].as_str().map(str::to_string).ok_or(format!("no {k}"));
        let headers = v["headers"]
            .as_array()
            .ok_or("no headers")?
            .iter()
            .map(|p| {
                let name = p[0].as_str().unwrap_or_default().to_string();
                let value = p[1].as_str().unwrap_or_default().to_string();
                (name, value)
            })
            .collect();
        Ok(Echo {
            backend: s("backend")?,
            method: s("method")?,
            uri: s("uri")?,
            version: s("version")?,
            headers,
            body_len: v["body_len"].as_u64().ok_or("no body_len")?,
            body_hash: s("body_hash")?,
        })
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The header `name`; panics if it is absent or repeated.
    pub fn one(&self, name: &str) -> &str {
        match self.all(name).as_slice() {
            [v] => v,
            other => panic!(
                "expected exactly one {name:?} header, got {other:?} in {:?}",
                self.headers
            ),
        }
    }

    /// Is the header present?
    pub fn has(&self, name: &str) -> bool {
        !self.all(name).is_empty()
    }
}

/// A request with a `Host` header (default `localhost`) and these headers.
pub fn build(
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut req = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", "localhost");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(body)).expect("valid request")
}

/// One request on a new HTTP/1.1 connection, bounded to 30 s.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Resp {
    let req = build(method, path, headers, body);
    within(30, "request through the proxy", async {
        let mut conn = H1Conn::connect(addr).await;
        conn.send(req).await
    })
    .await
}

/// One HTTP/1.1 client connection (keep-alive: requests go one at a time).
pub struct H1Conn<B = Full<Bytes>> {
    sender: hyper::client::conn::http1::SendRequest<B>,
    task: tokio::task::JoinHandle<()>,
}

impl<B> H1Conn<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Connect and handshake.
    pub async fn connect(addr: SocketAddr) -> H1Conn<B> {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .expect("http1 handshake");
        let task = tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        H1Conn { sender, task }
    }

    /// Send and collect; panics on a transport error.
    pub async fn send(&mut self, req: Request<B>) -> Resp {
        let resp = self.send_streaming(req).await.expect("response head");
        Resp::collect(resp).await.expect("response body")
    }

    /// Send; the body is left to the caller to stream.
    pub async fn send_streaming(
        &mut self,
        req: Request<B>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        self.sender.ready().await?;
        self.sender.send_request(req).await
    }

    /// Has the server closed this connection?
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

impl<B> Drop for H1Conn<B> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One h2c (prior knowledge) client connection; clone the sender for
/// concurrent streams.
pub struct H2Conn {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl H2Conn {
    /// Connect and do the HTTP/2 handshake (no upgrade, no TLS).
    pub async fn connect(addr: SocketAddr) -> H2Conn {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .expect("h2 handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        H2Conn { sender, task }
    }

    /// `GET http://<authority><path>` with these headers; collected.
    pub async fn get(&self, authority: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut req = Request::builder().uri(format!("http://{authority}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        within(30, "h2 request", async {
            let resp = self.send(req).await;
            Resp::collect(resp).await.expect("h2 response body")
        })
        .await
    }

    /// Send `req` on a new stream; its response head (the body, and its
    /// trailers, still to read).
    pub async fn send(&self, req: Request<Full<Bytes>>) -> http::Response<hyper::body::Incoming> {
        let mut sender = self.sender.clone();
        sender.ready().await.expect("h2 ready");
        sender.send_request(req).await.expect("h2 response head")
    }
}

impl Drop for H2Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One whole HTTP/1.1 response with a `Content-Length` body (or none) at
/// the front of `buf`, as raw bytes off a socket: its status, its body and
/// how many bytes of `buf` it took. `None` until all of it is there.
pub fn split_response(buf: &[u8]) -> Option<(u16, Vec<u8>, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let used = end + 4 + len;
    if buf.len() < used {
        return None;
    }
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Some((status, buf[end + 4..used].to_vec(), used))
}

/// The value of the first sample of `name` in a Prometheus text page.
pub fn metric_value(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}
