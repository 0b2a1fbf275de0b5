//! Latency histograms of the request path, with fixed buckets and atomic
//! counters, rendered into `/metrics` after the Prometheus exporter's own
//! text.
//!
//! `metrics-exporter-prometheus` serves every other metric. Its histograms
//! keep each raw sample (value and an `Instant`, so a clock read per sample)
//! in a lock-free list under an epoch guard until the 5 s upkeep folds them
//! into buckets. With two histograms per request (three or more with
//! filters) that cost about 300 instructions per sample on the worker,
//! held up to 5 s of samples (megabytes at load) and made the upkeep fold
//! hundreds of thousands of samples on the main thread. Here a sample is a
//! bucket search and three relaxed atomic adds, and memory is fixed.
//!
//! The text is what the exporter wrote for the same series: the same
//! names, labels and buckets, so dashboards and alerts do not change.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;

/// Upper bounds of the latency buckets, in seconds: these histograms and
/// any the exporter keeps (`app::metrics_handle`) use the same ones.
pub const BOUNDS: [f64; 12] = [
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];
/// The same bounds in nanoseconds, for the search.
const BOUNDS_NS: [u64; BOUNDS.len()] = {
    let mut ns = [0; BOUNDS.len()];
    let mut i = 0;
    while i < BOUNDS.len() {
        ns[i] = (BOUNDS[i] * 1e9 + 0.5) as u64;
        i += 1;
    }
    ns
};

/// One series: a metric name and one label.
#[derive(Debug)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is past every bound.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Count one observation.
    pub fn record(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn new() -> Histogram {
        Histogram {
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// Every series, by metric name, then label name and value. Series live as
/// long as the process (as the exporter's did): a route or filter removed
/// by a reload keeps its last figures.
type Registry = BTreeMap<&'static str, BTreeMap<(&'static str, String), Arc<Histogram>>>;

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

/// The series `name{label="value"}`, made on first use. Called when a
/// snapshot or filter is built, not per request.
pub fn histogram(name: &'static str, label: &'static str, value: &str) -> Arc<Histogram> {
    let mut reg = registry().lock();
    reg.entry(name)
        .or_default()
        .entry((label, value.to_string()))
        .or_insert_with(|| Arc::new(Histogram::new()))
        .clone()
}

/// Append every series in the Prometheus text format.
pub fn render(out: &mut String) {
    let reg = registry().lock();
    for (name, series) in reg.iter() {
        let _ = writeln!(out, "# TYPE {name} histogram");
        for ((label, value), h) in series {
            let value = escape(value);
            let mut cumulative = 0;
            for (i, bound) in BOUNDS.iter().enumerate() {
                cumulative += h.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{label}=\"{value}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            // Read after the buckets: `+Inf` and `_count` never fall below
            // the last bucket while samples keep arriving.
            let count = h.count.load(Ordering::Relaxed).max(cumulative);
            let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(out, "{name}_sum{{{label}=\"{value}\"}} {sum}");
            let _ = writeln!(out, "{name}_count{{{label}=\"{value}\"}} {count}");
        }
        out.push('\n');
    }
}

/// What one series has counted so far: per bucket (not cumulative; the
/// last is past every bound), the count and the sum.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Per bucket, as [`BOUNDS`] plus one past them.
    pub buckets: [u64; BOUNDS.len() + 1],
    /// Observations.
    pub count: u64,
    /// Their sum, in nanoseconds.
    pub sum_ns: u64,
}

/// The totals of every series of `name`, by label value (for the status
/// page's charts; a lock and a copy per series, off the request path).
pub fn totals(name: &str) -> Vec<(String, Totals)> {
    let reg = registry().lock();
    let Some(series) = reg.get(name) else {
        return Vec::new();
    };
    series
        .iter()
        .map(|((_, value), h)| {
            let mut t = Totals::default();
            for (b, n) in t.buckets.iter_mut().zip(&h.buckets) {
                *b = n.load(Ordering::Relaxed);
            }
            t.count = h.count.load(Ordering::Relaxed);
            t.sum_ns = h.sum_ns.load(Ordering::Relaxed);
            (value.clone(), t)
        })
        .collect()
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_in_nanoseconds() {
        assert_eq!(BOUNDS_NS[0], 10_000);
        assert_eq!(BOUNDS_NS[3], 500_000);
        assert_eq!(BOUNDS_NS[8], 100_000_000);
        assert_eq!(BOUNDS_NS[11], 5_000_000_000);
    }

    #[test]
    fn samples_land_in_their_bucket_and_render_cumulatively() {
        let h = histogram("test_hist_seconds", "route", "a\"b");
        h.record(Duration::from_micros(5)); // <= 10 us
        h.record(Duration::from_micros(10)); // exactly on a bound: that bucket
        h.record(Duration::from_millis(2)); // <= 5 ms
        h.record(Duration::from_secs(9)); // past every bound
        let mut text = String::new();
        render(&mut text);
        let line = |le: &str| {
            let key = format!("test_hist_seconds_bucket{{route=\"a\\\"b\",le=\"{le}\"}} ");
            let rest =
                &text[text.find(&key).unwrap_or_else(|| panic!("{key} in {text}")) + key.len()..];
            rest.lines().next().unwrap_or("").to_string()
        };
        assert_eq!(line("0.00001"), "2");
        assert_eq!(line("0.001"), "2");
        assert_eq!(line("0.005"), "3");
        assert_eq!(line("5"), "3");
        assert_eq!(line("+Inf"), "4");
        assert!(text.contains("# TYPE test_hist_seconds histogram\n"));
        assert!(text.contains("test_hist_seconds_count{route=\"a\\\"b\"} 4\n"));
        assert!(
            text.contains("test_hist_seconds_sum{route=\"a\\\"b\"} 9.002015\n"),
            "{text}"
        );
        // The same series again, not a second one.
        assert!(Arc::ptr_eq(
            &h,
            &histogram("test_hist_seconds", "route", "a\"b")
        ));
    }
}
