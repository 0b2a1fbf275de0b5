//! HS256 JSON Web Token verification (RFC 7519 / RFC 7515, compact form).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// The claims the filter uses from a verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `sub`, if present and a string.
    pub sub: Option<String>,
}

/// Why a token was refused; the text goes into the 401 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url parts with JSON header and payload.
    Malformed,
    /// `alg` is not `HS256`, or the header has `crit`.
    UnsupportedAlg,
    /// The signature does not match.
    BadSignature,
    /// No numeric `exp` claim.
    MissingExp,
    /// `exp` is not after now.
    Expired,
    /// `nbf` is after now.
    NotYetValid,
    /// `iss` differs from the configured issuer.
    WrongIssuer,
}

impl JwtError {
    /// A short reason for the client.
    pub fn reason(self) -> &'static str {
        match self {
            JwtError::Malformed => "malformed token",
            JwtError::UnsupportedAlg => "unsupported token algorithm",
            JwtError::BadSignature => "bad token signature",
            JwtError::MissingExp => "token has no exp",
            JwtError::Expired => "token expired",
            JwtError::NotYetValid => "token not yet valid",
            JwtError::WrongIssuer => "wrong token issuer",
        }
    }
}

fn b64(part: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed)
}

fn json(part: &str) -> Result<serde_json::Map<String, Value>, JwtError> {
    match serde_json::from_slice(&b64(part)?) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Malformed),
    }
}

/// Verifies `token` against `secret` at `now_secs` (seconds since the Unix
/// epoch): HS256 signature, `exp` required and in the future, `nbf` (if
/// present) not in the future, and `iss` equal to `issuer` when one is given.
pub fn verify(
    token: &str,
    secret: &[u8],
    now_secs: u64,
    issuer: Option<&str>,
) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header = json(h)?;
    if header.get("alg").and_then(Value::as_str) != Some("HS256") || header.contains_key("crit") {
        return Err(JwtError::UnsupportedAlg);
    }
    let signature = b64(s)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| JwtError::BadSignature)?;
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| JwtError::BadSignature)?;

    let claims = json(p)?;
    let now = now_secs as f64;
    let exp = claims
        .get("exp")
        .and_then(Value::as_f64)
        .ok_or(JwtError::MissingExp)?;
    if now >= exp {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        match nbf.as_f64() {
            Some(nbf) if nbf <= now => {}
            Some(_) => return Err(JwtError::NotYetValid),
            None => return Err(JwtError::Malformed),
        }
    }
    if let Some(want) = issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(want) {
            return Err(JwtError::WrongIssuer);
        }
    }
    Ok(Claims {
        sub: claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Signs a token (used by the tests, and handy for tooling).
#[cfg(test)]
pub fn sign(header: &str, payload: &str, secret: &[u8]) -> String {
    let h = URL_SAFE_NO_PAD.encode(header);
    let p = URL_SAFE_NO_PAD.encode(payload);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{h}.{p}").as_bytes());
    let s = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{h}.{p}.{s}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HS: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
    const KEY: &[u8] = b"s3cret";

    #[test]
    fn rfc7515_example_shape() {
        // jwt.io's canonical example, secret "your-256-bit-secret", no exp.
        let t = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
                 eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.\
                 SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        assert_eq!(
            verify(t, b"your-256-bit-secret", 0, None),
            Err(JwtError::MissingExp)
        );
        assert_eq!(verify(t, b"wrong", 0, None), Err(JwtError::BadSignature));
    }

    #[test]
    fn valid_token() {
        let t = sign(HS, r#"{"sub":"alice","exp":2000,"iss":"me"}"#, KEY);
        let c = verify(&t, KEY, 1999, Some("me")).unwrap();
        assert_eq!(c.sub.as_deref(), Some("alice"));
        assert_eq!(
            verify(&t, KEY, 1999, None).unwrap().sub.as_deref(),
            Some("alice")
        );
    }

    #[test]
    fn expiry_and_nbf() {
        let t = sign(HS, r#"{"exp":2000,"nbf":1500}"#, KEY);
        assert_eq!(verify(&t, KEY, 2000, None), Err(JwtError::Expired));
        assert_eq!(verify(&t, KEY, 1499, None), Err(JwtError::NotYetValid));
        assert!(verify(&t, KEY, 1500, None).is_ok());
        let t = sign(HS, r#"{"sub":"x"}"#, KEY);
        assert_eq!(verify(&t, KEY, 0, None), Err(JwtError::MissingExp));
    }

    #[test]
    fn issuer() {
        let t = sign(HS, r#"{"exp":2000,"iss":"other"}"#, KEY);
        assert_eq!(verify(&t, KEY, 1, Some("me")), Err(JwtError::WrongIssuer));
        let t = sign(HS, r#"{"exp":2000}"#, KEY);
        assert_eq!(verify(&t, KEY, 1, Some("me")), Err(JwtError::WrongIssuer));
    }

    #[test]
    fn rejects_other_algs_and_garbage() {
        let t = sign(r#"{"alg":"none"}"#, r#"{"exp":2000}"#, KEY);
        assert_eq!(verify(&t, KEY, 1, None), Err(JwtError::UnsupportedAlg));
        let t = sign(r#"{"alg":"HS256","crit":["x"]}"#, r#"{"exp":2000}"#, KEY);
        assert_eq!(verify(&t, KEY, 1, None), Err(JwtError::UnsupportedAlg));
        let unsigned = format!("{}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#));
        assert!(verify(&unsigned, KEY, 1, None).is_err());
        assert_eq!(verify("a.b", KEY, 1, None), Err(JwtError::Malformed));
        assert_eq!(verify("a.b.c.d", KEY, 1, None), Err(JwtError::Malformed));
        assert_eq!(verify("!!.b.c", KEY, 1, None), Err(JwtError::Malformed));
    }

    #[test]
    fn tampered_payload() {
        let t = sign(HS, r#"{"sub":"alice","exp":2000}"#, KEY);
        let mut parts: Vec<&str> = t.split('.').collect();
        let evil = URL_SAFE_NO_PAD.encode(r#"{"sub":"admin","exp":2000}"#);
        parts[1] = &evil;
        assert_eq!(
            verify(&parts.join("."), KEY, 1, None),
            Err(JwtError::BadSignature)
        );
    }
}
