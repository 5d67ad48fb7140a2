//! Job pages: the filters a list asks the pool for.

use super::tests::{TIMING, spec};
use super::*;

/// A page lists only the jobs of the owner and name asked for, across the whole queue, and never
/// another user's.
#[test]
fn a_job_page_filters_by_owner_and_name_on_every_page() {
    let mut e = Engine::new(TIMING);
    let (alice, bob) = (Principal::User("alice".into()), Principal::User("bob".into()));
    let mut sweep = spec(0);
    sweep.name = "Sweep-A".into();
    e.submit(&alice, spec(0), 3, 0).unwrap();
    e.submit(&bob, sweep.clone(), 2, 0).unwrap();
    e.submit(&alice, sweep, 2, 0).unwrap();
    let admin = Principal::Admin("admin".into());
    let f = |owner: Option<&str>, name: Option<&str>| JobFilter {
        state: None,
        owner: owner.map(str::to_string),
        name: name.map(str::to_string),
        newest_first: false,
    };
    let ids = |p: &Principal, f: &JobFilter| e.job_page(p, 0, 1000, f).jobs.iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(ids(&admin, &f(Some("alice"), Some("sweep"))).len(), 2);
    assert_eq!(ids(&admin, &f(None, Some("SWEEP-a"))).len(), 4, "the name matches case folded");
    assert_eq!(ids(&admin, &f(Some("bob"), None)).len(), 2);
    assert!(ids(&alice, &f(Some("bob"), None)).is_empty(), "a user never sees another user's jobs");
    // A small page still finds matches past the first jobs.
    let page = e.job_page(&admin, 0, 1, &f(Some("alice"), Some("sweep")));
    assert_eq!(page.jobs.len(), 1);
    let next = e.job_page(&admin, page.next_after.unwrap(), 1, &f(Some("alice"), Some("sweep")));
    assert_eq!(next.jobs.len(), 1);
    assert!(next.jobs[0].id > page.jobs[0].id && next.jobs[0].owner == "alice");
}

/// A filter that matches few jobs of many gives short pages, each bounded in the jobs it looks
/// at, and the pages together list every match once. A user's own pages (and an admin's for one
/// owner) read only that owner's jobs, so they are full however many jobs others have.
#[test]
fn a_page_looks_at_a_bounded_number_of_jobs_and_says_where_to_go_on() {
    let mut e = Engine::new(TIMING);
    e.set_limits(Limits { max_queued_per_user: 10_000_000, ..Limits::default() });
    let (alice, bob) = (Principal::User("alice".into()), Principal::User("bob".into()));
    let mut rare = spec(0);
    rare.name = "rare".into();
    e.submit(&alice, rare.clone(), 2, 0).unwrap();
    e.submit(&bob, spec(0), (MAX_PAGE_SCAN * 2) as u64, 0).unwrap();
    e.submit(&alice, rare, 3, 0).unwrap();
    let admin = Principal::Admin("root".into());
    let walk_as = |p: &Principal, newest_first, owner: Option<&str>, name: Option<&str>| {
        let filter = JobFilter {
            newest_first,
            owner: owner.map(str::to_string),
            name: name.map(str::to_string),
            ..JobFilter::default()
        };
        let (mut after, mut seen, mut pages) = (0, Vec::new(), 0);
        loop {
            let page = e.job_page(p, after, 1000, &filter);
            pages += 1;
            seen.extend(page.jobs.iter().map(|j| j.id));
            match page.next_after {
                Some(next) => after = next,
                None => break,
            }
        }
        (seen, pages)
    };
    let last = (MAX_PAGE_SCAN * 2) as u64 + 2;
    let mine = vec![1, 2, last + 1, last + 2, last + 3];
    let newest: Vec<u64> = mine.iter().rev().copied().collect();
    let (seen, pages) = walk_as(&admin, false, None, Some("rare"));
    assert_eq!(seen, mine, "alice's five jobs, each once");
    assert_eq!(pages, 3, "two full scans and the last page");
    let (seen, pages) = walk_as(&admin, true, None, Some("rare"));
    assert_eq!(seen, newest, "newest first: the same five, largest id first");
    assert_eq!(pages, 3);
    for (p, owner) in [(&alice, None), (&admin, Some("alice"))] {
        assert_eq!(walk_as(p, false, owner, None), (mine.clone(), 1), "one owner's jobs: one page");
        assert_eq!(walk_as(p, true, owner, None), (newest.clone(), 1));
    }
    // Pages of two, both ways, across the gap of bob's jobs.
    let two = |newest_first| {
        let filter = JobFilter { newest_first, ..JobFilter::default() };
        let (mut after, mut pages) = (0, Vec::new());
        loop {
            let page = e.job_page(&alice, after, 2, &filter);
            pages.push(page.jobs.iter().map(|j| j.id).collect::<Vec<_>>());
            match page.next_after {
                Some(next) => after = next,
                None => return pages,
            }
        }
    };
    assert_eq!(two(false), vec![vec![1, 2], vec![last + 1, last + 2], vec![last + 3]]);
    assert_eq!(two(true), vec![vec![last + 3, last + 2], vec![last + 1, 2], vec![1]]);
    assert!(walk_as(&bob, false, Some("alice"), None).0.is_empty(), "bob never sees alice's jobs");
    e.check_invariants().unwrap();
}

/// Newest first, pages of two: each page goes on below where the last one ended.
#[test]
fn newest_first_pages_go_down_from_the_largest_id() {
    let mut e = Engine::new(TIMING);
    let alice = Principal::User("alice".into());
    e.submit(&alice, spec(0), 5, 0).unwrap();
    let filter = JobFilter { newest_first: true, ..JobFilter::default() };
    let first = e.job_page(&alice, 0, 2, &filter);
    assert_eq!(first.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![5, 4]);
    let second = e.job_page(&alice, first.next_after.unwrap(), 2, &filter);
    assert_eq!(second.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![3, 2]);
    let third = e.job_page(&alice, second.next_after.unwrap(), 2, &filter);
    assert_eq!(third.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(third.next_after, None);
}
