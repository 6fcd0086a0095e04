//! The bounds and names both ends of the protocol must agree on: what a request may carry, and
//! the metadata a refusal names its reasons in.

/// Longest task id and client request id, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest key id, project name or pool name, in bytes: each is shown in every status reply,
/// metric label and log line about its key.
pub const MAX_NAME_BYTES: usize = 128;
/// Most key ids one acquire may exclude: more than any pool holds keys to try in one task.
pub const MAX_EXCLUDED_KEYS: usize = 1024;
/// Longest free text a caller sends (a failure's detail, a disable's reason), in bytes.
pub const MAX_DETAIL_BYTES: usize = 1024;
/// Largest input token figure a request may carry (an estimate, an addition, a release's
/// count): far above any real lease (a thousand requests of two million tokens each), and low
/// enough that no sum of them in a quota window can overflow.
pub const MAX_INPUT_TOKENS: u64 = 10_000_000_000;
/// Most quota violations one failure report carries.
pub const MAX_QUOTA_VIOLATIONS: usize = 8;
/// Largest limit figure a quota violation may name: far above any provider's limit.
pub const MAX_QUOTA_VALUE: u64 = 1_000_000_000_000;
/// The domain of the `google.rpc.ErrorInfo` a `RESOURCE_EXHAUSTED` reply carries.
pub const ERROR_DOMAIN: &str = "keylease.v1";
/// Metadata key of a `RESOURCE_EXHAUSTED` reply carrying the retry delay in milliseconds, for
/// clients that do not read `google.rpc.RetryInfo`.
pub const RETRY_AFTER_METADATA: &str = "retry-after-ms";
/// Metadata key of a `RESOURCE_EXHAUSTED` reply carrying why no key could be lent, as the name
/// of an `UnavailableReason` (`UNAVAILABLE_REASON_ALL_DISABLED`), for clients that do not read
/// `google.rpc.ErrorInfo`.
pub const UNAVAILABLE_REASON_METADATA: &str = "unavailable-reason";
