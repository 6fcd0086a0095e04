//! API key secrets and the identifiers derived from them. A secret is a newtype whose `Debug` and
//! `Display` mask it; `reveal` is the one way to read it, used only where the key is handed to a
//! client or sent to a provider.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

/// An API key. Never printed in full.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself: for the lease reply and nothing else.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    /// `AIza…x9Q2`: enough for an operator to tell keys apart, too little to use one.
    pub fn masked(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() < 12 {
            return "…".to_string();
        }
        let head: String = chars[..4].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{head}…{tail}")
    }

    /// A stable identifier that is not secret: a keyed hash, so that the id of a key cannot be
    /// checked against a guessed secret without the salt.
    pub fn derived_id(&self, salt: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(salt.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(self.0.as_bytes());
        let digest = mac.finalize().into_bytes();
        let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("key-{hex}")
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.masked())
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAKE: &str = "AIzaFAKE.test-key-0000000000000000000x9Q2";

    #[test]
    fn debug_and_display_mask_the_secret() {
        let key = ApiKey::new(FAKE);
        assert_eq!(format!("{key}"), "AIza…x9Q2");
        assert_eq!(format!("{key:?}"), "ApiKey(AIza…x9Q2)");
        assert!(!format!("{key:?}").contains("FAKE"));
    }

    #[test]
    fn short_secrets_are_masked_entirely() {
        assert_eq!(ApiKey::new("short-key").masked(), "…");
    }

    #[test]
    fn derived_id_is_stable_and_depends_on_the_salt() {
        let key = ApiKey::new(FAKE);
        assert_eq!(key.derived_id("a"), key.derived_id("a"));
        assert_ne!(key.derived_id("a"), key.derived_id("b"));
        assert!(!key.derived_id("a").contains("AIza"));
    }
}
