//! Route matching: host and longest path prefix to an upstream and a filter chain.

use std::sync::Arc;

use crate::config::Config;

/// One route, as matched at request time.
#[derive(Debug)]
pub struct Route {
    /// Index in the config (`route[i]`), for logs and metrics.
    pub index: usize,
    /// Lower-case host without port, or `None` for any host.
    pub host: Option<String>,
    /// Path prefix, matched on segment boundaries.
    pub path_prefix: String,
    /// The upstream requests go to unless a filter routes elsewhere.
    pub upstream: Arc<str>,
    /// Filter names: request phase in this order, response phase reversed.
    pub filters: Vec<Arc<str>>,
    /// A label for metrics and logs: `host/prefix`.
    pub label: Arc<str>,
}

/// All routes, ordered so the first match is the best one.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Build the table from a validated config.
    pub fn new(config: &Config) -> RouteTable {
        let mut routes: Vec<Arc<Route>> = config
            .routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let host = r.host.as_ref().map(|h| h.to_ascii_lowercase());
                let label = format!("{}{}", host.as_deref().unwrap_or("*"), r.path_prefix);
                Arc::new(Route {
                    index,
                    host,
                    path_prefix: r.path_prefix.clone(),
                    upstream: Arc::from(r.upstream.get_ref().as_str()),
                    filters: r
                        .filters
                        .iter()
                        .map(|f| Arc::from(f.get_ref().as_str()))
                        .collect(),
                    label: Arc::from(label),
                })
            })
            .collect();
        // Host-specific routes first, then the longest prefix; stable, so
        // among equals the first in the file wins.
        routes.sort_by_key(|r| (r.host.is_none(), std::cmp::Reverse(r.path_prefix.len())));
        RouteTable { routes }
    }

    /// The best route for this host (any case, port allowed) and path.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        let host = host.map(strip_port);
        self.routes.iter().find(|r| {
            let host_ok = match (&r.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                (Some(_), None) => false,
            };
            host_ok && prefix_matches(&r.path_prefix, path)
        })
    }

    /// Every route, in match order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Segment-aware prefix match: `/api` matches `/api`, `/api/x` and
/// `/api?q`, but not `/apiary`. A prefix ending in `/` matches anything under it.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if !path.starts_with(prefix) {
        return false;
    }
    if prefix.ends_with('/') || path.len() == prefix.len() {
        return true;
    }
    matches!(path.as_bytes()[prefix.len()], b'/' | b'?')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table() -> RouteTable {
        let text = r#"
[proxy]
listen = ["127.0.0.1:1"]
[[upstream]]
name = "a"
endpoints = ["127.0.0.1:2"]
[[route]]
path_prefix = "/"
upstream = "a"
[[route]]
path_prefix = "/api"
upstream = "a"
[[route]]
host = "Example.com"
path_prefix = "/"
upstream = "a"
"#;
        RouteTable::new(&Config::parse(text, Path::new("t.toml")).unwrap())
    }

    #[test]
    fn longest_prefix_and_host_win() {
        let t = table();
        assert_eq!(t.find(Some("other"), "/api/x").unwrap().index, 1);
        assert_eq!(t.find(Some("other"), "/apiary").unwrap().index, 0);
        assert_eq!(t.find(Some("EXAMPLE.com:8080"), "/api").unwrap().index, 2);
        assert_eq!(t.find(None, "/api?x=1").unwrap().index, 1);
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
