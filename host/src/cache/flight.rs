//! Request coalescing: while one request of a URL is at the origin (a miss
//! or a revalidation), the others wait for it instead of asking too.
//!
//! A flight is a `watch` channel whose sender lives in the leader's
//! [`FlightGuard`]. The guard is dropped when the leader is done, however
//! it ends (stored, not storable, failed, the client went away): that
//! removes the flight and wakes every follower, which then looks in the
//! store again and, finding nothing usable, asks the origin itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

/// The flights in progress, by primary key.
#[derive(Default)]
pub struct Flights {
    open: Mutex<HashMap<Arc<str>, watch::Receiver<()>>>,
}

/// The leader's side of a flight; dropping it ends the flight.
pub struct FlightGuard {
    flights: Arc<Flights>,
    key: Arc<str>,
    _done: watch::Sender<()>,
}

/// What joining a flight made of this request.
pub enum Join {
    /// No flight was in progress: this request goes to the origin.
    Leader(FlightGuard),
    /// Another request is at the origin: wait for it.
    Follower(Follower),
}

/// A request waiting for another's flight.
pub struct Follower(watch::Receiver<()>);

impl Flights {
    /// Lead a new flight for `key`, or follow the one in progress.
    pub fn join(self: &Arc<Self>, key: &Arc<str>) -> Join {
        let mut open = self.open.lock();
        if let Some(rx) = open.get(key) {
            return Join::Follower(Follower(rx.clone()));
        }
        let (tx, rx) = watch::channel(());
        open.insert(key.clone(), rx);
        Join::Leader(FlightGuard {
            flights: self.clone(),
            key: key.clone(),
            _done: tx,
        })
    }

    /// Lead a flight only if none is in progress (background refreshes).
    pub fn try_lead(self: &Arc<Self>, key: &Arc<str>) -> Option<FlightGuard> {
        match self.join(key) {
            Join::Leader(g) => Some(g),
            Join::Follower(_) => None,
        }
    }

    /// Flights in progress.
    pub fn len(&self) -> usize {
        self.open.lock().len()
    }

    /// No flight in progress?
    pub fn is_empty(&self) -> bool {
        self.open.lock().is_empty()
    }
}

impl Follower {
    /// Wait until the leader is done, at most `limit`. True if it finished
    /// in time.
    pub async fn wait(mut self, limit: Duration) -> bool {
        // `changed` errs once the sender is dropped: that is the signal.
        tokio::time::timeout(limit, async { while self.0.changed().await.is_ok() {} })
            .await
            .is_ok()
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        // The sender drops right after this, waking the followers, which
        // then find the flight gone and the store updated.
        self.flights.open.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_wake_when_the_leader_is_done() {
        let flights = Arc::new(Flights::default());
        let key: Arc<str> = Arc::from("k");
        let Join::Leader(guard) = flights.join(&key) else {
            panic!("first is leader")
        };
        let Join::Follower(f) = flights.join(&key) else {
            panic!("second follows")
        };
        assert!(flights.try_lead(&key).is_none());
        let waiter = tokio::spawn(f.wait(Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(guard);
        assert!(waiter.await.unwrap());
        assert_eq!(flights.len(), 0);
        assert!(flights.try_lead(&key).is_some());
    }

    #[tokio::test]
    async fn a_follower_gives_up_after_its_limit() {
        let flights = Arc::new(Flights::default());
        let key: Arc<str> = Arc::from("k");
        let _guard = flights.try_lead(&key).unwrap();
        let Join::Follower(f) = flights.join(&key) else {
            panic!("follows")
        };
        assert!(!f.wait(Duration::from_millis(30)).await);
    }
}
