//! `auth`: lets a request through only with a valid API key or HS256 JWT.
//!
//! Config (at least one of `api_keys` and `jwt_hs256_secret`):
//!
//! ```toml
//! [filters.config.auth]
//! api_keys = ["key-one", "key-two"]   # accepted values of the API-key header
//! header = "x-api-key"                # the API-key header (default)
//! jwt_hs256_secret = "..."            # accept `Authorization: Bearer <jwt>`
//! jwt_issuer = "https://issuer"       # optional: required `iss`
//! ```
//!
//! Request phase only. A request passes when its API-key header equals one
//! of `api_keys` (compared in constant time), or when it carries
//! `Authorization: Bearer <jwt>` with a valid HS256 signature, a numeric
//! `exp` after the host's `now-ms`, an `nbf` (if any) not after it, and the
//! configured `iss` (if any). On success the API-key header is removed and
//! `x-auth-subject` is set for the upstream: the JWT `sub` (`"jwt"` when it
//! has none) or `"api-key"`. Otherwise the filter answers `401` itself with
//! `www-authenticate` (`Bearer realm="sluicegate"` when JWTs are configured,
//! with `error="invalid_token"` after a bad token; `ApiKey
//! realm="sluicegate", header="<header>"` when keys are configured) and a
//! one-line `text/plain` body naming the reason. Counters: `allowed`,
//! `denied`.

mod jwt;

use serde::Deserialize;
use sluicegate_sdk::{
    env, export_filter, headers, metrics, Capabilities, Filter, LocalResponse, Request,
    RequestAction,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    api_keys: Vec<String>,
    #[serde(default = "default_header")]
    header: String,
    #[serde(default)]
    jwt_hs256_secret: Option<String>,
    #[serde(default)]
    jwt_issuer: Option<String>,
}

fn default_header() -> String {
    "x-api-key".to_string()
}

struct Auth {
    api_keys: Vec<Vec<u8>>,
    header: String,
    secret: Option<Vec<u8>>,
    issuer: Option<String>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Denial {
    Missing,
    BadKey,
    BadToken(jwt::JwtError),
}

/// Compares without an early exit (the length is not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    fn from_config(config: &str) -> Result<Self, String> {
        let c: Config = sluicegate_sdk::parse_config(config)?;
        let header = c.header.to_ascii_lowercase();
        if !headers::is_valid_name(&header) {
            return Err(format!("invalid header name {:?}", c.header));
        }
        if c.api_keys.iter().any(String::is_empty) {
            return Err("api_keys: empty key".to_string());
        }
        if c.jwt_hs256_secret.as_deref() == Some("") {
            return Err("jwt_hs256_secret is empty".to_string());
        }
        if c.api_keys.is_empty() && c.jwt_hs256_secret.is_none() {
            return Err("configure api_keys and/or jwt_hs256_secret".to_string());
        }
        if c.jwt_issuer.is_some() && c.jwt_hs256_secret.is_none() {
            return Err("jwt_issuer needs jwt_hs256_secret".to_string());
        }
        Ok(Auth {
            api_keys: c.api_keys.into_iter().map(String::into_bytes).collect(),
            header,
            secret: c.jwt_hs256_secret.map(String::into_bytes),
            issuer: c.jwt_issuer,
        })
    }

    /// The subject for the upstream, or why not.
    fn decide(
        &self,
        api_key: Option<&str>,
        authorization: Option<&str>,
        now_secs: u64,
    ) -> Result<String, Denial> {
        let mut denial = Denial::Missing;
        if let (Some(key), false) = (api_key, self.api_keys.is_empty()) {
            // Check every key so the time does not tell which one matched.
            let ok = self
                .api_keys
                .iter()
                .fold(false, |ok, k| ct_eq(k, key.as_bytes()) | ok);
            if ok {
                return Ok("api-key".to_string());
            }
            denial = Denial::BadKey;
        }
        if let Some(secret) = &self.secret {
            if let Some(token) = authorization.and_then(headers::bearer_token) {
                return match jwt::verify(token, secret, now_secs, self.issuer.as_deref()) {
                    Ok(claims) => Ok(claims.sub.unwrap_or_else(|| "jwt".to_string())),
                    Err(e) => Err(Denial::BadToken(e)),
                };
            }
        }
        Err(denial)
    }

    fn unauthorized(&self, denial: Denial) -> LocalResponse {
        let reason = match denial {
            Denial::Missing => "missing credentials",
            Denial::BadKey => "invalid api key",
            Denial::BadToken(e) => e.reason(),
        };
        let mut resp = LocalResponse::text(401, format!("unauthorized: {reason}\n"));
        if self.secret.is_some() {
            let challenge = match denial {
                Denial::BadToken(_) => {
                    format!("Bearer realm=\"sluicegate\", error=\"invalid_token\", error_description=\"{reason}\"")
                }
                _ => "Bearer realm=\"sluicegate\"".to_string(),
            };
            resp = resp.with_header("www-authenticate", challenge);
        }
        if !self.api_keys.is_empty() {
            let challenge = format!("ApiKey realm=\"sluicegate\", header=\"{}\"", self.header);
            resp = resp.with_header("www-authenticate", challenge);
        }
        resp
    }
}

impl Filter for Auth {
    const CAPABILITIES: Capabilities = Capabilities::REQUEST;

    fn init(config: &str) -> Result<Self, String> {
        Self::from_config(config)
    }

    fn on_request(&mut self, req: &Request) -> RequestAction {
        let api_key = if self.api_keys.is_empty() {
            None
        } else {
            req.header(&self.header)
        };
        let authorization = if self.secret.is_some() {
            req.header("authorization")
        } else {
            None
        };
        match self.decide(
            api_key.as_deref(),
            authorization.as_deref(),
            env::now_secs(),
        ) {
            Ok(subject) => {
                if !self.api_keys.is_empty() {
                    req.remove_header(&self.header);
                }
                if let Err(e) = req.set_header("x-auth-subject", &subject) {
                    // A subject the host refuses must not pass as someone else.
                    metrics::increment("denied");
                    return LocalResponse::text(401, format!("unauthorized: {e}\n")).into();
                }
                metrics::increment("allowed");
                RequestAction::Continue
            }
            Err(denial) => {
                metrics::increment("denied");
                self.unauthorized(denial).into()
            }
        }
    }
}

export_filter!(Auth);

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(config: &str) -> Auth {
        Auth::from_config(config).unwrap()
    }

    #[test]
    fn config_validation() {
        assert!(Auth::from_config("{}").is_err());
        assert!(Auth::from_config(r#"{"api_keys": []}"#).is_err());
        assert!(Auth::from_config(r#"{"api_keys": [""]}"#).is_err());
        assert!(Auth::from_config(r#"{"api_keys": ["k"], "header": "bad header"}"#).is_err());
        assert!(Auth::from_config(r#"{"jwt_hs256_secret": ""}"#).is_err());
        assert!(Auth::from_config(r#"{"api_keys": ["k"], "jwt_issuer": "x"}"#).is_err());
        assert!(Auth::from_config(r#"{"api_keys": ["k"], "extra": 1}"#).is_err());
        let a = auth(r#"{"api_keys": ["k"], "header": "X-Key"}"#);
        assert_eq!(a.header, "x-key");
    }

    #[test]
    fn api_keys() {
        let a = auth(r#"{"api_keys": ["k1", "k2"]}"#);
        assert_eq!(a.decide(Some("k2"), None, 0), Ok("api-key".into()));
        assert_eq!(a.decide(Some("k3"), None, 0), Err(Denial::BadKey));
        assert_eq!(a.decide(None, None, 0), Err(Denial::Missing));
        // A bearer token is ignored when JWTs are not configured.
        assert_eq!(a.decide(None, Some("Bearer x"), 0), Err(Denial::Missing));
    }

    #[test]
    fn jwt_and_keys_together() {
        let a = auth(r#"{"api_keys": ["k"], "jwt_hs256_secret": "s"}"#);
        let good = jwt::sign(r#"{"alg":"HS256"}"#, r#"{"sub":"bob","exp":100}"#, b"s");
        let bearer = format!("Bearer {good}");
        assert_eq!(a.decide(None, Some(&bearer), 99), Ok("bob".into()));
        assert_eq!(a.decide(Some("nope"), Some(&bearer), 99), Ok("bob".into()));
        assert_eq!(
            a.decide(None, Some(&bearer), 100),
            Err(Denial::BadToken(jwt::JwtError::Expired))
        );
        let nosub = jwt::sign(r#"{"alg":"HS256"}"#, r#"{"exp":100}"#, b"s");
        let bearer = format!("Bearer {nosub}");
        assert_eq!(a.decide(None, Some(&bearer), 1), Ok("jwt".into()));
    }

    #[test]
    fn challenges() {
        let a = auth(r#"{"api_keys": ["k"], "jwt_hs256_secret": "s"}"#);
        let r = a.unauthorized(Denial::BadToken(jwt::JwtError::Expired));
        assert_eq!(r.status, 401);
        let challenges: Vec<_> = r
            .headers
            .iter()
            .filter(|(n, _)| n == "www-authenticate")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(challenges.len(), 2);
        assert!(challenges[0].contains("invalid_token"));
        assert!(challenges[1].contains("header=\"x-api-key\""));
        assert_eq!(r.body, b"unauthorized: token expired\n");
    }

    #[test]
    fn ct_eq_works() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
