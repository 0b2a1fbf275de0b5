//! JSON Web Key Sets (RFC 7517): the verification keys of the JWKS
//! document, RSA (for RS256) and EC P-256 (for ES256). Other keys are
//! skipped.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::VerifyingKey as EcKey;
use rsa::{BigUint, RsaPublicKey};
use serde_json::Value;
use sha2::Sha256;

/// RFC 7518 §3.3: RSA keys for RS256 are at least 2048 bits.
pub const MIN_RSA_BITS: usize = 2048;

/// A key's material.
#[derive(Debug, Clone)]
pub enum KeyKind {
    /// `kty: RSA`, for RS256.
    Rsa(rsa::pkcs1v15::VerifyingKey<Sha256>),
    /// `kty: EC`, `crv: P-256`, for ES256.
    Ec(EcKey),
}

/// One verification key.
#[derive(Debug, Clone)]
pub struct Key {
    /// The key id, matched against a token's `kid`.
    pub kid: Option<String>,
    /// The algorithm the JWKS pins the key to, if it says.
    pub alg: Option<String>,
    /// The key itself.
    pub kind: KeyKind,
}

/// Base64url, with or without padding (JWKS producers differ).
pub fn b64url(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

fn field<'a>(jwk: &'a Value, name: &str) -> Option<&'a str> {
    jwk.get(name).and_then(Value::as_str)
}

/// One JWK: `Ok(None)` for a key of another kind or use (skipped),
/// `Err` for a supported key that is malformed.
fn parse_key(jwk: &Value) -> Result<Option<Key>, String> {
    if field(jwk, "use").is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    let kid = field(jwk, "kid").map(str::to_string);
    let alg = field(jwk, "alg").map(str::to_string);
    let bytes = |name: &str| {
        field(jwk, name)
            .and_then(b64url)
            .ok_or_else(|| format!("key {kid:?}: {name} missing or not base64url"))
    };
    let kind = match (field(jwk, "kty"), field(jwk, "crv")) {
        (Some("RSA"), _) => {
            let n = BigUint::from_bytes_be(&bytes("n")?);
            let e = BigUint::from_bytes_be(&bytes("e")?);
            let key = RsaPublicKey::new(n, e).map_err(|e| format!("key {kid:?}: {e}"))?;
            if rsa::traits::PublicKeyParts::size(&key) * 8 < MIN_RSA_BITS {
                return Err(format!(
                    "key {kid:?}: RSA key shorter than {MIN_RSA_BITS} bits"
                ));
            }
            KeyKind::Rsa(rsa::pkcs1v15::VerifyingKey::new(key))
        }
        (Some("EC"), Some("P-256")) => {
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err(format!("key {kid:?}: P-256 coordinates must be 32 bytes"));
            }
            let mut sec1 = Vec::with_capacity(65);
            sec1.push(0x04);
            sec1.extend_from_slice(&x);
            sec1.extend_from_slice(&y);
            let key = EcKey::from_sec1_bytes(&sec1)
                .map_err(|_| format!("key {kid:?}: not a point on P-256"))?;
            KeyKind::Ec(key)
        }
        _ => return Ok(None),
    };
    Ok(Some(Key { kid, alg, kind }))
}

/// The usable keys of a JWKS document. Malformed supported keys are
/// skipped and reported in the second list (for the log); a document that
/// is not a JWKS, or holds no usable key, is an error.
pub fn parse_jwks(doc: &[u8]) -> Result<(Vec<Key>, Vec<String>), String> {
    let doc: Value = serde_json::from_slice(doc).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let list = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no \"keys\" list")?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for jwk in list {
        match parse_key(jwk) {
            Ok(Some(k)) => keys.push(k),
            Ok(None) => {}
            Err(e) => skipped.push(e),
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "JWKS holds no usable RSA or P-256 signing key ({} skipped: {})",
            skipped.len(),
            skipped.join("; ")
        ));
    }
    Ok((keys, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b64url_accepts_padding() {
        assert_eq!(b64url("AQAB"), Some(vec![1, 0, 1]));
        assert_eq!(b64url("AQ=="), Some(vec![1]));
        assert_eq!(b64url("A+/="), None);
    }

    #[test]
    fn not_a_jwks() {
        assert!(parse_jwks(b"nope").is_err());
        assert!(parse_jwks(b"{}").is_err());
        assert!(parse_jwks(br#"{"keys":[]}"#).is_err());
        // Only unsupported keys: none usable.
        let e = parse_jwks(br#"{"keys":[{"kty":"oct","k":"AQAB"},{"kty":"EC","crv":"P-384"}]}"#)
            .unwrap_err();
        assert!(e.contains("no usable"), "{e}");
    }

    #[test]
    fn malformed_keys_are_reported() {
        let e = parse_jwks(
            br#"{"keys":[{"kty":"RSA","kid":"short","n":"AQAB","e":"AQAB"},
                         {"kty":"EC","crv":"P-256","kid":"off","x":"AQAB","y":"AQAB"}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("2 skipped"), "{e}");
    }
}
