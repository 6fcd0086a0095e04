//! Borrow API keys from a keylease server, and call Gemini under a lease.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use keylease_client::{ClientConfig, KeyLeaseClient, gemini::*};
//! let keylease = KeyLeaseClient::connect(ClientConfig::new("http://127.0.0.1:50051"))?;
//! let gemini = GeminiClient::new(DEFAULT_BASE_URL, std::time::Duration::from_secs(60))?;
//! let calls = LeasedGemini::new(keylease, gemini, RetryPolicy::default());
//! let answer = calls.generate("job-42", "gemini-2.5-flash", &GenerateContentRequest::text("Hi")).await?;
//! # Ok(()) }
//! ```
//!
//! - [`client`]: the connection to keylease, with bounded retries when it is unreachable.
//! - [`in_process`]: keylease in the same process, called without a connection.
//! - [`lease`]: a borrowed key that renews itself and is released when dropped.
//! - [`gemini`]: the Gemini HTTP client, its error classifier, and calls wrapped in leases.
//!
//! When keylease cannot be reached, each call is tried [`ClientConfig::attempts`] times with a
//! doubling pause and then fails with [`Error::Unreachable`]; nothing waits forever. A lease
//! whose renewals fail stops offering its key at its own deadline, which is never later than the
//! server's.
#![forbid(unsafe_code)]

pub mod client;
mod clock;
pub mod gemini;
pub mod in_process;
pub mod lease;

pub use client::{ClientConfig, Error, KeyLeaseClient, TlsConfig};
pub use in_process::InProcessCalls;
pub use lease::{AcquireOptions, Failure, LeaseGuard, Usage};
