//! Device secrets and digests: generation, argon2id hashing and verification, SHA-256, hex.
//!
//! Invariants:
//! - A secret is 32 bytes from the thread-local CSPRNG (ChaCha seeded by the OS), written as 64
//!   lowercase hex digits. It exists in clear only in the response that creates or rotates it;
//!   the registry stores its argon2id PHC string (salted, default cost: 19 MiB, 2 passes) and,
//!   once it is known to be right, its SHA-256 digest.
//! - Verification is slow on purpose (tens of ms): callers run it in `spawn_blocking` behind a
//!   concurrency limit, and only when the digest cannot decide (see `Registry::authenticate`).
//! - Digests are compared in constant time ([`digest_eq`]).

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A SHA-256 digest.
pub type Sha256Digest = [u8; 32];

/// A fresh random secret (or API token): 32 random bytes as 64 lowercase hex digits.
pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    hex(&bytes)
}

/// The argon2id PHC string of `secret` with a random salt. Blocking and slow: call it from a
/// blocking thread.
pub fn hash(secret: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(secret.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `secret` matches the PHC string `phc`. An unparsable PHC string never matches.
/// Blocking and slow: call it from a blocking thread.
pub fn verify(secret: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "Stored secret hash is not a valid PHC string");
            false
        }
    }
}

/// An argon2id hash of a random secret nobody knows, with the same parameters as real ones:
/// verifying against it costs what verifying a real secret costs (see `Registry::authenticate`).
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash(&generate()).unwrap_or_default())
}

pub fn sha256(data: &[u8]) -> Sha256Digest {
    Sha256::digest(data).into()
}

/// Constant-time equality of two digests.
pub fn digest_eq(a: &Sha256Digest, b: &Sha256Digest) -> bool {
    a.ct_eq(b).into()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Parses 64 hex digits (either case) into a digest.
pub fn parse_sha256_hex(text: &str) -> Option<Sha256Digest> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_distinct_hex() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn hash_verifies_only_the_right_secret() {
        let secret = generate();
        let phc = hash(&secret).unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(!phc.contains(&secret));
        assert!(verify(&secret, &phc));
        assert!(!verify(&generate(), &phc));
        assert!(!verify(&secret, "not a phc string"));
    }

    #[test]
    fn hex_round_trip() {
        let d = sha256(b"abc");
        assert_eq!(
            hex(&d),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_sha256_hex(&hex(&d)), Some(d));
        assert_eq!(parse_sha256_hex(&hex(&d).to_uppercase()), Some(d));
        assert_eq!(parse_sha256_hex("abc"), None);
        assert_eq!(parse_sha256_hex(&"g".repeat(64)), None);
        assert!(digest_eq(&d, &d));
        assert!(!digest_eq(&d, &sha256(b"abd")));
    }
}
