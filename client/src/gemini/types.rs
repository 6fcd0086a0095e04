//! The `v1beta` wire types of `generateContent`, as far as callers and the service need them;
//! fields this crate does not model are kept in `extra` and sent back as they came.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentRequest {
    pub contents: Vec<Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_instruction: Option<Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_config: Option<GenerationConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub safety_settings: Vec<SafetySetting>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Value>,
}

impl GenerateContentRequest {
    /// One user turn of plain text.
    pub fn text(prompt: impl Into<String>) -> Self {
        Self {
            contents: vec![Content::user(prompt)],
            ..Self::default()
        }
    }

    /// About four characters a token: the estimate keylease reserves before the real count.
    pub fn estimated_input_tokens(&self) -> u64 {
        let chars: usize = self
            .contents
            .iter()
            .chain(self.system_instruction.iter())
            .flat_map(|c| c.parts.iter())
            .filter_map(|p| p.text.as_ref())
            .map(|t| t.chars().count())
            .sum();
        (chars as u64).div_ceil(4).max(1)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Content {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default)]
    pub parts: Vec<Part>,
}

impl Content {
    pub fn user(text: impl Into<String>) -> Self {
        Self {
            role: Some("user".into()),
            parts: vec![Part::text(text)],
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Part {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Inline data, function calls, thoughts and anything newer.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Part {
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: Some(text.into()),
            extra: Map::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerationConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop_sequences: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_mime_type: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SafetySetting {
    pub category: String,
    pub threshold: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentResponse {
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    pub prompt_feedback: Option<PromptFeedback>,
    pub usage_metadata: Option<UsageMetadata>,
    pub model_version: Option<String>,
    pub response_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub content: Option<Content>,
    pub finish_reason: Option<String>,
    pub index: Option<u32>,
    #[serde(default)]
    pub safety_ratings: Vec<SafetyRating>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SafetyRating {
    pub category: String,
    pub probability: String,
    #[serde(default)]
    pub blocked: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PromptFeedback {
    pub block_reason: Option<String>,
    #[serde(default)]
    pub safety_ratings: Vec<SafetyRating>,
}

/// Token counts; `total` = prompt + candidates + thoughts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageMetadata {
    #[serde(default)]
    pub prompt_token_count: u64,
    #[serde(default)]
    pub candidates_token_count: u64,
    #[serde(default)]
    pub thoughts_token_count: u64,
    #[serde(default)]
    pub total_token_count: u64,
}

/// A content decision of the provider's: not a failure of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// The prompt was refused (`promptFeedback.blockReason`); there are no candidates.
    Prompt { reason: String },
    /// The answer was stopped (`finishReason` such as `SAFETY`).
    Answer { finish_reason: String },
}

impl GenerateContentResponse {
    /// The first candidate's text, joined.
    pub fn text(&self) -> Option<String> {
        let parts = &self.candidates.first()?.content.as_ref()?.parts;
        let text: String = parts.iter().filter_map(|p| p.text.as_deref()).collect();
        (!text.is_empty()).then_some(text)
    }

    pub fn block(&self) -> Option<Block> {
        if let Some(reason) = self
            .prompt_feedback
            .as_ref()
            .and_then(|f| f.block_reason.clone())
        {
            return Some(Block::Prompt { reason });
        }
        let finish = self.candidates.first()?.finish_reason.as_deref()?;
        matches!(
            finish,
            "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY"
        )
        .then(|| Block::Answer {
            finish_reason: finish.to_string(),
        })
    }
}
