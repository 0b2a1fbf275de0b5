//! In-process upstream servers on 127.0.0.1:0. Each counts the TCP
//! connections it accepted and the requests that reached it; all are
//! stopped when their handle is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::Message;

use super::{pattern, Fnv, PATTERN_CHUNK};

/// Errors of a backend's response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A backend's response body.
pub type RespBody = BoxBody<Bytes, BoxError>;

/// A buffered body.
pub fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// How a [`Backend::broken`] server misbehaves after reading a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// Close without writing anything.
    CloseBeforeHead,
    /// Write half a response head, then close.
    MidHead,
    /// Write a full head promising 1 MB, 1000 bytes of body, then close.
    MidBody,
}

/// A running backend.
pub struct Backend {
    id: String,
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// Serve HTTP/1.1 with `handler`; every response gets `x-backend: <id>`.
    pub async fn serve<F, Fut>(id: &str, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<RespBody>> + Send + 'static,
    {
        Backend::serve_at("127.0.0.1:0".parse().unwrap(), id, handler).await
    }

    /// [`Backend::serve`] on a given address (e.g. `127.0.0.2:<port>`, for
    /// several backends behind one DNS name and port).
    pub async fn serve_at<F, Fut>(bind: SocketAddr, id: &str, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<RespBody>> + Send + 'static,
    {
        let listener = TcpListener::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("bind backend {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let tag = HeaderValue::from_str(id).expect("backend id is a header value");
        let (acc, reqs) = (accepts.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_nodelay(true);
                let (handler, reqs, tag) = (handler.clone(), reqs.clone(), tag.clone());
                let svc = service_fn(move |req| {
                    reqs.fetch_add(1, Ordering::SeqCst);
                    let (handler, tag) = (handler.clone(), tag.clone());
                    async move {
                        let mut resp = handler(req).await;
                        resp.headers_mut().insert("x-backend", tag);
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Backend::new(id, addr, accepts, requests, Arc::default(), task)
    }

    /// Answers every request with JSON describing it: method, uri, version,
    /// headers (a list of pairs, in order), body length and FNV checksum
    /// (computed while streaming, so it doubles as an upload sink). Each
    /// `x-echo-set: name: value` request header becomes a response header.
    pub async fn echo(id: &str) -> Backend {
        let id2 = id.to_string();
        Backend::serve(id, move |req| echo_response(id2.clone(), req)).await
    }

    /// An upload sink: counts and checksums the body in constant memory and
    /// reports it in the echo JSON (`body_len`, `body_hash`).
    pub async fn sink(id: &str) -> Backend {
        Backend::echo(id).await
    }

    /// Streams `total` bytes of [`pattern`] as a chunked body.
    pub async fn download(id: &str, total: u64) -> Backend {
        Backend::serve(id, move |_req| async move {
            let mut resp = Response::new(
                PatternBody::new(total)
                    .map_err(|never| match never {})
                    .boxed(),
            );
            resp.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            resp
        })
        .await
    }

    /// Waits `delay` before sending the response head (then echoes).
    pub async fn slow(id: &str, delay: Duration) -> Backend {
        let id2 = id.to_string();
        Backend::serve(id, move |req| {
            let id = id2.clone();
            async move {
                tokio::time::sleep(delay).await;
                echo_response(id, req).await
            }
        })
        .await
    }

    /// Reads a request head, then misbehaves as `mode` says.
    pub async fn broken(id: &str, mode: Broken) -> Backend {
        Backend::raw(id, move |mut stream, requests, _seen| async move {
            if read_head(&mut stream).await.is_none() {
                return;
            }
            requests.fetch_add(1, Ordering::SeqCst);
            let out: &[u8] = match mode {
                Broken::CloseBeforeHead => b"",
                Broken::MidHead => b"HTTP/1.1 200 OK\r\nContent-Ty",
                Broken::MidBody => {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nx-backend: broken\r\n\r\n"
                }
            };
            let _ = stream.write_all(out).await;
            if mode == Broken::MidBody {
                let _ = stream.write_all(&[b'x'; 1000]).await;
            }
            let _ = stream.flush().await;
            // Dropping the stream closes it.
        })
        .await
    }

    /// An HTTP/1.1 server that answers `got <n>` (`n`: the request body's
    /// length) without `Connection: close`, then closes each connection
    /// when no new request arrives within `keepalive` (an upstream whose
    /// keep-alive timeout is shorter than the proxy's pool's).
    pub async fn closes_when_idle(id: &str, keepalive: Duration) -> Backend {
        Backend::closes_when_idle_announcing(id, keepalive, None).await
    }

    /// [`Backend::closes_when_idle`], each response saying
    /// `Keep-Alive: timeout=<announce>` when given.
    pub async fn closes_when_idle_announcing(
        id: &str,
        keepalive: Duration,
        announce: Option<u64>,
    ) -> Backend {
        let id = id.to_string();
        let extra = announce
            .map(|t| format!("keep-alive: timeout={t}\r\n"))
            .unwrap_or_default();
        Backend::raw(&id.clone(), move |mut stream, requests, _seen| {
            let (id, extra) = (id.clone(), extra.clone());
            async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // A head, then its Content-Length of body.
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match tokio::time::timeout(keepalive, stream.read(&mut chunk)).await {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return, // idle too long, or closed: close
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + length {
                        match stream.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    buf.drain(..end + length);
                    requests.fetch_add(1, Ordering::SeqCst);
                    let body = format!("got {length}");
                    let out = format!(
                        "HTTP/1.1 200 OK\r\nx-backend: {id}\r\n{extra}content-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        })
        .await
    }

    /// A WebSocket server: greets with the text `welcome <id>`, then echoes
    /// every text and binary message. The handshake request's headers are
    /// kept (see [`Backend::seen_headers`]).
    pub async fn websocket_echo(id: &str) -> Backend {
        let greeting = format!("welcome {id}");
        Backend::raw(id, move |stream, requests, seen| {
            let greeting = greeting.clone();
            // tungstenite's callback signature fixes the large error type.
            #[allow(clippy::result_large_err)]
            async move {
                let record =
                    |req: &WsRequest, resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
                        let mut seen = seen.lock().unwrap();
                        seen.clear();
                        for (k, v) in req.headers() {
                            seen.push((
                                k.as_str().to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            ));
                        }
                        Ok(resp)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
                    return;
                };
                requests.fetch_add(1, Ordering::SeqCst);
                if ws.send(Message::text(greeting)).await.is_err() {
                    return;
                }
                while let Some(msg) = ws.next().await {
                    match msg {
                        Ok(m) if m.is_text() || m.is_binary() => {
                            if ws.send(m).await.is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
        })
        .await
    }

    /// A raw TCP server: `conn(stream, requests, seen)` per connection.
    pub async fn raw<F, Fut>(id: &str, conn: F) -> Backend
    where
        F: Fn(TcpStream, Arc<AtomicUsize>, Arc<Mutex<Vec<(String, String)>>>) -> Fut
            + Send
            + Sync
            + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (acc, reqs, seen2) = (accepts.clone(), requests.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(conn(stream, reqs.clone(), seen2.clone()));
            }
        });
        Backend::new(id, addr, accepts, requests, seen, task)
    }

    fn new(
        id: &str,
        addr: SocketAddr,
        accepts: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<(String, String)>>>,
        task: tokio::task::JoinHandle<()>,
    ) -> Backend {
        Backend {
            id: id.to_string(),
            addr,
            accepts,
            requests,
            seen,
            task,
        }
    }

    /// The id sent as `x-backend`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// Requests that reached it so far (counted on arrival, before any delay).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Headers of the last WebSocket handshake (websocket backends only).
    pub fn seen_headers(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().clone()
    }

    /// Wait (≤ `secs`) until at least `n` requests have arrived.
    pub async fn wait_requests(&self, n: usize, secs: u64) {
        super::within(
            secs,
            &format!("{n} request(s) to reach backend {}", self.id),
            async {
                while self.requests() < n {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        )
        .await
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The echo JSON for `req` (body consumed as a stream).
pub async fn echo_response(id: String, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, mut body) = req.into_parts();
    let (mut len, mut hash) = (0u64, Fnv::new());
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    len += data.len() as u64;
                    hash.update(data);
                }
            }
            Err(e) => {
                let mut resp = Response::new(full(format!("body error: {e}")));
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                return resp;
            }
        }
    }
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let json = serde_json::json!({
        "backend": id,
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": len,
        "body_hash": hash.hex(),
    });
    let mut resp = Response::new(full(json.to_string()));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    for set in parts.headers.get_all("x-echo-set") {
        let Some((k, v)) = set.to_str().ok().and_then(|s| s.split_once(':')) else {
            continue;
        };
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.trim().as_bytes()),
            HeaderValue::from_str(v.trim()),
        ) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

/// Read until the end of a request head (≤ 64 KiB, ≤ 10 s).
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(());
            }
            if buf.len() > 64 * 1024 {
                return None;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()??;
    Some(buf)
}

/// `total` bytes of [`pattern`] in 64 KiB frames, generated on demand, with
/// no length announced (so HTTP/1.1 sends it chunked).
pub struct PatternBody {
    off: u64,
    total: u64,
}

impl PatternBody {
    /// A body of `total` bytes.
    pub fn new(total: u64) -> PatternBody {
        PatternBody { off: 0, total }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.off >= self.total {
            return Poll::Ready(None);
        }
        let n = PATTERN_CHUNK.min((self.total - self.off) as usize);
        let chunk = pattern(self.off, n);
        self.off += n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.off >= self.total
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
