//! Endpoints given by name (`"app.default.svc:8080"`): every address the
//! name resolves to becomes an endpoint of its own, so a Kubernetes
//! headless Service's pods are balanced one by one, and the names are
//! re-resolved every `[proxy.dns] refresh_ms`.
//!
//! Resolution happens off the data path (at start, before each config
//! reload is swapped in, and on the refresh timer). A change swaps in a new
//! snapshot exactly as a config reload does: in-flight requests finish on
//! the endpoint they started on, a new address takes traffic on the next
//! pick, and addresses that stay keep their balancing state. A name that
//! fails to resolve keeps its last answer; one that never resolved stays
//! a single endpoint resolved at connect time (and fails like a dead one).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, DnsConfig};
use crate::proxy::{Proxy, Snapshot};

/// The answers: configured `host:port` → the addresses it resolved to
/// (sorted, without duplicates).
pub type DnsTable = BTreeMap<String, Vec<SocketAddr>>;

/// Split `host:port` (IPv6 hosts in brackets) and tell whether the host
/// is a name that needs resolving.
fn name_and_port(endpoint: &str) -> Option<(&str, u16)> {
    let (host, port) = endpoint.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return None;
    }
    Some((host, port))
}

/// Every endpoint of `config` given by name.
pub fn names(config: &Config) -> BTreeSet<String> {
    config
        .upstreams
        .iter()
        .flat_map(|u| u.endpoints.get_ref().iter())
        .map(|e| e.get_ref().addr())
        .filter(|a| name_and_port(a).is_some())
        .map(str::to_string)
        .collect()
}

/// A resolver: the system's (`getaddrinfo`: `/etc/hosts`, `/etc/resolv.conf`
/// with its search domains) or the configured name servers.
enum Resolver {
    System,
    Servers(Box<hickory_resolver::TokioResolver>),
}

impl Resolver {
    fn new(cfg: &DnsConfig) -> Resolver {
        use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
        use hickory_resolver::name_server::TokioConnectionProvider;
        let servers = cfg.server_addrs().unwrap_or_default();
        if servers.is_empty() {
            return Resolver::System;
        }
        let mut group = NameServerConfigGroup::new();
        for s in servers {
            group.merge(NameServerConfigGroup::from_ips_clear(
                &[s.ip()],
                s.port(),
                true,
            ));
        }
        let config = ResolverConfig::from_parts(None, vec![], group);
        let mut builder = hickory_resolver::Resolver::builder_with_config(
            config,
            TokioConnectionProvider::default(),
        );
        // The refresh timer decides how fresh answers are, not the TTL.
        builder.options_mut().cache_size = 0;
        Resolver::Servers(Box::new(builder.build()))
    }

    async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let mut addrs: Vec<SocketAddr> = match self {
            Resolver::System => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| e.to_string())?
                .collect(),
            Resolver::Servers(r) => r
                .lookup_ip(host)
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect(),
        };
        addrs.sort();
        addrs.dedup();
        Ok(addrs)
    }
}

/// Resolve every name of `config`, each within `timeout_ms`. A name that
/// fails keeps its answer in `previous`, if any.
pub async fn resolve(config: &Config, previous: &DnsTable) -> DnsTable {
    let names = names(config);
    let mut table = DnsTable::new();
    if names.is_empty() {
        return table;
    }
    let dns = &config.proxy.dns;
    let resolver = Resolver::new(dns);
    let timeout = Duration::from_millis(dns.timeout_ms);
    for name in names {
        let Some((host, port)) = name_and_port(&name) else {
            continue;
        };
        let answer = match tokio::time::timeout(timeout, resolver.lookup(host, port)).await {
            Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
            Ok(Ok(_)) => Err("no addresses".to_string()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {} ms", dns.timeout_ms)),
        };
        match (answer, previous.get(&name)) {
            (Ok(addrs), _) => {
                table.insert(name, addrs);
            }
            (Err(reason), Some(last)) => {
                tracing::warn!(endpoint = %name, %reason, "DNS resolution failed; keeping the last answer");
                table.insert(name, last.clone());
            }
            (Err(reason), None) => {
                tracing::warn!(endpoint = %name, %reason, "DNS resolution failed; resolving at connect time");
            }
        }
    }
    table
}

/// Re-resolve the live config's names every `refresh_ms`; swap in a new
/// snapshot when an answer changed.
pub async fn run(proxy: Arc<Proxy>) {
    loop {
        let refresh = proxy.snapshot.load().config.proxy.dns.refresh_ms;
        // With refreshing off, look again later in case a reload turns it on.
        let wait = if refresh == 0 { 1_000 } else { refresh };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let snap = proxy.snapshot.load_full();
        if refresh == 0 || snap.dns.is_empty() && names(&snap.config).is_empty() {
            continue;
        }
        let table = resolve(&snap.config, &snap.dns).await;
        if table == *snap.dns {
            continue;
        }
        let table = Arc::new(table);
        let swapped = crate::reload::swap_snapshot(&proxy, |old| {
            // A config reload may have happened meanwhile: it resolved its
            // own names, so only answer for the config we resolved.
            if !Arc::ptr_eq(&old.config, &snap.config) {
                return Ok(None);
            }
            Snapshot::with_dns(old.config.as_ref().clone(), Some(old), table.clone()).map(Some)
        })
        .await;
        match swapped {
            Ok(true) => {
                metrics::counter!("sluicegate_dns_changes_total").increment(1);
                tracing::info!(
                    names = table.len(),
                    "DNS answers changed; endpoints updated"
                );
            }
            Ok(false) => {}
            Err(e) => tracing::error!("DNS update rejected: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_need_resolving() {
        assert_eq!(name_and_port("app.svc:8080"), Some(("app.svc", 8080)));
        assert_eq!(name_and_port("localhost:1"), Some(("localhost", 1)));
        assert_eq!(name_and_port("127.0.0.1:80"), None);
        assert_eq!(name_and_port("[::1]:80"), None);
        assert_eq!(name_and_port("app"), None);
    }

    #[tokio::test]
    async fn the_system_resolver_answers_localhost() {
        let addrs = Resolver::System.lookup("localhost", 81).await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 81));
        assert!(!addrs.is_empty());
    }
}
