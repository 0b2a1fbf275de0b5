//! A periodic timer looked at from a read that would block: the idle
//! timeout of a client connection and the keep-alive parking check.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Fires every `period`, re-armed from when it is seen to fire (ticks that
/// fall due while the worker is busy count once). Looked at on every read
/// that would block, so it is polled (which re-registers the task's waker,
/// most of the cost) only when it has fired or the task changed.
pub struct Ticker {
    sleep: Pin<Box<Sleep>>,
    period: Duration,
    /// The waker `sleep` was last polled with; `None` until then.
    registered: Option<Waker>,
}

impl Ticker {
    /// A ticker whose first tick is `period` from now.
    pub fn new(period: Duration) -> Ticker {
        Ticker {
            sleep: Box::pin(tokio::time::sleep(period)),
            period,
            registered: None,
        }
    }

    /// Run `on_tick` for each tick that has fired, re-arming after each,
    /// until it returns `true` (then `true`, and the ticker is left fired).
    /// `false` once the ticker waits, registered with this task's waker.
    pub fn poll_ticks(&mut self, cx: &mut Context<'_>, mut on_tick: impl FnMut() -> bool) -> bool {
        if let Some(w) = &self.registered {
            if w.will_wake(cx.waker()) && !self.sleep.is_elapsed() {
                return false;
            }
        }
        while self.sleep.as_mut().poll(cx).is_ready() {
            if on_tick() {
                return true;
            }
            self.sleep.as_mut().reset(Instant::now() + self.period);
        }
        self.registered = Some(cx.waker().clone());
        false
    }
}
