//! `jwks-auth`: validates `Authorization: Bearer <JWT>` tokens signed RS256
//! or ES256 (P-256) with keys from a JWKS document, fetched by callout and
//! refreshed on a periodic tick.
//!
//! ```toml
//! [[upstream]]
//! name = "idp"
//! endpoints = ["127.0.0.1:9002"]
//!
//! [filters.policy.jwks-auth]
//! callouts = ["idp"]                     # the grant: upstreams it may call
//!
//! [filters.config.jwks-auth]
//! jwks_upstream = "idp"                  # required
//! jwks_path = "/.well-known/jwks.json"   # the default
//! refresh_ms = 60000                     # tick interval (min 100)
//! issuer = "https://idp.example"         # optional: the required `iss`
//! audience = "api"                       # optional: a required `aud`
//! leeway_s = 30                          # clock skew on exp / nbf
//! ```
//!
//! Keys: `init` asks for a tick every `refresh_ms`; each tick fetches the
//! JWKS (`GET jwks_path` on `jwks_upstream`) and, if it holds at least one
//! usable key, stores it in KV, where every instance of the filter reads
//! it. A failed refresh keeps the keys already stored. Until a tick has
//! stored keys, a request fetches them itself (once: it stores them too).
//! Each instance keeps the parsed keys and parses again only when the
//! document in KV changes.
//!
//! A request: no bearer token, or a token that fails (malformed, `alg` not
//! RS256/ES256, `alg: none`, unknown `kid`, key type or `alg` not matching,
//! bad signature, no `exp`, expired, before `nbf`, wrong `iss` or `aud`) is
//! answered 401 with `www-authenticate: Bearer error="invalid_token"`; a
//! valid one goes on with `x-jwt-sub: <sub>` (a client's own `x-jwt-sub` is
//! always removed). No keys at all (the JWKS never fetched) answers 503.
//!
//! Metrics: `jwt_requests_total{result="valid|invalid|missing|no_keys"}`,
//! `jwks_refresh_total{result="ok|error"}`.

mod config;
mod jwk;
mod jwt;

use config::Config;
use jwk::{parse_jwks, Key};
use jwt::{verify, Rules};
use sluicegate_sdk_v2::callout::{self, Request as Fetch};
use sluicegate_sdk_v2::{
    env, export_filter, kv, log, metrics, Context, Filter, LocalResponse, LogLevel, Phases,
    Request, RequestAction,
};

/// The request header carrying the verified token's `sub`.
const SUB_HEADER: &str = "x-jwt-sub";

struct JwksAuth {
    config: Config,
    rules: Rules,
    /// The JWKS document last read from KV and its parsed keys.
    parsed: Option<(Vec<u8>, Vec<Key>)>,
}

/// The bearer token of an `Authorization` value, if it is one.
fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthorized() -> RequestAction {
    RequestAction::Respond(LocalResponse {
        status: 401,
        headers: vec![
            (
                "www-authenticate".to_string(),
                b"Bearer error=\"invalid_token\"".to_vec(),
            ),
            (
                "content-type".to_string(),
                b"text/plain; charset=utf-8".to_vec(),
            ),
        ],
        body: b"invalid or missing bearer token\n".to_vec(),
    })
}

fn count(name: &str, result: &str) {
    metrics::counter_add(name, &[("result", result)], 1);
}

/// Fetch the JWKS document and check that it holds a usable key.
fn fetch(config: &Config) -> Result<Vec<u8>, String> {
    let resp = callout::call(
        &config.jwks_upstream,
        Fetch::get(config.jwks_path.clone()).header("accept", "application/json"),
    )
    .map_err(|e| format!("fetching the JWKS from {:?}: {e:?}", config.jwks_upstream))?;
    if resp.status != 200 {
        return Err(format!("the JWKS upstream answered {}", resp.status));
    }
    let (_, skipped) = parse_jwks(&resp.body)?;
    for why in skipped {
        log::warn(format!("jwks-auth: skipped a key: {why}"));
    }
    Ok(resp.body)
}

impl JwksAuth {
    /// The keys: the document in KV (fetched and stored first if KV has
    /// none), parsed again only when it changed.
    fn keys(&mut self) -> Result<&[Key], String> {
        let kv_key = self.config.kv_key();
        let doc = match kv::get(&kv_key) {
            Some(doc) => doc,
            None => {
                let doc = fetch(&self.config)?;
                kv::set(&kv_key, &doc, None);
                doc
            }
        };
        let stale = self.parsed.as_ref().is_none_or(|(seen, _)| *seen != doc);
        if stale {
            let (keys, _) = parse_jwks(&doc)?;
            self.parsed = Some((doc, keys));
        }
        Ok(self
            .parsed
            .as_ref()
            .map(|(_, k)| k.as_slice())
            .unwrap_or(&[]))
    }
}

impl Filter for JwksAuth {
    const PHASES: Phases = Phases::REQUEST;

    fn init(config: &str) -> Result<Self, String> {
        let config = Config::parse(config)?;
        callout::request_tick(config.refresh_ms)
            .map_err(|e| format!("asking for a tick every {} ms: {e}", config.refresh_ms))?;
        let rules = Rules {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway_s: config.leeway_s,
        };
        Ok(JwksAuth {
            config,
            rules,
            parsed: None,
        })
    }

    fn on_request(&mut self, _cx: &Context, req: &Request) -> RequestAction {
        let headers = req.headers();
        // The identity header comes from a verified token only.
        let _ = headers.remove(SUB_HEADER);
        let Some(token) = headers
            .get("authorization")
            .and_then(|v| bearer(&v).map(str::to_string))
        else {
            count("jwt_requests_total", "missing");
            return unauthorized();
        };
        let now_s = env::now_ms() / 1000;
        let rules = self.rules.clone();
        let keys = match self.keys() {
            Ok(keys) => keys,
            Err(why) => {
                count("jwt_requests_total", "no_keys");
                log::warn(format!("jwks-auth: no signing keys: {why}"));
                return RequestAction::Respond(sluicegate_sdk_v2::text_response(
                    503,
                    "signing keys unavailable\n",
                ));
            }
        };
        match verify(&token, keys, &rules, now_s) {
            Ok(claims) => {
                count("jwt_requests_total", "valid");
                if let Some(sub) = claims.sub {
                    if let Err(e) = headers.set(SUB_HEADER, &sub) {
                        log::warn(format!("jwks-auth: setting {SUB_HEADER}: {e}"));
                    }
                }
                RequestAction::Continue
            }
            Err(why) => {
                count("jwt_requests_total", "invalid");
                log::write_at(LogLevel::Debug, format!("jwks-auth: token refused: {why}"));
                unauthorized()
            }
        }
    }

    fn on_tick(&mut self) {
        match fetch(&self.config) {
            Ok(doc) => {
                count("jwks_refresh_total", "ok");
                let kv_key = self.config.kv_key();
                if kv::get(&kv_key).as_deref() != Some(doc.as_slice()) {
                    kv::set(&kv_key, &doc, None);
                }
            }
            Err(why) => {
                count("jwks_refresh_total", "error");
                log::warn(format!(
                    "jwks-auth: refresh failed, keeping the keys: {why}"
                ));
            }
        }
    }
}

export_filter!(JwksAuth);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(b"Bearer abc.def.ghi"), Some("abc.def.ghi"));
        assert_eq!(bearer(b"bearer  abc "), Some("abc"));
        assert_eq!(bearer(b"Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(&[0xff, b' ', b'a']), None);
    }
}
