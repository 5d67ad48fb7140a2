//! The last hour of the pool, one sample a minute: how many jobs completed in the minute
//! (throughput) and how many jobs were idle at its end (queue length). The engine offers its
//! counters every tick; a sample is taken only when the minute turns, and stored (`Op::Sample`),
//! so a restarted coordinator, or a standby taking over, shows the hour that went before. The
//! minute being counted when a coordinator stops is lost; the minutes it was down are empty.

use std::collections::VecDeque;

use serde::Serialize;

/// How many minutes are kept.
pub const MINUTES: usize = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// The minute's start, in ms since the epoch.
    pub minute_ms: u64,
    /// Jobs completed in the minute.
    pub completed: u64,
    /// Idle jobs when the minute ended (for the current minute: now).
    pub queued: u64,
}

#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    /// The minute being counted, and the completed-jobs counter when it began.
    current: Option<(u64, u64)>,
}

impl History {
    /// The stored minutes (oldest first), to go on from after a restart.
    pub fn from_stored(stored: Vec<Sample>) -> History {
        let mut h = History::default();
        for s in stored {
            h.push(s);
        }
        h
    }

    /// Closes the current minute if `now_ms` is past it, and gives the minutes it closed, to be
    /// stored. `accepted` is the engine's counter of completed jobs; `queued` the idle jobs now.
    pub fn offer(&mut self, now_ms: u64, accepted: u64, queued: u64) -> Vec<Sample> {
        let minute = now_ms / 60_000;
        let mut closed = Vec::new();
        match self.current {
            // The same minute, or a clock that stepped back: nothing closes.
            Some((m, _)) if minute <= m => return closed,
            Some((m, base)) => {
                closed.push(Sample { minute_ms: m * 60_000, completed: accepted.saturating_sub(base), queued });
                self.fill_gap(m, minute, queued, &mut closed);
            }
            // The first offer since the start: the minutes since the last stored one were not
            // counted by anyone (the pool was down); they are recorded as empty.
            None => {
                if let Some(last) = self.samples.back().map(|s| s.minute_ms / 60_000).filter(|&l| l < minute) {
                    self.fill_gap(last, minute, queued, &mut closed);
                }
            }
        }
        for s in &closed {
            self.push(*s);
        }
        self.current = Some((minute, accepted));
        closed
    }

    /// Empty samples for the minutes strictly between `from` and `to` (the last hour of them).
    fn fill_gap(&self, from: u64, to: u64, queued: u64, out: &mut Vec<Sample>) {
        let start = (from + 1).max(to.saturating_sub(MINUTES as u64));
        out.extend((start..to).map(|m| Sample { minute_ms: m * 60_000, completed: 0, queued }));
    }

    fn push(&mut self, s: Sample) {
        if self.samples.len() == MINUTES {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    /// The closed minutes, oldest first, then the current one so far.
    pub fn samples(&self, accepted: u64, queued: u64) -> Vec<Sample> {
        let mut out: Vec<Sample> = self.samples.iter().copied().collect();
        if let Some((m, base)) = self.current {
            out.push(Sample { minute_ms: m * 60_000, completed: accepted.saturating_sub(base), queued });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_is_closed_when_the_next_begins_and_an_hour_is_kept() {
        let mut h = History::default();
        assert!(h.offer(0, 5, 9).is_empty(), "no minute closed yet");
        assert!(h.offer(59_999, 9, 9).is_empty(), "still the same minute");
        assert_eq!(h.offer(60_000, 12, 3), vec![Sample { minute_ms: 0, completed: 7, queued: 3 }]);
        assert_eq!(
            h.samples(12, 4),
            vec![
                Sample { minute_ms: 0, completed: 7, queued: 3 },
                Sample { minute_ms: 60_000, completed: 0, queued: 4 },
            ]
        );
        // Three silent minutes are recorded as empty ones.
        assert_eq!(h.offer(4 * 60_000, 20, 1).len(), 3, "the minute closed and the two silent ones");
        let s = h.samples(20, 1);
        assert_eq!(s.iter().map(|s| s.completed).collect::<Vec<_>>(), vec![7, 8, 0, 0, 0]);
        for i in 0..200u64 {
            h.offer((5 + i) * 60_000, 20 + i, 0);
        }
        let s = h.samples(220, 0);
        assert_eq!(s.len(), MINUTES + 1, "an hour of closed minutes and the current one");
        assert!(s.windows(2).all(|w| w[1].minute_ms == w[0].minute_ms + 60_000));
    }

    #[test]
    fn after_a_restart_the_stored_minutes_go_on_and_the_minutes_down_are_empty() {
        let stored = vec![
            Sample { minute_ms: 0, completed: 7, queued: 3 },
            Sample { minute_ms: 60_000, completed: 2, queued: 1 },
        ];
        let mut h = History::from_stored(stored.clone());
        // Back at minute 4: minutes 2 and 3 were not counted; minute 4 is being counted.
        let closed = h.offer(4 * 60_000 + 5, 0, 6);
        assert_eq!(
            closed.iter().map(|s| (s.minute_ms / 60_000, s.completed)).collect::<Vec<_>>(),
            vec![(2, 0), (3, 0)]
        );
        let s = h.samples(1, 6);
        assert_eq!(&s[..2], &stored[..]);
        assert_eq!(s.iter().map(|s| s.minute_ms / 60_000).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        assert_eq!(s[4].completed, 1, "the current minute counts from the restart");
        // A clock that steps back closes nothing and overwrites nothing.
        assert!(h.offer(3 * 60_000, 5, 0).is_empty());
        assert_eq!(h.samples(1, 6).len(), 5);
        // Down for a day: only the last hour of empty minutes is recorded.
        let mut h = History::from_stored(stored);
        assert_eq!(h.offer(24 * 3_600_000, 0, 0).len(), MINUTES);
        assert_eq!(h.samples(0, 0).len(), MINUTES + 1);
    }
}
