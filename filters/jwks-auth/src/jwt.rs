//! JWT verification (RFC 7519, JWS compact form, RFC 7515): the signature
//! by a key of the set, then `exp`, `nbf`, `iss` and `aud`. Pure: the keys
//! and the clock are arguments, so it is tested natively.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

use crate::jwk::{Key, KeyKind};

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The signature algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }

    /// True if `key` may verify this algorithm: the right key type, and
    /// the key's own `alg`, if it names one, is this one.
    fn fits(self, key: &Key) -> bool {
        let kind_ok = matches!(
            (self, &key.kind),
            (Alg::Rs256, KeyKind::Rsa(_)) | (Alg::Es256, KeyKind::Ec(_))
        );
        kind_ok && key.alg.as_deref().is_none_or(|a| a == self.name())
    }
}

/// What a valid token's claims must say.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// The required `iss`.
    pub issuer: Option<String>,
    /// A required `aud` (the claim is a string or a list).
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    pub leeway_s: u64,
}

/// What the filter takes from a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The `sub` claim, if a string.
    pub sub: Option<String>,
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts of JSON objects, or too long.
    Malformed(&'static str),
    /// `alg` is not RS256 or ES256 (`none` included).
    UnsupportedAlg(String),
    /// The header has a `crit` list: extensions this filter does not know.
    Critical,
    /// No key of the set has the token's `kid` (or, without a `kid`, none
    /// fits its `alg`).
    UnknownKey,
    /// The key named by `kid` is of another type or algorithm.
    KeyMismatch,
    /// The signature does not verify.
    BadSignature,
    /// No numeric `exp` claim.
    MissingExp,
    /// Past `exp` (plus leeway).
    Expired,
    /// Before `nbf` (minus leeway).
    NotYetValid,
    /// `iss` is not the configured issuer.
    WrongIssuer,
    /// `aud` does not hold the configured audience.
    WrongAudience,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed(why) => write!(f, "malformed token: {why}"),
            TokenError::UnsupportedAlg(alg) => write!(f, "unsupported alg {alg:?}"),
            TokenError::Critical => f.write_str("unsupported critical header"),
            TokenError::UnknownKey => f.write_str("no key for this token"),
            TokenError::KeyMismatch => f.write_str("key type or alg does not match the token"),
            TokenError::BadSignature => f.write_str("bad signature"),
            TokenError::MissingExp => f.write_str("no exp claim"),
            TokenError::Expired => f.write_str("expired"),
            TokenError::NotYetValid => f.write_str("not yet valid (nbf)"),
            TokenError::WrongIssuer => f.write_str("wrong issuer"),
            TokenError::WrongAudience => f.write_str("wrong audience"),
        }
    }
}

fn json_part(part: &str, what: &'static str) -> Result<Value, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed(what))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed(what))?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(TokenError::Malformed(what))
    }
}

fn verify_with(alg: Alg, key: &Key, message: &[u8], sig: &[u8]) -> bool {
    match (alg, &key.kind) {
        (Alg::Rs256, KeyKind::Rsa(k)) => {
            use rsa::signature::Verifier;
            rsa::pkcs1v15::Signature::try_from(sig).is_ok_and(|s| k.verify(message, &s).is_ok())
        }
        (Alg::Es256, KeyKind::Ec(k)) => {
            use p256::ecdsa::signature::Verifier;
            // JWS ES256 signatures are r || s, 32 bytes each (not DER).
            sig.len() == 64
                && p256::ecdsa::Signature::from_slice(sig)
                    .is_ok_and(|s| k.verify(message, &s).is_ok())
        }
        _ => false,
    }
}

/// The signing key(s) to try: the one named by `kid`, or, without one,
/// every key that fits `alg`.
fn candidates<'k>(
    alg: Alg,
    kid: Option<&str>,
    keys: &'k [Key],
) -> Result<Vec<&'k Key>, TokenError> {
    match kid {
        Some(kid) => {
            let named: Vec<&Key> = keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect();
            if named.is_empty() {
                return Err(TokenError::UnknownKey);
            }
            let fitting: Vec<&Key> = named.into_iter().filter(|k| alg.fits(k)).collect();
            if fitting.is_empty() {
                Err(TokenError::KeyMismatch)
            } else {
                Ok(fitting)
            }
        }
        None => {
            let fitting: Vec<&Key> = keys.iter().filter(|k| alg.fits(k)).collect();
            if fitting.is_empty() {
                Err(TokenError::UnknownKey)
            } else {
                Ok(fitting)
            }
        }
    }
}

fn check_claims(claims: &Value, rules: &Rules, now_s: u64) -> Result<(), TokenError> {
    let now = now_s as f64;
    let leeway = rules.leeway_s as f64;
    let exp = claims
        .get("exp")
        .and_then(Value::as_f64)
        .ok_or(TokenError::MissingExp)?;
    if now >= exp + leeway {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_f64().ok_or(TokenError::Malformed("nbf"))?;
        if now + leeway < nbf {
            return Err(TokenError::NotYetValid);
        }
    }
    if let Some(issuer) = &rules.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
            return Err(TokenError::WrongIssuer);
        }
    }
    if let Some(audience) = &rules.audience {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        };
        if !ok {
            return Err(TokenError::WrongAudience);
        }
    }
    Ok(())
}

/// Verify `token` (compact JWS) against `keys` and `rules` at `now_s`
/// (seconds since the Unix epoch).
pub fn verify(token: &str, keys: &[Key], rules: &Rules, now_s: u64) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed("too long"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("not three parts"));
    };
    let header = json_part(h, "header")?;
    let alg = match header.get("alg").and_then(Value::as_str) {
        Some("RS256") => Alg::Rs256,
        Some("ES256") => Alg::Es256,
        Some(other) => return Err(TokenError::UnsupportedAlg(other.to_string())),
        None => return Err(TokenError::Malformed("no alg")),
    };
    if header.get("crit").is_some() {
        return Err(TokenError::Critical);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.as_str()),
        Some(_) => return Err(TokenError::Malformed("kid")),
    };
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| TokenError::Malformed("signature"))?;
    let message = &token.as_bytes()[..h.len() + 1 + p.len()];
    let keys = candidates(alg, kid, keys)?;
    if !keys.iter().any(|k| verify_with(alg, k, message, &sig)) {
        return Err(TokenError::BadSignature);
    }
    // Only a signed payload is read.
    let claims = json_part(p, "payload")?;
    check_claims(&claims, rules, now_s)?;
    Ok(Claims {
        sub: claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

#[cfg(test)]
mod tests;
