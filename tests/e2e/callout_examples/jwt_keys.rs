//! Test-side JWTs for the jwks-auth tests: keys made and tokens signed by
//! the `openssl` command-line tool in a scratch dir, JWKs built from them.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::common::TempDir;

/// Run `openssl` with `args` in `dir`; its stdout.
fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The unsigned big-endian integer of a DER INTEGER's content, left-padded
/// (or stripped of its sign byte) to `len` bytes.
fn fixed(int: &[u8], len: usize) -> Vec<u8> {
    let int = &int[int.len().saturating_sub(len)..];
    let mut out = vec![0; len - int.len()];
    out.extend_from_slice(int);
    out
}

/// An ECDSA signature in DER (`SEQUENCE { INTEGER r, INTEGER s }`) as JWS
/// wants it: r || s, 32 bytes each.
fn der_to_jws(der: &[u8]) -> Vec<u8> {
    assert_eq!(der[0], 0x30, "not a DER sequence");
    // P-256 signatures are short enough for one-byte lengths.
    let mut at = 2;
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[at], 0x02, "not a DER integer");
        let len = der[at + 1] as usize;
        out.extend(fixed(&der[at + 2..at + 2 + len], 32));
        at += 2 + len;
    }
    out
}

/// A signing key made by `openssl` in a scratch dir: RSA 2048 (RS256) or
/// P-256 (ES256), with its JWK.
pub struct TestKey {
    dir: TempDir,
    pub alg: &'static str,
    kid: String,
}

impl TestKey {
    pub fn rsa(kid: &str) -> TestKey {
        let dir = TempDir::new("jwk");
        openssl(
            dir.path(),
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "key.pem",
            ],
        );
        TestKey {
            dir,
            alg: "RS256",
            kid: kid.to_string(),
        }
    }

    pub fn ec(kid: &str) -> TestKey {
        let dir = TempDir::new("jwk");
        openssl(
            dir.path(),
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "key.pem",
            ],
        );
        TestKey {
            dir,
            alg: "ES256",
            kid: kid.to_string(),
        }
    }

    fn jwk(&self) -> serde_json::Value {
        if self.alg == "RS256" {
            let out = openssl(
                self.dir.path(),
                &["rsa", "-in", "key.pem", "-noout", "-modulus"],
            );
            let hex = String::from_utf8(out).unwrap();
            let hex = hex.trim().strip_prefix("Modulus=").expect("Modulus=");
            let n: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            // openssl's default public exponent is 65537.
            serde_json::json!({ "kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                                "n": b64(&n), "e": "AQAB" })
        } else {
            let spki = openssl(
                self.dir.path(),
                &["pkey", "-in", "key.pem", "-pubout", "-outform", "DER"],
            );
            // A P-256 SPKI ends with the uncompressed point 04 || x || y.
            let point = &spki[spki.len() - 65..];
            assert_eq!(point[0], 4);
            serde_json::json!({ "kty": "EC", "crv": "P-256", "kid": self.kid,
                                "x": b64(&point[1..33]), "y": b64(&point[33..]) })
        }
    }

    /// A compact JWS of `claims`, signed with this key under `alg` (which
    /// may lie, to test the filter).
    pub fn sign_as(&self, alg: &str, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({ "alg": alg, "typ": "JWT", "kid": self.kid });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        self.dir.write("input", &input);
        let sig = openssl(
            self.dir.path(),
            &["dgst", "-sha256", "-sign", "key.pem", "input"],
        );
        let sig = if self.alg == "ES256" {
            der_to_jws(&sig)
        } else {
            sig
        };
        format!("{input}.{}", b64(&sig))
    }

    pub fn sign(&self, claims: &serde_json::Value) -> String {
        self.sign_as(self.alg, claims)
    }
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({ "sub": sub, "iss": "https://idp.test", "aud": "api",
                        "iat": now_s(), "exp": now_s() + 600 })
}

pub fn jwks(keys: &[&TestKey]) -> String {
    serde_json::json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
}
