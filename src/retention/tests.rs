use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::json;

use super::*;

fn at(s: &str) -> Timestamp {
    Timestamp::parse_rfc3339(s).unwrap()
}

fn backup(folder: &str, time: &str) -> BackupInfo {
    BackupInfo { folder: folder.into(), time: at(time), pinned: false, verified: None, member: None }
}

fn policy(v: serde_json::Value) -> RetentionPolicy {
    RetentionPolicy::from_value(&v).unwrap()
}

/// folder → reasons (as written in the API), kept backups only.
fn kept(plan: &Plan) -> BTreeMap<String, Vec<String>> {
    plan.kept().map(|d| (d.folder.clone(), d.reasons.iter().map(ToString::to_string).collect())).collect()
}

fn deleted(plan: &Plan) -> Vec<String> {
    plan.deleted().map(|d| d.folder.clone()).collect()
}

const NOW: &str = "2027-06-01T00:00:00Z";

#[test]
fn durations_in_restic_and_iso_form_are_accepted() {
    let d = |y, m, days, h| KeepWithin { years: y, months: m, days, hours: h };
    for (text, want) in [
        ("1y2m3d4h", d(1, 2, 3, 4)),
        ("30d", d(0, 0, 30, 0)),
        ("12h", d(0, 0, 0, 12)),
        (" 2d12h ", d(0, 0, 2, 12)),
        ("6m1y", d(1, 6, 0, 0)),
        ("P1Y6M", d(1, 6, 0, 0)),
        ("P30D", d(0, 0, 30, 0)),
        ("P2W", d(0, 0, 14, 0)),
        ("P1W2D", d(0, 0, 9, 0)),
        ("PT12H", d(0, 0, 0, 12)),
        ("P1DT2H", d(0, 0, 1, 2)),
        ("p30d", d(0, 0, 30, 0)),
    ] {
        assert_eq!(KeepWithin::parse(text), Ok(want), "{text}");
    }
    assert_eq!(d(1, 6, 0, 12).to_string(), "1y6m12h");
    assert_eq!(KeepWithin::parse("P2W").unwrap().to_string(), "14d");
}

#[test]
fn bad_durations_are_refused_saying_what_is_accepted() {
    for text in [
        "",
        "0d",
        "P0D",
        "1w",
        "1x",
        "d",
        "1",
        "1d1d",
        "P",
        "P1DT",
        "PT30M",
        "PT1H30M",
        "P1H",
        "P1D2Y",
        "P1M1M",
        "200000d",
        "99999999999999999999d",
        "-1d",
        "1.5d",
        "1 d",
        "P20000W1D",
    ] {
        let err = KeepWithin::parse(text).unwrap_err();
        assert!(err.contains(&format!("{text:?}")), "{text}: {err}");
        assert!(err.contains("valid duration") || err.contains("zero"), "{text}: {err}");
    }
    assert!(KeepWithin::parse("1x").unwrap_err().contains("\"1y6m\""), "names the accepted syntax");
}

#[test]
fn a_policy_table_is_parsed_strictly_naming_the_field() {
    let p = policy(json!({"keep_last": 3, "keep_daily": 7, "keep_within": "1y6m"}));
    assert_eq!(p.keep_last, Count::new(3));
    assert_eq!(p.keep_daily, Count::new(7));
    assert_eq!(p.keep_within, Some(KeepWithin { years: 1, months: 6, days: 0, hours: 0 }));
    let err = |v| RetentionPolicy::from_value(&v).unwrap_err();
    let e = err(json!({"keep_dayly": 7}));
    assert_eq!(e.path("retention"), "retention.keep_dayly");
    assert!(e.problem.contains("not a known field") && e.problem.contains("keep_daily"), "{e}");
    for bad in [json!(0), json!(-1), json!("7"), json!(1.5), json!(2_000_000), json!(true)] {
        let e = err(json!({"keep_weekly": bad}));
        assert_eq!(e.path("retention"), "retention.keep_weekly", "{bad}");
        assert!(e.problem.contains("whole number from 1"), "{bad}: {e}");
    }
    let e = err(json!({"keep_last": 1, "keep_within": "1fortnight"}));
    assert_eq!(e.path("retention"), "retention.keep_within");
    assert!(e.problem.contains("valid duration"), "{e}");
    let e = err(json!({}));
    assert_eq!((e.field.as_deref(), e.path("retention").as_str()), (None, "retention"));
    assert!(e.problem.contains("sets no rule"), "{e}");
    assert!(err(json!([1])).problem.contains("must be a table"));
}

#[test]
fn the_serde_derive_alone_refuses_unknown_fields_zero_counts_and_empty_tables() {
    let from = |v| serde_json::from_value::<RetentionPolicy>(v);
    assert!(from(json!({"keep_dayly": 1})).is_err());
    assert!(from(json!({"keep_daily": 0})).is_err());
    assert!(from(json!({})).is_err());
    assert!(from(json!({"keep_within": "0d"})).is_err());
    let p = from(json!({"keep_yearly": 2, "keep_within": "P30D"})).unwrap();
    assert_eq!(serde_json::to_value(p).unwrap(), json!({"keep_yearly": 2, "keep_within": "30d"}));
}

#[test]
fn keep_last_keeps_the_newest_n_and_the_rest_goes() {
    let backups = ["a", "b", "c", "d"]
        .iter()
        .enumerate()
        .map(|(i, f)| backup(f, &format!("2026-11-2{i}T03:00:00Z")))
        .collect::<Vec<_>>();
    let plan = plan(&policy(json!({"keep_last": 2})), &backups, false, at(NOW));
    assert_eq!(
        plan.backups.iter().map(|d| d.folder.as_str()).collect::<Vec<_>>(),
        ["d", "c", "b", "a"],
        "newest first"
    );
    assert_eq!(
        kept(&plan),
        BTreeMap::from([("d".into(), vec!["newest".into(), "last".into()]), ("c".into(), vec!["last".into()])])
    );
    assert_eq!(deleted(&plan), ["b", "a"]);
}

#[test]
fn keep_daily_keeps_the_newest_backup_of_each_of_the_newest_days() {
    let backups = vec![
        backup("d1-early", "2026-11-24T01:00:00Z"),
        backup("d1-late", "2026-11-24T23:00:00Z"),
        backup("d2", "2026-11-25T12:00:00Z"),
        backup("d4-early", "2026-11-27T00:00:00Z"),
        backup("d4-late", "2026-11-27T23:59:59Z"),
    ];
    let plan = plan(&policy(json!({"keep_daily": 2})), &backups, false, at(NOW));
    assert_eq!(
        kept(&plan),
        BTreeMap::from([
            ("d4-late".into(), vec!["newest".into(), "daily 2026-11-27".into()]),
            ("d2".into(), vec!["daily 2026-11-25".into()]),
        ])
    );
    assert_eq!(deleted(&plan), ["d4-early", "d1-late", "d1-early"]);
}

#[test]
fn a_rule_with_room_left_also_keeps_the_oldest_backup_as_restic_does() {
    let backups = vec![
        backup("d1-early", "2026-11-24T01:00:00Z"),
        backup("d1-late", "2026-11-24T23:00:00Z"),
        backup("d2", "2026-11-25T12:00:00Z"),
    ];
    let plan = plan(&policy(json!({"keep_daily": 5})), &backups, false, at(NOW));
    assert_eq!(kept(&plan)["d1-early"], ["oldest daily 2026-11-24"]);
    assert_eq!(kept(&plan)["d1-late"], ["daily 2026-11-24"]);
    assert!(deleted(&plan).is_empty());
    // With exactly as many days as the count there is no room left: the oldest goes.
    let plan = super::plan(&policy(json!({"keep_daily": 2})), &backups, false, at(NOW));
    assert_eq!(deleted(&plan), ["d1-early"]);
}

#[test]
fn weeks_are_iso_weeks_across_the_new_year() {
    // 2027-01-03 (a Sunday) is in ISO week 2026-W53, with 2026-12-31; 2027-01-04 starts 2027-W01.
    let backups = vec![
        backup("thu", "2026-12-31T03:00:00Z"),
        backup("sun", "2027-01-03T03:00:00Z"),
        backup("mon", "2027-01-04T03:00:00Z"),
    ];
    let plan = plan(&policy(json!({"keep_weekly": 2})), &backups, false, at(NOW));
    assert_eq!(kept(&plan)["mon"], ["newest", "weekly 2027-W01"]);
    assert_eq!(kept(&plan)["sun"], ["weekly 2026-W53"]);
    assert_eq!(deleted(&plan), ["thu"]);
}

#[test]
fn period_labels_name_the_utc_period() {
    let t = at("2026-11-27T23:30:00-05:00"); // 04:30 UTC on the 28th
    let labels: Vec<String> = Period::ALL.iter().map(|p| p.label(t)).collect();
    assert_eq!(labels, ["2026-11-28T04", "2026-11-28", "2026-W48", "2026-11", "2026"]);
}

#[test]
fn keep_within_is_measured_from_the_newest_backup_that_is_not_in_the_future() {
    let backups = vec![
        backup("future", "2027-09-01T00:00:00Z"),
        backup("newest-past", "2026-03-31T12:00:00Z"),
        backup("edge", "2026-02-28T12:00:00Z"),
        backup("inside", "2026-02-28T12:00:01Z"),
        backup("old", "2025-12-01T00:00:00Z"),
    ];
    // One calendar month before 2026-03-31T12:00 is 2026-02-28T12:00 (clamped); the cut-off is
    // exclusive, as restic's.
    let plan = plan(&policy(json!({"keep_within": "1m"})), &backups, false, at(NOW));
    let k = kept(&plan);
    assert_eq!(k["future"], ["newest", "within 1m"], "newer than the reference, so within");
    assert_eq!(k["newest-past"], ["within 1m"]);
    assert_eq!(k["inside"], ["within 1m"]);
    assert_eq!(deleted(&plan), ["edge", "old"]);
    // Not from now: a source that stopped backing up long ago keeps its last stretch.
    let plan = super::plan(&policy(json!({"keep_within": "1m"})), &backups[1..], false, at("2030-01-01T00:00:00Z"));
    assert_eq!(deleted(&plan), ["edge", "old"]);
}

#[test]
fn pinned_backups_are_kept_whatever_the_rules_say() {
    let mut backups = vec![backup("old", "2025-01-01T00:00:00Z"), backup("new", "2026-01-01T00:00:00Z")];
    backups[0].pinned = true;
    let plan = plan(&policy(json!({"keep_last": 1})), &backups, false, at(NOW));
    assert_eq!(kept(&plan)["old"], ["pinned"]);
    assert!(deleted(&plan).is_empty());
}

#[test]
fn when_the_source_verifies_backups_newer_than_the_newest_verified_one_and_it_are_kept() {
    let mut backups = vec![
        backup("e", "2026-11-20T03:00:00Z"),
        backup("d-ok", "2026-11-21T03:00:00Z"),
        backup("c-mismatch", "2026-11-22T03:00:00Z"),
        backup("b-ok", "2026-11-23T03:00:00Z"),
        backup("a", "2026-11-24T03:00:00Z"),
    ];
    backups[1].verified = Some(true);
    backups[2].verified = Some(false);
    backups[3].verified = Some(true);
    let p = policy(json!({"keep_last": 1}));
    let plan = plan(&p, &backups, true, at(NOW));
    assert_eq!(kept(&plan)["a"], ["newest", "replacement not verified", "last"]);
    assert_eq!(kept(&plan)["b-ok"], ["replacement not verified"]);
    assert_eq!(deleted(&plan), ["c-mismatch", "d-ok", "e"]);
    // A source that does not verify ignores verification records.
    assert_eq!(deleted(&super::plan(&p, &backups, false, at(NOW))), ["b-ok", "c-mismatch", "d-ok", "e"]);
    // Nothing verified ok yet: nothing can be replaced, nothing goes.
    for b in &mut backups {
        b.verified = b.verified.and(Some(false));
    }
    assert!(deleted(&super::plan(&p, &backups, true, at(NOW))).is_empty());
}

#[test]
fn without_a_policy_everything_is_kept() {
    let backups = vec![backup("a", "2025-01-01T00:00:00Z"), backup("b", "2026-01-01T00:00:00Z")];
    let plan = Plan::keep_everything(&backups);
    assert_eq!(kept(&plan).len(), 2);
    assert_eq!(kept(&plan)["a"], ["no retention policy"]);
}

#[test]
fn the_plan_serializes_as_the_api_shows_it() {
    let backups = vec![backup("s/a/", "2026-11-27T03:00:00Z"), backup("s/b/", "2026-11-28T03:00:00Z")];
    let plan = plan(&policy(json!({"keep_daily": 1})), &backups, false, at(NOW));
    assert_eq!(
        serde_json::to_value(&plan).unwrap(),
        json!({"backups": [
            {"folder": "s/b/", "time": "2026-11-28T03:00:00.000Z", "action": "keep", "reasons": ["newest", "daily 2026-11-28"]},
            {"folder": "s/a/", "time": "2026-11-27T03:00:00.000Z", "action": "delete", "reasons": []},
        ]})
    );
}

#[test]
fn a_daily_pass_runs_at_most_once_per_utc_day() {
    let day = utc_day(at("2026-11-28T00:05:00Z"));
    assert!(daily_pass_due(None, at("2026-11-28T00:05:00Z")));
    assert!(!daily_pass_due(Some(day), at("2026-11-28T23:55:00Z")));
    assert!(daily_pass_due(Some(day), at("2026-11-29T00:00:00Z")));
    assert!(!daily_pass_due(Some(day), at("2026-11-27T12:00:00Z")), "an older tick never repeats a pass");
}

#[test]
fn the_backup_time_is_the_fire_time_served_else_the_start() {
    let mut m: Manifest = serde_json::from_value(json!({
        "source": "s", "kind": "d1", "job_id": "0123456789abcdef", "trigger": "cron",
        "started_at": "2026-11-28T03:07:00.000Z", "finished_at": "2026-11-28T03:09:00.000Z",
        "provider": {}, "artifacts": []
    }))
    .unwrap();
    assert_eq!(backup_time(&m), at("2026-11-28T03:07:00Z"), "manifests written before scheduled_for existed");
    m.scheduled_for = Some(at("2026-11-28T03:00:00Z"));
    assert_eq!(backup_time(&m), at("2026-11-28T03:00:00Z"));
}

// --- property tests over generated histories -------------------------------------------------

/// The oracle's own period labels, computed from the epoch milliseconds with chrono's calendar
/// fields and plain arithmetic, never with `Period::label` (the code under test): the ISO week is
/// the one holding that week's Thursday, numbered from the first Thursday of the Thursday's year.
fn independent_label(period: Period, t: Timestamp) -> String {
    use chrono::{Datelike, NaiveDate, Timelike};
    let ms = t.millis();
    let days = ms.div_euclid(86_400_000);
    let hour = ms.rem_euclid(86_400_000) / 3_600_000;
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
    let date = epoch + chrono::Duration::days(days);
    match period {
        Period::Hourly => {
            let d = chrono::DateTime::from_timestamp_millis(ms).unwrap();
            assert_eq!(i64::from(d.hour()), hour);
            format!("{:04}-{:02}-{:02}T{hour:02}", date.year(), date.month(), date.day())
        }
        Period::Daily => format!("{:04}-{:02}-{:02}", date.year(), date.month(), date.day()),
        Period::Weekly => {
            // 1970-01-01 was a Thursday: Monday = 0.
            let monday_based = (days + 3).rem_euclid(7);
            let thursday = epoch + chrono::Duration::days(days - monday_based + 3);
            let week = (thursday.ordinal0() / 7) + 1;
            format!("{:04}-W{week:02}", thursday.year())
        }
        Period::Monthly => format!("{:04}-{:02}", date.year(), date.month()),
        Period::Yearly => format!("{:04}", date.year()),
    }
}

#[test]
fn the_oracles_labels_agree_with_known_calendar_facts() {
    // Year boundaries where the ISO week year differs from the calendar year.
    for (t, week) in [
        ("2020-12-31T12:00:00Z", "2020-W53"),
        ("2021-01-03T23:59:59Z", "2020-W53"),
        ("2021-01-04T00:00:00Z", "2021-W01"),
        ("2024-12-30T00:00:00Z", "2025-W01"),
        ("2026-11-28T04:00:00Z", "2026-W48"),
        ("2027-01-01T00:00:00Z", "2026-W53"),
    ] {
        assert_eq!(independent_label(Period::Weekly, at(t)), week, "{t}");
    }
    assert_eq!(independent_label(Period::Hourly, at("2026-11-28T04:59:59Z")), "2026-11-28T04");
    assert_eq!(independent_label(Period::Daily, at("2026-02-28T23:59:59Z")), "2026-02-28");
    assert_eq!(independent_label(Period::Monthly, at("2028-02-29T00:00:00Z")), "2028-02");
    assert_eq!(independent_label(Period::Yearly, at("2026-12-31T23:59:59Z")), "2026");
}

/// An independent, naive reading of the rules: folder → the reasons it is kept for.
fn oracle(
    policy: &RetentionPolicy,
    backups: &[BackupInfo],
    verifies: bool,
    now: Timestamp,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut sorted: Vec<&BackupInfo> = backups.iter().collect();
    sorted.sort_by_key(|b| std::cmp::Reverse((b.time, b.folder.clone())));
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |b: &BackupInfo, reason: String| {
        out.entry(b.folder.clone()).or_default().insert(reason);
    };
    if let Some(b) = sorted.first() {
        add(b, "newest".into());
    }
    for b in &sorted {
        if b.pinned {
            add(b, "pinned".into());
        }
    }
    if verifies {
        let ok = sorted.iter().position(|b| b.verified == Some(true));
        for (i, b) in sorted.iter().enumerate() {
            if ok.is_none_or(|ok| i <= ok) {
                add(b, "replacement not verified".into());
            }
        }
    }
    if let Some(n) = policy.keep_last {
        for b in sorted.iter().take(n.get()) {
            add(b, "last".into());
        }
    }
    for period in Period::ALL {
        let Some(n) = period.count(policy) else { continue };
        // The distinct periods, newest first, each with its newest backup.
        let mut reps: Vec<(String, usize)> = Vec::new();
        for (i, b) in sorted.iter().enumerate() {
            let label = independent_label(period, b.time);
            if !reps.iter().any(|(l, _)| *l == label) {
                reps.push((label, i));
            }
        }
        for (label, i) in reps.iter().take(n.get()) {
            add(sorted[*i], format!("{} {label}", period.name()));
        }
        let oldest = sorted.len().saturating_sub(1);
        if !sorted.is_empty() && reps.len() < n.get() && !reps.iter().any(|(_, i)| *i == oldest) {
            add(sorted[oldest], format!("oldest {} {}", period.name(), independent_label(period, sorted[oldest].time)));
        }
    }
    if let Some(w) = policy.keep_within {
        let reference = sorted.iter().map(|b| b.time).filter(|t| *t <= now).max();
        for b in &sorted {
            if reference.is_none_or(|r| b.time > w.before(r)) {
                add(b, format!("within {w}"));
            }
        }
    }
    out
}

const BASE_MS: i64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z
const HOUR_MS: i64 = 3_600_000;

fn histories() -> impl Strategy<Value = Vec<BackupInfo>> {
    // Times on a half-hour grid over two years, so periods hold several backups and ties happen.
    let one = (0i64..(2 * 365 * 48), prop::bool::weighted(0.1), prop::option::of(prop::bool::weighted(0.7)));
    prop::collection::vec(one, 0..60).prop_map(|items| {
        items
            .into_iter()
            .enumerate()
            .map(|(i, (slot, pinned, verified))| BackupInfo {
                folder: format!("src/{i:03}/"),
                time: Timestamp::from_millis(BASE_MS + slot * HOUR_MS / 2),
                pinned,
                verified,
                member: None,
            })
            .collect()
    })
}

fn policies() -> impl Strategy<Value = RetentionPolicy> {
    let count = || prop::option::of((1u64..12).prop_map(|n| Count::new(n).unwrap()));
    let within =
        prop::option::of((0u32..2, 0u32..13, 0u32..40, 0u32..48).prop_map(|(years, months, days, hours)| KeepWithin {
            years,
            months,
            days,
            hours,
        }))
        .prop_map(|w| w.filter(|w| *w != KeepWithin::default()));
    (count(), count(), count(), count(), count(), count(), within)
        .prop_map(|(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, keep_within)| {
            RetentionPolicy { keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, keep_within }
        })
        .prop_filter("at least one rule", |p| *p != RetentionPolicy::default())
}

fn nows() -> impl Strategy<Value = Timestamp> {
    // From a month into the history to a year after it: some backups may be "in the future".
    (30 * 24i64..3 * 365 * 24).prop_map(|h| Timestamp::from_millis(BASE_MS + h * HOUR_MS))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_newest_and_every_pinned_backup_are_always_kept(
        history in histories(), policy in policies(), verifies in any::<bool>(), now in nows()
    ) {
        let plan = plan(&policy, &history, verifies, now);
        prop_assert_eq!(plan.backups.len(), history.len());
        if let Some(newest) = history.iter().max_by_key(|b| (b.time, b.folder.clone())) {
            let d = plan.backups.iter().find(|d| d.folder == newest.folder).unwrap();
            prop_assert_eq!(d.action, Action::Keep);
            prop_assert!(d.reasons.contains(&Reason::Newest));
        }
        for b in history.iter().filter(|b| b.pinned) {
            let d = plan.backups.iter().find(|d| d.folder == b.folder).unwrap();
            prop_assert_eq!(d.action, Action::Keep);
        }
    }

    #[test]
    fn the_kept_set_is_exactly_the_union_of_what_each_rule_and_protection_keeps(
        history in histories(), policy in policies(), verifies in any::<bool>(), now in nows()
    ) {
        let plan = plan(&policy, &history, verifies, now);
        let got: BTreeMap<String, BTreeSet<String>> = plan
            .kept()
            .map(|d| (d.folder.clone(), d.reasons.iter().map(ToString::to_string).collect()))
            .collect();
        prop_assert_eq!(got, oracle(&policy, &history, verifies, now));
        for d in &plan.backups {
            prop_assert_eq!(d.action == Action::Keep, !d.reasons.is_empty());
        }
    }

    #[test]
    fn applying_a_plan_then_planning_again_deletes_nothing_more(
        history in histories(), policy in policies(), verifies in any::<bool>(), now in nows()
    ) {
        let first = plan(&policy, &history, verifies, now);
        let kept: BTreeSet<&str> = first.kept().map(|d| d.folder.as_str()).collect();
        let survivors: Vec<BackupInfo> = history.iter().filter(|b| kept.contains(b.folder.as_str())).cloned().collect();
        let second = plan(&policy, &survivors, verifies, now);
        prop_assert_eq!(second.deleted().count(), 0, "{:?}", second);
    }

    #[test]
    fn planning_never_panics_on_any_times(
        times in prop::collection::vec((any::<i64>(), any::<bool>(), any::<Option<bool>>()), 0..20),
        policy in policies(),
        verifies in any::<bool>(),
        now in any::<i64>(),
    ) {
        let history: Vec<BackupInfo> = times
            .into_iter()
            .enumerate()
            .map(|(i, (t, pinned, verified))| BackupInfo { folder: format!("{i}"), time: Timestamp::from_millis(t), pinned, verified, member: None })
            .collect();
        let plan = plan(&policy, &history, verifies, Timestamp::from_millis(now));
        prop_assert!(serde_json::to_string(&plan).is_ok());
    }

    #[test]
    fn duration_and_policy_parsers_never_panic(text in ".{0,24}", n in any::<i64>()) {
        let _ = KeepWithin::parse(&text);
        let _ = KeepWithin::parse(&format!("P{text}"));
        let _ = RetentionPolicy::from_value(&json!({"keep_within": text, "keep_daily": n}));
    }
}

fn member_backup(member: &str, day: u32) -> BackupInfo {
    BackupInfo {
        member: Some(member.into()),
        ..backup(&format!("account/2027-05-{day:02}T020000Z-{member}/"), &format!("2027-05-{day:02}T02:00:00Z"))
    }
}

#[test]
fn in_account_mode_each_backend_keeps_its_own_backups() {
    // Two backends of one Dgraph account, backed up every day by one source: with keep_daily = 2
    // each keeps its own two newest days, not one backup per day between them.
    let backups: Vec<BackupInfo> =
        (1..=5).flat_map(|day| [member_backup("alpha", day), member_backup("beta", day)]).collect();
    let plan = plan(&policy(json!({"keep_daily": 2})), &backups, false, at(NOW));
    let kept_of = |m: &str| -> Vec<String> {
        plan.kept().filter(|d| d.member.as_deref() == Some(m)).map(|d| d.folder.clone()).collect()
    };
    assert_eq!(
        kept_of("alpha"),
        ["account/2027-05-05T020000Z-alpha/", "account/2027-05-04T020000Z-alpha/"],
        "{:?}",
        kept(&plan)
    );
    assert_eq!(kept_of("beta"), ["account/2027-05-05T020000Z-beta/", "account/2027-05-04T020000Z-beta/"]);
    assert_eq!(deleted(&plan).len(), 6);
    assert!(plan.backups.windows(2).all(|w| w[0].time >= w[1].time), "newest first across members");
}

#[test]
fn in_account_mode_every_backend_keeps_its_newest_backup_whatever_the_rules() {
    // A backend backed up last a week ago is not pushed out by another's newer backups.
    let backups = vec![member_backup("alpha", 20), member_backup("alpha", 21), member_backup("beta", 14)];
    let plan = plan(&policy(json!({"keep_last": 1})), &backups, false, at(NOW));
    let kept = kept(&plan);
    assert_eq!(kept["account/2027-05-14T020000Z-beta/"], ["newest", "last"]);
    assert_eq!(deleted(&plan), ["account/2027-05-20T020000Z-alpha/"]);
}

#[test]
fn in_account_mode_a_backends_unverified_replacement_protects_only_its_own_series() {
    let mut alpha_old = member_backup("alpha", 1);
    alpha_old.verified = Some(true);
    let mut beta_new = member_backup("beta", 3);
    beta_new.verified = Some(true);
    let alpha_new = member_backup("alpha", 2);
    let plan = plan(&policy(json!({"keep_last": 1})), &[alpha_old, alpha_new, beta_new], true, at(NOW));
    // alpha's newest is not verified: alpha's verified one stays, whatever beta's verification.
    assert!(deleted(&plan).is_empty(), "{:?}", kept(&plan));
    assert!(kept(&plan)["account/2027-05-01T020000Z-alpha/"].contains(&"replacement not verified".to_string()));
}
