//! The engine's refusals of a request ([`EngineError`]), and the bounds it checks callers'
//! figures and text against.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("lease_id: no lease {0}")]
    LeaseNotFound(String),
    #[error("lease {lease_id}: {reason}")]
    StaleLease { lease_id: String, reason: String },
    #[error("key_id: no key {0}")]
    KeyNotFound(String),
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

pub(crate) fn validate_id(
    field: &'static str,
    id: &str,
    required: bool,
) -> Result<(), EngineError> {
    if required && id.is_empty() {
        return Err(invalid(field, "empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(invalid(
            field,
            format!("{} bytes is above the maximum of {MAX_ID_BYTES}", id.len()),
        ));
    }
    Ok(())
}

/// A token figure from a caller, bounded so that no sum of them can overflow.
pub(crate) fn validate_tokens(field: &'static str, tokens: u64) -> Result<(), EngineError> {
    if tokens > MAX_INPUT_TOKENS {
        return Err(invalid(
            field,
            format!("{tokens} is above the maximum of {MAX_INPUT_TOKENS}"),
        ));
    }
    Ok(())
}

/// Free text from a caller (a failure's detail, a disable's reason), bounded in size.
pub(crate) fn validate_detail(field: &'static str, text: &str) -> Result<(), EngineError> {
    if text.len() > MAX_DETAIL_BYTES {
        return Err(invalid(
            field,
            format!(
                "{} bytes is above the maximum of {MAX_DETAIL_BYTES}",
                text.len()
            ),
        ));
    }
    Ok(())
}
