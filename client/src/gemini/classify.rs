//! What a Gemini error answer means for the key: read from the status, `QuotaFailure.violations`
//! (which limit, per minute or per day, and its figure), `RetryInfo.retryDelay`, the `Please
//! retry in` text, `ErrorInfo.reason` and the leaked-key message, in bodies that may come
//! wrapped in a one-element array.

use keylease::gemini::{QuotaLimit, quota_limit};
use keylease::pb::{FailureClass, FailureKind, KeyProblem};
use serde_json::Value;
use std::time::Duration;

/// What failed, from the key's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A per-minute limit (requests or tokens), or a 429 that says no more: the project rests
    /// for the retry delay.
    RateLimited,
    /// The project has spent the day's quota for the model (or has none: `limit: 0`).
    DailyQuota,
    /// The key is invalid, expired or unknown.
    InvalidKey,
    /// The key or its project may not be used: leaked, suspended, API disabled.
    KeyUnusable,
    /// No key reached the provider: a bug in the caller, not the key's fault.
    CallerBug,
    /// The request itself is wrong (other 400s, 404, unsupported location): do not retry.
    Request,
    /// Provider trouble (500, 503, 504): back off and retry; the key is fine.
    Server,
    /// The model has no capacity for anyone (`MODEL_CAPACITY_EXHAUSTED`, as a 429 or a 503):
    /// neither the key nor its project is at fault, and another key mostly gets the same
    /// answer; back off for the retry delay. Reported as provider trouble.
    ModelCapacity,
}

impl Failure {
    /// The kind to report to keylease; `None` for failures that say nothing about the key.
    pub fn report_kind(self) -> Option<FailureKind> {
        match self {
            Self::RateLimited => Some(FailureKind::RateLimited),
            Self::DailyQuota => Some(FailureKind::DailyQuotaExhausted),
            Self::InvalidKey => Some(FailureKind::InvalidKey),
            Self::KeyUnusable => Some(FailureKind::PermissionDenied),
            Self::Server | Self::ModelCapacity => Some(FailureKind::ServerError),
            Self::CallerBug | Self::Request => None,
        }
    }

    /// Whether it is trouble on the provider's side (its servers, or the model's capacity):
    /// back off and try again; the key is fine.
    pub fn is_provider_trouble(self) -> bool {
        matches!(self, Self::Server | Self::ModelCapacity)
    }

    /// Whether the failure is the key's (or its project's): rotating to another key helps.
    pub fn blames_key(self) -> bool {
        matches!(
            self,
            Self::RateLimited | Self::DailyQuota | Self::InvalidKey | Self::KeyUnusable
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub failure: Failure,
    /// The provider's retry delay, when it gave one.
    pub retry_after: Option<Duration>,
    /// The provider's message, for people.
    pub message: String,
    /// `ErrorInfo.reason` or the `status` word, for the report.
    pub reason: String,
    /// The limits a 429 says were hit (at most [`keylease::MAX_QUOTA_VIOLATIONS`]).
    pub violations: Vec<QuotaViolation>,
    /// What is wrong with the key, for [`Failure::InvalidKey`] and [`Failure::KeyUnusable`]:
    /// whether it may come back once an operator fixes its project (a check looks again) or
    /// never (invalid, leaked).
    pub key_problem: Option<KeyProblem>,
}

impl Classified {
    /// The class `ReportFailure` carries beside its kind: the one place a provider's answer
    /// becomes a finer class than the kind an older server knows.
    pub fn report_class(&self) -> FailureClass {
        match self.failure {
            Failure::RateLimited if self.violations.is_empty() => FailureClass::BareRateLimit,
            Failure::RateLimited | Failure::DailyQuota => FailureClass::Quota,
            Failure::ModelCapacity => FailureClass::ModelCapacity,
            Failure::Server if self.reason == "UNAVAILABLE" => FailureClass::Overloaded,
            _ => FailureClass::Unspecified,
        }
    }
}

/// One of `QuotaFailure.violations`: which limit, for which model, and its figure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaViolation {
    /// `quotaId`, such as `GenerateRequestsPerMinutePerProjectPerModel-FreeTier`.
    pub quota_id: String,
    /// `quotaDimensions.model`; empty when not given.
    pub model: String,
    /// `quotaValue` (a JSON string, or a number), when given and at most
    /// [`keylease::MAX_QUOTA_VALUE`].
    pub value: Option<u64>,
}

impl QuotaViolation {
    /// As `ReportFailure` carries it, cut to the protocol's bounds.
    pub fn to_pb(&self) -> keylease::pb::QuotaViolation {
        let cut = |text: &str| {
            keylease::truncate_on_char_boundary(text, keylease::MAX_ID_BYTES).to_string()
        };
        keylease::pb::QuotaViolation {
            quota_id: cut(&self.quota_id),
            model: cut(&self.model),
            quota_value: self.value,
        }
    }
}

/// Classifies an error answer by its HTTP status and body.
pub fn classify(status: u16, body: &str) -> Classified {
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let error = match &parsed {
        Value::Array(items) => items.first().and_then(|i| i.get("error")),
        other => other.get("error"),
    };
    let text = |field: &str| {
        error
            .and_then(|e| e.get(field))
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let message = text("message").to_string();
    let status_word = text("status").to_string();
    let details: &[Value] = error
        .and_then(|e| e.get("details"))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let detail_of = |suffix: &str| {
        details.iter().find(|d| {
            d.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with(suffix))
        })
    };

    let error_reason = detail_of("ErrorInfo")
        .and_then(|d| d.get("reason"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let retry_after = detail_of("RetryInfo")
        .and_then(|d| d.get("retryDelay"))
        .and_then(Value::as_str)
        .and_then(parse_seconds)
        .or_else(|| retry_hint_in(&message));
    let violations: Vec<QuotaViolation> = detail_of("QuotaFailure")
        .and_then(|d| d.get("violations"))
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .take(keylease::MAX_QUOTA_VIOLATIONS)
        .map(violation_of)
        .collect();
    let per_day = violations
        .iter()
        .any(|v| quota_limit(&v.quota_id).is_some_and(QuotaLimit::is_daily));
    let no_quota_at_all = message.contains("limit: 0,") || message.contains("limit: 0\n");
    // The model's capacity, by its reason whatever the domain, or by its words.
    let no_capacity = error_reason.as_deref() == Some("MODEL_CAPACITY_EXHAUSTED")
        || message.starts_with("No capacity available for model");

    let unusable = |problem| (Failure::KeyUnusable, Some(problem));
    let (failure, key_problem) = match status {
        429 | 503 if no_capacity => (Failure::ModelCapacity, None),
        429 if per_day || no_quota_at_all => (Failure::DailyQuota, None),
        429 => (Failure::RateLimited, None),
        400 if error_reason.as_deref() == Some("API_KEY_INVALID") => {
            (Failure::InvalidKey, Some(KeyProblem::Invalid))
        }
        403 if message.contains("unregistered callers") => (Failure::CallerBug, None),
        403 if message.contains("reported as leaked") => unusable(KeyProblem::Leaked),
        403 if error_reason.as_deref() == Some("CONSUMER_SUSPENDED") => {
            unusable(KeyProblem::Suspended)
        }
        403 if matches!(
            error_reason.as_deref(),
            Some("SERVICE_DISABLED" | "API_KEY_SERVICE_BLOCKED")
        ) =>
        {
            unusable(KeyProblem::ServiceDisabled)
        }
        // Other permission errors are about the key or its project too.
        401 | 403 => unusable(KeyProblem::PermissionDenied),
        500..=599 => (Failure::Server, None),
        _ => (Failure::Request, None),
    };
    let reason = error_reason.unwrap_or_else(|| {
        if status_word.is_empty() {
            format!("HTTP {status}")
        } else {
            status_word
        }
    });
    Classified {
        failure,
        retry_after,
        message,
        reason,
        violations,
        key_problem,
    }
}

fn violation_of(violation: &Value) -> QuotaViolation {
    let text = |value: Option<&Value>| {
        value
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let value = match violation.get("quotaValue") {
        Some(Value::String(text)) => text.trim().parse().ok(),
        Some(number) => number.as_u64(),
        None => None,
    };
    QuotaViolation {
        quota_id: text(violation.get("quotaId")),
        model: text(
            violation
                .get("quotaDimensions")
                .and_then(|d| d.get("model")),
        ),
        value: value.filter(|&v| v <= keylease::MAX_QUOTA_VALUE),
    }
}

/// `"26s"`, `"55.837881432s"`.
fn parse_seconds(text: &str) -> Option<Duration> {
    let seconds: f64 = text.strip_suffix('s')?.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// `Please retry in 55.837881432s.` in the message text.
fn retry_hint_in(message: &str) -> Option<Duration> {
    let rest = &message[message.find("retry in ")? + "retry in ".len()..];
    let end = rest.find('s')?;
    parse_seconds(&rest[..=end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/../fake-gemini/fixtures/errors/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn of(status: u16, name: &str) -> Classified {
        classify(status, &fixture(name))
    }

    #[test]
    fn every_fixture_is_classified_as_the_wire_facts_say() {
        let expected = [
            (400, "400-api-key-expired.json", Failure::InvalidKey),
            (400, "400-api-key-invalid.json", Failure::InvalidKey),
            (400, "400-location-unsupported.json", Failure::Request),
            (403, "403-consumer-suspended.json", Failure::KeyUnusable),
            (403, "403-leaked.json", Failure::KeyUnusable),
            (403, "403-service-disabled.json", Failure::KeyUnusable),
            (403, "403-unregistered-caller.json", Failure::CallerBug),
            (404, "404-model-not-found.json", Failure::Request),
            (429, "429-limit-zero-text-only.json", Failure::DailyQuota),
            (429, "429-model-capacity.json", Failure::ModelCapacity),
            (429, "429-no-details.json", Failure::RateLimited),
            (429, "429-requests-per-day.json", Failure::DailyQuota),
            (429, "429-requests-per-minute.json", Failure::RateLimited),
            (429, "429-several-violations.json", Failure::DailyQuota),
            (429, "429-tokens-per-day.json", Failure::DailyQuota),
            (429, "429-tokens-per-minute.json", Failure::RateLimited),
            (429, "429-try-again-later.json", Failure::RateLimited),
            (429, "429-wrapped-in-array.json", Failure::RateLimited),
            (500, "500-internal.json", Failure::Server),
            (503, "503-model-capacity.json", Failure::ModelCapacity),
            (503, "503-overloaded.json", Failure::Server),
        ];
        let listed = std::fs::read_dir(format!(
            "{}/../fake-gemini/fixtures/errors",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
        .count();
        assert_eq!(listed, expected.len(), "a fixture without an expectation");
        for (status, name, failure) in expected {
            assert_eq!(of(status, name).failure, failure, "{name}");
        }
    }

    #[test]
    fn a_refused_key_says_whether_its_problem_may_heal() {
        let expected = [
            (400, "400-api-key-expired.json", Some(KeyProblem::Invalid)),
            (400, "400-api-key-invalid.json", Some(KeyProblem::Invalid)),
            (
                403,
                "403-consumer-suspended.json",
                Some(KeyProblem::Suspended),
            ),
            (403, "403-leaked.json", Some(KeyProblem::Leaked)),
            (
                403,
                "403-service-disabled.json",
                Some(KeyProblem::ServiceDisabled),
            ),
            (403, "403-unregistered-caller.json", None),
            (404, "404-model-not-found.json", None),
            (429, "429-no-details.json", None),
            (503, "503-overloaded.json", None),
        ];
        for (status, name, problem) in expected {
            assert_eq!(of(status, name).key_problem, problem, "{name}");
        }
        let denied = r#"{"error":{"code":403,"message":"Permission denied on the model","status":"PERMISSION_DENIED"}}"#;
        assert_eq!(
            classify(403, denied).key_problem,
            Some(KeyProblem::PermissionDenied)
        );
    }

    #[test]
    fn retry_delays_come_from_retry_info_or_the_message() {
        assert_eq!(
            of(429, "429-requests-per-minute.json").retry_after,
            Some(Duration::from_secs(47))
        );
        assert_eq!(
            of(429, "429-wrapped-in-array.json").retry_after,
            Some(Duration::from_secs(12))
        );
        let text_only = of(429, "429-limit-zero-text-only.json")
            .retry_after
            .unwrap();
        assert_eq!(text_only.as_millis(), 55_837);
        assert_eq!(of(429, "429-no-details.json").retry_after, None);
    }

    #[test]
    fn quota_violations_name_their_limit_model_and_figure() {
        let per_minute = of(429, "429-requests-per-minute.json");
        assert_eq!(
            per_minute.violations,
            vec![QuotaViolation {
                quota_id: "GenerateRequestsPerMinutePerProjectPerModel-FreeTier".into(),
                model: "gemini-2.0-flash".into(),
                value: Some(15),
            }]
        );
        let limits: Vec<Option<QuotaLimit>> = [
            "429-requests-per-minute.json",
            "429-tokens-per-minute.json",
            "429-requests-per-day.json",
            "429-tokens-per-day.json",
        ]
        .iter()
        .map(|name| quota_limit(&of(429, name).violations[0].quota_id))
        .collect();
        assert_eq!(
            limits,
            [
                Some(QuotaLimit::RequestsPerMinute),
                Some(QuotaLimit::InputTokensPerMinute),
                Some(QuotaLimit::RequestsPerDay),
                Some(QuotaLimit::InputTokensPerDay)
            ]
        );
        // One body, three limits: each named with its own figure.
        let several: Vec<(Option<QuotaLimit>, Option<u64>)> =
            of(429, "429-several-violations.json")
                .violations
                .iter()
                .map(|v| (quota_limit(&v.quota_id), v.value))
                .collect();
        assert_eq!(
            several,
            [
                (Some(QuotaLimit::RequestsPerDay), Some(250)),
                (Some(QuotaLimit::RequestsPerMinute), Some(10)),
                (Some(QuotaLimit::InputTokensPerMinute), Some(250_000))
            ]
        );
        // The model's capacity is no one's quota, and says when to come back.
        let capacity = of(503, "503-model-capacity.json");
        assert!(!capacity.failure.blames_key());
        assert_eq!(capacity.retry_after, Some(Duration::from_secs(40)));
        assert_eq!(
            capacity.failure.report_kind(),
            Some(FailureKind::ServerError)
        );
        assert_eq!(
            of(429, "429-tokens-per-minute.json").violations[0].value,
            Some(250_000)
        );
        assert!(of(429, "429-no-details.json").violations.is_empty());
        assert_eq!(quota_limit("SomethingElsePerMinute"), None);
        // Figures as numbers are read too; nonsense and absurd ones are not.
        let body = |value: &str| {
            format!(
                r#"{{"error":{{"code":429,"details":[{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{{"quotaId":"X","quotaValue":{value}}}]}}]}}}}"#
            )
        };
        let figure = |value: &str| classify(429, &body(value)).violations[0].value;
        assert_eq!(figure("42"), Some(42));
        assert_eq!(figure("\"-3\""), None);
        assert_eq!(figure("\"1e99\""), None);
        assert_eq!(figure("2000000000000"), None);
    }

    #[test]
    fn reasons_name_what_the_provider_said() {
        assert_eq!(
            of(403, "403-consumer-suspended.json").reason,
            "CONSUMER_SUSPENDED"
        );
        assert_eq!(of(403, "403-leaked.json").reason, "PERMISSION_DENIED");
        assert!(
            of(403, "403-leaked.json")
                .message
                .contains("reported as leaked")
        );
    }

    #[test]
    fn an_unreadable_body_is_classified_by_status_alone() {
        assert_eq!(
            classify(503, "<html>Service Unavailable</html>").failure,
            Failure::Server
        );
        assert_eq!(classify(429, "").failure, Failure::RateLimited);
        assert_eq!(classify(400, "null").failure, Failure::Request);
    }

    #[test]
    fn only_key_failures_rotate_and_request_errors_are_not_reported() {
        assert!(Failure::RateLimited.blames_key() && Failure::KeyUnusable.blames_key());
        assert!(!Failure::Server.blames_key() && !Failure::Request.blames_key());
        assert_eq!(Failure::Request.report_kind(), None);
        assert_eq!(Failure::CallerBug.report_kind(), None);
    }
}
