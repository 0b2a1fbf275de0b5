//! The status page's charts: every [`INTERVAL`] a sample of the traffic
//! (requests and 5xx per second, p50/p99 latency, each filter's mean call
//! time) is taken from the counters and histograms the proxy keeps anyway,
//! and the last [`SAMPLES`] are served as `/series` for the page to draw.
//!
//! The request path does nothing for it: a task on the main thread reads
//! the atomics every two seconds.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;

use crate::hist::{self, Totals, BOUNDS};

/// How often a sample is taken.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Samples kept: five minutes.
pub const SAMPLES: usize = 150;

/// One interval's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    /// End of the interval, ms since the Unix epoch.
    pub t: u64,
    /// Responses per second.
    pub rps: f64,
    /// 5xx responses per second.
    pub errors_per_s: f64,
    /// Median request latency in ms (none without requests).
    pub p50_ms: Option<f64>,
    /// 99th percentile request latency in ms.
    pub p99_ms: Option<f64>,
    /// Mean call time in ms of each filter called in the interval.
    pub filter_ms: BTreeMap<String, f64>,
}

/// What the counters said at the last sample.
#[derive(Default)]
struct Reading {
    responses: [u64; 5],
    latency: Totals,
    filters: BTreeMap<String, Totals>,
}

impl Reading {
    fn now() -> Reading {
        let mut latency = Totals::default();
        for (_, t) in hist::totals("sluicegate_request_seconds") {
            add(&mut latency, &t);
        }
        Reading {
            responses: crate::status::responses(),
            latency,
            filters: hist::totals("sluicegate_filter_call_seconds")
                .into_iter()
                .collect(),
        }
    }

    /// The figures between `self` (earlier) and `now`, over `secs`.
    fn since(&self, now: &Reading, secs: f64, t: u64) -> Sample {
        let total = |r: &[u64; 5]| r.iter().sum::<u64>();
        let requests = total(&now.responses).saturating_sub(total(&self.responses));
        let errors = now.responses[4].saturating_sub(self.responses[4]);
        let delta = minus(&now.latency, &self.latency);
        let mut filter_ms = BTreeMap::new();
        for (name, t) in &now.filters {
            let d = match self.filters.get(name) {
                Some(before) => minus(t, before),
                None => t.clone(),
            };
            if d.count > 0 {
                filter_ms.insert(name.clone(), round(d.sum_ns as f64 / d.count as f64 / 1e6));
            }
        }
        Sample {
            t,
            rps: round(requests as f64 / secs),
            errors_per_s: round(errors as f64 / secs),
            p50_ms: quantile(&delta, 0.5).map(|s| round(s * 1e3)),
            p99_ms: quantile(&delta, 0.99).map(|s| round(s * 1e3)),
            filter_ms,
        }
    }
}

fn add(into: &mut Totals, t: &Totals) {
    for (a, b) in into.buckets.iter_mut().zip(&t.buckets) {
        *a += b;
    }
    into.count += t.count;
    into.sum_ns += t.sum_ns;
}

fn minus(a: &Totals, b: &Totals) -> Totals {
    let mut d = Totals::default();
    for (i, slot) in d.buckets.iter_mut().enumerate() {
        *slot = a.buckets[i].saturating_sub(b.buckets[i]);
    }
    d.count = a.count.saturating_sub(b.count);
    d.sum_ns = a.sum_ns.saturating_sub(b.sum_ns);
    d
}

/// Three significant decimals are plenty for a chart.
fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The `q` quantile in seconds, interpolated inside its bucket as
/// Prometheus' `histogram_quantile` does (past the last bound: that bound).
pub fn quantile(t: &Totals, q: f64) -> Option<f64> {
    let total: u64 = t.buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &n) in t.buckets.iter().enumerate() {
        if n > 0 && (seen + n) as f64 >= rank {
            let Some(&upper) = BOUNDS.get(i) else {
                return BOUNDS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { BOUNDS[i - 1] };
            let within = (rank - seen as f64) / n as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        seen += n;
    }
    BOUNDS.last().copied()
}

struct Ring {
    last: Option<(std::time::Instant, Reading)>,
    samples: VecDeque<Sample>,
}

static RING: Mutex<Ring> = parking_lot::const_mutex(Ring {
    last: None,
    samples: VecDeque::new(),
});

/// Take one sample (the first call only reads the counters).
pub fn sample() {
    let now = Reading::now();
    let at = std::time::Instant::now();
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut ring = RING.lock();
    if let Some((then, before)) = &ring.last {
        let secs = at.duration_since(*then).as_secs_f64().max(1e-3);
        let s = before.since(&now, secs, t);
        if ring.samples.len() == SAMPLES {
            ring.samples.pop_front();
        }
        ring.samples.push_back(s);
    }
    ring.last = Some((at, now));
}

/// Sample every [`INTERVAL`], forever (a task on the main runtime).
pub async fn run() {
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tick.tick().await;
        sample();
    }
}

/// `/series`: the samples, oldest first.
pub fn json() -> serde_json::Value {
    let ring = RING.lock();
    serde_json::json!({
        "interval_s": INTERVAL.as_secs(),
        "samples": ring.samples.iter().collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(buckets: &[(usize, u64)]) -> Totals {
        let mut t = Totals::default();
        for &(i, n) in buckets {
            t.buckets[i] = n;
            t.count += n;
        }
        t
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        assert_eq!(quantile(&Totals::default(), 0.5), None);
        // 100 samples between 100 us and 500 us: the median halfway.
        let t = with(&[(3, 100)]);
        let p50 = quantile(&t, 0.5).unwrap();
        assert!((p50 - 0.0003).abs() < 1e-9, "{p50}");
        // 99 fast ones and one past every bound.
        let t = with(&[(0, 99), (12, 1)]);
        assert!(quantile(&t, 0.5).unwrap() <= 0.00001);
        assert_eq!(quantile(&t, 0.999), Some(5.0));
    }

    #[test]
    fn a_sample_is_the_difference_over_the_interval() {
        let before = Reading {
            responses: [0, 10, 0, 0, 2],
            latency: with(&[(4, 10)]),
            filters: [(
                "f".to_string(),
                Totals {
                    count: 4,
                    sum_ns: 4_000_000,
                    ..Default::default()
                },
            )]
            .into_iter()
            .collect(),
        };
        let now = Reading {
            responses: [0, 30, 0, 0, 6],
            latency: with(&[(4, 34)]),
            filters: [
                (
                    "f".to_string(),
                    Totals {
                        count: 8,
                        sum_ns: 12_000_000,
                        ..Default::default()
                    },
                ),
                ("idle".to_string(), Totals::default()),
            ]
            .into_iter()
            .collect(),
        };
        let s = before.since(&now, 2.0, 7);
        assert_eq!(s.rps, 12.0);
        assert_eq!(s.errors_per_s, 2.0);
        // Bucket 4 is 0.5 ms .. 1 ms.
        assert!(s.p50_ms.unwrap() > 0.5 && s.p50_ms.unwrap() <= 1.0, "{s:?}");
        assert_eq!(s.filter_ms.get("f"), Some(&2.0));
        assert!(!s.filter_ms.contains_key("idle"));
    }
}
