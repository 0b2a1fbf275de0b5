//! Per-filter counters (for the admin API and Prometheus) and quarantine:
//! a filter that keeps failing is benched for a while instead of called.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::instance::FilterFailure;

/// Consecutive failures that put a filter in quarantine.
pub const QUARANTINE_AFTER: u32 = 5;
/// How long the first quarantine lasts; it doubles on each relapse, to 60 s.
const QUARANTINE_BASE: Duration = Duration::from_secs(2);

/// Counters of one filter name (all its versions).
pub struct FilterStats {
    name: String,
    /// Calls made, every phase.
    pub calls: AtomicU64,
    /// Calls cut at the CPU deadline.
    pub timeouts: AtomicU64,
    /// Calls that trapped (memory cap included).
    pub traps: AtomicU64,
    /// Calls that hit the memory cap.
    pub oom: AtomicU64,
    /// Invalid actions returned.
    pub invalid: AtomicU64,
    consecutive: AtomicU32,
    /// Quarantined until this many ms after `epoch` (0 = never).
    quarantine_until_ms: AtomicU64,
    relapses: AtomicU32,
    epoch: Instant,
    /// The last failure, for the admin API.
    pub last_error: Mutex<Option<String>>,
    latency: std::sync::Arc<crate::hist::Histogram>,
    calls_metric: metrics::Counter,
    /// The filter's CPU share (see `compute`).
    pub cpu: super::compute::CpuShare,
}

impl std::fmt::Debug for FilterStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterStats")
            .field("name", &self.name)
            .finish()
    }
}

impl FilterStats {
    /// Counters for the filter `name`.
    pub fn new(name: &str) -> FilterStats {
        FilterStats {
            name: name.to_string(),
            calls: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            traps: AtomicU64::new(0),
            oom: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            quarantine_until_ms: AtomicU64::new(0),
            relapses: AtomicU32::new(0),
            epoch: Instant::now(),
            last_error: Mutex::new(None),
            latency: crate::hist::histogram("sluicegate_filter_call_seconds", "filter", name),
            calls_metric: metrics::counter!("sluicegate_filter_calls_total", "filter" => name.to_string()),
            cpu: super::compute::CpuShare::new(name),
        }
    }

    /// One call finished (successfully or not) after `took`.
    pub fn record_call(&self, _phase: &str, took: Duration) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.calls_metric.increment(1);
        self.latency.record(took);
    }

    /// A call succeeded: the failure streak ends.
    pub fn record_success(&self) {
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
    }

    /// A call failed; quarantine the filter if it keeps failing.
    pub fn record_failure(&self, failure: &FilterFailure) {
        let (counter, kind) = match failure {
            FilterFailure::Timeout(_) => (&self.timeouts, "timeout"),
            FilterFailure::OutOfMemory(_) => (&self.oom, "oom"),
            FilterFailure::Invalid(_) => (&self.invalid, "invalid"),
            FilterFailure::Quarantined | FilterFailure::Missing | FilterFailure::Overloaded => {
                return
            }
            FilterFailure::Trap(_) | FilterFailure::Instantiate(_) => (&self.traps, "trap"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("sluicegate_filter_failures_total", "filter" => self.name.clone(), "kind" => kind).increment(1);
        *self.last_error.lock() = Some(failure.to_string());
        let streak = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if streak >= QUARANTINE_AFTER {
            let relapses = self.relapses.fetch_add(1, Ordering::Relaxed);
            let backoff = QUARANTINE_BASE
                .saturating_mul(1 << relapses.min(5))
                .min(Duration::from_secs(60));
            let until = self.epoch.elapsed() + backoff;
            self.quarantine_until_ms
                .store(until.as_millis() as u64, Ordering::Relaxed);
            self.consecutive.store(0, Ordering::Relaxed);
            tracing::error!(filter = %self.name, seconds = backoff.as_secs(), "filter quarantined after {streak} consecutive failures");
        }
    }

    /// True while the filter is benched.
    pub fn quarantined(&self) -> bool {
        let until = self.quarantine_until_ms.load(Ordering::Relaxed);
        until != 0 && until > self.epoch.elapsed().as_millis() as u64
    }
}
