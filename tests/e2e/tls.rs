//! TLS: termination with certificates chosen by SNI, ALPN h2 and
//! http/1.1, certificate reload from disk (and refusal of a bad one), and
//! TLS to upstreams trusting a test CA. Certificates are made at run time
//! with rcgen.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use crate::common::backend::echo_response;
use crate::common::{describe, free_addr, run_cli, within, Backend, Proxy, Resp, TempDir};

const H2: &[u8] = b"h2";
const H1: &[u8] = b"http/1.1";

/// A test certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A leaf certificate: PEM chain, PEM key, DER of the leaf.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses), signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let p = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A client config trusting only this CA, offering `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

/// What one TLS request saw.
struct TlsSeen {
    alpn: Option<Vec<u8>>,
    leaf: CertificateDer<'static>,
    resp: Resp,
}

/// Handshake with `sni` (verifying against `ca`), then `GET path` over
/// whatever ALPN picked.
async fn tls_get(addr: SocketAddr, ca: &Ca, sni: &str, alpn: &[&[u8]], path: &str) -> TlsSeen {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(ca.client(alpn));
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let tls = within(10, "TLS handshake", connector.connect(name, tcp))
        .await
        .unwrap_or_else(|e| panic!("handshake for {sni} failed: {e}"));
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(|p| p.to_vec());
    let leaf = session.peer_certificates().expect("server certificate")[0].clone();
    let req = Request::get(format!("https://{sni}{path}"))
        .header("host", sni)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let io = TokioIo::new(tls);
    let resp = if alpn.as_deref() == Some(H2) {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = req;
        req.headers_mut().remove("host");
        within(10, "h2 response", send.send_request(req))
            .await
            .unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = path.parse().unwrap();
        within(10, "h1 response", send.send_request(req))
            .await
            .unwrap()
    };
    let resp = Resp::collect(resp).await.unwrap();
    TlsSeen { alpn, leaf, resp }
}

/// A config with a plain listener, a TLS listener at `tls` with `certs`
/// (file names in the proxy's dir) and one echo upstream.
fn tls_config(tls: SocketAddr, certs: &[(&str, &str)], backend: SocketAddr) -> String {
    let certs: Vec<String> = certs
        .iter()
        .map(|(c, k)| format!("{{ cert = {c:?}, key = {k:?} }}"))
        .collect();
    format!(
        "[proxy]\nlisten = [\"@LISTEN@\"]\nadmin = \"@ADMIN@\"\nworkers = 2\n\n\
         [[proxy.tls]]\nlisten = \"{tls}\"\ncerts = [{}]\n\n\
         [[upstream]]\nname = \"app\"\nendpoints = [\"{backend}\"]\n\n\
         [[route]]\npath_prefix = \"/\"\nupstream = \"app\"\n",
        certs.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_alpn_serves_h2_and_http1() {
    let backend = Backend::echo("app").await;
    let ca = Ca::new("test CA");
    let a = ca.leaf(&["a.test"]);
    let b = ca.leaf(&["b.test", "*.wild.test"]);
    let tls = free_addr();
    let cfg = tls_config(
        tls,
        &[("a.pem", "a.key"), ("b.pem", "b.key")],
        backend.addr(),
    );
    let proxy = Proxy::builder(&cfg)
        .file("a.pem", a.cert_pem.clone())
        .file("a.key", a.key_pem.clone())
        .file("b.pem", b.cert_pem.clone())
        .file("b.key", b.key_pem.clone())
        .start();

    for (sni, want) in [
        ("a.test", &a.der),
        ("b.test", &b.der),
        ("x.wild.test", &b.der),
    ] {
        for alpn in [H2, H1] {
            let seen = tls_get(tls, &ca, sni, &[alpn], "/hello").await;
            assert_eq!(&seen.leaf, want, "{sni} got another certificate");
            assert_eq!(seen.alpn.as_deref(), Some(alpn), "{sni}: ALPN");
            assert_eq!(seen.resp.status, StatusCode::OK, "{sni}: {:?}", seen.resp);
            let echo = seen.resp.echo();
            assert_eq!(echo.uri, "/hello");
            assert_eq!(echo.one("x-forwarded-proto"), "https");
            assert_eq!(echo.one("x-forwarded-host"), sni);
        }
    }
    // A client offering both protocols gets h2.
    let seen = tls_get(tls, &ca, "a.test", &[H2, H1], "/").await;
    assert_eq!(seen.alpn.as_deref(), Some(H2));
    // The plain listener keeps serving plain HTTP.
    assert_eq!(proxy.get("/", &[]).await.status, StatusCode::OK);
}

/// Replace a file in one step (write aside, rename), like `kubectl` and
/// careful editors do.
fn replace(dir: &std::path::Path, name: &str, contents: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_and_a_bad_one_is_refused() {
    let backend = Backend::echo("app").await;
    let ca = Ca::new("test CA");
    let old = ca.leaf(&["a.test"]);
    let new = ca.leaf(&["a.test"]);
    let tls = free_addr();
    let cfg = tls_config(tls, &[("a.pem", "a.key")], backend.addr());
    let proxy = Proxy::builder(&cfg)
        .file("a.pem", old.cert_pem.clone())
        .file("a.key", old.key_pem.clone())
        .start();
    assert_eq!(tls_get(tls, &ca, "a.test", &[H2], "/").await.leaf, old.der);

    // Key first, then certificate: in between the pair does not match and
    // is refused; the old one keeps serving until the pair is whole.
    replace(proxy.dir(), "a.key", &new.key_pem);
    replace(proxy.dir(), "a.pem", &new.cert_pem);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = tls_get(tls, &ca, "a.test", &[H1], "/").await;
        assert_eq!(seen.resp.status, StatusCode::OK);
        if seen.leaf == new.der {
            break;
        }
        assert_eq!(seen.leaf, old.der);
        assert!(
            Instant::now() < deadline,
            "new certificate not served after 10s\n{}",
            proxy.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.wait_output("TLS certificates reloaded", 5).await;

    // A broken certificate file is refused with the reason; the running
    // certificate keeps serving new connections.
    replace(
        proxy.dir(),
        "a.pem",
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    );
    let log = proxy
        .wait_output("TLS certificate reload rejected", 10)
        .await;
    assert!(log.contains("a.pem"), "the log names the file:\n{log}");
    for alpn in [H2, H1] {
        let seen = tls_get(tls, &ca, "a.test", &[alpn], "/").await;
        assert_eq!(seen.leaf, new.der);
        assert_eq!(seen.resp.status, StatusCode::OK);
    }
    let metrics = proxy.admin_get("/metrics").await.text();
    assert!(
        metrics.contains("sluicegate_reload_failures_total{kind=\"tls\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_bad_certificates_naming_the_file_and_reason() {
    let ca = Ca::new("test CA");
    let a = ca.leaf(&["a.test"]);
    let b = ca.leaf(&["b.test"]);
    let dir = TempDir::new("tls-check");
    dir.write("a.pem", &a.cert_pem);
    dir.write("a.key", &a.key_pem);
    dir.write("b.key", &b.key_pem);
    dir.write("junk.pem", "hello\n");
    let backend = free_addr();
    let cases = [
        ("a.pem", "b.key", "does not match the certificate"),
        ("junk.pem", "a.key", "junk.pem"),
        ("missing.pem", "a.key", "missing.pem"),
    ];
    for (cert, key, want) in cases {
        let text = tls_config(free_addr(), &[(cert, key)], backend)
            .replace("@LISTEN@", "127.0.0.1:1")
            .replace("@ADMIN@", "127.0.0.1:2");
        let path = dir.write("sluicegate.toml", &text);
        let out = run_cli(&["check", "--config", path.to_str().unwrap()], 20).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}", describe(&out));
        assert!(
            err.contains("line 8: proxy.tls[0].certs[0]"),
            "{}",
            describe(&out)
        );
        assert!(err.contains(want), "want {want:?}\n{}", describe(&out));
    }
    let text = tls_config(free_addr(), &[("a.pem", "a.key")], backend)
        .replace("@LISTEN@", "127.0.0.1:1")
        .replace("@ADMIN@", "127.0.0.1:2");
    let path = dir.write("sluicegate.toml", &text);
    let out = run_cli(&["check", "--config", path.to_str().unwrap()], 20).await;
    assert!(out.status.success(), "{}", describe(&out));
}

/// An HTTPS echo backend with `leaf`; answers HTTP/1.1.
async fn tls_backend(id: &str, leaf: &Leaf) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let certs = vec![leaf.der.clone()];
    let key = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap()
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let id = id.to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, id) = (acceptor.clone(), id.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req| {
                    let id = id.clone();
                    async move {
                        let mut resp = echo_response(id.clone(), req).await;
                        resp.headers_mut()
                            .insert("x-backend", http::HeaderValue::from_str(&id).unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_trusts_the_configured_ca_only() {
    let ca = Ca::new("upstream CA");
    let leaf = ca.leaf(&["backend.test"]);
    let (addr, task) = tls_backend("secure", &leaf).await;
    let other = Ca::new("another CA");
    let cfg = format!(
        "[proxy]\nlisten = [\"@LISTEN@\"]\nworkers = 2\n\n\
         [[upstream]]\nname = \"secure\"\nendpoints = [\"{addr}\"]\nretries = 0\n\
         [upstream.tls]\nca = \"ca.pem\"\nsni = \"backend.test\"\n\n\
         [[upstream]]\nname = \"untrusted\"\nendpoints = [\"{addr}\"]\nretries = 0\n\
         [upstream.tls]\nca = \"other.pem\"\nsni = \"backend.test\"\n\n\
         [[upstream]]\nname = \"wrong-name\"\nendpoints = [\"{addr}\"]\nretries = 0\n\
         [upstream.tls]\nca = \"ca.pem\"\nsni = \"other.test\"\n\n\
         [[route]]\npath_prefix = \"/\"\nupstream = \"secure\"\n\n\
         [[route]]\npath_prefix = \"/untrusted\"\nupstream = \"untrusted\"\n\n\
         [[route]]\npath_prefix = \"/wrong-name\"\nupstream = \"wrong-name\"\n"
    );
    let proxy = Proxy::builder(&cfg)
        .file("ca.pem", ca.pem())
        .file("other.pem", other.pem())
        .start();
    for _ in 0..3 {
        let resp = proxy.get("/over-tls", &[]).await;
        assert_eq!(resp.status, StatusCode::OK, "{resp:?}\n{}", proxy.output());
        assert_eq!(resp.backend(), "secure");
        let echo = resp.echo();
        assert_eq!(echo.uri, "/over-tls");
        assert_eq!(echo.one("host"), "localhost");
    }
    // A server whose certificate the configured CA did not sign, or that is
    // not for the configured name, is refused: 502, and the proxy says why.
    for path in ["/untrusted", "/wrong-name"] {
        let resp = proxy.get(path, &[]).await;
        assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{path}: {resp:?}");
    }
    for name in ["untrusted", "wrong-name"] {
        let log = proxy.wait_output(&format!("\"{name}\""), 5).await;
        let line = log
            .lines()
            .find(|l| l.contains(&format!("\"{name}\"")))
            .unwrap();
        assert!(line.contains("invalid peer certificate"), "{line}");
    }
    task.abort();
}
