//! Waves: most projects of a pool refused at once. Gemini refuses a whole pool when it is short
//! of capacity or dislikes the pool's outbound address, and then every project's 429s say
//! nothing of its own quota: the pool rests briefly instead, and no project learns from them.
//!
//! A project *refuses* when its last three answers or more were refusals, the latest within two
//! spans (1/60 of a window each: two seconds of Gemini's minute); it *answers* when it had any
//! answer within the last window. A wave is a strict majority of the pool's answering projects refusing, at least
//! two: the ordinary noise of a busy pool (a few percent of calls refused at random) seldom
//! refuses one project three times in a row, and never most of them at once.

use super::ids::{PoolIdx, ProjectIdx};
use super::learning::weighing::span_of;
use foldhash::HashMap;
use serde::{Deserialize, Serialize};

/// Refusals in a row, the last within two spans, that make a project refusing.
const REFUSALS_OF_A_REFUSING_PROJECT: u64 = 3;

/// One project's latest answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answers {
    /// Steady time of the latest answer.
    last_ms: u64,
    /// Refusals since the last acceptance.
    refusals_in_a_row: u64,
}

impl Answers {
    fn answered_within(&self, now: u64, span: u64) -> bool {
        now < self.last_ms.saturating_add(span)
    }

    fn refusing(&self, now: u64, span: u64) -> bool {
        self.answered_within(now, 2 * span)
            && self.refusals_in_a_row >= REFUSALS_OF_A_REFUSING_PROJECT
    }
}

/// Every project's recent answers.
#[derive(Debug, Clone, Default)]
pub struct Waves {
    answers: HashMap<(PoolIdx, ProjectIdx), Answers>,
}

impl Waves {
    /// The provider accepted a call of `project` at `now`.
    pub fn accepted(&mut self, pool: PoolIdx, project: ProjectIdx, now: u64) {
        let answers = self.answers.entry((pool, project)).or_default();
        answers.last_ms = now;
        answers.refusals_in_a_row = 0;
    }

    /// The provider refused a call of `project` at `now`: whether the pool is in a wave. A
    /// wave's tallies start again, so that it is announced once.
    pub fn refused(
        &mut self,
        pool: PoolIdx,
        project: ProjectIdx,
        now: u64,
        window_ms: u64,
    ) -> bool {
        let span = span_of(window_ms);
        let answers = self.answers.entry((pool, project)).or_default();
        answers.last_ms = now;
        answers.refusals_in_a_row = answers.refusals_in_a_row.saturating_add(1);
        let (mut answering, mut refusing) = (0usize, 0usize);
        for (_, answers) in self.answers.iter().filter(|((p, _), _)| *p == pool) {
            answering += usize::from(answers.answered_within(now, window_ms));
            refusing += usize::from(answers.refusing(now, span));
        }
        let wave = refusing >= 2 && refusing * 2 > answering;

        if wave {
            self.answers.retain(|(p, _), _| *p != pool);
        }
        wave
    }

    /// The tallies, for an image.
    pub fn iter(&self) -> impl Iterator<Item = ((PoolIdx, ProjectIdx), Answers)> + '_ {
        self.answers.iter().map(|(&key, &answers)| (key, answers))
    }

    pub fn restore(&mut self, pool: PoolIdx, project: ProjectIdx, answers: Answers) {
        self.answers.insert((pool, project), answers);
    }
}
