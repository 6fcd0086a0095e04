//! The proxy's own answers, in Gemini's error format (`{"error": {"code", "message", "status",
//! "details"}}`), which every SDK reads: every failure of the proxy or of keylease is mapped to
//! one here, once. The provider's own answers pass through unchanged and never come here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keylease_client::Error as KeyLeaseError;
use keylease_client::gemini::GenerateError;
use serde_json::json;
use std::time::Duration;

/// Why the proxy answers for itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request cannot be sent: bad JSON, too big, no model, an unknown model.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// A path the proxy serves, called with another method than `allow`.
    #[error("{message}")]
    WrongMethod {
        message: String,
        allow: axum::http::Method,
    },
    /// A real Gemini endpoint the proxy does not serve.
    #[error("{0}")]
    NotServed(String),
    /// keylease did not know the caller's token.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role may not lease.
    #[error("{0}")]
    PermissionDenied(String),
    /// No key within the wait: the caller may come back after `retry_after`.
    #[error("no key could be had in time ({reason})")]
    NoKey {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// keylease cannot be reached, or the lease ended under the call.
    #[error("{0}")]
    Unavailable(String),
    /// The provider failed every try.
    #[error("{message}")]
    Upstream {
        status: Option<u16>,
        message: String,
    },
    #[error("no answer within {0:?}")]
    DeadlineExceeded(Duration),
    /// The request's body did not arrive in time (`[proxy] body_timeout`).
    #[error("the request body did not arrive within {0:?} ([proxy] body_timeout)")]
    BodyTimeout(Duration),
    /// The provider refused the request itself (400, 404, ...): its answer goes back as it came.
    #[error("Gemini answered {0}")]
    Passed(u16, String),
}

/// When the provider does not say, how long a caller told to come back should wait.
const DEFAULT_RETRY: Duration = Duration::from_secs(1);

impl From<KeyLeaseError> for ProxyError {
    fn from(error: KeyLeaseError) -> Self {
        match error {
            KeyLeaseError::NoKey {
                reason,
                retry_after,
                ..
            } => Self::NoKey {
                reason,
                retry_after,
            },
            KeyLeaseError::Refused(status) => {
                let message = format!("keylease: {}", status.message());
                match status.code() {
                    tonic::Code::Unauthenticated => Self::Unauthenticated(format!(
                        "{message}; give a keylease worker token where the SDK puts its API key"
                    )),
                    tonic::Code::PermissionDenied => Self::PermissionDenied(message),
                    tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                        Self::BadRequest(message)
                    }
                    _ => Self::Unavailable(message),
                }
            }
            other @ (KeyLeaseError::Unreachable { .. }
            | KeyLeaseError::InvalidEndpoint { .. }
            | KeyLeaseError::LeaseEnded(_)
            | KeyLeaseError::BudgetSpent(_)) => Self::Unavailable(format!("keylease: {other}")),
        }
    }
}

impl From<super::route::Unrouted> for ProxyError {
    fn from(unrouted: super::route::Unrouted) -> Self {
        use super::route::Unrouted;
        match unrouted {
            Unrouted::NotFound(message) => Self::NotFound(message),
            Unrouted::WrongMethod { message, allow } => Self::WrongMethod { message, allow },
            Unrouted::NotServed(message) => Self::NotServed(message),
        }
    }
}

impl ProxyError {
    /// The same answer with every secret `redactor` finds in its text masked: the proxy's own
    /// messages quote the caller's path and headers, and the provider's go on as they came.
    pub fn redacted(self, redact: impl Fn(&str) -> String) -> Self {
        let mask = |text: String| redact(&text);
        match self {
            Self::BadRequest(m) => Self::BadRequest(mask(m)),
            Self::NotFound(m) => Self::NotFound(mask(m)),
            Self::WrongMethod { message, allow } => Self::WrongMethod {
                message: mask(message),
                allow,
            },
            Self::NotServed(m) => Self::NotServed(mask(m)),
            Self::Unauthenticated(m) => Self::Unauthenticated(mask(m)),
            Self::PermissionDenied(m) => Self::PermissionDenied(mask(m)),
            Self::NoKey {
                reason,
                retry_after,
            } => Self::NoKey {
                reason: mask(reason),
                retry_after,
            },
            Self::Unavailable(m) => Self::Unavailable(mask(m)),
            Self::Upstream { status, message } => Self::Upstream {
                status,
                message: mask(message),
            },
            Self::DeadlineExceeded(deadline) => Self::DeadlineExceeded(deadline),
            Self::BodyTimeout(limit) => Self::BodyTimeout(limit),
            Self::Passed(status, body) => Self::Passed(status, mask(body)),
        }
    }

    /// What a leased call's failure means for the caller; a request error the provider
    /// answered goes back as it came.
    pub fn from_call(error: GenerateError) -> Self {
        match error {
            GenerateError::Request { status, body, .. } => Self::Passed(status, body),
            GenerateError::Provider {
                attempts,
                last,
                status,
            } => Self::Upstream {
                status,
                message: format!("Gemini failed {attempts} times; last: {last}"),
            },
            GenerateError::DeadlineExceeded(deadline) => Self::DeadlineExceeded(deadline),
            GenerateError::KeyLease(error) => error.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::WrongMethod { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotServed(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Self::NoKey { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream { status, .. } => status
                .and_then(|s| StatusCode::from_u16(s).ok())
                .filter(StatusCode::is_server_error)
                .unwrap_or(StatusCode::BAD_GATEWAY),
            Self::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Passed(status, _) => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
        }
    }

    /// The `google.rpc.Code` name Gemini puts in `status`.
    fn status_word(&self) -> &'static str {
        match self {
            Self::BadRequest(_) | Self::WrongMethod { .. } => "INVALID_ARGUMENT",
            Self::NotFound(_) => "NOT_FOUND",
            Self::NotServed(_) => "UNIMPLEMENTED",
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::PermissionDenied(_) => "PERMISSION_DENIED",
            Self::NoKey { .. } => "RESOURCE_EXHAUSTED",
            Self::Unavailable(_) | Self::Upstream { .. } => "UNAVAILABLE",
            Self::DeadlineExceeded(_) | Self::BodyTimeout(_) => "DEADLINE_EXCEEDED",
            Self::Passed(..) => "UNKNOWN",
        }
    }

    /// The body alone, for an error event at the end of a stream.
    pub fn body(&self) -> serde_json::Value {
        let mut error = json!({
            "code": self.status().as_u16(),
            "message": self.to_string(),
            "status": self.status_word(),
        });
        if let Self::NoKey { retry_after, .. } = self {
            let delay = retry_after.unwrap_or(DEFAULT_RETRY);
            error["details"] = json!([{
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": format!("{:.3}s", delay.as_secs_f64()),
            }]);
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Passed(_, body) = self {
            return (
                status,
                [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
                body,
            )
                .into_response();
        }
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
            self.body().to_string(),
        )
            .into_response();
        if let Self::WrongMethod { allow, .. } = &self
            && let Ok(allow) = HeaderValue::from_str(allow.as_str())
        {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        if let Self::NoKey { retry_after, .. } = &self {
            // Whole seconds, rounded up: a client that waits that long finds the delay over.
            let seconds = retry_after.unwrap_or(DEFAULT_RETRY).as_secs_f64().ceil() as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keylease_client::gemini::classify;

    #[test]
    fn a_key_wait_that_ran_out_reads_as_geminis_own_429() {
        let error = ProxyError::NoKey {
            reason: "QuotaSpent".into(),
            retry_after: Some(Duration::from_millis(12_400)),
        };
        let body = error.body().to_string();
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "13");
        // The one classifier reads it as any 429 from Gemini.
        let classified = classify(429, &body);
        assert_eq!(
            classified.failure,
            keylease_client::gemini::Failure::RateLimited
        );
        assert_eq!(classified.retry_after, Some(Duration::from_millis(12_400)));
    }

    #[test]
    fn keylease_refusals_map_to_http_statuses() {
        let refused =
            |code| ProxyError::from(KeyLeaseError::Refused(tonic::Status::new(code, "x")));
        assert_eq!(
            refused(tonic::Code::Unauthenticated).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            refused(tonic::Code::PermissionDenied).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            refused(tonic::Code::InvalidArgument).status(),
            StatusCode::BAD_REQUEST
        );
        let upstream = ProxyError::Upstream {
            status: Some(503),
            message: "overloaded".into(),
        };
        assert_eq!(upstream.status(), StatusCode::SERVICE_UNAVAILABLE);
        let transport = ProxyError::Upstream {
            status: None,
            message: "reset".into(),
        };
        assert_eq!(transport.status(), StatusCode::BAD_GATEWAY);
    }
}
