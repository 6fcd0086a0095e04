//! The client's one reading of the time: tokio's clock, so tests can pause and advance it.
#![allow(clippy::disallowed_methods)]

pub fn now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}
