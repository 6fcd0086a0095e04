//! The identifiers derived from API keys (ids, store fingerprints), and the one redaction of
//! secrets in free text. The key itself, a newtype whose `Debug` and `Display` mask it, is
//! [`keylease_core::ApiKey`].

use aho_corasick::{AhoCorasick, MatchKind};
use hmac::{Hmac, Mac};
use regex::Regex;
use sha2::Sha256;
use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, LazyLock};

use keylease_core::ApiKey;

/// A stable identifier of `secret` that is not secret: a keyed hash, so that the id of a key
/// cannot be checked against a guessed secret without the salt.
pub fn derived_id(secret: &ApiKey, salt: &str) -> String {
    format!(
        "key-{}",
        hex(&keyed_hash(salt.as_bytes(), secret.reveal())[..6])
    )
}

/// The key of the fingerprints, kept in the state directory (memory only when ephemeral).
#[derive(Clone, PartialEq, Eq)]
pub struct FingerprintKey([u8; 32]);

impl FingerprintKey {
    pub const LEN: usize = 32;

    pub fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes)
    }

    /// A new key from the operating system's random source.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0; Self::LEN];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// The key every replica of a fleet derives from their shared token, so that they all
    /// fingerprint a secret alike while Redis, which holds the fingerprints, never holds the key.
    pub fn shared_by_replicas(token: &ApiKey) -> Self {
        let hash = keyed_hash(b"keylease replica fingerprint key", token.reveal());
        let mut bytes = [0; Self::LEN];
        bytes.copy_from_slice(&hash[..Self::LEN]);
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    /// A key's identity in a state store, whatever id it is configured under: a keyed hash
    /// under the store's own key, so the store never holds anything a secret can be checked
    /// against without that key.
    pub fn fingerprint(&self, secret: &ApiKey) -> String {
        hex(&keyed_hash(&self.0, secret.reveal())[..16])
    }
}

impl fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintKey(…)")
    }
}

fn keyed_hash(key: &[u8], text: &str) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(text.as_bytes());
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Text shaped like a credential, ours or not: Google API keys, `sk-` keys, bearer tokens.
/// Word boundaries are ASCII ones, so that non-ASCII text keeps the regex on its fast path.
static CREDENTIAL_SHAPES: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"AIza[0-9A-Za-z_\-]{35}|(?-u:\b)sk-[0-9A-Za-z_\-]{20,}|(?i-u:\bbearer\s+)[0-9A-Za-z._~+/=\-]{8,}",
    )
    .expect("a valid pattern")
});

/// Masks secrets in free text that clients or configuration mistakes put there (a provider's
/// error message pasted into a failure report, a key typed as a reason): every secret the server
/// was configured with, and anything shaped like a credential. Each is replaced by its masked
/// form, as [`ApiKey::masked`] shows it. Cheap to clone.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Every configured secret; `None` when there are none.
    known: Option<Arc<AhoCorasick>>,
    /// SHA-256 of tokens known only by their hash (`server.tokens`): a word of free text
    /// whose hash is one of these is that token.
    token_hashes: Arc<std::collections::HashSet<[u8; 32]>>,
}

/// A bearer token as RFC 6750 spells one (`token68`, `_` included), long enough to be one of
/// ours.
static TOKEN_CANDIDATE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[0-9A-Za-z._~+/\-]{8,}=*").expect("a valid pattern"));

impl Redactor {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a ApiKey>) -> Self {
        let secrets: Vec<&str> = secrets
            .into_iter()
            .map(ApiKey::reveal)
            .filter(|s| !s.is_empty())
            .collect();
        if secrets.is_empty() {
            return Self::default();
        }
        let known = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(secrets)
            .expect("secrets are bounded in number and size");
        Self {
            known: Some(Arc::new(known)),
            token_hashes: Arc::default(),
        }
    }

    /// Also masks the tokens whose SHA-256 are `hashes`, wherever they stand as a word.
    pub fn with_token_hashes(mut self, hashes: impl IntoIterator<Item = [u8; 32]>) -> Self {
        self.token_hashes = Arc::new(hashes.into_iter().collect());
        self
    }

    /// Whether `word`, or a part of it between `/` (a path that quotes a token), is a token.
    fn holds_token(&self, word: &str) -> bool {
        self.is_token(word) || (word.contains('/') && word.split('/').any(|p| self.is_token(p)))
    }

    /// `word` with the token it is, or the tokens among its parts between `/`, masked.
    fn mask_tokens_in(&self, word: &str) -> String {
        if self.is_token(word) {
            return ApiKey::new(word).masked();
        }
        word.split('/')
            .map(|part| {
                if self.is_token(part) {
                    ApiKey::new(part).masked()
                } else {
                    part.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    fn is_token(&self, word: &str) -> bool {
        use sha2::Digest;
        !self.token_hashes.is_empty()
            && self
                .token_hashes
                .contains(&<[u8; 32]>::from(Sha256::digest(word.as_bytes())))
    }

    /// `text` with every secret in it masked; borrowed when there was none.
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let mut text = Cow::Borrowed(text);
        if let Some(known) = &self.known
            && known.is_match(text.as_ref())
        {
            let mut masked = String::with_capacity(text.len());
            known.replace_all_with(&text, &mut masked, |_, secret, out| {
                out.push_str(&ApiKey::new(secret).masked());
                true
            });
            text = Cow::Owned(masked);
        }
        if !self.token_hashes.is_empty()
            && TOKEN_CANDIDATE
                .find_iter(&text)
                .any(|word| self.holds_token(word.as_str()))
        {
            let masked = TOKEN_CANDIDATE
                .replace_all(&text, |found: &regex::Captures<'_>| {
                    self.mask_tokens_in(&found[0])
                })
                .into_owned();
            text = Cow::Owned(masked);
        }
        if CREDENTIAL_SHAPES.is_match(&text) {
            let masked = CREDENTIAL_SHAPES
                .replace_all(&text, |found: &regex::Captures<'_>| {
                    ApiKey::new(&found[0]).masked()
                })
                .into_owned();
            text = Cow::Owned(masked);
        }
        text
    }

    /// Whether `text` holds anything [`Redactor::redact`] would mask.
    pub fn finds_secret(&self, text: &str) -> bool {
        self.known.as_ref().is_some_and(|k| k.is_match(text))
            || CREDENTIAL_SHAPES.is_match(text)
            || TOKEN_CANDIDATE
                .find_iter(text)
                .any(|word| self.holds_token(word.as_str()))
    }
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.known.as_ref().map_or(0, |k| k.patterns_len());
        write!(f, "Redactor({count} secrets)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A string of the real Gemini key shape, made at run time so no such literal is in the tree.
    fn key_shaped() -> String {
        format!("AIza{}", "Xy9_-".repeat(7))
    }

    #[test]
    fn tokens_known_by_their_hash_are_masked_as_words() {
        use sha2::Digest;
        let token = "kl_0123456789abcdef";
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let redactor = Redactor::default().with_token_hashes([hash]);
        let text = format!("my token is {token}, not kl_0123456789abcdeX; token={token}");
        assert_eq!(
            redactor.redact(&text),
            "my token is kl_0…cdef, not kl_0123456789abcdeX; token=kl_0…cdef"
        );
        assert!(redactor.finds_secret(token));
        assert!(!redactor.finds_secret("kl_0123456789abcde"));
        // A path quotes it between slashes.
        assert_eq!(
            redactor.redact(&format!("POST /v1beta/{token}/models: not found")),
            "POST /v1beta/kl_0…cdef/models: not found"
        );
        assert!(redactor.finds_secret(&format!("/{token}")));
    }

    #[test]
    fn configured_secrets_are_masked_wherever_they_stand() {
        let arbitrary = ApiKey::new("tok3n-without-any-shape-9Zq");
        let redactor = Redactor::new([&arbitrary, &ApiKey::new(FAKE)]);
        let text = format!("got 403 for key={FAKE}&x=1; token {}!", arbitrary.reveal());
        let masked = redactor.redact(&text);
        assert_eq!(masked, "got 403 for key=AIza…x9Q2&x=1; token tok3…-9Zq!");
        assert!(redactor.finds_secret(&text));
    }

    #[test]
    fn credential_shaped_text_is_masked_though_not_configured() {
        let redactor = Redactor::default();
        let key = key_shaped();
        for text in [
            format!("API key not valid: {key}"),
            "header Authorization: Bearer abcdEFGH1234.5678-zz".to_string(),
            format!("openai said sk-proj-{}", "a1B2".repeat(8)),
        ] {
            let masked = redactor.redact(&text);
            assert_ne!(masked, text);
            assert!(
                !masked.contains(&key)
                    && !masked.contains("abcdEFGH1234")
                    && !masked.contains("a1B2a1B2"),
                "{masked}"
            );
        }
        assert!(matches!(
            redactor.redact("nothing secret here"),
            Cow::Borrowed(_)
        ));
    }

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
        assert_eq!(derived_id(&key, "a"), derived_id(&key, "a"));
        assert_ne!(derived_id(&key, "a"), derived_id(&key, "b"));
        assert!(!derived_id(&key, "a").contains("AIza"));
    }
}
