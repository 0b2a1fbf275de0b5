//! gRPC through the real binary (issue 26): a tonic server behind the proxy
//! over h2c, a tonic client in front of it. The service is written by hand
//! (no protoc): one message type, four methods, one per call kind.
//!
//! Also a raw hyper HTTP/2 upstream where a test needs exact control of
//! what the upstream sends (trailers byte for byte, a slow head).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::uri::PathAndQuery;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tonic::codegen::{BoxFuture, BoxStream, StdError};
use tonic::{Code, Status};

use crate::common::*;

/// The one message: a number, some bytes, and who answered.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(uint64, tag = "1")]
    pub n: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
    #[prost(string, tag = "3")]
    pub from: String,
}

fn msg(n: u64, data: &[u8]) -> Msg {
    Msg {
        n,
        data: data.to_vec(),
        from: String::new(),
    }
}

type Codec = tonic_prost::ProstCodec<Msg, Msg>;

/// The test service `test.Echo`.
#[derive(Clone)]
struct Echo {
    id: Arc<str>,
    calls: Arc<AtomicUsize>,
    inflight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Echo {
    fn new(id: &str) -> Echo {
        Echo {
            id: Arc::from(id),
            calls: Arc::default(),
            inflight: Arc::default(),
            peak: Arc::default(),
        }
    }

    fn reply(&self, n: u64, data: Vec<u8>) -> Msg {
        Msg {
            n,
            data,
            from: self.id.to_string(),
        }
    }
}

/// The status a `details` server stream ends with: a code, a message that
/// needs percent-encoding, binary details and custom trailing metadata.
fn details_status() -> Status {
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert_bin(
        "x-checksum-bin",
        tonic::metadata::MetadataValue::from_bytes(b"\xde\xad\xbe\xef\x00\x01"),
    );
    md.insert("x-note", "plain text".parse().unwrap());
    Status::with_details_and_metadata(
        Code::Aborted,
        "naïve 100% done\nsecond line",
        Bytes::from_static(b"\x00\x01\xfe\xffdetails"),
        md,
    )
}

struct UnarySvc(Echo);
impl tonic::server::UnaryService<Msg> for UnarySvc {
    type Response = Msg;
    type Future = BoxFuture<tonic::Response<Msg>, Status>;
    fn call(&mut self, req: tonic::Request<Msg>) -> Self::Future {
        let me = self.0.clone();
        Box::pin(async move {
            let m = req.into_inner();
            me.calls.fetch_add(1, Ordering::SeqCst);
            let now = me.inflight.fetch_add(1, Ordering::SeqCst) + 1;
            me.peak.fetch_max(now, Ordering::SeqCst);
            if m.data == b"slow" {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            me.inflight.fetch_sub(1, Ordering::SeqCst);
            Ok(tonic::Response::new(me.reply(m.n + 1, m.data)))
        })
    }
}

struct ServerSvc(Echo);
impl tonic::server::ServerStreamingService<Msg> for ServerSvc {
    type Response = Msg;
    type ResponseStream = BoxStream<Msg>;
    type Future = BoxFuture<tonic::Response<BoxStream<Msg>>, Status>;
    fn call(&mut self, req: tonic::Request<Msg>) -> Self::Future {
        let me = self.0.clone();
        Box::pin(async move {
            let m = req.into_inner();
            me.calls.fetch_add(1, Ordering::SeqCst);
            let id = me.id.clone();
            let one = move |i: u64| -> Result<Msg, Status> {
                Ok(Msg {
                    n: i,
                    data: Vec::new(),
                    from: id.to_string(),
                })
            };
            let stream: BoxStream<Msg> = match m.data.as_slice() {
                // One message, then nothing: only a deadline ends it.
                b"stall" => Box::pin(
                    futures_util::stream::iter(vec![one(0)]).chain(futures_util::stream::pending()),
                ),
                // A message every 10 ms, forever.
                b"forever" => Box::pin(futures_util::stream::unfold(0u64, move |i| {
                    let m = one(i);
                    async move {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Some((m, i + 1))
                    }
                })),
                b"details" => Box::pin(
                    futures_util::stream::iter((0..m.n).map(one).collect::<Vec<_>>())
                        .chain(futures_util::stream::iter(vec![Err(details_status())])),
                ),
                _ => Box::pin(futures_util::stream::iter(
                    (0..m.n).map(one).collect::<Vec<_>>(),
                )),
            };
            Ok(tonic::Response::new(stream))
        })
    }
}

struct ClientSvc(Echo);
impl tonic::server::ClientStreamingService<Msg> for ClientSvc {
    type Response = Msg;
    type Future = BoxFuture<tonic::Response<Msg>, Status>;
    fn call(&mut self, req: tonic::Request<tonic::Streaming<Msg>>) -> Self::Future {
        let me = self.0.clone();
        Box::pin(async move {
            me.calls.fetch_add(1, Ordering::SeqCst);
            let mut s = req.into_inner();
            let (mut count, mut sum) = (0u64, 0u64);
            while let Some(m) = s.message().await? {
                count += 1;
                sum = sum.wrapping_add(m.n);
            }
            Ok(tonic::Response::new(
                me.reply(count, sum.to_le_bytes().to_vec()),
            ))
        })
    }
}

struct BidiSvc(Echo);
impl tonic::server::StreamingService<Msg> for BidiSvc {
    type Response = Msg;
    type ResponseStream = BoxStream<Msg>;
    type Future = BoxFuture<tonic::Response<BoxStream<Msg>>, Status>;
    fn call(&mut self, req: tonic::Request<tonic::Streaming<Msg>>) -> Self::Future {
        let me = self.0.clone();
        Box::pin(async move {
            me.calls.fetch_add(1, Ordering::SeqCst);
            let out = req
                .into_inner()
                .map(move |r| r.map(|m| me.reply(m.n + 1, m.data)));
            Ok(tonic::Response::new(Box::pin(out) as BoxStream<Msg>))
        })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for Echo
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(Codec::default());
            let resp = match req.uri().path() {
                "/test.Echo/Unary" => grpc.unary(UnarySvc(me), req).await,
                "/test.Echo/ServerStream" => grpc.server_streaming(ServerSvc(me), req).await,
                "/test.Echo/ClientStream" => grpc.client_streaming(ClientSvc(me), req).await,
                "/test.Echo/Bidi" => grpc.streaming(BidiSvc(me), req).await,
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(resp)
        })
    }
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

/// A tonic server on its own listener, which the test accepts for it: it
/// counts connections, can tear them all down ("kill"), and can hand the
/// listener to a fresh server while the old one drains (a graceful restart:
/// GOAWAY on the old connections).
struct GrpcUpstream {
    addr: SocketAddr,
    echo: Echo,
    health: tonic_health::server::HealthReporter,
    accepts: Arc<AtomicUsize>,
    current: Arc<Mutex<Option<Serving>>>,
    sockets: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

struct Serving {
    conns: mpsc::Sender<TcpStream>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcUpstream {
    async fn start(id: &str) -> GrpcUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = GrpcUpstream {
            addr: listener.local_addr().unwrap(),
            echo: Echo::new(id),
            health: tonic_health::server::HealthReporter::new(),
            accepts: Arc::default(),
            current: Arc::default(),
            sockets: Arc::default(),
        };
        *up.current.lock().unwrap() = Some(up.serve());
        let (accepts, current, sockets) =
            (up.accepts.clone(), up.current.clone(), up.sockets.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepts.fetch_add(1, Ordering::SeqCst);
                let std = stream.into_std().unwrap();
                sockets.lock().unwrap().push(std.try_clone().unwrap());
                let stream = TcpStream::from_std(std).unwrap();
                let tx = current.lock().unwrap().as_ref().map(|s| s.conns.clone());
                if let Some(tx) = tx {
                    let _ = tx.send(stream).await;
                }
            }
        });
        up
    }

    /// A server for the connections accepted from now on.
    fn serve(&self) -> Serving {
        let (conns, rx) = mpsc::channel::<TcpStream>(64);
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|s| (Ok::<_, std::io::Error>(s), rx))
        });
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(self.health.clone()),
        );
        let router = tonic::transport::Server::builder()
            .add_service(self.echo.clone())
            .add_service(health);
        let task = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Serving { conns, stop, task }
    }

    /// Graceful restart: a new server takes the listener, the old one
    /// sends GOAWAY and finishes what it has. Returns when it has.
    async fn restart(&self) {
        let fresh = self.serve();
        let old = self.current.lock().unwrap().replace(fresh);
        if let Some(old) = old {
            let _ = old.stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(10), old.task).await;
        }
    }

    /// Tear down every connection accepted so far (the upstream "dies").
    fn kill_connections(&self) {
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    async fn set_serving(&self, serving: bool) {
        use tonic_health::ServingStatus;
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health.set_service_status("test.Echo", status).await;
    }
}

/// The proxy in front of `endpoints`, spoken to over h2c.
fn grpc_proxy(endpoints: &[SocketAddr], upstream_extra: &str) -> Proxy {
    Proxy::start(&grpc_toml(endpoints, upstream_extra))
}

/// [`grpc_proxy`]'s config: its one route is the last table, so a caller
/// may append keys to the route and then tables of its own.
fn grpc_toml(endpoints: &[SocketAddr], upstream_extra: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|a| a.to_string()).collect();
    format!(
        r#"[proxy]
listen = ["@LISTEN@"]
admin = "@ADMIN@"
workers = 2

[proxy.access_log]
format = "json"
path = "@DIR@/access.log"

[[upstream]]
name = "grpc"
endpoints = {eps:?}
protocol = "h2c"
{upstream_extra}

[[route]]
path_prefix = "/"
upstream = "grpc"
"#
    )
}

async fn channel(proxy: &Proxy) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{}", proxy.addr()))
        .unwrap()
        .connect()
        .await
        .expect("connect to the proxy")
}

fn path(m: &'static str) -> PathAndQuery {
    PathAndQuery::from_static(m)
}

async fn unary(
    ch: &tonic::transport::Channel,
    req: tonic::Request<Msg>,
) -> Result<tonic::Response<Msg>, Status> {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    g.unary(req, path("/test.Echo/Unary"), Codec::default())
        .await
}

async fn server_stream(
    ch: &tonic::transport::Channel,
    req: tonic::Request<Msg>,
) -> Result<tonic::Streaming<Msg>, Status> {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    g.server_streaming(req, path("/test.Echo/ServerStream"), Codec::default())
        .await
        .map(tonic::Response::into_inner)
}

/// Every message of a stream, until it ends with an OK status.
async fn all_messages(s: &mut tonic::Streaming<Msg>) -> Vec<Msg> {
    let mut all = Vec::new();
    while let Some(m) = within(10, "stream message", s.message())
        .await
        .expect("every message decodes, then an OK status")
    {
        all.push(m);
    }
    all
}

/// A raw h2c upstream (hyper, no gRPC library) answering every request with
/// `handle`: for what tonic would hide (exact trailers, a head that never
/// comes). Its address.
async fn raw_h2_upstream<F, Fut, B>(handle: F) -> std::net::SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let handle = handle.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handle(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_server_streaming_calls_pass() {
    let up = GrpcUpstream::start("a").await;
    let proxy = grpc_proxy(&[up.addr], "");
    let ch = within(10, "connect", channel(&proxy)).await;
    let resp = within(10, "unary", unary(&ch, tonic::Request::new(msg(41, b"hi"))))
        .await
        .expect("unary call");
    let m = resp.into_inner();
    assert_eq!(
        (m.n, m.data.as_slice(), m.from.as_str()),
        (42, &b"hi"[..], "a")
    );

    let mut s = within(
        10,
        "server stream",
        server_stream(&ch, tonic::Request::new(msg(10_000, b""))),
    )
    .await
    .expect("server streaming call");
    let ns: Vec<u64> = all_messages(&mut s).await.iter().map(|m| m.n).collect();
    assert_eq!(ns, (0..10_000).collect::<Vec<u64>>());
    // The access log has the calls with their gRPC status (written at the end).
    let log = std::fs::read_to_string(proxy.dir().join("access.log")).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut log = log;
    while log
        .lines()
        .filter(|l| l.contains("\"grpc_status\":0"))
        .count()
        < 2
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        log = std::fs::read_to_string(proxy.dir().join("access.log")).unwrap_or_default();
    }
    assert!(
        log.lines()
            .filter(|l| l.contains("\"grpc_status\":0"))
            .count()
            >= 2,
        "{log}"
    );
    let metrics = proxy.admin_get("/metrics").await.text();
    assert!(
        metrics.contains("sluicegate_grpc_calls_total{") && metrics.contains("code=\"OK\""),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streaming_and_bidi_carry_10000_messages_each_way() {
    let up = GrpcUpstream::start("a").await;
    let proxy = grpc_proxy(&[up.addr], "");
    let ch = within(10, "connect", channel(&proxy)).await;
    const N: u64 = 10_000;

    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready().await.unwrap();
    let outgoing = futures_util::stream::iter((0..N).map(|i| msg(i, &[7u8; 100])));
    let resp = within(
        30,
        "client streaming",
        g.client_streaming(
            tonic::Request::new(outgoing),
            path("/test.Echo/ClientStream"),
            Codec::default(),
        ),
    )
    .await
    .expect("client streaming call")
    .into_inner();
    assert_eq!(resp.n, N);
    assert_eq!(resp.data, (0..N).sum::<u64>().to_le_bytes().to_vec());

    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready().await.unwrap();
    let outgoing = futures_util::stream::iter((0..N).map(|i| msg(i, &[9u8; 100])));
    let mut incoming = within(
        30,
        "bidi",
        g.streaming(
            tonic::Request::new(outgoing),
            path("/test.Echo/Bidi"),
            Codec::default(),
        ),
    )
    .await
    .expect("bidi call")
    .into_inner();
    let mut got = 0u64;
    while let Some(m) = within(30, "bidi message", incoming.message())
        .await
        .expect("message")
    {
        assert_eq!(m.n, got + 1, "in order, each answered");
        assert_eq!(m.data.len(), 100);
        got += 1;
    }
    assert_eq!(got, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_ends_a_stalled_call_with_deadline_exceeded() {
    let up = GrpcUpstream::start("a").await;
    let proxy = grpc_proxy(&[up.addr], "");
    let ch = within(10, "connect", channel(&proxy)).await;
    let mut req = tonic::Request::new(msg(0, b"stall"));
    req.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let mut s = within(10, "call", server_stream(&ch, req))
        .await
        .expect("head");
    let first = within(10, "first", s.message()).await.expect("one message");
    assert!(first.is_some());
    let err = within(10, "the deadline", s.message())
        .await
        .expect_err("the proxy ends the call");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_down_is_unavailable() {
    let proxy = grpc_proxy(&[free_addr()], "");
    let ch = within(10, "connect", channel(&proxy)).await;
    let err = within(10, "call", unary(&ch, tonic::Request::new(msg(1, b""))))
        .await
        .expect_err("nothing listens");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("sluicegate"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_killed_mid_stream_ends_the_call_with_a_status() {
    let up = GrpcUpstream::start("a").await;
    let proxy = grpc_proxy(&[up.addr], "");
    let ch = within(10, "connect", channel(&proxy)).await;
    let mut s = within(
        10,
        "call",
        server_stream(&ch, tonic::Request::new(msg(0, b"forever"))),
    )
    .await
    .expect("head");
    for _ in 0..5 {
        within(10, "message", s.message())
            .await
            .expect("message")
            .expect("more");
    }
    up.kill_connections();
    let err = loop {
        match within(10, "the end", s.message()).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the call ended as if it had succeeded"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("sluicegate"), "{err:?}");
    // The proxy is fine: a new call works once the upstream accepts again.
    let m = within(10, "again", unary(&ch, tonic::Request::new(msg(1, b""))))
        .await
        .expect("a new call");
    assert_eq!(m.into_inner().n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_byte_for_byte() {
    let up = GrpcUpstream::start("a").await;
    let proxy = grpc_proxy(&[up.addr], "");
    // Through the proxy and straight to the upstream: the same status.
    let direct = tonic::transport::Channel::from_shared(format!("http://{}", up.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let via = within(10, "connect", channel(&proxy)).await;
    let mut seen = Vec::new();
    for ch in [&direct, &via] {
        let mut s = within(
            10,
            "call",
            server_stream(ch, tonic::Request::new(msg(3, b"details"))),
        )
        .await
        .expect("head");
        let mut n = 0;
        let err = loop {
            match within(10, "message", s.message()).await {
                Ok(Some(_)) => n += 1,
                Ok(None) => panic!("no error status"),
                Err(e) => break e,
            }
        };
        assert_eq!(n, 3);
        seen.push(err);
    }
    let want = details_status();
    for err in &seen {
        assert_eq!(err.code(), Code::Aborted);
        assert_eq!(err.message(), want.message());
        assert_eq!(err.details(), want.details());
        assert_eq!(
            err.metadata()
                .get_bin("x-checksum-bin")
                .unwrap()
                .to_bytes()
                .unwrap(),
            Bytes::from_static(b"\xde\xad\xbe\xef\x00\x01")
        );
        assert_eq!(err.metadata().get("x-note").unwrap(), "plain text");
    }
    // And raw: every trailer field an upstream sends, value for value.
    raw_trailers_pass(&proxy).await;
}

/// A hyper HTTP/2 upstream answering with fixed trailers; a hyper client
/// reads them through the proxy.
async fn raw_trailers_pass(_grpc: &Proxy) {
    use http_body_util::BodyExt;
    let trailers: Vec<(&str, &[u8])> = vec![
        ("grpc-status", b"0"),
        ("grpc-message", b"ok%20%C3%A9"),
        ("x-sum-bin", b"3q2+7wAB"),
        ("x-multi", b"one"),
        ("x-multi", b"two"),
        ("x-empty", b""),
    ];
    let sent = trailers.clone();
    let addr = raw_h2_upstream(move |_req| {
        let sent = sent.clone();
        async move {
            let mut t = http::HeaderMap::new();
            for (k, v) in &sent {
                t.append(
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_bytes(v).unwrap(),
                );
            }
            let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = vec![
                Ok(http_body::Frame::data(Bytes::from_static(
                    b"\0\0\0\0\x02\x08\x01",
                ))),
                Ok(http_body::Frame::trailers(t)),
            ];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            http::Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap()
        }
    })
    .await;
    let proxy = grpc_proxy(&[addr], "");
    let conn = H2Conn::connect(proxy.addr()).await;
    let req = http::Request::post(format!("http://{}/x.Y/Z", proxy.addr()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let resp = within(10, "raw call", conn.send(req)).await;
    let got = within(10, "raw body", resp.into_body().collect())
        .await
        .unwrap();
    let t = got.trailers().expect("trailers").clone();
    let mut want = http::HeaderMap::new();
    for (k, v) in &trailers {
        want.append(
            http::HeaderName::from_static(k),
            http::HeaderValue::from_bytes(v).unwrap(),
        );
    }
    assert_eq!(t, want, "trailers changed on the way");
    assert_eq!(&got.to_bytes()[..], b"\0\0\0\0\x02\x08\x01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_share_a_handful_of_connections() {
    let up = GrpcUpstream::start("a").await;
    let proxy = grpc_proxy(&[up.addr], "");
    // Ten client connections of 100 streams each (the proxy's listener
    // allows 256 per connection).
    let mut chans = Vec::new();
    for _ in 0..10 {
        chans.push(within(10, "connect", channel(&proxy)).await);
    }
    let mut calls = Vec::new();
    for i in 0..1000u64 {
        let ch = chans[i as usize % 10].clone();
        calls.push(tokio::spawn(async move {
            unary(&ch, tonic::Request::new(msg(i, b"slow"))).await
        }));
    }
    for (i, c) in calls.into_iter().enumerate() {
        let r = within(30, "call", c).await.unwrap().expect("call");
        assert_eq!(r.into_inner().n, i as u64 + 1);
    }
    let conns = up.accepts();
    let peak = up.echo.peak.load(Ordering::SeqCst);
    eprintln!("1000 streams: {conns} upstream connections, peak {peak} at once");
    assert!(conns <= 4, "{conns} upstream connections");
    assert!(
        peak > 100,
        "streams were multiplexed, not queued: peak {peak}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upstream_restart_under_load_fails_nothing() {
    let up = Arc::new(GrpcUpstream::start("a").await);
    let proxy = grpc_proxy(&[up.addr], "");
    let ch = within(10, "connect", channel(&proxy)).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let mut load = Vec::new();
    for _ in 0..16 {
        let (ch, stop, ok, failed) = (ch.clone(), stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                match unary(&ch, tonic::Request::new(msg(i, b""))).await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        failed.lock().unwrap().push(e.to_string());
                        0
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        within(20, "restart", up.restart()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for l in load {
        within(20, "load", l).await.unwrap();
    }
    let failed = failed.lock().unwrap();
    let ok = ok.load(Ordering::SeqCst);
    eprintln!(
        "restarts under load: {ok} calls ok, {} failed, {} upstream connections",
        failed.len(),
        up.accepts()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} calls");
    assert!(
        up.accepts() >= 4,
        "each restart moved the proxy to a new connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_health_check_takes_a_not_serving_endpoint_out_and_back() {
    let a = GrpcUpstream::start("a").await;
    let b = GrpcUpstream::start("b").await;
    // tonic-health answers NOT_FOUND for a service it was never told of.
    a.set_serving(true).await;
    b.set_serving(true).await;
    let proxy = grpc_proxy(
        &[a.addr, b.addr],
        "[upstream.health]\ncheck = \"grpc\"\ngrpc_service = \"test.Echo\"\ninterval_ms = 100\ntimeout_ms = 500\nhealthy_threshold = 1\nunhealthy_threshold = 1\n",
    );
    let ch = within(10, "connect", channel(&proxy)).await;
    let froms = |n: usize| {
        let ch = ch.clone();
        async move {
            let mut v = Vec::new();
            for i in 0..n {
                let r = unary(&ch, tonic::Request::new(msg(i as u64, b"")))
                    .await
                    .expect("call");
                v.push(r.into_inner().from);
            }
            v
        }
    };
    let both = within(10, "calls", froms(20)).await;
    assert!(
        both.iter().any(|f| f == "a") && both.iter().any(|f| f == "b"),
        "{both:?}"
    );

    a.set_serving(false).await;
    within(10, "a taken out", async {
        loop {
            let v = froms(10).await;
            if v.iter().all(|f| f == "b") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let only_b = within(10, "calls", froms(20)).await;
    assert!(only_b.iter().all(|f| f == "b"), "{only_b:?}");

    a.set_serving(true).await;
    within(10, "a back", async {
        loop {
            let v = froms(10).await;
            if v.iter().any(|f| f == "a") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_head_past_grpc_timeout_is_deadline_exceeded() {
    // A raw upstream that never answers: the proxy's deadline is the
    // client's `grpc-timeout`, not `upstream_response_ms`.
    let addr = raw_h2_upstream(|_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        http::Response::new(http_body_util::Empty::<Bytes>::new())
    })
    .await;
    let proxy = grpc_proxy(&[addr], "");
    // A raw HTTP/2 client: tonic's own client enforces `grpc-timeout` too
    // (with CANCELLED), so only a client that does not shows what the
    // proxy answers.
    let conn = H2Conn::connect(proxy.addr()).await;
    let req = http::Request::post(format!("http://{}/test.Echo/Unary", proxy.addr()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let started = std::time::Instant::now();
    let resp = within(10, "call", conn.send(req)).await;
    let took = started.elapsed();
    // Trailers-only: HTTP 200, the status in the head.
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(resp.headers()["grpc-status"], "4", "{:?}", resp.headers());
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "the proxy answered after {took:?}, its deadline was 300 ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_unimplemented() {
    let up = GrpcUpstream::start("a").await;
    let eps = [up.addr.to_string()];
    let proxy = Proxy::start(&format!(
        "[proxy]\nlisten = [\"@LISTEN@\"]\nworkers = 1\n\n[[upstream]]\nname = \"grpc\"\nendpoints = {eps:?}\nprotocol = \"h2c\"\n\n[[route]]\npath_prefix = \"/other.Service/\"\nupstream = \"grpc\"\n"
    ));
    let ch = within(10, "connect", channel(&proxy)).await;
    let err = within(10, "call", unary(&ch, tonic::Request::new(msg(1, b""))))
        .await
        .expect_err("no route");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

/// The contract 0.2 chunk phase works on gRPC message bytes: `v2-probe`
/// with `chunks = true` upper-cases the ASCII letters of every response
/// chunk. It sees the length-prefixed messages byte for byte, so exactly
/// the letter bytes change (strings, and the one-byte varints 97 to 122)
/// while the framing stays intact and the status still comes in trailers,
/// for a unary call and for a 500-message server stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_filter_edits_grpc_message_bytes() {
    let up = GrpcUpstream::start("a").await;
    let toml = grpc_toml(&[up.addr], "")
        + "filters = [\"v2-chunks\"]\n\n[filters]\ndir = \"@DIR@/filters\"\n\n\
           [filters.config.v2-chunks]\nchunks = true\n";
    let proxy = Proxy::builder(&toml)
        .file("filters/v2-chunks.wasm", wasm("v2-probe"))
        .start();
    let ch = within(10, "connect", channel(&proxy)).await;
    let m = within(
        10,
        "unary",
        unary(&ch, tonic::Request::new(msg(41, b"hi grpc"))),
    )
    .await
    .expect("unary call through a chunk filter")
    .into_inner();
    assert_eq!(
        (m.n, m.data.as_slice(), m.from.as_str()),
        (42, &b"HI GRPC"[..], "A"),
        "the chunk phase saw and replaced the message bytes"
    );

    let mut s = within(
        10,
        "server stream",
        server_stream(&ch, tonic::Request::new(msg(500, b""))),
    )
    .await
    .expect("server streaming call through a chunk filter");
    // The filter sees the framed bytes as written: `n` from 97 to 122 is
    // one varint byte, an ASCII letter, and is upper-cased too (from 128 on
    // a varint's bytes are >= 0x80 or < 4).
    let got: Vec<(u64, String)> = all_messages(&mut s)
        .await
        .into_iter()
        .map(|m| (m.n, m.from))
        .collect();
    let want: Vec<(u64, String)> = (0..500u64)
        .map(|n| (if (97..=122).contains(&n) { n - 32 } else { n }, "A".into()))
        .collect();
    assert_eq!(got, want, "every message arrived, edited byte for byte");
}
