use super::*;
use crate::retention::{plan, RetentionPolicy};

const HOUR_MS: i64 = 3_600_000;
const BASE_MS: i64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z

fn entry(i: usize) -> IndexEntry {
    IndexEntry {
        folder: format!("app/{:08}-{:016x}/", i, i),
        time: Timestamp::from_millis(BASE_MS + i as i64 * HOUR_MS),
        bytes: 10,
        member: i.is_multiple_of(2).then(|| "even".to_string()),
        pinned: false,
        verified: None,
    }
}

fn budgets() -> Vec<StepBudget> {
    [MIN_STEP_SUBREQUESTS, 9, SUBREQUESTS_FREE, DEFAULT_STEP_SUBREQUESTS, SUBREQUESTS_PAID]
        .iter()
        .map(|n| StepBudget::parse(Some(&n.to_string())).unwrap())
        .collect()
}

#[test]
fn the_step_budget_defaults_below_the_paid_cap_and_refuses_bad_values_naming_the_var() {
    assert_eq!(StepBudget::parse(None).unwrap().subrequests(), DEFAULT_STEP_SUBREQUESTS);
    const { assert!(DEFAULT_STEP_SUBREQUESTS <= SUBREQUESTS_PAID) };
    for bad in ["0", "4", "1001", "ten", "-3", ""] {
        let e = StepBudget::parse(Some(bad)).unwrap_err().to_string();
        assert!(e.contains(STEP_BUDGET_VAR) && e.contains(&format!("{bad:?}")), "{e}");
    }
    assert_eq!(StepBudget::parse(Some(" 50 ")).unwrap().subrequests(), 50);
}

/// Listing 1,000 backups (today: three R2 GETs per backup in one request, 3,000 subrequests)
/// goes page by page, each within the step budget, and shows every backup once, newest first.
#[test]
fn listing_a_thousand_backups_stays_under_the_cap_in_every_request() {
    let all: Vec<IndexEntry> = (0..1000).map(entry).rev().collect();
    for budget in budgets() {
        let limit = budget.listing_page();
        let mut seen = Vec::new();
        let mut before: Option<String> = None;
        let mut requests = 0;
        loop {
            requests += 1;
            assert!(requests <= 1000, "the paging never ends");
            // What the object reads: entries before the cursor, newest first, `limit + 1` of them.
            let window: Vec<IndexEntry> =
                all.iter().filter(|e| before.as_ref().is_none_or(|b| e.folder < *b)).take(limit + 1).cloned().collect();
            let (shown, next) = page(window, limit, None);
            let cost = listing_cost(shown.len());
            assert!(cost <= budget.subrequests() && cost <= SUBREQUESTS_PAID, "{budget:?}: {cost}");
            seen.extend(shown.into_iter().map(|e| e.folder));
            match next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        let expected: Vec<String> = all.iter().map(|e| e.folder.clone()).collect();
        assert_eq!(seen, expected, "{budget:?}");
    }
    // The default page of 100 fits the default budget in one request.
    assert!(StepBudget::default().listing_page() >= 100);
    assert!(listing_cost(StepBudget::parse(Some("50")).unwrap().listing_page()) <= SUBREQUESTS_FREE);
}

#[test]
fn a_listing_page_filtered_by_member_shows_only_that_members_backups() {
    let all: Vec<IndexEntry> = (0..10).map(entry).rev().collect();
    let (shown, next) = page(all.clone(), 3, Some("even"));
    assert_eq!(
        shown.iter().map(|e| e.folder.as_str()).collect::<Vec<_>>(),
        [&all[1].folder, &all[3].folder, &all[5].folder]
    );
    assert_eq!(next.as_deref(), Some(all[5].folder.as_str()));
    let (shown, next) = page(all[..4].to_vec(), 3, None);
    assert_eq!((shown.len(), next), (3, Some(all[2].folder.clone())));
    assert_eq!(page(all[..3].to_vec(), 3, None).1, None, "no more: no cursor");
}

/// A retention pass over a year and more of hourly backups (17,520; today it reads every
/// manifest and deletes all it plans in one invocation) deletes in steps that each stay within
/// the budget, and over all steps deletes exactly what the plan says.
#[test]
fn retention_over_17_000_backups_deletes_in_steps_under_the_cap() {
    let entries: Vec<IndexEntry> = (0..17_520).map(entry).collect();
    let infos: Vec<_> = entries.iter().map(IndexEntry::info).collect();
    let policy = RetentionPolicy::from_value(&serde_json::json!({"keep_daily": 7, "keep_monthly": 12})).unwrap();
    let now = Timestamp::from_millis(BASE_MS + 17_520 * HOUR_MS);
    let planned = plan(&policy, &infos, false, now);
    let doomed: Vec<String> = planned.deleted().map(|d| d.folder.clone()).collect();
    assert!(doomed.len() > 17_000, "{}", doomed.len());
    for budget in budgets() {
        for marks in [false, true] {
            let mut done = 0;
            let mut deleted = Vec::new();
            let mut steps = 0;
            loop {
                steps += 1;
                // What the step sees: the plan's deletions not yet done (a window is enough).
                let window = doomed[done..].iter().take(400).cloned().collect();
                let (now_, more) = deletions_now(window, budget, marks);
                let cost = deletion_cost(now_.len(), marks);
                assert!(cost <= budget.subrequests() && cost <= SUBREQUESTS_PAID, "{budget:?} {marks}: {cost}");
                assert!(!now_.is_empty());
                done += now_.len();
                deleted.extend(now_);
                if !more {
                    break;
                }
            }
            assert_eq!(done, doomed.len());
            assert_eq!(deleted, doomed);
            assert!(steps >= doomed.len() / budget.deletions(marks));
        }
    }
}

/// Rebuilding the index of 17,520 folders from R2 goes a bounded list page at a time, every step
/// within the budget, each folder read once, and ends ready.
#[test]
fn rebuilding_the_index_of_17_000_backups_takes_bounded_steps_and_reads_each_folder_once() {
    let folders: Vec<String> = (0..17_520).map(|i| entry(i).folder).collect();
    for budget in budgets() {
        let mut state = IndexState::missing();
        let mut read = Vec::new();
        let mut steps = 0;
        while let IndexState::Building { after } = state.clone() {
            steps += 1;
            assert!(steps <= 20_000, "never ready");
            // R2's delimited page after `after`, larger than one step reads.
            let start = after.as_ref().map(|a| past_folder(a));
            let from = start.as_ref().map_or(0, |s| folders.partition_point(|f| f.as_str() <= s.as_str()));
            let more = folders.len() - from > 400;
            let listed: Vec<String> = folders[from..].iter().take(400).cloned().collect();
            let (to_read, next) = rebuild_step(listed, more, budget);
            let cost = rebuild_cost(to_read.len());
            assert!(cost <= budget.subrequests() && cost <= SUBREQUESTS_PAID, "{budget:?}: {cost}");
            read.extend(to_read);
            state = next;
        }
        assert_eq!(read, folders, "{budget:?}");
    }
    assert_eq!(rebuild_step(vec![], false, StepBudget::default()), (vec![], IndexState::Ready));
}

#[test]
fn an_entry_carries_what_retention_reads() {
    let manifest: Manifest = serde_json::from_value(serde_json::json!({
        "source": "s", "kind": "d1", "job_id": "0123456789abcdef", "trigger": "cron",
        "started_at": "2026-11-28T03:07:00.000Z", "scheduled_for": "2026-11-28T03:00:00.000Z",
        "finished_at": "2026-11-28T03:09:00.000Z", "provider": {},
        "artifacts": [{"key": "s/f/a.sql", "filename": "a.sql", "size": 7, "sha256": "00", "content_type": "application/sql"}]
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let e = IndexEntry::of("s/2026-11-28T030700Z-0123456789abcdef/", &manifest, true, Some(false));
    assert_eq!(e.time, Timestamp::parse_rfc3339("2026-11-28T03:00:00Z").unwrap());
    assert_eq!(e.bytes, 7);
    let info = e.info();
    assert!(info.pinned && info.verified == Some(false) && info.member.is_none());
    let back: IndexEntry = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
    assert_eq!(back, e);
}
