//! A service the tests can kill: its listener and every open connection
//! close at once. (A dropped `Backend` stops accepting but keeps serving
//! the connections it has, which the proxy's keep-alive pool for callouts
//! would go on using.)

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::common::backend::RespBody;

/// A running service on 127.0.0.1; killed when dropped.
pub struct Killable {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
}

impl Killable {
    /// Serve HTTP/1.1 with `handler` until killed.
    pub async fn serve<F, Fut>(handler: F) -> Killable
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<RespBody>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let (stop, rx) = watch::channel(false);
        let (handler, count) = (Arc::new(handler), requests.clone());
        let mut stopped = rx.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    s = listener.accept() => match s { Ok((s, _)) => s, Err(_) => continue },
                    _ = stopped.changed() => return,
                };
                let (handler, count, mut stopped) = (handler.clone(), count.clone(), rx.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        count.fetch_add(1, Ordering::SeqCst);
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stopped.changed() => {}
                    }
                });
            }
        });
        Killable {
            addr,
            requests,
            stop,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests that reached it so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Close the listener and every open connection.
    pub fn kill(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}
