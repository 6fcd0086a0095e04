//! Secrets that never print: an API key is a newtype whose `Debug` and `Display` mask it, and
//! `reveal` is the one way to read it. The masked form (`AIza…x9Q2`) is the one every place
//! shows a secret in. Ids and fingerprints derived from a key, and the redaction of free text,
//! are the server's (`keylease_server::secret`).

use std::fmt;

/// An API key. Never printed in full.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself: for the lease reply, the provider, and the keyed hashes derived from
    /// it, nothing else.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    /// `AIza…x9Q2`: enough for an operator to tell keys apart, too little to use one.
    pub fn masked(&self) -> String {
        masked_secret(&self.0)
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

/// How a secret is shown wherever one must be named (`AIza…x9Q2`): enough for an operator to
/// tell keys apart, too little to use one; `…` alone for a secret under 12 characters.
pub fn masked_secret(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < 12 {
        return "…".to_string();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

/// `text` with every occurrence of `secret` masked as [`masked_secret`] shows it.
pub fn mask_in(text: &str, secret: &str) -> String {
    if secret.is_empty() || !text.contains(secret) {
        return text.to_string();
    }
    text.replace(secret, &masked_secret(secret))
}
