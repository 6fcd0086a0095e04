//! The bodies the fake answers with: the real fixtures' shapes, filled in for the request.

use crate::limits::Violation;
use serde_json::{Value, json};
use std::time::Duration;

pub const API_KEY_INVALID: &str = include_str!("../fixtures/errors/400-api-key-invalid.json");
pub const API_KEY_EXPIRED: &str = include_str!("../fixtures/errors/400-api-key-expired.json");
pub const LEAKED: &str = include_str!("../fixtures/errors/403-leaked.json");
pub const SUSPENDED: &str = include_str!("../fixtures/errors/403-consumer-suspended.json");
pub const UNREGISTERED: &str = include_str!("../fixtures/errors/403-unregistered-caller.json");
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

/// A normal answer: echoes the start of the prompt, with usage like Gemini's.
pub fn answer(model: &str, prompt: &str, prompt_tokens: u64, response_id: u64) -> Value {
    let text: String = prompt.chars().take(40).collect();
    let candidate_tokens = 8;
    json!({
        "candidates": [{"content": {"parts": [{"text": format!("echo: {text}")}], "role": "model"}, "finishReason": "STOP", "index": 0}],
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
