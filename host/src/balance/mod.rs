//! Choosing an endpoint of an upstream. Balancing is native: a filter may
//! pick *which* upstream, never which endpoint.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::uri::Authority;

use crate::config::UpstreamConfig;

/// One server of an upstream.
#[derive(Debug)]
pub struct Endpoint {
    /// `host:port` as configured.
    pub addr: Arc<str>,
    /// The same, parsed for building upstream URIs.
    pub authority: Authority,
}

/// A selection algorithm: given the endpoint count, which index next.
pub trait Selector: Send + Sync + std::fmt::Debug {
    /// The index of the endpoint to try, `attempt` counting retries from 0.
    fn pick(&self, len: usize, attempt: usize) -> usize;
}

/// Plain round robin; a retry moves to the next endpoint.
#[derive(Debug, Default)]
pub struct RoundRobin(AtomicUsize);

impl Selector for RoundRobin {
    fn pick(&self, len: usize, attempt: usize) -> usize {
        if attempt == 0 {
            self.0.fetch_add(1, Ordering::Relaxed) % len
        } else {
            (self.0.load(Ordering::Relaxed) + len - 1 + attempt) % len
        }
    }
}

/// A named pool of endpoints with its selection algorithm.
#[derive(Debug)]
pub struct Upstream {
    /// The name routes and filters use.
    pub name: Arc<str>,
    /// The servers, never empty.
    pub endpoints: Vec<Endpoint>,
    selector: Box<dyn Selector>,
}

impl Upstream {
    /// Build from a validated `[[upstream]]` table.
    pub fn new(config: &UpstreamConfig) -> anyhow::Result<Upstream> {
        let endpoints = config
            .endpoints
            .get_ref()
            .iter()
            .map(|ep| {
                let addr = ep.get_ref().as_str();
                let authority = addr.parse::<Authority>().map_err(|e| {
                    anyhow::anyhow!("upstream {}: endpoint {addr:?}: {e}", config.name.get_ref())
                })?;
                Ok(Endpoint {
                    addr: Arc::from(addr),
                    authority,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            !endpoints.is_empty(),
            "upstream {} has no endpoints",
            config.name.get_ref()
        );
        Ok(Upstream {
            name: Arc::from(config.name.get_ref().as_str()),
            endpoints,
            selector: Box::new(RoundRobin::default()),
        })
    }

    /// The endpoint for this attempt (0 = first try).
    pub fn pick(&self, attempt: usize) -> &Endpoint {
        let i = self.selector.pick(self.endpoints.len(), attempt);
        &self.endpoints[i % self.endpoints.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_cycles_and_retries_elsewhere() {
        let rr = RoundRobin::default();
        let first: Vec<usize> = (0..4).map(|_| rr.pick(3, 0)).collect();
        assert_eq!(first, vec![0, 1, 2, 0]);
        let a = rr.pick(3, 0);
        let b = rr.pick(3, 1);
        assert_ne!(a, b);
    }
}
