//! Live counters for the admin API's `/stats` and the HTML status page
//! served at `/` (a static page whose script reads `/stats`, `/filters` and
//! `/upstreams`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Responses by status class (1xx..5xx), since start.
static RESPONSES: [AtomicU64; 5] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];

/// When the process started serving.
static STARTED: OnceLock<Instant> = OnceLock::new();

/// Mark the start time (for `uptime_s`).
pub fn mark_start() {
    let _ = STARTED.set(Instant::now());
}

/// Count one response of class `class` (0 = 1xx .. 4 = 5xx).
pub fn count_response(class: usize) {
    if let Some(c) = RESPONSES.get(class) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Responses by class (1xx..5xx) since start.
pub fn responses() -> [u64; 5] {
    std::array::from_fn(|i| RESPONSES[i].load(Ordering::Relaxed))
}

/// The counters as JSON: uptime, open connections, responses by class.
pub fn stats_json(open_connections: usize, ready: bool) -> serde_json::Value {
    let by_class: Vec<u64> = RESPONSES
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    serde_json::json!({
        "uptime_s": STARTED.get().map_or(0, |s| s.elapsed().as_secs()),
        "ready": ready,
        "open_connections": open_connections,
        "requests": by_class.iter().sum::<u64>(),
        "responses": {
            "1xx": by_class[0], "2xx": by_class[1], "3xx": by_class[2],
            "4xx": by_class[3], "5xx": by_class[4],
        },
        "version": env!("CARGO_PKG_VERSION"),
    })
}

/// The status page: static HTML and a small script that fills it in from
/// the JSON endpoints every two seconds. With an admin token, open it as
/// `/#token=TOKEN` (the fragment never leaves the browser).
pub const PAGE: &str = include_str!("status.html");
