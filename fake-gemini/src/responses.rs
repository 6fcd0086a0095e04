//! The bodies the fake answers with: the real fixtures' shapes, filled in for the request.

use crate::limits::Violation;
use serde_json::{Value, json};
use std::time::Duration;

pub const API_KEY_INVALID: &str = include_str!("../fixtures/errors/400-api-key-invalid.json");
pub const API_KEY_EXPIRED: &str = include_str!("../fixtures/errors/400-api-key-expired.json");
pub const LEAKED: &str = include_str!("../fixtures/errors/403-leaked.json");
pub const SUSPENDED: &str = include_str!("../fixtures/errors/403-consumer-suspended.json");
pub const SERVICE_DISABLED: &str = include_str!("../fixtures/errors/403-service-disabled.json");
pub const UNREGISTERED: &str = include_str!("../fixtures/errors/403-unregistered-caller.json");
pub const QUOTA_NO_DETAILS: &str = include_str!("../fixtures/errors/429-no-details.json");
pub const INTERNAL: &str = include_str!("../fixtures/errors/500-internal.json");
pub const OVERLOADED: &str = include_str!("../fixtures/errors/503-overloaded.json");
pub const PROMPT_BLOCKED: &str =
    include_str!("../fixtures/responses/generate-content-prompt-blocked.json");
pub const ANSWER_BLOCKED: &str =
    include_str!("../fixtures/responses/generate-content-answer-blocked.json");

/// 404 for a model the fake does not serve, worded like Gemini's.
pub fn model_not_found(model: &str, method: &str) -> Value {
    json!({"error": {"code": 404, "status": "NOT_FOUND", "message": format!(
        "models/{model} is not found for API version v1beta, or is not supported for {method}. Call ListModels to see the list of available models and their supported methods."
    )}})
}

pub fn bad_request(message: &str) -> Value {
    json!({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": message}})
}

/// A 429 in the shape of `429-requests-per-minute.json` and its siblings, for this model.
pub fn quota_exceeded(violation: Violation, model: &str) -> Value {
    let (metric, quota_id, limit, retry_after) = match violation {
        Violation::RequestsPerMinute { limit, retry_after } => (
            "generate_content_free_tier_requests",
            "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            limit,
            retry_after,
        ),
        Violation::TokensPerMinute { limit, retry_after } => (
            "generate_content_free_tier_input_token_count",
            "GenerateContentInputTokensPerModelPerMinute-FreeTier",
            limit,
            retry_after,
        ),
        Violation::RequestsPerDay { limit, retry_after } => (
            "generate_content_free_tier_requests",
            "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
            limit,
            retry_after,
        ),
        Violation::TokensPerDay { limit, retry_after } => (
            "generate_content_free_tier_input_token_count",
            "GenerateContentInputTokensPerModelPerDay-FreeTier",
            limit,
            retry_after,
        ),
    };
    json!({"error": {
        "code": 429,
        "message": "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                "quotaMetric": format!("generativelanguage.googleapis.com/{metric}"),
                "quotaId": quota_id,
                "quotaDimensions": {"location": "global", "model": model},
                "quotaValue": limit.to_string(),
            }]},
            {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
            }]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": duration_string(retry_after)},
        ],
    }})
}

/// Gemini's duration strings: `"26s"`, `"55.837881432s"`.
fn duration_string(duration: Duration) -> String {
    let seconds = duration.as_secs_f64().max(0.001);
    if seconds.fract() == 0.0 {
        format!("{seconds}s")
    } else {
        format!("{seconds:.3}s")
    }
}

/// A prompt starting with this is answered with the rest of it, verbatim: a model's reply of
/// the test's choosing (JSON, broken JSON, prose).
pub const REPLY_VERBATIM: &str = "[[reply]]";

/// A normal answer: echoes the start of the prompt (or replies what the prompt dictates after
/// [`REPLY_VERBATIM`]), with usage like Gemini's.
pub fn answer(model: &str, prompt: &str, prompt_tokens: u64, response_id: u64) -> Value {
    let text = match prompt.strip_prefix(REPLY_VERBATIM) {
        Some(reply) => reply.to_string(),
        None => format!("echo: {}", prompt.chars().take(40).collect::<String>()),
    };
    let candidate_tokens = 8;
    json!({
        "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": candidate_tokens,
            "totalTokenCount": prompt_tokens + candidate_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
        },
        "modelVersion": model,
        "responseId": format!("fake-{response_id}"),
    })
}

/// The same answer as stream chunks, each with cumulative usage; the last holds the totals.
pub fn answer_chunks(
    model: &str,
    prompt: &str,
    prompt_tokens: u64,
    response_id: u64,
) -> Vec<Value> {
    let text: String = prompt.chars().take(40).collect();
    ["echo: ".to_string(), text].iter().enumerate().map(|(i, part)| {
        let candidate_tokens = 4 * (i as u64 + 1);
        let mut candidate = json!({"content": {"parts": [{"text": part}], "role": "model"}, "index": 0});
        if i == 1 {
            candidate["finishReason"] = json!("STOP");
        }
        json!({
            "candidates": [candidate],
            "usageMetadata": {"promptTokenCount": prompt_tokens, "candidatesTokenCount": candidate_tokens, "totalTokenCount": prompt_tokens + candidate_tokens},
            "modelVersion": model,
            "responseId": format!("fake-{response_id}"),
        })
    }).collect()
}

/// One model in the listing's shape.
pub fn model_entry(name: &str) -> Value {
    let embeds = name.contains("embedding");
    let methods = if embeds {
        json!(["embedContent", "batchEmbedContents", "countTokens"])
    } else {
        json!(["generateContent", "streamGenerateContent", "countTokens"])
    };
    json!({
        "name": format!("models/{name}"),
        "version": "001",
        "displayName": name,
        "description": format!("{name}, served by the fake"),
        "inputTokenLimit": 1_048_576,
        "outputTokenLimit": 65_536,
        "supportedGenerationMethods": methods,
    })
}

/// A small vector that depends on the text, so that tests can tell answers apart.
fn vector_of(text: &str) -> Vec<f64> {
    let sum: u64 = text.bytes().map(u64::from).sum();
    (0..4).map(|i| ((sum + i) % 97) as f64 / 97.0).collect()
}

/// `embedContent`'s answer.
pub fn embedding(text: &str) -> Value {
    json!({"embedding": {"values": vector_of(text)}})
}

/// `batchEmbedContents`' answer: one embedding per request, in order.
pub fn embeddings(texts: &[String]) -> Value {
    let embeddings: Vec<Value> = texts
        .iter()
        .map(|t| json!({"values": vector_of(t)}))
        .collect();
    json!({"embeddings": embeddings})
}

/// OpenAI's embeddings answer.
pub fn openai_embeddings(model: &str, inputs: &[String], prompt_tokens: u64) -> Value {
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, t)| json!({"object": "embedding", "index": index, "embedding": vector_of(t)}))
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
}

/// OpenAI's chat completion: the same echo as [`answer`].
pub fn openai_chat(model: &str, prompt: &str, prompt_tokens: u64, response_id: u64) -> Value {
    let text: String = prompt.chars().take(40).collect();
    json!({
        "id": format!("fake-{response_id}"),
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("echo: {text}")}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 8, "total_tokens": prompt_tokens + 8},
    })
}

/// The same completion streamed: two chunks, the last with the finish reason and the usage.
pub fn openai_chat_chunks(
    model: &str,
    prompt: &str,
    prompt_tokens: u64,
    response_id: u64,
) -> Vec<Value> {
    let text: String = prompt.chars().take(40).collect();
    let chunk = |delta: Value, finish: Value, usage: Value| {
        json!({
            "id": format!("fake-{response_id}"),
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            "usage": usage,
        })
    };
    vec![
        chunk(
            json!({"role": "assistant", "content": "echo: "}),
            Value::Null,
            Value::Null,
        ),
        chunk(
            json!({"content": text}),
            json!("stop"),
            json!({"prompt_tokens": prompt_tokens, "completion_tokens": 8, "total_tokens": prompt_tokens + 8}),
        ),
    ]
}
