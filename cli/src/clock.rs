//! The one place the command reads the time: a batch times its tasks and names its run; its
//! rules of expiry and cooldown are keylease's, on keylease's clock.

/// Now, for durations.
#[allow(clippy::disallowed_methods)]
pub fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// The wall clock, since the Unix epoch.
#[allow(clippy::disallowed_methods)]
pub fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}
