//! Verification against keys generated here: RS256 and ES256 tokens
//! signed in the test, then every way a token can be wrong.

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand_core::OsRng;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use sha2::Sha256;

use super::*;
use crate::jwk::parse_jwks;

const NOW: u64 = 1_800_000_000;

struct TestKeys {
    rsa: rsa::RsaPrivateKey,
    ec: p256::ecdsa::SigningKey,
}

/// One RSA and one P-256 key for every test (RSA generation is slow in a
/// debug build).
fn test_keys() -> &'static TestKeys {
    static KEYS: OnceLock<TestKeys> = OnceLock::new();
    KEYS.get_or_init(|| TestKeys {
        rsa: rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap(),
        ec: p256::ecdsa::SigningKey::random(&mut OsRng),
    })
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The JWKS of the test keys: RSA as `rsa-1`, P-256 as `ec-1`.
fn jwks_json() -> String {
    let k = test_keys();
    let public = k.rsa.to_public_key();
    let point = k.ec.verifying_key().to_encoded_point(false);
    serde_json::json!({ "keys": [
        { "kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
          "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be()) },
        { "kty": "EC", "crv": "P-256", "kid": "ec-1",
          "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap()) },
        { "kty": "oct", "kid": "hmac", "k": "c2VjcmV0" },
    ]})
    .to_string()
}

fn keys() -> Vec<Key> {
    let (keys, skipped) = parse_jwks(jwks_json().as_bytes()).unwrap();
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(keys.len(), 2);
    keys
}

/// A token with this header and these claims, signed for `alg` (RS256 or
/// ES256 with the test keys; anything else gets an empty signature).
fn token(header: Value, claims: Value) -> String {
    let alg = header["alg"].as_str().unwrap_or("").to_string();
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = match alg.as_str() {
        "RS256" => rsa::pkcs1v15::SigningKey::<Sha256>::new(test_keys().rsa.clone())
            .sign(signing_input.as_bytes())
            .to_vec(),
        "ES256" => {
            let s: p256::ecdsa::Signature = test_keys().ec.sign(signing_input.as_bytes());
            s.to_bytes().to_vec()
        }
        _ => Vec::new(),
    };
    format!("{signing_input}.{}", b64(&sig))
}

fn claims() -> Value {
    serde_json::json!({ "sub": "alice", "iss": "https://idp.test", "aud": "api",
                        "exp": NOW + 300, "nbf": NOW - 10, "iat": NOW - 10 })
}

fn rules() -> Rules {
    Rules {
        issuer: Some("https://idp.test".into()),
        audience: Some("api".into()),
        leeway_s: 30,
    }
}

fn rs(kid: &str) -> Value {
    serde_json::json!({ "alg": "RS256", "typ": "JWT", "kid": kid })
}

fn es(kid: &str) -> Value {
    serde_json::json!({ "alg": "ES256", "typ": "JWT", "kid": kid })
}

fn check(token: &str) -> Result<Claims, TokenError> {
    verify(token, &keys(), &rules(), NOW)
}

#[test]
fn rs256_and_es256_valid() {
    let alice = Ok(Claims {
        sub: Some("alice".into()),
    });
    assert_eq!(check(&token(rs("rsa-1"), claims())), alice);
    assert_eq!(check(&token(es("ec-1"), claims())), alice);
    // Without a kid, the keys that fit the alg are tried.
    assert_eq!(
        check(&token(serde_json::json!({"alg": "ES256"}), claims())),
        alice
    );
    assert_eq!(
        check(&token(serde_json::json!({"alg": "RS256"}), claims())),
        alice
    );
}

#[test]
fn expired_and_not_yet_valid() {
    let mut c = claims();
    c["exp"] = (NOW - 31).into();
    assert_eq!(
        check(&token(rs("rsa-1"), c.clone())),
        Err(TokenError::Expired)
    );
    // Within the leeway it still passes.
    c["exp"] = (NOW - 29).into();
    assert!(check(&token(rs("rsa-1"), c.clone())).is_ok());
    c["nbf"] = (NOW + 31).into();
    assert_eq!(
        check(&token(es("ec-1"), c.clone())),
        Err(TokenError::NotYetValid)
    );
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(check(&token(es("ec-1"), c)), Err(TokenError::MissingExp));
}

#[test]
fn wrong_audience_and_issuer() {
    let mut c = claims();
    c["aud"] = "other".into();
    assert_eq!(
        check(&token(rs("rsa-1"), c.clone())),
        Err(TokenError::WrongAudience)
    );
    c["aud"] = serde_json::json!(["other", "api"]);
    assert!(check(&token(rs("rsa-1"), c.clone())).is_ok());
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        check(&token(rs("rsa-1"), c)),
        Err(TokenError::WrongAudience)
    );
    let mut c = claims();
    c["iss"] = "https://evil.test".into();
    assert_eq!(check(&token(es("ec-1"), c)), Err(TokenError::WrongIssuer));
    // No rules for them: anything goes.
    let mut c = claims();
    c["iss"] = "https://evil.test".into();
    c["aud"] = "other".into();
    let lax = Rules {
        leeway_s: 0,
        ..Rules::default()
    };
    assert!(verify(&token(es("ec-1"), c), &keys(), &lax, NOW).is_ok());
}

#[test]
fn bad_signature() {
    for header in [rs("rsa-1"), es("ec-1")] {
        let good = token(header, claims());
        // The same signature over other claims.
        let mut forged = claims();
        forged["sub"] = "mallory".into();
        let other = token(serde_json::json!({"alg": "none"}), forged);
        let (h, rest) = good.split_once('.').unwrap();
        let sig = rest.rsplit_once('.').unwrap().1;
        let payload = other.split('.').nth(1).unwrap();
        assert_eq!(
            check(&format!("{h}.{payload}.{sig}")),
            Err(TokenError::BadSignature)
        );
        // One bit of the signature flipped, and the signature cut short.
        let (input, sig) = good.rsplit_once('.').unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
        bytes[10] ^= 1;
        assert_eq!(
            check(&format!("{input}.{}", b64(&bytes))),
            Err(TokenError::BadSignature)
        );
        bytes.truncate(bytes.len() - 3);
        assert_eq!(
            check(&format!("{input}.{}", b64(&bytes))),
            Err(TokenError::BadSignature)
        );
    }
}

#[test]
fn alg_none_and_others_are_refused() {
    let none = token(serde_json::json!({"alg": "none"}), claims());
    assert_eq!(check(&none), Err(TokenError::UnsupportedAlg("none".into())));
    let unsigned = format!("{}.", none.trim_end_matches('.'));
    assert_eq!(
        check(&unsigned),
        Err(TokenError::UnsupportedAlg("none".into()))
    );
    let hs = token(serde_json::json!({"alg": "HS256", "kid": "hmac"}), claims());
    assert_eq!(check(&hs), Err(TokenError::UnsupportedAlg("HS256".into())));
}

#[test]
fn alg_and_key_type_must_match() {
    // An ES256 token naming the RSA key, and the reverse.
    assert_eq!(
        check(&token(es("rsa-1"), claims())),
        Err(TokenError::KeyMismatch)
    );
    assert_eq!(
        check(&token(rs("ec-1"), claims())),
        Err(TokenError::KeyMismatch)
    );
    // A key the JWKS pins to another alg is not used for ES256.
    let mut doc: Value = serde_json::from_str(&jwks_json()).unwrap();
    doc["keys"][1]["alg"] = "ES384".into();
    let (pinned, _) = parse_jwks(doc.to_string().as_bytes()).unwrap();
    assert_eq!(
        verify(&token(es("ec-1"), claims()), &pinned, &rules(), NOW),
        Err(TokenError::KeyMismatch)
    );
}

#[test]
fn unknown_kid() {
    assert_eq!(
        check(&token(rs("rsa-2"), claims())),
        Err(TokenError::UnknownKey)
    );
    // A JWKS with only the RSA key: an ES256 token without kid has no key.
    let mut doc: Value = serde_json::from_str(&jwks_json()).unwrap();
    doc["keys"].as_array_mut().unwrap().remove(1);
    let (rsa_only, _) = parse_jwks(doc.to_string().as_bytes()).unwrap();
    assert_eq!(
        verify(
            &token(serde_json::json!({"alg": "ES256"}), claims()),
            &rsa_only,
            &rules(),
            NOW
        ),
        Err(TokenError::UnknownKey)
    );
}

#[test]
fn malformed_tokens() {
    for bad in ["", "a.b", "a.b.c.d", "!!.e30.", "e30.e30.e30"] {
        assert!(
            matches!(check(bad), Err(TokenError::Malformed(_))),
            "{bad}: {:?}",
            check(bad)
        );
    }
    let crit = token(
        serde_json::json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}),
        claims(),
    );
    assert_eq!(check(&crit), Err(TokenError::Critical));
    let long = "a".repeat(MAX_TOKEN_BYTES + 1);
    assert_eq!(check(&long), Err(TokenError::Malformed("too long")));
}
