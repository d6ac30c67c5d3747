//! Standard Webhooks v1 signatures (<https://www.standardwebhooks.com>):
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`
//! with the key from a `whsec_<base64>` secret. Written here over `hmac`
//! and `sha2` because the `standardwebhooks` crate pulls in its own HTTP
//! types for a dozen lines of work; the tests verify our signatures with
//! that crate.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A decoded signing secret.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(hidden)")
    }
}

impl SigningKey {
    /// Parses `whsec_<base64>` (the prefix is optional, as receivers
    /// accept both).
    pub fn parse(secret: &str) -> Result<Self, String> {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| {
                "the signing secret is not `whsec_` followed by base64; generate one with `openssl rand -base64 32` and prefix it with whsec_".to_string()
            })?;
        if key.len() < 16 {
            return Err(format!(
                "the signing secret holds {} bytes; use at least 16 (24 to 64 is usual)",
                key.len()
            ));
        }
        Ok(Self(key))
    }

    /// The `webhook-signature` header value.
    pub fn sign(&self, message_id: &str, timestamp: i64, body: &[u8]) -> String {
        // Cannot fail: HMAC takes keys of any length (longer ones are
        // hashed, shorter ones padded); `InvalidLength` exists for MACs
        // with fixed key sizes only.
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC-SHA256 takes keys of any length");
        mac.update(message_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_specification_example() {
        // The example of the Standard Webhooks specification.
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn short_or_malformed_secrets_are_refused() {
        assert!(SigningKey::parse("whsec_not base64!").is_err());
        assert!(SigningKey::parse("whsec_AAAA").is_err());
    }
}
