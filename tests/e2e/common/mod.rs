//! Shared helpers of the end-to-end suite: the real `sluicegate` binary run
//! as a child process, in-process backends, an HTTP client, config builders.
//!
//! Everything listens on 127.0.0.1 only, every wait is bounded, and every
//! process or task a helper starts is ended when its handle is dropped.

#![allow(dead_code)]

pub mod backend;
pub mod client;
pub mod killable;
pub mod proc;
pub mod redis_server;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub use backend::{Backend, Broken};
#[allow(unused_imports)]
pub use client::{metric_value, split_response, Echo, H1Conn, H2Conn, Resp};
#[allow(unused_imports)]
pub use proc::{Proxy, ProxyBuilder};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

/// Await `fut` for at most `secs` seconds; panic naming `what` otherwise.
pub async fn within<F: Future>(secs: u64, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs}s: {what}"),
    }
}

/// A built filter component: an example in `target/filters/<name>.wasm`,
/// or a test fixture in `target/test-filters/<name>.wasm`.
pub fn wasm(name: &str) -> Vec<u8> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../target");
    let example = format!("{root}/filters/{name}.wasm");
    let fixture = format!("{root}/test-filters/{name}.wasm");
    std::fs::read(&example)
        .or_else(|_| std::fs::read(&fixture))
        .unwrap_or_else(|e| panic!("{example} or {fixture}: {e} (run scripts/build-filters.sh)"))
}

/// A proxy (with its admin listener) whose `[filters]` dir holds
/// `filters`, each installed under its own name, with `filters_toml`
/// appended after `[filters]`.
pub fn start_with_filters(cfg: Cfg, filters: &[&str], filters_toml: &str) -> Proxy {
    let named: Vec<(&str, &str)> = filters.iter().map(|f| (*f, *f)).collect();
    start_with_filters_as(cfg, &named, filters_toml)
}

/// Like [`start_with_filters`], with each filter installed under a name of
/// its own: `(name, built filter)`, e.g. one fixture twice with two configs.
pub fn start_with_filters_as(cfg: Cfg, filters: &[(&str, &str)], filters_toml: &str) -> Proxy {
    let toml = cfg
        .admin()
        .extra(&format!(
            "[filters]\ndir = \"@DIR@/filters\"\n{filters_toml}"
        ))
        .toml();
    let mut b = Proxy::builder(&toml);
    for (name, built) in filters {
        b = b.file(&format!("filters/{name}.wasm"), wasm(built));
    }
    b.start()
}

/// Where the `versioned` filter keeps the ten digits it reports.
const VERSION_MARKER: &[u8] = b"SGVERSION:";

/// The `versioned` filter stamped with `version` (a new content hash).
pub fn versioned(version: u32) -> Vec<u8> {
    let mut bytes = wasm("versioned");
    let at = bytes
        .windows(VERSION_MARKER.len())
        .position(|w| w == VERSION_MARKER)
        .expect("marker in versioned.wasm")
        + VERSION_MARKER.len();
    bytes[at..at + 10].copy_from_slice(format!("{version:010}").as_bytes());
    bytes
}

/// Replace a file the way `mv`, editors and deploy tools do: write aside,
/// then rename.
pub fn install(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A port on 127.0.0.1 that was free a moment ago, for a proxy to listen
/// on.
///
/// Not the kernel's pick (`bind :0`): that comes from the ephemeral range,
/// which every backend and client socket of the concurrent tests draws
/// from too, so the port could be taken again before the proxy binds it.
/// Ports here come from a range below the ephemeral one (Linux's default
/// starts at 32768), each handed out once per test process, starting at an
/// offset from the process id.
pub fn free_port() -> u16 {
    const BASE: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let start = std::process::id() % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
        let port = (BASE + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {BASE}..{}", BASE + SPAN)
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A scratch directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "sluicegate-e2e-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Write `contents` to `rel` inside the directory; returns the full path.
    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds a config TOML. Listener addresses are left as the placeholders
/// `@LISTEN@` / `@ADMIN@`, which [`Proxy::start`] replaces with free ports.
///
/// ```ignore
/// let toml = Cfg::new()
///     .upstream("app", &[backend.addr()])
///     .route(Some("example.com"), "/api", "app")
///     .timeout("upstream_response_ms", 300)
///     .toml();
/// ```
#[derive(Debug, Clone)]
pub struct Cfg {
    admin: bool,
    workers: Option<usize>,
    timeouts: Vec<(String, u64)>,
    upstreams: Vec<(String, Vec<String>)>,
    routes: Vec<String>,
    extra: Vec<String>,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg::new()
    }
}

impl Cfg {
    /// One listener, two workers, no admin, nothing else.
    pub fn new() -> Cfg {
        Cfg {
            admin: false,
            workers: Some(2),
            timeouts: Vec::new(),
            upstreams: Vec::new(),
            routes: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// Also serve the admin listener.
    pub fn admin(mut self) -> Cfg {
        self.admin = true;
        self
    }

    /// `[proxy] workers` (None leaves the key out).
    pub fn workers(mut self, n: Option<usize>) -> Cfg {
        self.workers = n;
        self
    }

    /// A `[proxy.timeouts]` key, e.g. `("drain_ms", 5000)`.
    pub fn timeout(mut self, key: &str, ms: u64) -> Cfg {
        self.timeouts.push((key.to_string(), ms));
        self
    }

    /// An `[[upstream]]` with these endpoints.
    pub fn upstream(mut self, name: &str, endpoints: &[SocketAddr]) -> Cfg {
        let eps = endpoints.iter().map(|a| a.to_string()).collect();
        self.upstreams.push((name.to_string(), eps));
        self
    }

    /// An `[[upstream]]` with endpoints given as text (any `host:port`).
    pub fn upstream_raw(mut self, name: &str, endpoints: &[&str]) -> Cfg {
        let eps = endpoints.iter().map(|a| a.to_string()).collect();
        self.upstreams.push((name.to_string(), eps));
        self
    }

    /// A `[[route]]`.
    pub fn route(self, host: Option<&str>, prefix: &str, upstream: &str) -> Cfg {
        self.route_with_filters(host, prefix, upstream, &[])
    }

    /// A `[[route]]` running `filters` (needs a `[filters]` table, see [`Cfg::extra`]).
    pub fn route_with_filters(
        mut self,
        host: Option<&str>,
        prefix: &str,
        upstream: &str,
        filters: &[&str],
    ) -> Cfg {
        let mut r = String::from("[[route]]\n");
        if let Some(h) = host {
            r += &format!("host = {h:?}\n");
        }
        r += &format!("path_prefix = {prefix:?}\nupstream = {upstream:?}\n");
        if !filters.is_empty() {
            r += &format!("filters = {filters:?}\n");
        }
        self.routes.push(r);
        self
    }

    /// Raw TOML appended at the end (e.g. a `[filters]` table).
    pub fn extra(mut self, toml: &str) -> Cfg {
        self.extra.push(toml.to_string());
        self
    }

    /// The TOML text.
    pub fn toml(&self) -> String {
        let mut s = String::from("[proxy]\nlisten = [\"@LISTEN@\"]\n");
        if self.admin {
            s += "admin = \"@ADMIN@\"\n";
        }
        if let Some(w) = self.workers {
            s += &format!("workers = {w}\n");
        }
        if !self.timeouts.is_empty() {
            s += "\n[proxy.timeouts]\n";
            for (k, v) in &self.timeouts {
                s += &format!("{k} = {v}\n");
            }
        }
        for (name, eps) in &self.upstreams {
            s += &format!("\n[[upstream]]\nname = {name:?}\nendpoints = {eps:?}\n");
        }
        for r in &self.routes {
            s += "\n";
            s += r;
        }
        for e in &self.extra {
            s += "\n";
            s += e;
            s += "\n";
        }
        s
    }
}

/// FNV-1a, 64 bit: a streaming, order-sensitive checksum of a byte stream.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv::new()
    }
}

impl Fnv {
    /// The initial state.
    pub fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    /// Feed bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }

    /// The checksum as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }

    /// The checksum of `bytes`.
    pub fn of(bytes: &[u8]) -> String {
        let mut f = Fnv::new();
        f.update(bytes);
        f.hex()
    }
}

/// Chunk size of the streamed pattern.
pub const PATTERN_CHUNK: usize = 64 * 1024;

/// The deterministic pattern at stream offset `offset`, `len` bytes. Every
/// byte depends on its position, so a lost, repeated or reordered chunk
/// changes the checksum.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let p = offset + i;
            (p.wrapping_mul(0x9E37_79B9) >> 11) as u8 ^ (p >> 20) as u8
        })
        .collect()
}

/// The FNV checksum of the first `total` bytes of the pattern.
pub fn pattern_checksum(total: u64) -> String {
    let mut f = Fnv::new();
    let mut off = 0u64;
    while off < total {
        let n = PATTERN_CHUNK.min((total - off) as usize);
        f.update(&pattern(off, n));
        off += n as u64;
    }
    f.hex()
}

/// Peak resident memory of a process, sampled on a thread until stopped.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    /// Sample `/proc/<pid>/status` VmRSS every 20 ms.
    pub fn start(pid: u32) -> RssSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0;
            while !flag.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    max = max.max(kib);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            max
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop sampling; the peak in KiB.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Run the binary with `args` to completion (≤ `secs`); its output.
pub async fn run_cli(args: &[&str], secs: u64) -> std::process::Output {
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    within(secs, &format!("sluicegate {}", args.join(" ")), child)
        .await
        .expect("spawn sluicegate")
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn describe(out: &std::process::Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
