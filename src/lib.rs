//! The keylease wire protocol: the generated gRPC and protobuf code of `keylease.v1`, and the
//! limits and names that both ends of the protocol must agree on. Nothing else lives here;
//! conversions to domain types happen at the server's edge.
#![forbid(unsafe_code)]

/// Generated code of `proto/keylease/v1/keylease.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keylease.v1");

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keylease_descriptor");
}

/// Longest task id and client request id, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest key id, project name or pool name, in bytes: each is shown in every status reply,
/// metric label and log line about its key.
pub const MAX_NAME_BYTES: usize = 128;
/// Most key ids one acquire may exclude: more than any pool holds keys to try in one task.
pub const MAX_EXCLUDED_KEYS: usize = 1024;
/// Longest free text a caller sends (a failure's detail, a disable's reason), in bytes.
pub const MAX_DETAIL_BYTES: usize = 1024;
/// Largest input token figure a request may carry (an estimate, an addition, a release's
/// count): far above any real lease (a thousand requests of two million tokens each), and low
/// enough that no sum of them in a quota window can overflow.
pub const MAX_INPUT_TOKENS: u64 = 10_000_000_000;
/// Most quota violations one failure report carries.
pub const MAX_QUOTA_VIOLATIONS: usize = 8;
/// Largest limit figure a quota violation may name: far above any provider's limit.
pub const MAX_QUOTA_VALUE: u64 = 1_000_000_000_000;
/// The domain of the `google.rpc.ErrorInfo` a `RESOURCE_EXHAUSTED` reply carries.
pub const ERROR_DOMAIN: &str = "keylease.v1";
/// Metadata key of a `RESOURCE_EXHAUSTED` reply carrying the retry delay in milliseconds, for
/// clients that do not read `google.rpc.RetryInfo`.
pub const RETRY_AFTER_METADATA: &str = "retry-after-ms";
/// Metadata key of a `RESOURCE_EXHAUSTED` reply carrying why no key could be lent, as the name
/// of an `UnavailableReason` (`UNAVAILABLE_REASON_ALL_DISABLED`), for clients that do not read
/// `google.rpc.ErrorInfo`.
pub const UNAVAILABLE_REASON_METADATA: &str = "unavailable-reason";

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

/// The longest prefix of `text` that fits `max_bytes` without splitting a character.
pub fn truncate_on_char_boundary(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let end = (0..=max_bytes)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters_within_the_byte_limit() {
        // Three bytes a character: 1024 bytes hold 341 of them and a third of one more.
        let text = "語".repeat(400);
        let cut = truncate_on_char_boundary(&text, MAX_DETAIL_BYTES);
        assert_eq!(cut.len(), 341 * 3);
        assert_eq!(
            truncate_on_char_boundary("short", MAX_DETAIL_BYTES),
            "short"
        );
    }
}
