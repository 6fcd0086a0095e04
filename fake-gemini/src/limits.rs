//! The fake's own enforcement of Gemini's limits, per project and model: a true sliding window
//! for requests and input tokens per minute, and a count per day, on scaled time.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Limits of one model, per project; `None` is not limited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub requests_per_day: Option<u64>,
    /// Input tokens per day (`GenerateContentInputTokensPerModelPerDay`).
    pub tokens_per_day: Option<u64>,
}

/// Which limit a request broke, and how long until it would fit (real time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    RequestsPerMinute { limit: u64, retry_after: Duration },
    TokensPerMinute { limit: u64, retry_after: Duration },
    RequestsPerDay { limit: u64, retry_after: Duration },
    TokensPerDay { limit: u64, retry_after: Duration },
}

/// One (project, model): what arrived in the window and today.
#[derive(Debug, Default)]
pub struct Window {
    /// Arrivals in the last window, oldest first, with their input tokens.
    arrivals: VecDeque<(Instant, u64)>,
    tokens: u64,
    day: u64,
    today: u64,
    tokens_today: u64,
}

impl Window {
    /// Counts a request arriving `at` with `tokens` input tokens, unless it breaks a limit.
    pub fn admit(
        &mut self,
        at: Instant,
        tokens: u64,
        limits: Limits,
        minute: Duration,
        day: (u64, Duration),
    ) -> Result<(), Violation> {
        while let Some(&(first, first_tokens)) = self.arrivals.front() {
            if at.duration_since(first) < minute {
                break;
            }
            self.arrivals.pop_front();
            self.tokens -= first_tokens;
        }
        let (day_number, until_tomorrow) = day;
        if day_number != self.day {
            self.day = day_number;
            self.today = 0;
            self.tokens_today = 0;
        }
        let leaves_window = |index: usize| {
            self.arrivals
                .get(index)
                .map_or(Duration::ZERO, |&(first, _)| {
                    minute.saturating_sub(at.duration_since(first))
                })
        };
        if let Some(limit) = limits.requests_per_day
            && self.today >= limit
        {
            return Err(Violation::RequestsPerDay {
                limit,
                retry_after: until_tomorrow,
            });
        }
        if let Some(limit) = limits.tokens_per_day
            && self.tokens_today + tokens > limit
        {
            return Err(Violation::TokensPerDay {
                limit,
                retry_after: until_tomorrow,
            });
        }
        if let Some(limit) = limits.requests_per_minute
            && self.arrivals.len() as u64 >= limit
        {
            let wait = leaves_window(self.arrivals.len() - limit as usize);
            return Err(Violation::RequestsPerMinute {
                limit,
                retry_after: wait,
            });
        }
        if let Some(limit) = limits.tokens_per_minute
            && self.tokens + tokens > limit
        {
            // Until enough of the oldest arrivals leave the window.
            let mut freed = 0;
            let mut index = 0;
            while self.tokens - freed + tokens > limit && index < self.arrivals.len() {
                freed += self.arrivals[index].1;
                index += 1;
            }
            return Err(Violation::TokensPerMinute {
                limit,
                retry_after: leaves_window(index.saturating_sub(1)),
            });
        }
        self.arrivals.push_back((at, tokens));
        self.tokens += tokens;
        self.today += 1;
        self.tokens_today += tokens;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);
    const DAY: (u64, Duration) = (0, Duration::from_secs(3600));

    fn rpm(limit: u64) -> Limits {
        Limits {
            requests_per_minute: Some(limit),
            ..Limits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_rather_than_resetting_each_minute() {
        let mut window = Window::default();
        let start = crate::now();
        window.admit(start, 1, rpm(2), MINUTE, DAY).unwrap();
        window
            .admit(start + Duration::from_secs(30), 1, rpm(2), MINUTE, DAY)
            .unwrap();
        let refused = window.admit(start + Duration::from_secs(59), 1, rpm(2), MINUTE, DAY);
        assert_eq!(
            refused,
            Err(Violation::RequestsPerMinute {
                limit: 2,
                retry_after: Duration::from_secs(1)
            })
        );
        window
            .admit(start + MINUTE, 1, rpm(2), MINUTE, DAY)
            .unwrap();
        assert!(
            window
                .admit(start + Duration::from_secs(61), 1, rpm(2), MINUTE, DAY)
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_and_days_are_limited_too() {
        let limits = Limits {
            tokens_per_minute: Some(100),
            requests_per_day: Some(2),
            ..Limits::default()
        };
        let mut window = Window::default();
        let start = crate::now();
        window.admit(start, 60, limits, MINUTE, DAY).unwrap();
        assert!(matches!(
            window.admit(start, 50, limits, MINUTE, DAY),
            Err(Violation::TokensPerMinute { limit: 100, .. })
        ));
        window.admit(start, 40, limits, MINUTE, DAY).unwrap();
        assert!(matches!(
            window.admit(start + MINUTE, 1, limits, MINUTE, DAY),
            Err(Violation::RequestsPerDay { limit: 2, .. })
        ));
        window
            .admit(start + MINUTE, 1, limits, MINUTE, (1, MINUTE))
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn input_tokens_per_day_are_limited_until_the_day_turns() {
        let limits = Limits {
            tokens_per_day: Some(1_000),
            ..Limits::default()
        };
        let mut window = Window::default();
        let start = crate::now();
        window.admit(start, 600, limits, MINUTE, DAY).unwrap();
        // A window later the minute is free, the day is not.
        assert_eq!(
            window.admit(start + MINUTE, 500, limits, MINUTE, DAY),
            Err(Violation::TokensPerDay {
                limit: 1_000,
                retry_after: DAY.1
            })
        );
        window
            .admit(start + MINUTE, 400, limits, MINUTE, DAY)
            .unwrap();
        window
            .admit(start + MINUTE, 1_000, limits, MINUTE, (1, MINUTE))
            .unwrap();
    }
}
