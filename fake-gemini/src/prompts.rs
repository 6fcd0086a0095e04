//! The text a request asks about, in each shape the fake accepts (Gemini's and OpenAI's), and
//! the tokens it counts for it.

use serde_json::Value;

/// The texts of a `batchEmbedContents` request, one per embedding asked for.
pub(super) fn batch_texts(request: &Value) -> Vec<String> {
    request
        .get("requests")
        .and_then(Value::as_array)
        .map(|requests| {
            requests
                .iter()
                .map(|r| content_text(r.get("content")))
                .collect()
        })
        .unwrap_or_default()
}

/// The `input` of an OpenAI embeddings request: a string or a list of them.
pub(super) fn openai_inputs(request: &Value) -> Vec<String> {
    match request.get("input") {
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// The text parts of one `content`.
fn content_text(content: Option<&Value>) -> String {
    content
        .and_then(|c| c.get("parts"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|part| part.get("text").and_then(Value::as_str))
        .collect()
}

/// All text of the request: its contents' parts (`generateContent`), its content's
/// (`embedContent`), its requests' (`batchEmbedContents`), or OpenAI's messages and inputs.
pub(super) fn prompt_text(request: &Value) -> String {
    let mut text = content_text(request.get("content"));
    for part in batch_texts(request) {
        text.push_str(&part);
    }
    for input in openai_inputs(request) {
        text.push_str(&input);
    }
    for message in request
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match message.get("content") {
            Some(Value::String(content)) => text.push_str(content),
            Some(Value::Array(parts)) => {
                for part in parts {
                    if let Some(t) = part.get("text").and_then(Value::as_str) {
                        text.push_str(t);
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(contents) = request.get("contents").and_then(Value::as_array) {
        for content in contents {
            for part in content
                .get("parts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(t) = part.get("text").and_then(Value::as_str) {
                    text.push_str(t);
                }
            }
        }
    }
    text
}

/// Gemini counts about four characters a token.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}
