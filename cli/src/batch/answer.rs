//! What a task keeps of Gemini's answer: its text, or with `--json` the JSON in it. Models break
//! JSON in a few common ways (a code fence around it, prose before it, trailing commas, single
//! quotes); those are repaired. An answer with no object or array in it, or one cut off at the
//! token limit, is not JSON however it is repaired: the task is tried again.

use serde_json::Value;

/// Why an answer is not the JSON asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotJson {
    #[error("the answer was cut off at the output token limit ({0} characters of it)")]
    Truncated(usize),
    #[error("the answer holds no JSON object or array: {0:?}")]
    NoJson(String),
}

/// Longest start of an answer quoted in an error.
const QUOTED_CHARS: usize = 80;

/// The JSON in `text`, repaired if need be. `finish_reason` is the candidate's: an answer
/// stopped at `MAX_TOKENS` would only be "repaired" by closing what was cut off.
pub fn parse_json(text: &str, finish_reason: Option<&str>) -> Result<Value, NotJson> {
    if let Ok(value) = serde_json::from_str(text.trim()) {
        return Ok(value);
    }
    if finish_reason == Some("MAX_TOKENS") {
        return Err(NotJson::Truncated(text.chars().count()));
    }
    let no_json = || NotJson::NoJson(text.chars().take(QUOTED_CHARS).collect());
    // Repair turns any prose into a JSON string: only an object or an array it found counts.
    if !text.contains(['{', '[']) {
        return Err(no_json());
    }
    match llm_json::loads(text, &Default::default()) {
        Ok(value @ (Value::Object(_) | Value::Array(_))) if !is_empty_container(&value) => {
            Ok(value)
        }
        _ => Err(no_json()),
    }
}

/// `{}` or `[]`, which repair returns for text it could make nothing of.
fn is_empty_container(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn valid_json_is_taken_as_it_is() {
        assert_eq!(parse_json(" {\"a\": 1} ", None), Ok(json!({"a": 1})));
        assert_eq!(parse_json("[1, 2]", Some("STOP")), Ok(json!([1, 2])));
        // A JSON answer that is not a container is still the JSON asked for.
        assert_eq!(parse_json("42", None), Ok(json!(42)));
        assert_eq!(parse_json("{}", None), Ok(json!({})));
    }

    #[test]
    fn common_breakage_is_repaired() {
        let cases = [
            (
                "```json\n{\"city\": \"Paris\"}\n```",
                json!({"city": "Paris"}),
            ),
            ("```\n[1, 2, 3]\n```", json!([1, 2, 3])),
            ("{\"a\": 1, \"b\": [1, 2,],}", json!({"a": 1, "b": [1, 2]})),
            (
                "{'name': 'Ada', 'tags': ['x']}",
                json!({"name": "Ada", "tags": ["x"]}),
            ),
            (
                "Sure! Here is the JSON you asked for:\n{\"ok\": true}",
                json!({"ok": true}),
            ),
            (
                "```json\n{'answer': 'Paris', 'confidence': 0.9,}\n```",
                json!({"answer": "Paris", "confidence": 0.9}),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_json(text, Some("STOP")), Ok(expected), "{text:?}");
        }
    }

    #[test]
    fn prose_and_cut_answers_are_not_json() {
        for text in ["The capital of France is Paris.", "", "{ ,, }", "[,]"] {
            assert!(
                matches!(parse_json(text, Some("STOP")), Err(NotJson::NoJson(_))),
                "{text:?}"
            );
        }
        assert_eq!(
            parse_json("{\"items\": [1, 2", Some("MAX_TOKENS")),
            Err(NotJson::Truncated(15))
        );
        let long = "word ".repeat(100);
        let Err(NotJson::NoJson(quoted)) = parse_json(&long, None) else {
            panic!("prose")
        };
        assert_eq!(quoted.chars().count(), QUOTED_CHARS);
    }
}
