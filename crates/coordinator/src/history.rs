//! The last hour of the pool, one sample a minute, in memory (lost at restart): how many results
//! were accepted in the minute (throughput) and how many jobs were idle at its end (queue length).
//! The tick loop offers a sample every tick; one is taken only when the minute turns.

use std::collections::VecDeque;

use serde::Serialize;

use crate::engine::Engine;

/// How many minutes are kept.
pub const MINUTES: usize = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// The minute's start, in ms since the epoch.
    pub minute_ms: u64,
    /// Results accepted in the minute.
    pub completed: u64,
    /// Idle jobs when the minute ended (for the current minute: now).
    pub queued: u64,
}

#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    /// The minute being counted, and the accepted-results counter when it began.
    current: Option<(u64, u64)>,
}

impl History {
    /// Closes the current minute if `now_ms` is past it. `accepted` is the engine's counter of
    /// accepted results; `queued` is asked for only when a minute closes (it counts jobs).
    pub fn offer(&mut self, now_ms: u64, accepted: u64, queued: impl FnOnce() -> u64) {
        let minute = now_ms / 60_000;
        match self.current {
            None => self.current = Some((minute, accepted)),
            Some((m, _)) if m == minute => {}
            Some((m, base)) => {
                let queued = queued();
                self.push(Sample { minute_ms: m * 60_000, completed: accepted.saturating_sub(base), queued });
                // Minutes without a tick (a paused process) are recorded as empty.
                for gap in (m + 1..minute).rev().take(MINUTES).collect::<Vec<_>>().into_iter().rev() {
                    self.push(Sample { minute_ms: gap * 60_000, completed: 0, queued });
                }
                self.current = Some((minute, accepted));
            }
        }
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

/// Offers the engine's state to `history` (called from the tick loop).
pub fn offer(history: &std::sync::Mutex<History>, engine: &Engine, now_ms: u64) {
    let accepted = engine.metrics().results_accepted;
    let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
    h.offer(now_ms, accepted, || idle_jobs(engine));
}

pub fn idle_jobs(engine: &Engine) -> u64 {
    engine.counts().jobs.iter().find(|(s, _)| *s == vmgrid_proto::JobState::Idle).map_or(0, |(_, n)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_is_closed_when_the_next_begins_and_an_hour_is_kept() {
        let mut h = History::default();
        h.offer(0, 5, || panic!("no minute closed yet"));
        h.offer(59_999, 9, || panic!("still the same minute"));
        h.offer(60_000, 12, || 3);
        assert_eq!(
            h.samples(12, 4),
            vec![
                Sample { minute_ms: 0, completed: 7, queued: 3 },
                Sample { minute_ms: 60_000, completed: 0, queued: 4 },
            ]
        );
        // Three silent minutes are recorded as empty ones.
        h.offer(4 * 60_000, 20, || 1);
        let s = h.samples(20, 1);
        assert_eq!(s.iter().map(|s| s.completed).collect::<Vec<_>>(), vec![7, 8, 0, 0, 0]);
        for i in 0..200u64 {
            h.offer((5 + i) * 60_000, 20 + i, || 0);
        }
        let s = h.samples(220, 0);
        assert_eq!(s.len(), MINUTES + 1, "an hour of closed minutes and the current one");
        assert!(s.windows(2).all(|w| w[1].minute_ms == w[0].minute_ms + 60_000));
    }
}
