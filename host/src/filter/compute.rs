//! Keeping one tenant's filter from starving the others.
//!
//! A filter call starts on the worker that owns the connection, as a plain
//! synchronous call: that is the cheapest way to run the microsecond calls
//! almost every filter makes. The epoch ticker (every
//! [`EPOCH_TICK`](super::engine::EPOCH_TICK)) is how the host notices a call
//! that computes for longer: a synchronous call that sees two ticks has run
//! for more than a tick, and its version is marked *slow*. From then on its
//! calls run as wasmtime async calls on the **compute pool**, a few threads
//! of their own, where every tick makes the guest yield, so calls of slow
//! filters share the pool's threads in slices of at most one tick and never
//! hold a worker. A slow version whose calls turn cheap again (256 in a row
//! under a quarter of a tick) goes back to the worker.
//!
//! The CPU deadline (`timeout_ms`) counts the filter's own execution: on
//! the worker, ticks seen during the call (the call blocks the thread, so
//! wall time is its time); on the pool, the thread CPU time spent inside
//! the call's polls ([`Metered`]), so time spent yielded or waiting for a
//! thread does not count.
//!
//! Each filter also has a CPU share ([`CpuShare`], `max_cpu_percent`): a
//! token bucket of CPU time refilled at that share of the workers'
//! capacity and debited by every call's time. A call that arrives while the
//! bucket is in debt waits (without holding anything) until the debt is
//! repaid, up to `cpu_queue_ms`; past that it is shed by the filter's
//! failure policy.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The CPU time of the calling thread, nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// How the call in progress runs, for the epoch callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A synchronous call on the worker (or a start-up call).
    Sync,
    /// An async call on the compute pool.
    Async,
}

/// Per-store accounting of the call in progress, read by the epoch
/// callback and written by [`Metered`] (which polls the call without
/// access to the store). One store makes one call at a time, so the
/// atomics are never contended; they are atomics because the call may be
/// polled on another thread than the one that set it up.
#[derive(Debug, Clone)]
pub struct CallMeter {
    inner: Arc<MeterInner>,
    /// The version's *slow* flag (shared by all its instances).
    pub slow: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct MeterInner {
    async_mode: AtomicBool,
    /// Sync: ticks seen so far, and the tick count that ends the call.
    ticks: AtomicU64,
    deadline_ticks: AtomicU64,
    /// Async: CPU spent in finished polls, the thread's CPU clock when the
    /// current poll began (0 between polls), and the CPU deadline.
    spent_ns: AtomicU64,
    poll_start_ns: AtomicU64,
    deadline_ns: AtomicU64,
}

/// What the epoch callback should do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Past the deadline: interrupt the guest (a timeout).
    Interrupt,
    /// Go on for one more tick.
    Continue,
    /// Yield to the executor, then go on for one more tick.
    Yield,
}

impl CallMeter {
    /// A meter for a store of the version whose slow flag is `slow`.
    pub fn new(slow: Arc<AtomicBool>) -> CallMeter {
        CallMeter {
            inner: Arc::default(),
            slow,
        }
    }

    /// A synchronous call begins, ending after `deadline_ticks` ticks.
    pub fn start_sync(&self, deadline_ticks: u64) {
        let m = &self.inner;
        m.async_mode.store(false, Ordering::Relaxed);
        m.ticks.store(0, Ordering::Relaxed);
        m.deadline_ticks.store(deadline_ticks, Ordering::Relaxed);
    }

    /// An async call begins, ending after `deadline` of its own CPU time.
    pub fn start_async(&self, deadline: Duration) {
        let m = &self.inner;
        m.async_mode.store(true, Ordering::Relaxed);
        m.spent_ns.store(0, Ordering::Relaxed);
        m.poll_start_ns.store(0, Ordering::Relaxed);
        m.deadline_ns
            .store(deadline.as_nanos() as u64, Ordering::Relaxed);
    }

    /// CPU the async call has used so far (finished polls plus the
    /// current one).
    pub fn spent(&self) -> Duration {
        let m = &self.inner;
        let mut ns = m.spent_ns.load(Ordering::Relaxed);
        let start = m.poll_start_ns.load(Ordering::Relaxed);
        if start != 0 {
            ns += thread_cpu_ns().saturating_sub(start);
        }
        Duration::from_nanos(ns)
    }

    /// The epoch ticked while the guest ran: decide.
    pub fn on_tick(&self) -> Verdict {
        let m = &self.inner;
        if m.async_mode.load(Ordering::Relaxed) {
            if self.spent().as_nanos() as u64 >= m.deadline_ns.load(Ordering::Relaxed) {
                return Verdict::Interrupt;
            }
            return Verdict::Yield;
        }
        let ticks = m.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        if ticks >= m.deadline_ticks.load(Ordering::Relaxed) {
            return Verdict::Interrupt;
        }
        // Two ticks: the call has run for more than a whole tick on the
        // worker. Its next calls go to the compute pool.
        if ticks == 2 {
            self.slow.store(true, Ordering::Relaxed);
        }
        Verdict::Continue
    }

    fn poll_begins(&self) {
        self.inner
            .poll_start_ns
            .store(thread_cpu_ns().max(1), Ordering::Relaxed);
    }

    fn poll_ends(&self) {
        let m = &self.inner;
        let start = m.poll_start_ns.swap(0, Ordering::Relaxed);
        if start != 0 {
            m.spent_ns
                .fetch_add(thread_cpu_ns().saturating_sub(start), Ordering::Relaxed);
        }
    }
}

/// A call's future, with the CPU of each poll added to its meter.
pub struct Metered<F> {
    inner: Pin<Box<F>>,
    meter: CallMeter,
}

impl<F: Future> Metered<F> {
    /// Meter `inner` into `meter`.
    pub fn new(inner: F, meter: CallMeter) -> Metered<F> {
        Metered {
            inner: Box::pin(inner),
            meter,
        }
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.meter.poll_begins();
        let out = self.inner.as_mut().poll(cx);
        self.meter.poll_ends();
        out
    }
}

/// The threads that run slow filters' calls.
pub struct ComputePool {
    runtime: Option<tokio::runtime::Runtime>,
}

impl ComputePool {
    /// Start `threads` compute threads.
    pub fn new(threads: usize) -> anyhow::Result<ComputePool> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("sluicegate-filter-compute")
            // Below the workers' priority (nice +10, this thread only, as
            // Linux applies it per thread): when both compete for a core,
            // the kernel gives plain requests the workers' time first.
            // Best effort: a failure leaves the thread at the default.
            .on_thread_start(|| {
                let tid = rustix::thread::gettid();
                if let Err(e) = rustix::process::setpriority_process(Some(tid), 10) {
                    tracing::debug!(error = %e, "cannot lower the compute thread's priority");
                }
            })
            .enable_time()
            .build()?;
        Ok(ComputePool {
            runtime: Some(runtime),
        })
    }

    /// Run `fut` on the pool.
    pub fn spawn<F>(&self, fut: F) -> Option<tokio::task::JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.as_ref().map(|rt| rt.spawn(fut))
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        // Dropping a runtime from inside another one panics; calls still
        // running are cut off (their instances are discarded with them).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Counts a slow version's cheap calls, to send it back to the worker.
#[derive(Debug, Default)]
pub struct Demotion(AtomicU32);

/// Cheap async calls in a row that make a slow version fast again.
const DEMOTE_AFTER: u32 = 256;

impl Demotion {
    /// An async call used `spent`; true when the version should be fast
    /// again.
    pub fn record(&self, spent: Duration) -> bool {
        if spent < super::engine::EPOCH_TICK / 4 {
            let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= DEMOTE_AFTER {
                self.0.store(0, Ordering::Relaxed);
                return true;
            }
        } else {
            self.0.store(0, Ordering::Relaxed);
        }
        false
    }
}

/// A filter's CPU share: a token bucket of CPU time.
#[derive(Debug)]
pub struct CpuShare {
    state: Mutex<Bucket>,
    /// CPU used by every call, nanoseconds (for `/filters`).
    pub used_ns: AtomicU64,
    /// Calls shed for being over the share.
    pub shed: AtomicU64,
    shed_metric: metrics::Counter,
}

#[derive(Debug)]
struct Bucket {
    /// Nanoseconds of CPU the filter may still use (negative: in debt).
    balance: i64,
    refilled: Instant,
    /// Refill, nanoseconds of CPU per second of wall time.
    rate: f64,
}

/// How much CPU a filter may bank while idle: this much wall time's worth.
const BURST: Duration = Duration::from_millis(100);

impl CpuShare {
    /// A bucket for the filter `name`, full.
    pub fn new(name: &str) -> CpuShare {
        CpuShare {
            state: Mutex::new(Bucket {
                balance: 0,
                refilled: Instant::now(),
                rate: f64::INFINITY,
            }),
            used_ns: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            shed_metric: metrics::counter!("sluicegate_filter_shed_total", "filter" => name.to_string()),
        }
    }

    /// Set the share: `percent` of `workers` threads' CPU.
    pub fn set_limit(&self, percent: f64, workers: usize) {
        let rate = if percent >= 100.0 {
            f64::INFINITY
        } else {
            percent / 100.0 * workers.max(1) as f64 * 1e9
        };
        let mut b = self.state.lock();
        if b.rate != rate {
            b.rate = rate;
            b.balance = (rate * BURST.as_secs_f64()).min(i64::MAX as f64) as i64;
        }
    }

    /// May a call start now? `None`: yes. `Some(wait)`: the bucket is in
    /// debt and will be out of it after `wait`.
    pub fn debt(&self, now: Instant) -> Option<Duration> {
        let mut b = self.state.lock();
        if b.rate.is_infinite() {
            return None;
        }
        let cap = (b.rate * BURST.as_secs_f64()) as i64;
        let gained = (now.saturating_duration_since(b.refilled).as_secs_f64() * b.rate) as i64;
        b.balance = b.balance.saturating_add(gained).min(cap);
        b.refilled = now;
        if b.balance >= 0 {
            return None;
        }
        Some(Duration::from_secs_f64(-(b.balance as f64) / b.rate))
    }

    /// Wait (up to `max_wait`) until a call may start; false when it may
    /// not within that: the call is shed (counted).
    pub async fn admit(&self, max_wait: Duration) -> bool {
        let mut waited = Duration::ZERO;
        while let Some(wait) = self.debt(Instant::now()) {
            // Wake a little after the debt is repaid, and at least every
            // 50 ms to re-check (other calls may have charged meanwhile).
            let step = (wait + Duration::from_micros(100)).min(Duration::from_millis(50));
            if waited + step > max_wait {
                self.shed.fetch_add(1, Ordering::Relaxed);
                self.shed_metric.increment(1);
                return false;
            }
            tokio::time::sleep(step).await;
            waited += step;
        }
        true
    }

    /// A call used `cpu`.
    pub fn charge(&self, cpu: Duration) {
        let ns = cpu.as_nanos().min(i64::MAX as u128) as i64;
        self.used_ns.fetch_add(ns as u64, Ordering::Relaxed);
        let mut b = self.state.lock();
        if !b.rate.is_infinite() {
            b.balance = b.balance.saturating_sub(ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_in_debt_says_how_long_until_it_is_repaid() {
        let share = CpuShare::new("t");
        share.set_limit(10.0, 1); // 100 ms of CPU per second, 10 ms banked
        let t0 = Instant::now();
        assert_eq!(share.debt(t0), None);
        share.charge(Duration::from_millis(30));
        let wait = share.debt(t0).expect("20 ms in debt");
        assert!(
            wait > Duration::from_millis(190) && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        // 300 ms later, 30 ms were refilled: back above zero.
        assert_eq!(share.debt(t0 + Duration::from_millis(300)), None);
    }

    #[tokio::test]
    async fn a_call_waits_for_the_share_or_is_shed() {
        let share = CpuShare::new("t");
        share.set_limit(10.0, 1);
        share.charge(Duration::from_millis(12)); // 2 ms in debt: 20 ms to repay
        assert!(!share.admit(Duration::from_millis(5)).await, "shed");
        assert_eq!(share.shed.load(Ordering::Relaxed), 1);
        assert!(
            share.admit(Duration::from_millis(500)).await,
            "queued, then admitted"
        );
    }

    #[test]
    fn a_full_share_never_sheds() {
        let share = CpuShare::new("t");
        share.set_limit(100.0, 2);
        share.charge(Duration::from_secs(10));
        assert_eq!(share.debt(Instant::now()), None);
    }

    #[test]
    fn two_ticks_on_the_worker_mark_the_version_slow() {
        let meter = CallMeter::new(Arc::default());
        meter.start_sync(5);
        assert_eq!(meter.on_tick(), Verdict::Continue);
        assert!(!meter.slow.load(Ordering::Relaxed));
        assert_eq!(meter.on_tick(), Verdict::Continue);
        assert!(meter.slow.load(Ordering::Relaxed));
        assert_eq!(meter.on_tick(), Verdict::Continue);
        assert_eq!(meter.on_tick(), Verdict::Continue);
        assert_eq!(meter.on_tick(), Verdict::Interrupt);
    }

    #[test]
    fn an_async_call_counts_only_its_own_cpu() {
        let meter = CallMeter::new(Arc::default());
        meter.start_async(Duration::from_secs(3600));
        assert_eq!(meter.on_tick(), Verdict::Yield);
        meter.start_async(Duration::ZERO);
        assert_eq!(meter.on_tick(), Verdict::Interrupt);
    }
}
