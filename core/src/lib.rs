//! What every keylease crate agrees on, with no dependencies: the bounds and names both ends of
//! the protocol keep ([`bounds`]), secrets that never print and the masked form every place
//! shows them in ([`secret`]), and which of a project's limits a Gemini quota id names
//! ([`gemini`]). The protocol crate re-exports it; the engine, which cannot depend on tonic,
//! takes it from here.
#![forbid(unsafe_code)]

pub mod bounds;
pub mod gemini;
pub mod secret;

pub use bounds::*;
pub use secret::{ApiKey, mask_in, masked_secret};

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
