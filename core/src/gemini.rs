//! Which of a project's limits a Gemini `quotaId` names: the one mapping the client's
//! classifier and the server's learning both read.

/// Which of a project's limits a Gemini `quotaId` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaLimit {
    RequestsPerMinute,
    InputTokensPerMinute,
    RequestsPerDay,
    /// Input tokens per day, which some models have.
    InputTokensPerDay,
}

impl QuotaLimit {
    /// Whether it is counted over a day: spent, it rests the project until the daily reset.
    pub fn is_daily(self) -> bool {
        matches!(self, Self::RequestsPerDay | Self::InputTokensPerDay)
    }
}

/// The limit a `quotaId` names: `GenerateRequestsPerDayPerProjectPerModel-FreeTier`,
/// `GenerateContentInputTokensPerModelPerDay-FreeTier`,
/// `GenerateContentInputTokensPerModelPerMinute-FreeTier`,
/// `GenerateRequestsPerMinutePerProjectPerModel-FreeTier`; `None` for one it does not know.
pub fn quota_limit(quota_id: &str) -> Option<QuotaLimit> {
    if quota_id.contains("PerDay") && quota_id.contains("Token") {
        Some(QuotaLimit::InputTokensPerDay)
    } else if quota_id.contains("PerDay") {
        Some(QuotaLimit::RequestsPerDay)
    } else if !quota_id.contains("PerMinute") {
        None
    } else if quota_id.contains("Token") {
        Some(QuotaLimit::InputTokensPerMinute)
    } else if quota_id.contains("Request") {
        Some(QuotaLimit::RequestsPerMinute)
    } else {
        None
    }
}
