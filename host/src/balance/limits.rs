//! Per-upstream circuit breakers: a cap on requests in flight with a short
//! bounded queue in front of it (`[upstream.limits]`), and a retry budget
//! (`[upstream.retry_budget]`). Both are shared by every worker and kept
//! across config reloads while their settings stay the same, so a reload
//! neither forgets the requests in flight nor lets a burst through.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{RetryBudgetConfig, UpstreamLimits};

/// Why a request was refused before it reached an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// `max_connections` busy and `max_pending` already waiting.
    Pending,
    /// Waited `pending_timeout_ms` without a slot freeing up.
    Timeout,
}

impl Overflow {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Overflow::Pending => "max_pending",
            Overflow::Timeout => "pending_timeout",
        }
    }
}

/// `max_connections` slots with a queue of at most `max_pending` waiters.
#[derive(Debug)]
pub struct Admission {
    /// The settings this was built from (to keep it across equal reloads).
    pub config: UpstreamLimits,
    slots: Arc<Semaphore>,
    max: usize,
    pending: AtomicUsize,
    refused: AtomicU64,
}

/// Holds one slot until dropped (the proxy keeps it with the response body).
pub type Slot = OwnedSemaphorePermit;

impl Admission {
    /// Slots for `config.max_connections`, or `None` when unlimited.
    pub fn new(config: &UpstreamLimits) -> Option<Admission> {
        let max = config.max_connections?;
        Some(Admission {
            config: config.clone(),
            slots: Arc::new(Semaphore::new(max)),
            max,
            pending: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// A slot now, or after waiting in the queue; `Err` when the queue is
    /// full or the wait timed out.
    pub async fn admit(&self) -> Result<Slot, Overflow> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(slot);
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.config.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Overflow::Pending);
        }
        // Leaves the queue however the wait ends (the client may go away).
        let _queued = Queued(&self.pending);
        let wait = Duration::from_millis(self.config.pending_timeout_ms);
        match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(Overflow::Timeout)
            }
        }
    }

    /// (in use, waiting, refused so far) for the admin API.
    pub fn stats(&self) -> (usize, usize, u64) {
        (
            self.max - self.slots.available_permits().min(self.max),
            self.pending.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Retries in flight may be at most `percent` of the upstream's active
/// requests, and `min_concurrent` are always allowed.
#[derive(Debug)]
pub struct RetryBudget {
    /// The settings this was built from.
    pub config: RetryBudgetConfig,
    active: Arc<AtomicU64>,
    exhausted: AtomicU64,
}

/// One retry counted against the budget until dropped.
#[derive(Debug)]
pub struct RetryTicket(Arc<AtomicU64>);

impl Drop for RetryTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RetryBudget {
    /// A budget with nothing spent.
    pub fn new(config: &RetryBudgetConfig) -> RetryBudget {
        RetryBudget {
            config: config.clone(),
            active: Arc::default(),
            exhausted: AtomicU64::new(0),
        }
    }

    /// May one more retry start while `active_requests` are in flight on
    /// the upstream? The ticket counts it until the retried attempt ends.
    pub fn try_retry(&self, active_requests: u64) -> Option<RetryTicket> {
        let share = (self.config.percent / 100.0 * active_requests as f64) as u64;
        let allowed = share.max(self.config.min_concurrent as u64);
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        if before >= allowed {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.exhausted.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(RetryTicket(self.active.clone()))
    }

    /// (retries in flight, retries refused so far) for the admin API.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.active.load(Ordering::Relaxed),
            self.exhausted.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_then_a_bounded_queue_then_refusal() {
        let a = Admission::new(&UpstreamLimits {
            max_connections: Some(1),
            max_pending: 1,
            pending_timeout_ms: 50,
        })
        .unwrap();
        let first = a.admit().await.unwrap();
        assert_eq!(a.stats().0, 1);
        // The queue holds one waiter; a second is refused at once.
        let (waiter, refused) = tokio::join!(a.admit(), async {
            tokio::task::yield_now().await;
            a.admit().await
        });
        assert_eq!(waiter.unwrap_err(), Overflow::Timeout);
        assert_eq!(refused.unwrap_err(), Overflow::Pending);
        drop(first);
        assert!(a.admit().await.is_ok(), "a freed slot is reused");
        assert_eq!(a.stats(), (0, 0, 2));
    }

    #[test]
    fn retry_budget_is_a_share_with_a_floor() {
        let b = RetryBudget::new(&RetryBudgetConfig {
            percent: 20.0,
            min_concurrent: 1,
        });
        let t1 = b.try_retry(0).expect("the floor allows one");
        assert!(b.try_retry(0).is_none());
        let t2 = b.try_retry(10).expect("20% of 10 is 2");
        assert!(b.try_retry(10).is_none());
        drop((t1, t2));
        assert_eq!(b.stats(), (0, 2));
    }
}
