use super::*;

const HOUR: i64 = 3600 * 1000;
const NOW: Timestamp = Timestamp::from_millis(1_900_000_000_000);

fn at(hours_ago: i64) -> Timestamp {
    Timestamp::from_millis(NOW.millis() - hours_ago * HOUR)
}

const OLD_JOB: &str = "00000000000000a1";
const FRESH_JOB: &str = "00000000000000b2";
const DONE_JOB: &str = "00000000000000c3";
const LIVE_JOB: &str = "00000000000000d4";

fn folder(source: &str, job: &str) -> String {
    format!("{source}/2026-01-01T000000Z-{job}/")
}

fn obj(key: &str, size: u64, hours_ago: i64) -> StoredObject {
    StoredObject { key: key.into(), size, uploaded: at(hours_ago) }
}

fn upload(source: &str, job: &str, id: &str) -> OpenUpload {
    OpenUpload {
        key: format!("{}volume.tgz", folder(source, job)),
        upload_id: id.into(),
        job_id: job.into(),
        created_at: at(50),
        bucket: None,
    }
}

fn records(source: &str) -> SourceRecords {
    SourceRecords { source: source.into(), ..SourceRecords::default() }
}

fn removed_folders(plan: &Plan) -> Vec<&str> {
    plan.remove.iter().map(|r| r.folder.as_str()).collect()
}

/// A committed backup (old), a stale folder without a manifest, a fresh one, and the in-flight
/// job's old folder.
fn bucket() -> Vec<StoredObject> {
    let committed = folder("app", DONE_JOB);
    let stale = folder("app", OLD_JOB);
    let fresh = folder("app", FRESH_JOB);
    let live = folder("app", LIVE_JOB);
    vec![
        obj(&format!("{committed}database.gz"), 100, 400),
        obj(&format!("{committed}manifest.json"), 10, 400),
        obj(&format!("{committed}volume.tgz.tail-3"), 7, 400),
        obj(&format!("{stale}database.gz"), 1000, 30),
        obj(&format!("{stale}graph.jsonl.gz.tail-1"), 24, 26),
        obj(&format!("{fresh}database.gz"), 5, 23),
        obj(&format!("{live}database.gz"), 9, 100),
    ]
}

#[test]
fn committed_backups_are_never_touched_however_old() {
    let plan = plan(&bucket(), &[records("app")], NOW);
    let committed = folder("app", DONE_JOB);
    assert!(plan.remove.iter().all(|r| r.folder != committed && r.keys.iter().all(|k| !k.starts_with(&committed))));
    assert_eq!(plan.committed, 1);
}

#[test]
fn an_old_folder_without_a_manifest_is_removed_entirely() {
    let plan = plan(&bucket(), &[records("app")], NOW);
    let stale = folder("app", OLD_JOB);
    let removal = plan.remove.iter().find(|r| r.folder == stale).expect("the stale folder is removed");
    assert_eq!(removal.reason, RemovalReason::Stale);
    assert_eq!(removal.keys, vec![format!("{stale}database.gz"), format!("{stale}graph.jsonl.gz.tail-1")]);
    assert_eq!(removal.bytes, 1024);
}

#[test]
fn age_is_judged_by_the_newest_object_of_the_folder() {
    let f = folder("app", OLD_JOB);
    let objects = vec![obj(&format!("{f}a"), 1, 300), obj(&format!("{f}b"), 1, 2)];
    let plan = plan(&objects, &[records("app")], NOW);
    assert!(plan.remove.is_empty(), "one object written 2 h ago keeps the folder");
    assert_eq!(plan.fresh, 1);
}

#[test]
fn a_fresh_folder_without_a_manifest_is_left_for_a_later_sweep() {
    let plan = plan(&bucket(), &[records("app")], NOW);
    assert!(!removed_folders(&plan).contains(&folder("app", FRESH_JOB).as_str()));
    assert_eq!(plan.fresh, 1);
}

#[test]
fn exactly_one_day_old_is_stale_and_a_millisecond_less_is_not() {
    let f = folder("app", OLD_JOB);
    let one_day = vec![StoredObject { key: format!("{f}x"), size: 1, uploaded: at(24) }];
    assert_eq!(plan(&one_day, &[], NOW).remove.len(), 1);
    let almost =
        vec![StoredObject { key: format!("{f}x"), size: 1, uploaded: Timestamp::from_millis(at(24).millis() + 1) }];
    assert!(plan(&almost, &[], NOW).remove.is_empty());
}

#[test]
fn the_in_flight_jobs_folder_is_untouched_even_when_old() {
    let mut app = records("app");
    app.in_flight = vec![LIVE_JOB.into()];
    let plan = plan(&bucket(), &[app], NOW);
    assert!(!removed_folders(&plan).contains(&folder("app", LIVE_JOB).as_str()));
    assert_eq!(plan.in_flight, 1);
    // Without the in-flight record, the same folder is stale.
    let unprotected = super::plan(&bucket(), &[records("app")], NOW);
    assert!(removed_folders(&unprotected).contains(&folder("app", LIVE_JOB).as_str()));
}

#[test]
fn a_job_in_flight_is_protected_whichever_source_reports_it() {
    let mut other = records("other");
    other.in_flight = vec![LIVE_JOB.into()];
    let plan = plan(&bucket(), &[records("app"), other], NOW);
    assert!(!removed_folders(&plan).contains(&folder("app", LIVE_JOB).as_str()));
}

#[test]
fn uploads_of_ended_jobs_are_aborted_and_those_of_jobs_in_flight_kept() {
    let mut app = records("app");
    app.in_flight = vec![LIVE_JOB.into()];
    app.uploads =
        vec![upload("app", DONE_JOB, "u-done"), upload("app", OLD_JOB, "u-old"), upload("app", LIVE_JOB, "u-live")];
    let plan = plan(&[], &[app], NOW);
    let aborted: Vec<&str> = plan.abort.iter().map(|a| a.upload.upload_id.as_str()).collect();
    assert_eq!(aborted, vec!["u-done", "u-old"]);
    assert!(plan.abort.iter().all(|a| a.source == "app"));
    assert_eq!(plan.uploads_kept, 1);
}

#[test]
fn an_upload_into_an_in_flight_folder_is_kept_even_if_recorded_under_another_job() {
    let mut app = records("app");
    app.in_flight = vec![LIVE_JOB.into()];
    let mut odd = upload("app", LIVE_JOB, "u-odd");
    odd.job_id = OLD_JOB.into();
    app.uploads = vec![odd];
    let plan = plan(&[], &[app], NOW);
    assert!(plan.abort.is_empty());
    assert_eq!(plan.uploads_kept, 1);
}

#[test]
fn uploads_are_aborted_whatever_their_age() {
    let mut app = records("app");
    let mut young = upload("app", OLD_JOB, "u-young");
    young.created_at = NOW;
    app.uploads = vec![young];
    assert_eq!(plan(&[], &[app], NOW).abort.len(), 1, "a recorded upload of an ended job is dead at once");
}

#[test]
fn a_recorded_failed_clean_up_removes_the_folder_at_once() {
    let mut app = records("app");
    let fresh = folder("app", FRESH_JOB);
    app.leftovers =
        vec![Leftover { key: fresh.clone(), job_id: FRESH_JOB.into(), reason: "R2 said no".into(), at: at(1) }];
    let plan = plan(&bucket(), &[app], NOW);
    let removal = plan.remove.iter().find(|r| r.folder == fresh).expect("recorded folder removed");
    assert_eq!(removal.reason, RemovalReason::RecordedFolder);
    assert_eq!(removal.settles, vec![("app".to_string(), leftover_storage_key(&fresh))]);
    assert!(plan.settled.is_empty(), "settled only once the deletion succeeds");
}

#[test]
fn a_recorded_folder_never_overrides_a_manifest_or_a_job_in_flight() {
    let mut app = records("app");
    app.in_flight = vec![LIVE_JOB.into()];
    let committed = folder("app", DONE_JOB);
    let live = folder("app", LIVE_JOB);
    app.leftovers = vec![
        Leftover { key: committed.clone(), job_id: DONE_JOB.into(), reason: "r".into(), at: at(1) },
        Leftover { key: live.clone(), job_id: LIVE_JOB.into(), reason: "r".into(), at: at(1) },
    ];
    let plan = plan(&bucket(), &[app], NOW);
    assert!(!removed_folders(&plan).contains(&committed.as_str()));
    assert!(!removed_folders(&plan).contains(&live.as_str()));
    assert_eq!(plan.kept.len(), 1, "the committed one is reported as kept: {:?}", plan.kept);
    assert!(plan.settled.contains(&("app".to_string(), leftover_storage_key(&committed))));
    assert!(
        !plan.settled.contains(&("app".to_string(), leftover_storage_key(&live))),
        "the in-flight job's record waits for the job to end"
    );
}

#[test]
fn a_recorded_staging_object_in_a_committed_backup_is_reported_not_deleted() {
    let committed = folder("app", DONE_JOB);
    let tail = format!("{committed}volume.tgz.tail-3");
    let mut app = records("app");
    app.leftovers =
        vec![Leftover { key: tail.clone(), job_id: DONE_JOB.into(), reason: "delete failed".into(), at: at(1) }];
    let plan = plan(&bucket(), &[app], NOW);
    assert!(plan.remove.iter().all(|r| !r.keys.contains(&tail)));
    assert_eq!(plan.kept[0].key, tail);
    assert!(plan.kept[0].why.contains("committed backup") && plan.kept[0].why.contains("delete failed"));
}

#[test]
fn a_recorded_staging_object_in_a_fresh_uncommitted_folder_is_deleted_alone() {
    let f = folder("app", FRESH_JOB);
    let objects = vec![obj(&format!("{f}graph.jsonl.gz.tail-2"), 30, 1), obj(&format!("{f}database.gz"), 5, 1)];
    let mut app = records("app");
    let tail = format!("{f}graph.jsonl.gz.tail-2");
    let gone = format!("{f}graph.jsonl.gz.tail-1");
    app.leftovers = vec![
        Leftover { key: tail.clone(), job_id: FRESH_JOB.into(), reason: "r".into(), at: at(1) },
        Leftover { key: gone.clone(), job_id: FRESH_JOB.into(), reason: "r".into(), at: at(1) },
    ];
    let plan = plan(&objects, &[app], NOW);
    assert_eq!(plan.remove.len(), 1);
    assert_eq!(plan.remove[0].reason, RemovalReason::RecordedObjects);
    assert_eq!(plan.remove[0].keys, vec![tail.clone()]);
    assert_eq!(plan.remove[0].bytes, 30);
    assert_eq!(plan.settled, vec![("app".to_string(), leftover_storage_key(&gone))]);
}

#[test]
fn recorded_leftovers_with_nothing_listed_are_settled_as_gone() {
    let mut app = records("app");
    let f = folder("app", OLD_JOB);
    app.leftovers = vec![Leftover { key: f.clone(), job_id: OLD_JOB.into(), reason: "r".into(), at: at(1) }];
    let plan = plan(&[], &[app], NOW);
    assert!(plan.remove.is_empty());
    assert_eq!(plan.settled, vec![("app".to_string(), leftover_storage_key(&f))]);
}

#[test]
fn keys_outside_the_layout_and_the_reserved_prefix_are_never_judged() {
    let objects = vec![
        obj("_ferry/sweeps/2026-01-01.json", 10, 500),
        obj("notes.txt", 10, 500),
        obj("app/readme.txt", 10, 500),
        obj("app/exports/old.sql", 10, 500),
        obj("App/2026-01-01T000000Z-00000000000000a1/x", 10, 500),
    ];
    let plan = plan(&objects, &[], NOW);
    // "App/…" matches the layout (a source name may not start uppercase in the config, but the
    // folder shape is what the sweep trusts); everything else is foreign.
    assert_eq!(removed_folders(&plan), vec!["App/2026-01-01T000000Z-00000000000000a1/"]);
    assert_eq!(plan.folders_checked, 1);
}

#[test]
fn counts_add_up_over_a_whole_bucket() {
    let mut app = records("app");
    app.in_flight = vec![LIVE_JOB.into()];
    let plan = plan(&bucket(), &[app], NOW);
    assert_eq!(plan.folders_checked, 4);
    assert_eq!(plan.objects_checked, 7);
    assert_eq!((plan.committed, plan.in_flight, plan.fresh, plan.remove.len()), (1, 1, 1, 1));
}

fn page(keys: &[&str]) -> Vec<StoredObject> {
    keys.iter().map(|k| obj(k, 1, 48)).collect()
}

fn keys(objects: &[StoredObject]) -> Vec<&str> {
    objects.iter().map(|o| o.key.as_str()).collect()
}

#[test]
fn a_truncated_page_holds_back_its_last_folder() {
    let (done, held) = split_at_folder(page(&["a/f1/x", "a/f1/y", "a/f2/x", "a/f2/y"]), true);
    assert_eq!(keys(&done), vec!["a/f1/x", "a/f1/y"]);
    assert_eq!(keys(&held), vec!["a/f2/x", "a/f2/y"]);
}

#[test]
fn the_last_page_is_complete() {
    let (done, held) = split_at_folder(page(&["a/f1/x", "a/f2/x"]), false);
    assert_eq!(done.len(), 2);
    assert!(held.is_empty());
}

#[test]
fn a_page_of_one_folder_is_held_back_whole() {
    let (done, held) = split_at_folder(page(&["a/f1/x", "a/f1/y"]), true);
    assert!(done.is_empty());
    assert_eq!(held.len(), 2);
    let (done, held) = split_at_folder(Vec::new(), true);
    assert!(done.is_empty() && held.is_empty());
}

#[test]
fn a_folder_split_across_pages_is_judged_whole_so_its_manifest_protects_it() {
    // The first page ends inside a committed folder whose manifest is on the next page.
    let f = folder("app", DONE_JOB);
    let first = vec![obj(&format!("{f}database.gz"), 1, 500)];
    let second = vec![obj(&format!("{f}manifest.json"), 1, 500)];
    let (done, held) = split_at_folder(first, true);
    assert!(plan(&done, &[], NOW).remove.is_empty());
    let mut rest = held;
    rest.extend(second);
    let (done, _) = split_at_folder(rest, false);
    let plan = plan(&done, &[], NOW);
    assert!(plan.remove.is_empty());
    assert_eq!(plan.committed, 1);
}

#[test]
fn at_most_one_sweep_starts_per_utc_day() {
    let morning = Timestamp::parse_rfc3339("2026-03-04T00:05:00Z").unwrap();
    let evening = Timestamp::parse_rfc3339("2026-03-04T23:55:00Z").unwrap();
    let next_day = Timestamp::parse_rfc3339("2026-03-05T00:00:00Z").unwrap();
    let Tick::Run(mut sweep) = tick(None, morning) else { panic!("the first tick sweeps") };
    assert_eq!(sweep.report.day, "2026-03-04");
    assert_eq!(sweep.stage, Stage::Records);
    sweep.stage = Stage::Done;
    assert_eq!(tick(Some(*sweep.clone()), evening), Tick::AlreadySwept("2026-03-04".into()));
    let Tick::Run(next) = tick(Some(*sweep), next_day) else { panic!("a new day sweeps again") };
    assert_eq!(next.report.day, "2026-03-05");
    assert_eq!(next.report.started_at, next_day);
}

#[test]
fn an_unfinished_sweep_goes_on_even_past_midnight() {
    let day = Timestamp::parse_rfc3339("2026-03-04T23:50:00Z").unwrap();
    let Tick::Run(mut sweep) = tick(None, day) else { panic!() };
    sweep.stage = Stage::Walk { after: Some("app/f/x".into()), bucket: None };
    let later = Timestamp::parse_rfc3339("2026-03-05T00:10:00Z").unwrap();
    assert_eq!(tick(Some(*sweep.clone()), later), Tick::Run(sweep));
}

#[test]
fn the_report_counts_what_was_done_and_names_it() {
    let mut app = records("app");
    app.uploads = vec![upload("app", OLD_JOB, "u-old")];
    let plan = plan(&bucket(), &[app], NOW);
    let mut report = Report::new(NOW);
    report.judged(&plan);
    for a in &plan.abort {
        report.aborted(a);
    }
    for r in &plan.remove {
        report.removed(r);
    }
    report.error("R2 delete of x failed: boom");
    assert_eq!(report.objects_removed, 3, "the stale folder (2) and the unprotected old one (1)");
    assert_eq!(report.bytes_removed, 1024 + 9);
    assert_eq!(report.uploads_aborted[0].upload.upload_id, "u-old");
    assert_eq!(report.committed_folders, 1);
    assert_eq!(report.errors.len(), 1);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["uploads_aborted"][0]["upload_id"], "u-old");
    assert_eq!(json["uploads_aborted"][0]["source"], "app");
    assert_eq!(json["removed"][0]["reason"], "stale");
    assert_eq!(serde_json::from_value::<Report>(json).unwrap(), report);
    assert!(report.summary().contains("removed 3 objects"), "{}", report.summary());
}

#[test]
fn report_lists_are_capped_but_counts_stay_exact() {
    let mut report = Report::new(NOW);
    let removal = Removal {
        folder: "a/f/".into(),
        reason: RemovalReason::Stale,
        keys: vec!["a/f/x".into()],
        bytes: 2,
        settles: Vec::new(),
    };
    for _ in 0..REPORT_LIST_CAP + 5 {
        report.removed(&removal);
    }
    assert_eq!(report.removed.len(), REPORT_LIST_CAP);
    assert_eq!(report.omitted, 5);
    assert_eq!(report.objects_removed, REPORT_LIST_CAP as u64 + 5);
}

#[test]
fn sweep_state_round_trips_through_json() {
    let sweep = Sweep { stage: Stage::Walk { after: Some("app/f/x".into()), bucket: None }, report: Report::new(NOW) };
    let text = serde_json::to_string(&sweep).unwrap();
    assert_eq!(serde_json::from_str::<Sweep>(&text).unwrap(), sweep);
}

#[test]
fn reports_live_under_the_reserved_prefix_by_day() {
    assert_eq!(report_key("2026-03-04"), "_ferry/sweeps/2026-03-04.json");
    assert_eq!(utc_day(Timestamp::parse_rfc3339("2026-03-04T23:59:59.999Z").unwrap()), "2026-03-04");
    assert!(crate::manifest::parse_folder(REPORT_PREFIX).is_none());
}

#[test]
fn only_prefixes_a_source_can_have_name_a_source() {
    assert_eq!(source_of_prefix("app-db/"), Some("app-db"));
    assert_eq!(source_of_prefix("a.b_c-1/"), Some("a.b_c-1"));
    for other in ["_ferry/", "~sweeper/", "App/", "app", "/", "", "a/b/"] {
        assert_eq!(source_of_prefix(other), None, "{other}");
    }
}

#[test]
fn a_folder_a_replicate_job_is_writing_is_untouched_though_named_after_its_export() {
    // In the replica bucket the folder is named after the export (done long ago), while the
    // replicate job writing it is the one in flight.
    let objects = vec![obj(&format!("{}db.sql", folder("app", OLD_JOB)), 10, 40)];
    let mut live = records("app");
    live.in_flight = vec![LIVE_JOB.into()];
    assert_eq!(removed_folders(&plan(&objects, &[live.clone()], NOW)), vec![folder("app", OLD_JOB).as_str()]);
    live.in_flight_folders = vec![folder("app", OLD_JOB)];
    let p = plan(&objects, &[live], NOW);
    assert!(p.remove.is_empty(), "{p:?}");
    assert_eq!(p.in_flight, 1);
}

#[test]
fn the_walk_goes_from_the_primary_bucket_through_each_replica_bucket_once_in_order() {
    let replicas = vec!["B_EU".to_string(), "A_US".to_string(), "B_EU".to_string()];
    let walk = |b: &str| Stage::Walk { after: None, bucket: Some(b.into()) };
    assert_eq!(after_walk(None, &replicas), walk("A_US"));
    assert_eq!(after_walk(Some("A_US"), &replicas), walk("B_EU"));
    assert_eq!(after_walk(Some("B_EU"), &replicas), Stage::Done);
    assert_eq!(after_walk(None, &[]), Stage::Done);
}

#[test]
fn a_free_sweeper_grants_the_lease_until_now_plus_the_lease_length() {
    let LeaseClaim::Granted(lease) = claim_lease(None, "t1", NOW) else { panic!("not granted") };
    assert_eq!((lease.holder.as_str(), lease.taken_at, lease.expires_at), ("t1", NOW, NOW.plus(LEASE)));
    assert!(TICK_LIMIT < LEASE, "a tick is cut before its lease lapses");
    assert!(CALL_TIMEOUT < TICK_LIMIT);
}

#[test]
fn a_live_lease_is_not_taken_over() {
    let LeaseClaim::Granted(held) = claim_lease(None, "t1", NOW) else { panic!() };
    let just_before = held.expires_at.minus(Duration::from_millis(1));
    assert_eq!(claim_lease(Some(held.clone()), "t2", NOW), LeaseClaim::Held(held.clone()));
    assert_eq!(claim_lease(Some(held.clone()), "t2", just_before), LeaseClaim::Held(held));
}

#[test]
fn an_expired_lease_is_taken_over_by_the_next_tick() {
    // A tick whose call never answered holds the lease; it lapses and the next tick sweeps.
    let LeaseClaim::Granted(hung) = claim_lease(None, "hung", NOW) else { panic!() };
    let later = hung.expires_at;
    match claim_lease(Some(hung.clone()), "next", later) {
        LeaseClaim::TakenOver { lease, expired } => {
            assert_eq!(expired, hung);
            assert_eq!((lease.holder.as_str(), lease.expires_at), ("next", later.plus(LEASE)));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_tick_releases_only_its_own_lease() {
    let LeaseClaim::Granted(mine) = claim_lease(None, "mine", NOW) else { panic!() };
    assert_eq!(release_lease(Some(mine.clone()), "mine"), None);
    // Taken over meanwhile: the late tick leaves its successor's lease alone.
    let LeaseClaim::TakenOver { lease: theirs, .. } = claim_lease(Some(mine), "theirs", NOW.plus(LEASE)) else {
        panic!()
    };
    assert_eq!(release_lease(Some(theirs.clone()), "mine"), Some(theirs));
    assert_eq!(release_lease(None, "mine"), None);
}
