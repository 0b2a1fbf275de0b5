//! TLS with rustls (the `ring` provider): termination on `[[proxy.tls]]`
//! listeners, with certificates chosen by SNI and reloaded when their files
//! change, and client configs for `[upstream.tls]`.
//!
//! Each listener has a [`CertStore`]: a map from the names in each
//! certificate's SANs to the certificate, the first certificate being the
//! default. The map is swapped whole ([`arc_swap`]) when the files change;
//! a handshake reads it without a lock. A new file that does not load (bad
//! PEM, a key that does not match) keeps the running certificates and logs
//! why.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher as _};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{CertConfig, TlsListenerConfig, UpstreamTlsConfig};

/// The process's crypto provider: `ring`.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Load one `{ cert, key }` pair: the chain and a key that matches its
/// leaf. Errors name the file and the reason.
pub fn load_certified_key(c: &CertConfig) -> Result<(Arc<CertifiedKey>, Vec<String>), String> {
    let certs = read_certs(&c.cert)?;
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| {
        format!(
            "{}: no usable private key: {}",
            c.key.display(),
            pem_error(e)
        )
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unsupported private key: {e}", c.key.display()))?;
    let names = cert_names(&certs[0]).map_err(|e| format!("{}: {e}", c.cert.display()))?;
    let ck = CertifiedKey::new(certs, signing);
    match ck.keys_match() {
        // A key type that cannot tell its public key is let through, as
        // rustls' own `CertifiedKey::from_der` does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => {
            return Err(format!(
                "{} does not match the certificate {}: {e}",
                c.key.display(),
                c.cert.display()
            ))
        }
    }
    Ok((Arc::new(ck), names))
}

/// Every certificate in a PEM file (at least one).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {}", path.display(), pem_error(e)))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item found".into(),
        other => format!("{other:?}"),
    }
}

/// The DNS names (lower case, wildcards kept as `*.example.com`) and IP
/// addresses a certificate is for: its SANs, else its subject CN.
fn cert_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(ip) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*ip) {
                        names.push(std::net::IpAddr::from(a).to_string());
                    } else if let Ok(a) = <[u8; 16]>::try_from(*ip) {
                        names.push(std::net::IpAddr::from(a).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
        {
            names.push(cn.to_ascii_lowercase());
        }
    }
    Ok(names)
}

/// The certificates of one listener, by name.
#[derive(Debug)]
struct CertMap {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// The names of each certificate, in config order (for the admin API).
    names: Vec<Vec<String>>,
}

impl CertMap {
    /// Load every pair; the first error refuses the whole set.
    fn load(certs: &[CertConfig]) -> Result<CertMap, String> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        let mut all_names = Vec::new();
        for c in certs {
            let (ck, names) = load_certified_key(c)?;
            default.get_or_insert_with(|| ck.clone());
            for n in &names {
                // The first certificate naming a host wins.
                match n.strip_prefix("*.") {
                    Some(base) => wildcard.entry(base.to_string()),
                    None => exact.entry(n.clone()),
                }
                .or_insert_with(|| ck.clone());
            }
            all_names.push(names);
        }
        let default = default.ok_or("no certificate configured")?;
        Ok(CertMap {
            default,
            exact,
            wildcard,
            names: all_names,
        })
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(ck) = self.exact.get(&name) {
            return ck.clone();
        }
        name.split_once('.')
            .and_then(|(_, base)| self.wildcard.get(base))
            .unwrap_or(&self.default)
            .clone()
    }
}

/// The live certificates of one TLS listener; a rustls certificate resolver.
#[derive(Debug)]
pub struct CertStore {
    files: Vec<CertConfig>,
    map: ArcSwap<CertMap>,
}

impl CertStore {
    /// Load the listener's certificates.
    pub fn new(files: &[CertConfig]) -> Result<CertStore, String> {
        Ok(CertStore {
            files: files.to_vec(),
            map: ArcSwap::from_pointee(CertMap::load(files)?),
        })
    }

    /// Re-read the files; swap them in only if every pair loads.
    pub fn reload(&self) -> Result<(), String> {
        let map = CertMap::load(&self.files)?;
        self.map.store(Arc::new(map));
        Ok(())
    }

    /// The names each certificate serves, in config order.
    pub fn names(&self) -> Vec<Vec<String>> {
        self.map.load().names.clone()
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files
            .iter()
            .flat_map(|c| [c.cert.as_path(), c.key.as_path()])
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.map.load().pick(hello.server_name()))
    }
}

/// A TLS listener's acceptor and its certificates.
#[derive(Clone)]
pub struct TlsListener {
    /// The handshake side, shared by every worker.
    pub acceptor: TlsAcceptor,
    /// The certificates, reloadable.
    pub store: Arc<CertStore>,
}

impl TlsListener {
    /// Build from a validated `[[proxy.tls]]` table: ALPN `h2`, `http/1.1`.
    pub fn new(config: &TlsListenerConfig) -> anyhow::Result<TlsListener> {
        let store = Arc::new(
            CertStore::new(config.certs.get_ref())
                .map_err(|e| anyhow::anyhow!("proxy.tls {}: {e}", config.listen.get_ref()))?,
        );
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsListener {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            store,
        })
    }
}

/// Run the TLS handshake on an accepted connection, within `timeout`.
/// Failures are counted and logged at debug level (scanners are noisy).
pub async fn handshake<IO>(
    acceptor: &TlsAcceptor,
    io: IO,
    timeout: Duration,
    client: std::net::SocketAddr,
) -> Option<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let reason = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(tls)) => return Some(tls),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "handshake timed out".to_string(),
    };
    metrics::counter!("sluicegate_tls_handshake_failures_total").increment(1);
    tracing::debug!(%client, reason, "TLS handshake failed");
    None
}

/// Watch every listener's certificate and key files (their directories,
/// so editors' renames and Kubernetes Secret symlink swaps are seen);
/// reload a listener's certificates after its files change.
pub fn watch(listeners: &[TlsListener]) -> Option<notify::RecommendedWatcher> {
    if listeners.is_empty() {
        return None;
    }
    let stores: Vec<Arc<CertStore>> = listeners.iter().map(|l| l.store.clone()).collect();
    let mut dirs: Vec<PathBuf> = stores
        .iter()
        .flat_map(|s| s.paths().filter_map(|p| p.parent()).map(Path::to_path_buf))
        .map(|d| std::fs::canonicalize(&d).unwrap_or(d))
        .collect();
    dirs.sort();
    dirs.dedup();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event {
            if !e.kind.is_access() {
                let _ = tx.send(());
            }
        }
    })
    .map_err(|e| tracing::error!(error = %e, "cannot watch certificate files"))
    .ok()?;
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot watch a certificate directory");
        }
    }
    tokio::spawn(reload_on_change(stores, rx));
    Some(watcher)
}

/// After each burst of file events (quiet for 100 ms), reload the stores
/// whose files changed.
async fn reload_on_change(stores: Vec<Arc<CertStore>>, mut rx: mpsc::UnboundedReceiver<()>) {
    let mut seen: Vec<Vec<u8>> = stores.iter().map(|s| fingerprint(s)).collect();
    while rx.recv().await.is_some() {
        while let Ok(Some(())) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
        }
        for (store, seen) in stores.iter().zip(seen.iter_mut()) {
            let now = fingerprint(store);
            if now == *seen {
                continue;
            }
            *seen = now;
            match store.reload() {
                Ok(()) => {
                    metrics::counter!("sluicegate_reloads_total", "kind" => "tls").increment(1);
                    tracing::info!(names = ?store.names(), "TLS certificates reloaded");
                }
                Err(e) => {
                    metrics::counter!("sluicegate_reloads_total", "kind" => "tls").increment(1);
                    metrics::counter!("sluicegate_reload_failures_total", "kind" => "tls")
                        .increment(1);
                    tracing::error!(
                        "TLS certificate reload rejected, keeping the running certificates: {e}"
                    );
                }
            }
        }
    }
}

/// The bytes of a store's files (cheap: a few KiB), to skip events that
/// changed nothing.
fn fingerprint(store: &CertStore) -> Vec<u8> {
    let mut all = Vec::new();
    for p in store.paths() {
        all.extend(std::fs::read(p).unwrap_or_default());
        all.push(0);
    }
    all
}

/// A client config for `[upstream.tls]`: the CA file's certificates (or the
/// system's roots).
pub fn client_config(t: &UpstreamTlsConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca {
        Some(ca) => {
            for c in read_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err("no CA given and no system CA certificates found; set ca".into());
            }
        }
    }
    if let Some(sni) = &t.sni {
        ServerName::try_from(sni.as_str())
            .map_err(|_| format!("sni {sni:?} is not a DNS name or IP address"))?;
    }
    // ALPN is left to the connector (HTTP/1.1 only).
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `[upstream.tls]` ready for use: built with each snapshot (off the
/// request path), identified so workers can cache a client per version.
#[derive(Debug)]
pub struct UpstreamTls {
    /// Unique per build: a reload that rebuilds it gets a new client.
    pub id: u64,
    /// Trust roots and ALPN.
    pub config: Arc<rustls::ClientConfig>,
    /// The name sent and verified, if fixed by `sni`.
    pub sni: Option<ServerName<'static>>,
}

impl UpstreamTls {
    /// Read the CA file and check the name.
    pub fn new(t: &UpstreamTlsConfig) -> Result<UpstreamTls, String> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let config = client_config(t)?;
        let sni = match &t.sni {
            Some(s) => Some(
                ServerName::try_from(s.clone())
                    .map_err(|_| format!("sni {s:?} is not a DNS name or IP address"))?,
            ),
            None => None,
        };
        Ok(UpstreamTls {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            config,
            sni,
        })
    }

    /// The client config with ALPN `h2` alone, for `protocol = "h2"`
    /// (made per connection: connections are few and long-lived).
    pub fn h2_config(&self) -> Arc<rustls::ClientConfig> {
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// A connector for this upstream: TCP with the proxy's settings, then
    /// TLS (HTTP/1.1) with this CA and name.
    pub fn connector(
        &self,
        http: hyper_util::client::legacy::connect::HttpConnector,
    ) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.config).clone())
            .https_only();
        let builder = match &self.sni {
            Some(name) => builder.with_server_name_resolver(
                hyper_rustls::FixedServerNameResolver::new(name.clone()),
            ),
            None => builder,
        };
        builder.enable_http1().wrap_connector(http)
    }
}
