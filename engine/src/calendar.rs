//! Time as the engine reads it, and the calendar. Every command carries two readings of the
//! clock: a steady one that never runs backwards, for windows, TTLs and cooldowns, and the wall
//! clock, for the calendar alone (the daily reset at midnight in a time zone). An NTP step moves
//! the daily reset with the wall clock and leaves every window, lease and cooldown as it was.

use chrono::{DateTime, Days, NaiveDate, NaiveTime, TimeZone};
use chrono_tz::Tz;

const DAY_MS: u64 = 24 * 3_600_000;

/// The two readings of the clock that come with each command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Time {
    /// Milliseconds since the Unix epoch on the wall clock: the calendar and display only.
    pub wall_ms: u64,
    /// Milliseconds on a clock that never runs backwards (anchored to the wall clock at start).
    pub steady_ms: u64,
}

impl Time {
    pub fn new(wall_ms: u64, steady_ms: u64) -> Self {
        Self { wall_ms, steady_ms }
    }

    /// Both readings the same: a wall clock that was never stepped.
    pub fn at(ms: u64) -> Self {
        Self::new(ms, ms)
    }

    /// How far the wall clock reads ahead of the steady one: it moves when the wall clock is
    /// stepped.
    pub fn wall_offset_ms(&self) -> i128 {
        i128::from(self.wall_ms) - i128::from(self.steady_ms)
    }

    /// The steady reading at which the wall clock will read `wall_ms`, unless it is stepped.
    pub fn steady_at(&self, wall_ms: u64) -> u64 {
        clamp_ms(i128::from(wall_ms) - self.wall_offset_ms())
    }

    /// The wall-clock reading at steady time `steady_ms`, for display.
    pub fn wall_at(&self, steady_ms: u64) -> u64 {
        clamp_ms(i128::from(steady_ms) + self.wall_offset_ms())
    }
}

/// Tests write times as plain milliseconds: a wall clock that was never stepped.
#[cfg(test)]
impl From<u64> for Time {
    fn from(ms: u64) -> Self {
        Self::at(ms)
    }
}

/// Milliseconds that fit a u64.
fn clamp_ms(ms: i128) -> u64 {
    ms.clamp(0, i128::from(u64::MAX)) as u64
}

/// How the day is cut: the daily counts reset at midnight in this zone, or, on a day whose
/// midnight the zone skips, at the first instant of that day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DailyReset {
    pub zone: Tz,
}

impl DailyReset {
    /// The local calendar day of wall time `at_ms`, as a day number.
    pub fn day_of(&self, at_ms: u64) -> i64 {
        use chrono::Datelike;
        i64::from(self.local_date(at_ms).num_days_from_ce())
    }

    /// The first instant after `at_ms` at which the local date is later than at `at_ms`:
    /// always strictly after `at_ms`, even where the zone skips midnight or a whole day.
    pub fn next_reset_after(&self, at_ms: u64) -> u64 {
        let today = self.local_date(at_ms);
        let midnight = today
            .checked_add_days(Days::new(1))
            .and_then(|tomorrow| self.first_midnight(tomorrow));
        match midnight {
            Some(midnight) if midnight > at_ms => midnight,
            // Midnight is skipped (clocks spring forward over it, or the whole day is left out),
            // or was passed already and comes again after clocks went back: search for the
            // moment the date moves on.
            _ => self.first_instant(
                at_ms.saturating_add(1),
                at_ms.saturating_add(3 * DAY_MS),
                |date| date > today,
            ),
        }
    }

    /// The first instant of the local day of `at_ms`: the last reset at or before it.
    pub fn start_of_day_at(&self, at_ms: u64) -> u64 {
        let today = self.local_date(at_ms);
        match self.first_midnight(today) {
            Some(midnight) if midnight <= at_ms => midnight,
            _ => self.first_instant(at_ms.saturating_sub(3 * DAY_MS), at_ms, |date| {
                date >= today
            }),
        }
    }

    fn local_date(&self, at_ms: u64) -> NaiveDate {
        let at_ms = i64::try_from(at_ms).unwrap_or(i64::MAX);
        let utc =
            DateTime::from_timestamp_millis(at_ms).unwrap_or(DateTime::<chrono::Utc>::MAX_UTC);
        utc.with_timezone(&self.zone).date_naive()
    }

    /// Local midnight of `date`, the earlier one where clocks went back over it; `None` where
    /// the zone skips it.
    fn first_midnight(&self, date: NaiveDate) -> Option<u64> {
        let local = self
            .zone
            .from_local_datetime(&date.and_time(NaiveTime::MIN))
            .earliest()?;
        u64::try_from(local.timestamp_millis()).ok()
    }

    /// The first instant in `[low, high]` whose local date satisfies `reached`, which holds at
    /// `high` and, once it holds, keeps holding within the range.
    fn first_instant(
        &self,
        mut low: u64,
        mut high: u64,
        reached: impl Fn(NaiveDate) -> bool,
    ) -> u64 {
        while low < high {
            let middle = low + (high - low) / 2;
            if reached(self.local_date(middle)) {
                high = middle;
            } else {
                low = middle + 1;
            }
        }
        high
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-03-08 06:00 UTC: 22:00 PST on the eve of the spring-forward day.
    const EVENING_BEFORE_DST: u64 = 1_772_949_600_000;
    const HOUR: u64 = 3_600_000;

    fn reset(zone: Tz) -> DailyReset {
        DailyReset { zone }
    }

    fn utc_ms(y: i32, m: u32, d: u32, h: u32, min: u32) -> u64 {
        chrono::Utc
            .with_ymd_and_hms(y, m, d, h, min, 0)
            .unwrap()
            .timestamp_millis() as u64
    }

    #[test]
    fn daily_reset_is_midnight_pacific_across_dst() {
        let daily = reset(chrono_tz::America::Los_Angeles);
        let first = daily.next_reset_after(EVENING_BEFORE_DST);
        // Midnight PST (UTC-8) on 2026-03-08 is 08:00 UTC.
        assert_eq!(first, EVENING_BEFORE_DST + 2 * HOUR);
        // The next one comes after a 23-hour day, at midnight PDT (UTC-7).
        assert_eq!(daily.next_reset_after(first), first + 23 * HOUR);
    }

    #[test]
    fn a_skipped_midnight_resets_when_the_new_day_begins() {
        // Santiago springs forward from 24:00 to 01:00 on 2022-09-11 (-04 to -03): the new day
        // begins at 04:00 UTC, local 01:00.
        let daily = reset(chrono_tz::America::Santiago);
        let evening = utc_ms(2022, 9, 11, 1, 30); // 21:30 local on the 10th
        assert_eq!(daily.next_reset_after(evening), utc_ms(2022, 9, 11, 4, 0));
        assert_eq!(
            daily.start_of_day_at(utc_ms(2022, 9, 11, 6, 0)),
            utc_ms(2022, 9, 11, 4, 0)
        );
    }

    #[test]
    fn a_skipped_day_resets_once_when_the_day_after_begins() {
        // Samoa left out 2011-12-30 entirely: from the 29th at 23:59:59 to the 31st at 00:00.
        let daily = reset(chrono_tz::Pacific::Apia);
        let evening_29th = utc_ms(2011, 12, 30, 8, 0); // 22:00 local on the 29th (UTC-10)
        let reset_at = daily.next_reset_after(evening_29th);
        assert_eq!(reset_at, utc_ms(2011, 12, 30, 10, 0));
        assert_eq!(daily.day_of(reset_at) - daily.day_of(evening_29th), 2);
    }

    #[test]
    fn time_converts_between_readings_after_a_step() {
        let time = Time::new(10_000, 4_000);
        assert_eq!(time.steady_at(12_000), 6_000);
        assert_eq!(time.wall_at(1_000), 7_000);
        assert_eq!(Time::new(0, 5).steady_at(u64::MAX), u64::MAX);
        assert_eq!(Time::new(5, 0).steady_at(0), 0);
    }

    /// Every zone, every day from 2010 to 2030: the next reset is always after now, starts a
    /// later local date, and is the same from anywhere in the day before it.
    #[test]
    fn every_zone_resets_strictly_later_once_a_day_2010_to_2030() {
        let start = utc_ms(2010, 1, 1, 0, 0);
        let end = utc_ms(2031, 1, 1, 0, 0);
        let zones: Vec<Tz> = chrono_tz::TZ_VARIANTS.to_vec();
        let failures: Vec<String> = std::thread::scope(|scope| {
            let workers: Vec<_> = zones
                .chunks(zones.len().div_ceil(4))
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .filter_map(|&zone| check_zone(zone, start, end))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    fn check_zone(zone: Tz, start: u64, end: u64) -> Option<String> {
        let daily = reset(zone);
        let mut reset_at = daily.next_reset_after(start);
        while reset_at < end {
            let next = daily.next_reset_after(reset_at);
            let fail =
                |what: &str| Some(format!("{zone}: reset at {reset_at}, next {next}: {what}"));
            if next <= reset_at {
                return fail("the next reset is not later");
            }
            if daily.day_of(next) <= daily.day_of(reset_at) {
                return fail("the next reset does not start a later day");
            }
            if daily.day_of(next - 1) >= daily.day_of(next) {
                return fail("the date had moved on before the reset");
            }
            if next - reset_at > 49 * HOUR || next - reset_at < HOUR {
                return fail("a day is shorter than an hour or longer than two");
            }
            for at in [next - 1, reset_at + (next - reset_at) / 2] {
                let from_inside = daily.next_reset_after(at);
                if from_inside <= at {
                    return fail(&format!(
                        "from {at} the next reset {from_inside} is not later"
                    ));
                }
            }
            reset_at = next;
        }
        None
    }
}
