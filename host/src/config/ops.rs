//! Operations settings: `[[proxy.tls]]` listeners, `[upstream.tls]`,
//! `[proxy.access_log]` and the admin token. Certificate and CA files are
//! read and checked here, so `sluicegate check` catches a bad one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{Config, ConfigError, Validator};

/// `[[proxy.tls]]`: a listener that terminates TLS (HTTP/1.1 and HTTP/2 by
/// ALPN), with one or more certificates chosen by SNI.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerConfig {
    /// `ip:port` to listen on.
    pub listen: Spanned<String>,
    /// The certificates; the names each one serves come from its SANs. The
    /// first is the default for clients without SNI or with an unknown name.
    pub certs: Spanned<Vec<CertConfig>>,
}

/// `{ cert = "site.pem", key = "site.key" }`: PEM files (the chain, leaf
/// first; the private key). Relative paths are relative to the config file.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// The certificate chain, PEM.
    pub cert: PathBuf,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[upstream.tls]`: speak TLS to this upstream's endpoints.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM file of the CA certificates to trust (default: the system's).
    pub ca: Option<PathBuf>,
    /// The server name to send and verify (default: the endpoint's host).
    pub sni: Option<String>,
}

/// `[proxy.access_log]`: one line per request.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// `common` (Common Log Format plus a few fields) or `json`.
    #[serde(default)]
    pub format: AccessLogFormat,
    /// `stdout`, `stderr` or a file path (appended to; relative to the
    /// config file). Default `stdout`.
    #[serde(default = "default_log_path")]
    pub path: String,
}

fn default_log_path() -> String {
    "stdout".to_string()
}

/// The access log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// `client - - [time] "METHOD target VERSION" status bytes "referer" "agent" route upstream ms`.
    #[default]
    Common,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// The TLS listener addresses, already validated.
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.proxy
            .tls
            .iter()
            .filter_map(|t| t.listen.get_ref().parse().ok())
            .collect()
    }

    /// Make certificate, CA and log paths absolute (relative to `base`).
    pub(super) fn resolve_ops_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for l in &mut self.proxy.tls {
            for c in l.certs.get_mut() {
                abs(&mut c.cert);
                abs(&mut c.key);
            }
        }
        for u in &mut self.upstreams {
            if let Some(ca) = u.tls.as_mut().and_then(|t| t.ca.as_mut()) {
                abs(ca);
            }
        }
        if let Some(log) = &mut self.proxy.access_log {
            if !matches!(log.path.as_str(), "stdout" | "stderr")
                && Path::new(&log.path).is_relative()
            {
                log.path = base.join(&log.path).display().to_string();
            }
        }
        if let Some(f) = &mut self.proxy.admin_token_file {
            abs(f);
        }
    }

    /// Read `admin_token_file` into `admin_token` (whitespace trimmed).
    pub(super) fn read_admin_token(&mut self) -> Result<(), ConfigError> {
        let Some(file) = &self.proxy.admin_token_file else {
            return Ok(());
        };
        if self.proxy.admin_token.is_some() {
            return Err(ConfigError::Invalid {
                file: self.source.clone(),
                line: 0,
                key: "proxy.admin_token_file".into(),
                reason: "give admin_token or admin_token_file, not both".into(),
            });
        }
        let token = std::fs::read_to_string(file).map_err(|e| ConfigError::Invalid {
            file: self.source.clone(),
            line: 0,
            key: "proxy.admin_token_file".into(),
            reason: format!("cannot read {}: {e}", file.display()),
        })?;
        self.proxy.admin_token = Some(token.trim().to_string());
        Ok(())
    }
}

impl Validator<'_> {
    /// TLS listeners, upstream TLS, the access log and the admin token.
    pub(super) fn validate_ops(&self, config: &Config) -> Result<(), ConfigError> {
        let plain = config.listen_addrs();
        let mut seen = Vec::new();
        for (i, l) in config.proxy.tls.iter().enumerate() {
            let key = format!("proxy.tls[{i}].listen");
            let addr: SocketAddr = match l.listen.get_ref().parse() {
                Ok(a) => a,
                Err(_) => {
                    let reason = format!("{:?} is not an ip:port address", l.listen.get_ref());
                    return self.error(l.listen.span(), key, reason);
                }
            };
            if plain.contains(&addr) || seen.contains(&addr) {
                let reason = format!("{addr} is already a listener");
                return self.error(l.listen.span(), key, reason);
            }
            seen.push(addr);
            if l.certs.get_ref().is_empty() {
                let reason = "at least one { cert, key } is required".to_string();
                return self.error(l.certs.span(), format!("proxy.tls[{i}].certs"), reason);
            }
            for (j, c) in l.certs.get_ref().iter().enumerate() {
                if let Err(reason) = crate::tls::load_certified_key(c) {
                    return self.error(
                        l.certs.span(),
                        format!("proxy.tls[{i}].certs[{j}]"),
                        reason,
                    );
                }
            }
        }
        for (i, up) in config.upstreams.iter().enumerate() {
            if let Some(tls) = &up.tls {
                if let Err(reason) = crate::tls::UpstreamTls::new(tls) {
                    return self.error(up.name.span(), format!("upstream[{i}].tls"), reason);
                }
                if up.health.path.is_some() {
                    let reason = "active health checks speak plain HTTP; remove health.path for a TLS upstream (passive ejection still works)".to_string();
                    return self.error(
                        up.name.span(),
                        format!("upstream[{i}].health.path"),
                        reason,
                    );
                }
            }
        }
        if config.proxy.admin_token.as_deref() == Some("") {
            let reason = "an empty token would let anyone in; remove the key instead".to_string();
            return self.error(0..0, "proxy.admin_token".into(), reason);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[proxy]
listen = ["127.0.0.1:8080"]

[[upstream]]
name = "app"
endpoints = ["127.0.0.1:9001"]
"#;

    #[test]
    fn tls_listener_errors_name_line_and_key() {
        let text = format!(
            "{BASE}\n[[proxy.tls]]\nlisten = \"127.0.0.1:8443\"\ncerts = [{{ cert = \"nope.pem\", key = \"nope.key\" }}]\n"
        );
        let e = Config::parse(&text, Path::new("/tmp/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/tmp/x.toml: line 11: proxy.tls[0].certs[0]:"),
            "{e}"
        );
        assert!(e.contains("/tmp/nope.pem"), "{e}");
        let text = text.replace("127.0.0.1:8443", "127.0.0.1:8080");
        let e = Config::parse(&text, Path::new("/tmp/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("proxy.tls[0].listen") && e.contains("already"),
            "{e}"
        );
    }

    #[test]
    fn access_log_and_token_parse() {
        let text = BASE.replace(
            "listen = [\"127.0.0.1:8080\"]\n",
            "listen = [\"127.0.0.1:8080\"]\nadmin_token = \"s3cret\"\n[proxy.access_log]\nformat = \"json\"\npath = \"logs/access.log\"\n",
        );
        let c = Config::parse(&text, Path::new("/etc/x.toml")).unwrap();
        let log = c.proxy.access_log.as_ref().unwrap();
        assert_eq!(log.format, AccessLogFormat::Json);
        assert_eq!(log.path, "/etc/logs/access.log");
        assert_eq!(c.proxy.admin_token.as_deref(), Some("s3cret"));
        let bad = text.replace("\"json\"", "\"xml\"");
        let e = Config::parse(&bad, Path::new("/etc/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("xml") && e.contains("common"), "{e}");
        let empty = text.replace("\"s3cret\"", "\"\"");
        let e = Config::parse(&empty, Path::new("/etc/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy.admin_token:"), "{e}");
    }
}
