//! The Rust peer of Sluicegate's benchmarks: the smallest `ProxyHttp` Pingora allows.
//!
//!     bench-pingora-peer LISTEN_PORT BACKEND_PORT [THREADS]
//!
//! Every request goes to 127.0.0.1:BACKEND_PORT over plain HTTP/1.1, through Pingora's default
//! keep-alive upstream connection pool; one worker thread (Pingora's default) unless THREADS says
//! otherwise. No filters, no header changes, no logging.
use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Peer {
    backend: String,
}

#[async_trait]
impl ProxyHttp for Peer {
    type CTX = ();
    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.backend.as_str(), false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: {} LISTEN_PORT BACKEND_PORT [THREADS]", args[0]);
        std::process::exit(2);
    }
    let listen = format!("127.0.0.1:{}", args[1]);
    let backend = format!("127.0.0.1:{}", args[2]);
    let mut conf = ServerConf::default();
    if let Some(t) = args.get(3) {
        conf.threads = t.parse().expect("THREADS");
    }
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    eprintln!("pingora peer on {listen} -> {backend}, {} worker thread(s)", server.configuration.threads);
    let mut svc = http_proxy_service(&server.configuration, Peer { backend });
    svc.add_tcp(&listen);
    server.add_service(svc);
    server.run_forever();
}
