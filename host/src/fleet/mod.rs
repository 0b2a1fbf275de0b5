//! Fleet state on Redis: the one link every replica keeps to the `[redis]`
//! server, shared by filter KV (`filter::kv`), global route rate limits
//! (`protect::global`) and the purge fan-out ([`purge`]).
//!
//! Lifecycle of the link:
//!
//! 1. At start, [`install`] builds the link: a dedicated thread with its own
//!    tokio runtime (`sluicegate-redis`) owns every Redis socket, so the
//!    workers' single-threaded runtimes never host Redis I/O and a sync
//!    caller (today's filter host calls) can wait on it without blocking
//!    the runtime it waits for.
//! 2. A task on that runtime connects (`redis::aio::ConnectionManager`, one
//!    multiplexed connection) and retries with backoff until it succeeds;
//!    until then every operation fails at once as unavailable. The manager
//!    then reconnects by itself whenever the connection breaks.
//! 3. Every operation runs on that runtime under its deadline
//!    ([`RedisLink::run`] for async callers, [`RedisLink::run_blocking`]
//!    for sync ones). Its outcome marks the link up or down, counted in
//!    metrics; a once-a-second `PING` keeps the mark fresh when idle.
//! 4. `/readyz` and `/stats` read the mark ([`degraded`], [`status_json`]).

pub mod purge;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;

use crate::config::{KvConfig, RedisConfig};

/// Why a Redis operation gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisError {
    /// No connection, or the connection broke.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// No answer within the operation's deadline.
    #[error("redis did not answer within {0} ms")]
    Timeout(u64),
}

impl RedisError {
    fn kind(&self) -> &'static str {
        match self {
            RedisError::Unavailable(_) => "unavailable",
            RedisError::Timeout(_) => "timeout",
        }
    }
}

/// The operations counted in metrics (`op` label).
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// A filter KV call.
    Kv,
    /// A global rate-limit check.
    RateLimit,
    /// A purge published to the fleet.
    Purge,
    /// The idle health check.
    Ping,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Kv => "kv",
            Op::RateLimit => "rate_limit",
            Op::Purge => "purge",
            Op::Ping => "ping",
        }
    }
}

/// Up/down mark of the link, with the last failure.
#[derive(Default)]
struct Health {
    up: AtomicBool,
    /// The purge subscription is live.
    subscribed: AtomicBool,
    errors: AtomicU64,
    last_error: Mutex<Option<(String, Instant)>>,
}

/// The process's link to Redis.
pub struct RedisLink {
    /// The `[redis]` table it was built from.
    pub config: RedisConfig,
    /// `[filters.kv]` as read at start.
    pub kv: KvConfig,
    /// This process's id in purge messages (its own are skipped).
    pub node: u64,
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    health: Health,
    handle: tokio::runtime::Handle,
    // Kept so the runtime lives as long as the link (the process).
    _runtime: tokio::runtime::Runtime,
}

static LINK: OnceLock<Arc<RedisLink>> = OnceLock::new();

/// The link, when `[redis]` was configured at start.
pub fn link() -> Option<&'static Arc<RedisLink>> {
    LINK.get()
}

/// Build the link for `config` and start connecting (in the background:
/// a Redis that is down at start does not stop the proxy). Once per
/// process; later calls return the first link.
pub fn install(config: &RedisConfig, kv: &KvConfig) -> anyhow::Result<Arc<RedisLink>> {
    if let Some(l) = LINK.get() {
        return Ok(l.clone());
    }
    let client = redis::Client::open(config.url.get_ref().as_str()).map_err(|e| {
        anyhow::anyhow!(
            "redis.url {:?}: {e}",
            crate::config::redact_url(config.url.get_ref())
        )
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluicegate-redis")
        .enable_all()
        .build()?;
    let link = Arc::new(RedisLink {
        config: config.clone(),
        kv: kv.clone(),
        node: fastrand::u64(..),
        client,
        conn: ArcSwapOption::empty(),
        health: Health::default(),
        handle: runtime.handle().clone(),
        _runtime: runtime,
    });
    let link = LINK.get_or_init(|| link).clone();
    metrics::gauge!("sluicegate_redis_up").set(0.0);
    link.handle.spawn(connect_and_watch(link.clone()));
    tracing::info!(url = %crate::config::redact_url(config.url.get_ref()), "redis: connecting");
    Ok(link)
}

/// Connect (retrying with backoff), then ping once a second to keep the
/// up/down mark fresh while no request uses Redis.
async fn connect_and_watch(link: Arc<RedisLink>) {
    let mut backoff = Duration::from_millis(100);
    let connect_ms = link.config.connect_timeout_ms;
    let manager_config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(connect_ms)))
        .set_response_timeout(Some(Duration::from_millis(connect_ms)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    loop {
        let attempt =
            ConnectionManager::new_with_config(link.client.clone(), manager_config.clone());
        match tokio::time::timeout(Duration::from_millis(connect_ms * 2), attempt).await {
            Ok(Ok(conn)) => {
                link.conn.store(Some(Arc::new(conn)));
                link.mark_up();
                tracing::info!("redis: connected");
                break;
            }
            Ok(Err(e)) => link.mark_down(Op::Ping, &RedisError::Unavailable(e.to_string())),
            Err(_) => link.mark_down(Op::Ping, &RedisError::Timeout(connect_ms * 2)),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let timeout = Duration::from_millis(link.config.timeout_ms.max(250));
        let _ = link
            .run(Op::Ping, timeout, |mut c| async move {
                redis::cmd("PING").query_async::<String>(&mut c).await
            })
            .await;
    }
}

impl RedisLink {
    /// Run `op` against Redis on the link's runtime within `timeout`.
    pub async fn run<T, F, Fut>(&self, op: Op, timeout: Duration, f: F) -> Result<T, RedisError>
    where
        T: Send + 'static,
        F: FnOnce(ConnectionManager) -> Fut + Send + 'static,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
    {
        let result = match self.prepare(timeout, f) {
            Ok(fut) => match tokio::time::timeout(timeout + SLACK, self.handle.spawn(fut)).await {
                Ok(Ok(r)) => r,
                Ok(Err(join)) => Err(RedisError::Unavailable(join.to_string())),
                Err(_) => Err(RedisError::Timeout(timeout.as_millis() as u64)),
            },
            Err(e) => Err(e),
        };
        self.record(op, result)
    }

    /// [`RedisLink::run`] for a sync caller: blocks the calling thread (at
    /// most `timeout` and a little) on a channel while the link's own
    /// runtime does the I/O. Safe on any thread but the link's own (which
    /// runs nothing but this module's tasks), inside a tokio runtime or
    /// not: it never enters one.
    pub fn run_blocking<T, F, Fut>(&self, op: Op, timeout: Duration, f: F) -> Result<T, RedisError>
    where
        T: Send + 'static,
        F: FnOnce(ConnectionManager) -> Fut + Send + 'static,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
    {
        let result = match self.prepare(timeout, f) {
            Ok(fut) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                self.handle.spawn(async move {
                    let _ = tx.send(fut.await);
                });
                rx.recv_timeout(timeout + SLACK)
                    .unwrap_or(Err(RedisError::Timeout(timeout.as_millis() as u64)))
            }
            Err(e) => Err(e),
        };
        self.record(op, result)
    }

    /// `f` on the current connection under `timeout`, ready to spawn.
    fn prepare<T, F, Fut>(
        &self,
        timeout: Duration,
        f: F,
    ) -> Result<impl Future<Output = Result<T, RedisError>> + Send + 'static, RedisError>
    where
        T: Send + 'static,
        F: FnOnce(ConnectionManager) -> Fut + Send + 'static,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
    {
        let Some(conn) = self.conn.load_full() else {
            return Err(RedisError::Unavailable("not connected yet".into()));
        };
        let ms = timeout.as_millis() as u64;
        Ok(async move {
            match tokio::time::timeout(timeout, f((*conn).clone())).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(RedisError::Unavailable(e.to_string())),
                Err(_) => Err(RedisError::Timeout(ms)),
            }
        })
    }

    /// Count the outcome and update the up/down mark.
    fn record<T>(&self, op: Op, result: Result<T, RedisError>) -> Result<T, RedisError> {
        match &result {
            Ok(_) => {
                if !self.health.up.load(Ordering::Relaxed) {
                    self.mark_up();
                }
            }
            Err(e) => self.mark_down(op, e),
        }
        result
    }

    fn mark_up(&self) {
        if !self.health.up.swap(true, Ordering::Relaxed) {
            tracing::info!("redis: reachable");
        }
        metrics::gauge!("sluicegate_redis_up").set(1.0);
    }

    fn mark_down(&self, op: Op, e: &RedisError) {
        metrics::counter!("sluicegate_redis_errors_total", "op" => op.label(), "kind" => e.kind())
            .increment(1);
        self.health.errors.fetch_add(1, Ordering::Relaxed);
        let was_up = self.health.up.swap(false, Ordering::Relaxed);
        let mut last = self.health.last_error.lock();
        // Log the first failure and then at most one a second.
        if was_up
            || last
                .as_ref()
                .is_none_or(|(_, t)| t.elapsed() > Duration::from_secs(1))
        {
            tracing::warn!(op = op.label(), error = %e, "redis: operation failed");
        }
        *last = Some((e.to_string(), Instant::now()));
        metrics::gauge!("sluicegate_redis_up").set(0.0);
    }

    /// True while the last operation (or ping) succeeded.
    pub fn is_up(&self) -> bool {
        self.health.up.load(Ordering::Relaxed)
    }

    /// `prefix` + `rest`: every key and channel is under `[redis] prefix`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.config.prefix)
    }
}

/// How long past an operation's own deadline a caller waits for the
/// link's runtime to report it (scheduling slack).
const SLACK: Duration = Duration::from_millis(5);

/// `Some((fail_readiness, reason))` while Redis is configured and down.
pub fn degraded() -> Option<(bool, String)> {
    let link = link()?;
    if link.is_up() {
        return None;
    }
    Some((link.config.required_for_ready, "redis unreachable".into()))
}

/// The `dependencies` object of `/stats`.
pub fn status_json() -> serde_json::Value {
    let Some(link) = link() else {
        return serde_json::json!({});
    };
    let last = link.health.last_error.lock().clone();
    serde_json::json!({
        "redis": {
            "url": crate::config::redact_url(link.config.url.get_ref()),
            "state": if link.is_up() { "up" } else { "down" },
            "errors": link.health.errors.load(Ordering::Relaxed),
            "last_error": last.as_ref().map(|(e, _)| e.as_str()),
            "last_error_age_s": last.as_ref().map(|(_, t)| t.elapsed().as_secs()),
            "kv_backend": link.kv.backend,
            "purge_fanout": link.config.purge,
            "purge_subscribed": link.health.subscribed.load(Ordering::Relaxed),
        }
    })
}
