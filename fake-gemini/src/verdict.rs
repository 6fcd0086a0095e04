//! How the fake answers one call: the key's health, the faults asked for, and the limits it
//! enforces, weighed in that order.

use super::*;

pub(super) enum Verdict {
    Answer,
    Raw(StatusCode, &'static str),
    Json(StatusCode, Value),
}

impl Verdict {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            Self::Answer => StatusCode::OK,
            Self::Raw(status, _) | Self::Json(status, _) => *status,
        }
    }
}

/// What a key in ill `health` is answered, whatever it asks (a call or a read of the models).
pub(super) fn health_answer(health: KeyHealth) -> Option<(StatusCode, &'static str)> {
    match health {
        KeyHealth::Healthy => None,
        KeyHealth::Leaked => Some((StatusCode::FORBIDDEN, responses::LEAKED)),
        KeyHealth::Suspended => Some((StatusCode::FORBIDDEN, responses::SUSPENDED)),
        KeyHealth::Expired => Some((StatusCode::BAD_REQUEST, responses::API_KEY_EXPIRED)),
        KeyHealth::ServiceDisabled => Some((StatusCode::FORBIDDEN, responses::SERVICE_DISABLED)),
    }
}

pub(super) fn decide(
    fake: &FakeGemini,
    inner: &mut Inner,
    key: &FakeKey,
    model: &str,
    method: &Method,
    prompt: &str,
    tokens: u64,
) -> (Verdict, bool) {
    let verdict = |verdict| (verdict, false);
    if let Some((status, body)) = health_answer(key.health) {
        return verdict(Verdict::Raw(status, body));
    }
    let Some(limits) = inner.limits_of(&key.project, model) else {
        return verdict(Verdict::Json(
            StatusCode::NOT_FOUND,
            responses::model_not_found(model, "generateContent"),
        ));
    };
    if matches!(method, Method::CountTokens) {
        return verdict(Verdict::Answer);
    }
    if inner.faults.error_rate > 0.0 && next_unit(&mut inner.random) < inner.faults.error_rate {
        let injected = match inner.faults.status {
            500 => Verdict::Raw(StatusCode::INTERNAL_SERVER_ERROR, responses::INTERNAL),
            _ => Verdict::Raw(StatusCode::SERVICE_UNAVAILABLE, responses::OVERLOADED),
        };
        return (injected, true);
    }
    if inner.faults.rate_limit_rate > 0.0
        && next_unit(&mut inner.random) < inner.faults.rate_limit_rate
    {
        let injected = match limits.requests_per_minute {
            Some(limit) if !inner.faults.bare_429s => Verdict::Json(
                StatusCode::TOO_MANY_REQUESTS,
                responses::quota_exceeded(
                    limits::Violation::RequestsPerMinute {
                        limit,
                        retry_after: fake.shared.minute / 10,
                    },
                    model,
                ),
            ),
            _ => Verdict::Raw(StatusCode::TOO_MANY_REQUESTS, responses::QUOTA_NO_DETAILS),
        };
        return (injected, true);
    }
    let at = now();
    let shared = &fake.shared;
    let scaled_elapsed = at.duration_since(shared.started).as_secs_f64() * shared.time_scale;
    let day = (scaled_elapsed / 86_400.0) as u64;
    let until_tomorrow =
        Duration::from_secs_f64(((day + 1) as f64 * 86_400.0 - scaled_elapsed) / shared.time_scale);
    let window = inner
        .windows
        .entry((key.project.clone(), model.to_string()))
        .or_default();
    if let Err(violation) = window.admit(at, tokens, limits, shared.minute, (day, until_tomorrow)) {
        if inner.faults.bare_429s {
            return verdict(Verdict::Raw(
                StatusCode::TOO_MANY_REQUESTS,
                responses::QUOTA_NO_DETAILS,
            ));
        }
        return verdict(Verdict::Json(
            StatusCode::TOO_MANY_REQUESTS,
            responses::quota_exceeded(violation, model),
        ));
    }
    // Safety blocks are content decisions: they count against quota like any answer.
    if prompt.contains(BLOCK_PROMPT) {
        return verdict(Verdict::Raw(StatusCode::OK, responses::PROMPT_BLOCKED));
    }
    if prompt.contains(BLOCK_ANSWER) {
        return verdict(Verdict::Raw(StatusCode::OK, responses::ANSWER_BLOCKED));
    }
    verdict(Verdict::Answer)
}
