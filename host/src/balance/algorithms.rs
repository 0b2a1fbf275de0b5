//! The balancing algorithms, one small type each behind [`Selector`].
//!
//! Every algorithm only ever returns an endpoint for which
//! [`EndpointSet::usable`] holds, so exclusions (retries) and health
//! (ejection, active checks, panic mode) are handled in one place.

use parking_lot::Mutex;

use super::{hash64, EndpointSet, PickContext, Selector};
use crate::config::Balance;

/// Virtual nodes on the hash ring per unit of weight.
pub const VNODES_PER_WEIGHT: u32 = 100;

/// The selector for `balance`, sized for `set`.
pub fn selector(balance: Balance, set: &EndpointSet) -> Box<dyn Selector> {
    match balance {
        Balance::RoundRobin => Box::new(RoundRobin::new(set.len())),
        Balance::Random => Box::new(Random),
        Balance::LeastRequest => Box::new(LeastRequest),
        Balance::Ewma => Box::new(PeakEwma),
        Balance::ConsistentHash => Box::new(ConsistentHash::new(set)),
    }
}

/// Smooth weighted round robin (nginx): each pick adds every usable
/// endpoint's weight to its running score, takes the highest, and
/// subtracts the total from the winner. Weights 5:1:1 give
/// `a a b a c a a`, not `a a a a a b c`; any window of `sum(weights)`
/// consecutive picks is exact.
#[derive(Debug)]
pub struct RoundRobin {
    current: Mutex<Vec<i64>>,
}

impl RoundRobin {
    /// For `n` endpoints.
    pub fn new(n: usize) -> RoundRobin {
        RoundRobin {
            current: Mutex::new(vec![0; n]),
        }
    }
}

impl Selector for RoundRobin {
    fn pick(&self, set: &EndpointSet, ctx: &PickContext) -> Option<usize> {
        let mut current = self.current.lock();
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for i in 0..current.len() {
            if !set.usable(i, ctx) {
                continue;
            }
            let w = i64::from(set.weight(i));
            current[i] += w;
            total += w;
            match best {
                Some(b) if current[b] >= current[i] => {}
                _ => best = Some(i),
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }
}

/// Weighted random.
#[derive(Debug, Default)]
pub struct Random;

impl Selector for Random {
    fn pick(&self, set: &EndpointSet, ctx: &PickContext) -> Option<usize> {
        weighted_random(set, ctx)
    }
}

fn weighted_random(set: &EndpointSet, ctx: &PickContext) -> Option<usize> {
    let total: u64 = (0..set.len())
        .filter(|&i| set.usable(i, ctx))
        .map(|i| set.weight(i) as u64)
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(0..total);
    for i in 0..set.len() {
        if !set.usable(i, ctx) {
            continue;
        }
        let w = set.weight(i) as u64;
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

/// Two distinct usable endpoints at random (weighted), or the only one.
fn two_choices(set: &EndpointSet, ctx: &PickContext) -> Option<(usize, Option<usize>)> {
    let a = weighted_random(set, ctx)?;
    let mut excluded = [0usize; 16];
    let n = ctx.excluded.len().min(15);
    excluded[..n].copy_from_slice(&ctx.excluded[..n]);
    excluded[n] = a;
    let without_a = PickContext {
        excluded: &excluded[..n + 1],
        ..*ctx
    };
    Some((a, weighted_random(set, &without_a)))
}

/// Power of two choices: of two random endpoints, the one with fewer
/// requests in flight (relative to its weight).
#[derive(Debug, Default)]
pub struct LeastRequest;

impl Selector for LeastRequest {
    fn pick(&self, set: &EndpointSet, ctx: &PickContext) -> Option<usize> {
        let (a, b) = two_choices(set, ctx)?;
        let Some(b) = b else { return Some(a) };
        let eps = set.as_slice();
        let load =
            |i: usize| (eps[i].state.in_flight() as f64 + 1.0) / f64::from(set.weight(i).max(1));
        Some(if load(b) < load(a) { b } else { a })
    }
}

/// Latency assumed for an endpoint not measured yet: low, so it is tried.
const UNMEASURED_NS: f64 = 1_000.0;

/// Peak-EWMA (Finagle, Linkerd): of two random endpoints, the lower
/// `ewma_latency × (in_flight + 1) / weight`.
#[derive(Debug, Default)]
pub struct PeakEwma;

impl Selector for PeakEwma {
    fn pick(&self, set: &EndpointSet, ctx: &PickContext) -> Option<usize> {
        let (a, b) = two_choices(set, ctx)?;
        let Some(b) = b else { return Some(a) };
        let eps = set.as_slice();
        let cost = |i: usize| {
            let st = &eps[i].state;
            let lat = st.ewma_at(ctx.now).max(UNMEASURED_NS);
            lat * (st.in_flight() as f64 + 1.0) / f64::from(set.weight(i).max(1))
        };
        Some(if cost(b) < cost(a) { b } else { a })
    }
}

/// A hash ring with [`VNODES_PER_WEIGHT`] points per unit of weight, each
/// placed by hashing the endpoint's address: adding or removing an endpoint
/// moves only the keys whose nearest point changes (about `1/n` of them).
/// A key goes to the first usable endpoint clockwise from its hash; a
/// request without a key is placed at random.
#[derive(Debug)]
pub struct ConsistentHash {
    ring: Vec<(u64, u32)>,
}

impl ConsistentHash {
    /// The ring of `set`.
    pub fn new(set: &EndpointSet) -> ConsistentHash {
        let mut ring = Vec::new();
        for (i, ep) in set.as_slice().iter().enumerate() {
            for v in 0..ep.weight.max(1) * VNODES_PER_WEIGHT {
                let point = hash64(format!("{}#{v}", ep.addr).as_bytes());
                ring.push((point, i as u32));
            }
        }
        ring.sort_unstable();
        ConsistentHash { ring }
    }
}

impl Selector for ConsistentHash {
    fn pick(&self, set: &EndpointSet, ctx: &PickContext) -> Option<usize> {
        let Some(key) = ctx.key else {
            return weighted_random(set, ctx);
        };
        let start = self.ring.partition_point(|&(p, _)| p < key);
        let n = self.ring.len();
        (0..n)
            .map(|k| self.ring[(start + k) % n].1 as usize)
            .find(|&i| set.usable(i, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{now_ns, Upstream};

    fn upstream(balance: &str, endpoints: &str) -> Upstream {
        let text = format!(
            "[proxy]\nlisten = [\"127.0.0.1:1\"]\n[[upstream]]\nname = \"u\"\nbalance = \"{balance}\"\nendpoints = {endpoints}\n{}",
            if balance == "consistent_hash" { "hash_key = \"path\"\n" } else { "" }
        );
        let c = crate::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        Upstream::new(&c.upstreams[0], None, &Default::default()).unwrap()
    }

    const WEIGHTED: &str =
        r#"[{ addr = "127.0.0.1:1", weight = 5 }, "127.0.0.1:2", "127.0.0.1:3"]"#;

    #[test]
    fn smooth_round_robin_is_exact_and_interleaved() {
        let u = upstream("round_robin", WEIGHTED);
        let picks: Vec<usize> = (0..7).map(|_| u.pick(None, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
        let mut counts = [0; 3];
        for _ in 0..700 {
            counts[u.pick(None, &[]).unwrap()] += 1;
        }
        assert_eq!(counts, [500, 100, 100]);
        assert_eq!(u.pick(None, &[0, 1]), Some(2));
    }

    #[test]
    fn random_follows_weights() {
        let u = upstream("random", WEIGHTED);
        let mut counts = [0; 3];
        for _ in 0..7000 {
            counts[u.pick(None, &[]).unwrap()] += 1;
        }
        assert!((4600..5400).contains(&counts[0]), "{counts:?}");
        assert!((800..1200).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let u = upstream("least_request", r#"["127.0.0.1:1", "127.0.0.1:2"]"#);
        let _busy: Vec<_> = (0..5).map(|_| u.begin(0)).collect();
        for _ in 0..50 {
            assert_eq!(u.pick(None, &[]), Some(1));
        }
        assert_eq!(u.pick(None, &[1]), Some(0));
    }

    #[test]
    fn ewma_avoids_the_slow_endpoint() {
        let u = upstream("ewma", r#"["127.0.0.1:1", "127.0.0.1:2"]"#);
        let eps = u.endpoints.as_slice();
        eps[0].state.observe(std::time::Duration::from_millis(50));
        eps[1].state.observe(std::time::Duration::from_millis(1));
        for _ in 0..50 {
            assert_eq!(u.pick(None, &[]), Some(1));
        }
        assert!(eps[0].state.ewma_at(now_ns()) > 40e6);
    }

    #[test]
    fn consistent_hash_is_sticky_and_remaps_little() {
        let three = r#"["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]"#;
        let four = r#"["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"]"#;
        let (a, b) = (
            upstream("consistent_hash", three),
            upstream("consistent_hash", four),
        );
        let mut moved = 0;
        let mut counts = [0; 3];
        for k in 0..10_000u64 {
            let key = hash64(&k.to_le_bytes());
            let before = a.pick(Some(key), &[]).unwrap();
            assert_eq!(a.pick(Some(key), &[]), Some(before));
            counts[before] += 1;
            let after = b.pick(Some(key), &[]).unwrap();
            if after != before {
                moved += 1;
                assert_eq!(after, 3, "keys only move to the new endpoint");
            }
            assert_ne!(a.pick(Some(key), &[before]), Some(before));
        }
        assert!((1_800..3_200).contains(&moved), "moved {moved}");
        assert!(
            counts.iter().all(|&c| (2_600..4_100).contains(&c)),
            "{counts:?}"
        );
    }
}
