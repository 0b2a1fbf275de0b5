//! The real `sluicegate` binary as a child process.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;

use super::client::{self, Resp};
use super::{free_addr, TempDir, BIN};

/// How long a proxy may take to start accepting.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Options for starting a proxy; see [`Proxy::builder`].
pub struct ProxyBuilder {
    config: String,
    files: Vec<(String, Vec<u8>)>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    wait_admin: bool,
    start_timeout: Duration,
    nofile: Option<u64>,
}

impl ProxyBuilder {
    /// Start the proxy with this open-file limit (soft and hard), through
    /// util-linux `prlimit`.
    pub fn nofile(mut self, n: u64) -> ProxyBuilder {
        self.nofile = Some(n);
        self
    }

    /// Write an extra file into the proxy's temp dir (next to its config),
    /// e.g. `("filters/auth.wasm", bytes)`. `@DIR@` in the config names that dir.
    pub fn file(mut self, rel: &str, contents: impl Into<Vec<u8>>) -> ProxyBuilder {
        self.files.push((rel.to_string(), contents.into()));
        self
    }

    /// An extra argument after `run --config FILE`, e.g. `--log-format`.
    pub fn arg(mut self, arg: &str) -> ProxyBuilder {
        self.args.push(arg.to_string());
        self
    }

    /// An environment variable for the process (e.g. `RUST_LOG`).
    pub fn env(mut self, key: &str, value: &str) -> ProxyBuilder {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Wait this long for the listeners (filters load before them: compiling
    /// an 18 MB interpreted-language component takes seconds).
    pub fn start_timeout(mut self, timeout: Duration) -> ProxyBuilder {
        self.start_timeout = timeout;
        self
    }

    /// Do not wait for the admin listener (when a test expects it absent).
    pub fn no_admin_wait(mut self) -> ProxyBuilder {
        self.wait_admin = false;
        self
    }

    /// Start the proxy and wait until it accepts connections.
    pub fn start(self) -> Proxy {
        let dir = TempDir::new("proxy");
        let listen = free_addr();
        let admin = free_addr();
        let text = self
            .config
            .replace("@LISTEN@", &listen.to_string())
            .replace("@ADMIN@", &admin.to_string())
            .replace("@DIR@", &dir.path().display().to_string());
        let (listen, admin) = listener_addrs(&text);
        let config_path = dir.write("sluicegate.toml", &text);
        for (rel, contents) in &self.files {
            dir.write(rel, contents);
        }
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(&self.args);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn sluicegate");
        let stdout = capture(child.stdout.take().unwrap());
        let stderr = capture(child.stderr.take().unwrap());
        let mut proxy = Proxy {
            child,
            addr: listen,
            admin,
            config_path,
            stdout,
            stderr,
            exited: None,
            dir,
        };
        proxy.wait_accepting(listen, self.start_timeout);
        if let (Some(a), true) = (admin, self.wait_admin) {
            proxy.wait_accepting(a, self.start_timeout);
        }
        proxy
    }
}

/// A running `sluicegate run`; killed (SIGKILL) on drop. If the test is
/// panicking, its output is printed for diagnosis.
pub struct Proxy {
    child: Child,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    config_path: PathBuf,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    exited: Option<ExitStatus>,
    // Last: removed after the process is gone.
    dir: TempDir,
}

impl Proxy {
    /// Start `sluicegate run` on this config and wait until it accepts.
    ///
    /// Placeholders in the text: `@LISTEN@` and `@ADMIN@` become free
    /// 127.0.0.1 ports, `@DIR@` the proxy's temp dir (which holds the config
    /// file). Without placeholders, `[proxy] listen[0]` and `admin` are read
    /// from the TOML.
    pub fn start(config_toml: &str) -> Proxy {
        Proxy::builder(config_toml).start()
    }

    /// Like [`Proxy::start`], with extra files, arguments or environment.
    pub fn builder(config_toml: &str) -> ProxyBuilder {
        ProxyBuilder {
            config: config_toml.to_string(),
            files: Vec::new(),
            args: Vec::new(),
            envs: Vec::new(),
            wait_admin: true,
            start_timeout: START_TIMEOUT,
            nofile: None,
        }
    }

    /// The (first) proxy listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener; panics if the config has none.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .expect("this proxy's config has no [proxy] admin")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file the proxy was started with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temp dir holding the config (and any extra files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Wait (≤ `secs`) until stdout or stderr contains `needle`; returns
    /// stdout + stderr. Output is read on a thread, so a line logged just
    /// before the proxy accepted may not be in [`Proxy::stderr_text`] yet.
    pub async fn wait_output(&self, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let text = format!("{}\n{}", self.stdout_text(), self.stderr_text());
            if text.contains(needle) {
                return text;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{needle:?} not in the proxy's output after {secs}s\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// stdout and stderr, labelled, for assertion messages.
    pub fn output(&self) -> String {
        format!(
            "--- sluicegate stdout ---\n{}\n--- sluicegate stderr ---\n{}",
            self.stdout_text(),
            self.stderr_text()
        )
    }

    /// Send a signal by name (`TERM`, `INT`, `HUP`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Has the process exited? (non-blocking)
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Wait up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET path` with extra headers, on a new HTTP/1.1 connection. `Host`
    /// defaults to `localhost` unless given in `headers`.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.request(Method::GET, path, headers, Bytes::new()).await
    }

    /// Any request with a body, on a new HTTP/1.1 connection.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        client::request(self.addr, method, path, headers, body.into()).await
    }

    /// `GET path` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Resp {
        client::request(self.admin_addr(), Method::GET, path, &[], Bytes::new()).await
    }

    /// Poll a TCP connect until it succeeds; panic with the output on
    /// timeout or if the process exits first.
    fn wait_accepting(&mut self, addr: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(status) = self.try_exit() {
                // Let the reader threads catch the last output.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "sluicegate exited ({status}) before accepting on {addr}\n{}",
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "sluicegate did not accept on {addr} within {timeout:?}\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

/// Copy a pipe into a shared buffer on a thread.
fn capture(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let out = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    });
    buf
}

/// `[proxy] listen[0]` and `admin` of a config text.
fn listener_addrs(text: &str) -> (SocketAddr, Option<SocketAddr>) {
    let value: toml::Table =
        toml::from_str(text).unwrap_or_else(|e| panic!("test config is not TOML: {e}\n{text}"));
    let proxy = value
        .get("proxy")
        .and_then(|p| p.as_table())
        .expect("config has no [proxy]");
    let listen = proxy
        .get("listen")
        .and_then(|l| l.as_array())
        .and_then(|l| l.first())
        .and_then(|a| a.as_str())
        .and_then(|a| a.parse().ok())
        .expect("config has no parseable [proxy] listen[0]");
    let admin = proxy
        .get("admin")
        .and_then(|a| a.as_str())
        .and_then(|a| a.parse().ok());
    (listen, admin)
}
