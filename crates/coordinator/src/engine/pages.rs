//! The job list a page at a time (`GET /v1/jobs`, `vmgrid q`, the dashboard), and each owner's
//! jobs as ranges of ids, so that a user's pages read only their own jobs however many the pool
//! holds of others: a spec's jobs have consecutive ids and one owner, so a submission is one
//! range (ranges that touch are merged), and a range goes when its last job does.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use vmgrid_proto::*;

use super::{Engine, Job, JobFilter, MAX_PAGE, MAX_PAGE_SCAN, Principal};

/// Each owner's job ids: ranges, first id to last id.
#[derive(Default)]
pub(super) struct Owners(HashMap<Arc<str>, BTreeMap<u64, u64>>);

impl Owners {
    /// Jobs `first..=last` are `owner`'s.
    pub(super) fn add(&mut self, owner: &Arc<str>, first: u64, last: u64) {
        let ranges = self.0.entry(owner.clone()).or_default();
        if let Some((_, end)) = ranges.range_mut(..first).next_back()
            && end.checked_add(1) == Some(first)
        {
            *end = (*end).max(last);
            return;
        }
        ranges.insert(first, last);
    }

    /// Job `id` of `owner`'s is gone: its range goes too once `empty(first, last)` says no job of
    /// it is left.
    pub(super) fn removed(&mut self, owner: &str, id: u64, empty: impl Fn(u64, u64) -> bool) {
        let Some(ranges) = self.0.get_mut(owner) else { return };
        let Some((&first, &last)) = ranges.range(..=id).next_back() else { return };
        if last >= id && empty(first, last) {
            ranges.remove(&first);
            if ranges.is_empty() {
                self.0.remove(owner);
            }
        }
    }

    /// Whether `owner`'s ranges hold `id`.
    pub(super) fn holds(&self, owner: &str, id: u64) -> bool {
        self.0.get(owner).and_then(|r| r.range(..=id).next_back()).is_some_and(|(_, &last)| last >= id)
    }
}

impl Engine {
    /// Up to `limit` jobs after id `after` that `p` may see (in `state`, if given), in id order
    /// (or newest first, where `after` is the id the previous page ended at going down).
    pub fn job_page(&self, p: &Principal, after: u64, limit: usize, filter: &JobFilter) -> JobPage {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut jobs = Vec::new();
        let mut next_after = None;
        let name_of = |j: &Job| self.specs.get(&j.spec_id).map_or("", |s| s.spec.name.as_str());
        let needle = filter.name.as_deref().map(str::to_lowercase);
        let matches = |j: &Job| {
            p.may_see(&j.owner)
                && filter.state.is_none_or(|s| j.state == s)
                && filter.owner.as_deref().is_none_or(|o| *j.owner == *o)
                && needle.as_deref().is_none_or(|n| name_of(j).to_lowercase().contains(n))
        };
        // A page looks at no more than MAX_PAGE_SCAN jobs (the engine's lock is held meanwhile):
        // a filter that matches few of a million jobs gives short pages, each with where to go on.
        for (looked, (&id, j)) in self.page_order(p, after, filter).enumerate() {
            if jobs.len() == limit {
                next_after = jobs.last().map(|v: &JobView| v.id);
                break;
            }
            if looked == MAX_PAGE_SCAN {
                // Where this page stopped looking: the next one starts at `id`.
                next_after = Some(if filter.newest_first { id + 1 } else { id - 1 });
                break;
            }
            if matches(j) {
                jobs.push(self.view(j));
            }
        }
        JobPage { jobs, next_after }
    }

    /// The jobs a page walks, from where it starts: only one owner's when the caller is a user
    /// (or a console), or an admin asks for one owner; else the whole pool's.
    fn page_order<'a>(
        &'a self,
        p: &Principal,
        after: u64,
        filter: &JobFilter,
    ) -> Box<dyn Iterator<Item = (&'a u64, &'a Job)> + 'a> {
        let owner = match p {
            Principal::Admin(_) => filter.owner.as_deref(),
            _ => Some(p.owner()),
        };
        let Some(owner) = owner else {
            return match (filter.newest_first, after) {
                (false, _) => Box::new(self.jobs.range(after.saturating_add(1)..)),
                (true, 0) => Box::new(self.jobs.iter().rev()),
                (true, _) => Box::new(self.jobs.range(..after).rev()),
            };
        };
        let Some(ranges) = self.owners.0.get(owner) else { return Box::new(std::iter::empty()) };
        let jobs = &self.jobs;
        if filter.newest_first {
            // Ids below `below`: every range that starts below it, largest first.
            let below = if after == 0 { u64::MAX } else { after };
            Box::new(ranges.range(..below).rev().flat_map(move |(&f, &l)| jobs.range(f..=l.min(below - 1)).rev()))
        } else {
            let from = after.saturating_add(1);
            let start = ranges.range(..=from).next_back().map_or(0, |(&f, _)| f);
            let ranges = ranges.range(start..).filter(move |(_, l)| **l >= from);
            Box::new(ranges.flat_map(move |(&f, &l)| jobs.range(f.max(from)..=l)))
        }
    }

    /// Every job is in its owner's ranges (the owner index is what a user's pages read).
    pub(super) fn check_owners(&self) -> Result<(), String> {
        match self.jobs.values().find(|j| !self.owners.holds(&j.owner, j.id)) {
            Some(j) => Err(format!("job {} is not in the ranges of its owner {}", j.id, j.owner)),
            None => Ok(()),
        }
    }
}
