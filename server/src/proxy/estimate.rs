//! What a request will cost and what an answer says it cost: the input-token estimate booked
//! when the lease is taken, and the prompt tokens an answer reports, read as its bytes pass.

use serde_json::Value;

/// Tokens booked for each media part (an image, audio, a video or a file reference), whatever
/// its size: what Gemini counts for an image of up to 384×384 pixels. Larger media cost more;
/// the release corrects the books with the answer's own count.
pub const TOKENS_PER_MEDIA_PART: u64 = 258;

/// Keys whose objects are media parts, in Gemini's and OpenAI's request shapes.
const MEDIA_KEYS: [&str; 5] = ["inlineData", "fileData", "image_url", "input_audio", "file"];

/// The input-token estimate of a request body: the bytes of its text over four, plus
/// [`TOKENS_PER_MEDIA_PART`] per media part. Every string counts as text except the media's own
/// data, so roles and settings make it a little high rather than low.
pub fn input_tokens(body: &Value) -> u64 {
    let (text_bytes, media_parts) = measure(body);
    text_bytes
        .div_ceil(4)
        .saturating_add(media_parts.saturating_mul(TOKENS_PER_MEDIA_PART))
        .max(1)
}

/// Text bytes and media parts under `value` (whose depth serde_json bounds at 128 when it
/// reads a request).
fn measure(value: &Value) -> (u64, u64) {
    let (mut text_bytes, mut media_parts) = (0u64, 0u64);
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::String(text) => text_bytes = text_bytes.saturating_add(text.len() as u64),
            Value::Array(items) => pending.extend(items),
            Value::Object(fields) => {
                for (key, field) in fields {
                    if MEDIA_KEYS.contains(&key.as_str()) {
                        media_parts = media_parts.saturating_add(1);
                    } else {
                        pending.push(field);
                    }
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    (text_bytes, media_parts)
}

/// Reads, from an answer's bytes as they pass (whole, as a server-sent event stream or as a
/// JSON array), the last value of a usage field: `promptTokenCount` (Gemini, cumulative in a
/// stream, so the last is the total) or `prompt_tokens` (OpenAI). A field name inside generated
/// text is escaped (`\"`) there and never matches.
#[derive(Debug)]
pub struct UsageReader {
    pattern: &'static [u8],
    /// The end of what was read: enough to hold a field cut between two chunks.
    tail: Vec<u8>,
    last: Option<u64>,
}

/// Longest tail kept between chunks: the field's name, white space and a number.
const TAIL: usize = 96;

impl UsageReader {
    pub fn gemini() -> Self {
        Self::new(b"\"promptTokenCount\"")
    }

    pub fn openai() -> Self {
        Self::new(b"\"prompt_tokens\"")
    }

    fn new(pattern: &'static [u8]) -> Self {
        Self {
            pattern,
            tail: Vec::new(),
            last: None,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        self.tail.extend_from_slice(chunk);
        let mut from = 0;
        while let Some(found) = find(&self.tail[from..], self.pattern) {
            let start = from + found + self.pattern.len();
            match number_after(&self.tail[start..]) {
                Parsed::Number(value) => self.last = Some(value),
                Parsed::Incomplete => break,
                Parsed::Not => {}
            }
            from = start;
        }
        // Keep only what may still start a match the next chunk completes.
        let keep_from = match find(&self.tail[from..], self.pattern) {
            Some(found) => from + found,
            None => self.tail.len().saturating_sub(TAIL),
        };
        self.tail.drain(..keep_from.min(self.tail.len()));
        if self.tail.len() > 4 * TAIL {
            let excess = self.tail.len() - TAIL;
            self.tail.drain(..excess);
        }
    }

    /// The last count read, if any.
    pub fn prompt_tokens(&self) -> Option<u64> {
        self.last
    }
}

enum Parsed {
    Number(u64),
    /// The bytes end before the number does.
    Incomplete,
    Not,
}

/// `: 123` after a field's name.
fn number_after(bytes: &[u8]) -> Parsed {
    let mut rest = bytes.iter().skip_while(|b| b.is_ascii_whitespace());
    match rest.next() {
        Some(b':') => {}
        Some(_) => return Parsed::Not,
        None => return Parsed::Incomplete,
    }
    let mut value: u64 = 0;
    for (digits, &byte) in rest.skip_while(|b| b.is_ascii_whitespace()).enumerate() {
        if !byte.is_ascii_digit() {
            return if digits == 0 {
                Parsed::Not
            } else {
                Parsed::Number(value)
            };
        }
        value = value
            .saturating_mul(10)
            .saturating_add(u64::from(byte - b'0'));
    }
    Parsed::Incomplete
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_counts_a_quarter_token_a_byte_and_media_a_fixed_figure() {
        let text = json!({"contents": [{"role": "user", "parts": [{"text": "x".repeat(396)}]}]});
        // 396 bytes of text and 4 of the role.
        assert_eq!(input_tokens(&text), 100);
        let image = json!({"contents": [{"parts": [
            {"text": "abcd"},
            {"inlineData": {"mimeType": "image/png", "data": "A".repeat(100_000)}},
        ]}]});
        assert_eq!(input_tokens(&image), 1 + TOKENS_PER_MEDIA_PART);
        let openai = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hello"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]}]});
        assert_eq!(input_tokens(&openai), 6 + TOKENS_PER_MEDIA_PART);
        assert_eq!(input_tokens(&json!({})), 1);
    }

    #[test]
    fn the_last_usage_wins_even_when_cut_between_chunks() {
        let stream = concat!(
            "data: {\"usageMetadata\": {\"promptTokenCount\": 7, \"totalTokenCount\": 9}}\r\n\r\n",
            "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"say \\\"promptTokenCount\\\": 99\"}]}}], ",
            "\"usageMetadata\": {\"promptTokenCount\": 12345, \"totalTokenCount\": 12350}}\r\n\r\n",
        )
        .as_bytes();
        for size in [1, 2, 3, 7, 50, stream.len()] {
            let mut reader = UsageReader::gemini();
            for chunk in stream.chunks(size) {
                reader.feed(chunk);
            }
            assert_eq!(reader.prompt_tokens(), Some(12345), "chunks of {size}");
        }
        let mut none = UsageReader::gemini();
        none.feed(b"[{\"candidates\": []}]");
        assert_eq!(none.prompt_tokens(), None);
        let mut openai = UsageReader::openai();
        openai.feed(b"{\"usage\":{\"prompt_tokens\":31,\"completion_tokens\":2}}");
        assert_eq!(openai.prompt_tokens(), Some(31));
    }
}
