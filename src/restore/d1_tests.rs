//! Restore, time travel and drill jobs, driven through the job state machine with canned D1
//! answers and a virtual clock.

use std::time::Duration;

use serde_json::{json, Value};

use super::driver::{driven, Driver};
use super::*;
use crate::config::Config;
use crate::config::SourceConfig;
use crate::http::{HttpRequest, HttpResponse, Method};
use crate::job::{Action, Event, Phase, Trigger};
use crate::manifest::Artifact;
use crate::time::Timestamp;

const FOLDER: &str = "app-db/2026-11-23T030000Z-00000000000000aa/";
const MD5: &str = "0123456789abcdef0123456789abcdef";

fn source(kind_fields: Value) -> SourceConfig {
    let mut v = json!({
        "name": "app-db", "kind": "d1", "schedule": "0 3 * * *", "account_id": "acc",
        "database_id": "db-1", "token_secret": "D1_TOKEN", "api_base": "http://127.0.0.1:9/client/v4",
        "retry": {"max_attempts": 2, "base_ms": 1000, "max_delay_ms": 8000}
    });
    for (k, val) in kind_fields.as_object().unwrap() {
        v[k] = val.clone();
    }
    Config::from_value(&json!([v])).unwrap().sources.remove(0)
}

fn t0() -> Timestamp {
    Timestamp::parse_rfc3339("2026-11-23T10:00:00Z").unwrap()
}

fn manifest(counts: &[(&str, u64)], finished: Timestamp) -> Manifest {
    Manifest {
        source: "app-db".into(),
        kind: "d1".into(),
        job_id: JobId::new("00000000000000aa"),
        trigger: Trigger::Cron,
        started_at: finished,
        scheduled_for: None,
        finished_at: finished,
        provider: json!({"database_id": "db-1", "at_bookmark": "bm-1"}),
        artifacts: vec![Artifact {
            parts: 3,
            md5: Some(MD5.into()),
            row_counts: Some(counts.iter().map(|(t, n)| (t.to_string(), *n)).collect()),
            ..Artifact::sample(format!("{FOLDER}db.sql"), "db.sql", 12_000_000, "s", "application/sql")
        }],
    }
}

driven!(Harness);

impl Harness {
    fn new(task: Task, params: Value) -> Self {
        Self::try_new(task, params).unwrap()
    }

    fn try_new(task: Task, params: Value) -> Result<Self, String> {
        let backup = (task == Task::Restore).then(|| format!("{FOLDER}manifest.json"));
        Driver::start(task, source(json!({})), &params, backup, &[("D1_TOKEN", "tok")], t0()).map(Self)
    }

    /// Wakes and expects a request; returns it. The look-up of an import's target database is
    /// answered on the way (it exists), except where a test asks for it with [`Self::raw_request`].
    fn request(&mut self) -> HttpRequest {
        let req = self.raw_request();
        if req.method == Method::Get && req.url.ends_with("/accounts/acc/d1/database/db-2") {
            self.answer(200, json!({"uuid": "db-2", "name": "two"}));
            return self.raw_request();
        }
        req
    }

    /// An import of an empty dump, up to the moment D1's upload URL is handed to the runtime.
    fn at_the_upload() -> Self {
        let mut h = Self::new(Task::Restore, import_params());
        h.io();
        h.manifest(manifest(&[], t0()));
        h.request();
        h.answer(200, json!({"upload_url": "https://r2.example/up", "filename": "f.sql"}));
        h.io();
        h
    }

    fn raw_request(&mut self) -> HttpRequest {
        self.0.request()
    }

    fn answer(&mut self, status: u16, result: Value) -> Action {
        self.feed(Event::Response(HttpResponse::json(
            status,
            &json!({"success": (200..300).contains(&status), "errors": [], "messages": [], "result": result}),
        )))
    }

    fn manifest(&mut self, m: Manifest) {
        self.feed(Event::RestoreIo(Ok(IoDone::Manifest(format!("{FOLDER}manifest.json"), Box::new(m)))));
    }

    /// init → upload → ingest (active) → poll (complete), checking each request.
    fn import(&mut self, target: &str) {
        let init = self.request();
        assert!(init.url.ends_with(&format!("/accounts/acc/d1/database/{target}/import")), "{}", init.url);
        assert_eq!(body(&init), json!({"action": "init", "etag": MD5}));
        self.answer(200, json!({"upload_url": "https://r2.example/up?sig=1", "filename": "f.sql"}));
        let Io::Upload { key, size, url } = self.io() else { panic!("expected the upload") };
        assert_eq!(
            (key.as_str(), size, url.as_str()),
            (&*format!("{FOLDER}db.sql"), 12_000_000, "https://r2.example/up?sig=1")
        );
        self.feed(Event::RestoreIo(Ok(IoDone::Uploaded {
            status: 200,
            etag: Some(format!("\"{MD5}\"")),
            body: String::new(),
        })));
        let ingest = self.request();
        assert_eq!(body(&ingest), json!({"action": "ingest", "etag": MD5, "filename": "f.sql"}));
        let slept = self.answer(202, json!({"status": "active", "at_bookmark": "imp-1", "messages": ["Importing"]}));
        assert!(matches!(slept, Action::Sleep(_)));
        let poll = self.request();
        assert_eq!(body(&poll), json!({"action": "poll", "current_bookmark": "imp-1"}));
        self.answer(200, json!({"status": "complete", "at_bookmark": "imp-1", "result": {"final_bookmark": "f", "num_queries": 9, "meta": {}}}));
    }
}

fn body(req: &HttpRequest) -> Value {
    serde_json::from_slice(req.body.as_deref().unwrap_or_default()).unwrap()
}

fn import_params() -> Value {
    json!({"target": {"database_id": "db-2"}, "confirm": "db-2"})
}

#[test]
fn an_import_without_the_matching_confirm_is_refused_before_any_job_exists() {
    for params in [
        json!({"target": {"database_id": "db-2"}}),
        json!({"target": {"database_id": "db-2"}, "confirm": "db-1"}),
        json!({"confirm": "db-2"}),
        json!({"target": "db-2", "confirm": "db-2"}),
    ] {
        let err = Harness::try_new(Task::Restore, params.clone()).err().unwrap_or_else(|| panic!("{params} accepted"));
        assert!(err.contains("confirm") || err.contains("target"), "{err}");
    }
    assert!(Harness::try_new(Task::Restore, import_params()).is_ok());
}

#[test]
fn time_travel_must_confirm_the_source_database_and_a_drill_takes_no_target() {
    let err = Harness::try_new(Task::Restore, json!({"mode": "time_travel", "confirm": "db-2"})).err().unwrap();
    assert!(err.contains("db-1"), "{err}");
    assert!(Harness::try_new(Task::Restore, json!({"mode": "time_travel", "confirm": "db-1"})).is_ok());
    assert!(Harness::try_new(Task::Restore, json!({"mode": "other", "confirm": "db-1"})).is_err());
    assert!(Harness::try_new(Task::Drill, import_params()).is_err());
    assert!(Harness::try_new(Task::Drill, json!({})).is_ok());
}

#[test]
fn an_import_streams_the_dump_to_d1_and_polls_until_complete() {
    let mut h = Harness::new(Task::Restore, import_params());
    assert_eq!(h.io(), Io::ReadManifest { key: Some(format!("{FOLDER}manifest.json")) });
    h.manifest(manifest(&[("a", 2)], t0()));
    h.import("db-2");
    assert_eq!(h.wake(), Action::Done);
    assert_eq!(h.job.phase, Phase::Restored);
    assert!(h.job.note.as_deref().unwrap().contains("into database db-2"), "{:?}", h.job.note);
    let stored = serde_json::to_string(&h.job).unwrap();
    assert!(!stored.contains("sig=1"), "the upload URL is forgotten once the job ends");
}

#[test]
fn an_upload_whose_etag_is_not_the_md5_fails_naming_both() {
    let mut h = Harness::at_the_upload();
    let a = h.feed(Event::RestoreIo(Ok(IoDone::Uploaded { status: 200, etag: None, body: String::new() })));
    assert_eq!(a, Action::Done);
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(h.job.error.as_deref().unwrap().contains(MD5), "{:?}", h.job.error);
}

#[test]
fn an_import_error_fails_in_d1s_words_with_its_messages() {
    let mut h = Harness::new(Task::Restore, import_params());
    h.io();
    h.manifest(manifest(&[], t0()));
    h.request();
    h.answer(
        200,
        json!({"status": "error", "at_bookmark": "x", "error": "near \"x\": syntax error", "messages": ["Importing"]}),
    );
    assert_eq!(h.job.phase, Phase::Failed);
    let e = h.job.error.clone().unwrap();
    assert!(e.contains("D1 import failed: near \"x\": syntax error") && e.contains("Importing"), "{e}");
}

#[test]
fn a_backup_without_an_md5_cannot_be_imported() {
    let mut h = Harness::new(Task::Restore, import_params());
    h.io();
    let mut m = manifest(&[], t0());
    m.artifacts[0].md5 = None;
    h.manifest(m);
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(h.job.error.as_deref().unwrap().contains("no MD5"), "{:?}", h.job.error);
}

#[test]
fn a_transient_upload_failure_is_retried() {
    let mut h = Harness::at_the_upload();
    let a = h.feed(Event::RestoreIo(Err(StepError::transient("connection reset"))));
    assert!(matches!(a, Action::Sleep(_)));
    assert_eq!(h.job.phase, Phase::Restoring);
    assert!(matches!(h.io(), Io::Upload { .. }), "the upload is tried again");
}

#[test]
fn time_travel_restores_the_source_to_the_manifests_bookmark() {
    let mut h = Harness::new(Task::Restore, json!({"mode": "time_travel", "confirm": "db-1"}));
    h.io();
    h.manifest(manifest(&[], t0()));
    let req = h.request();
    assert!(req.url.ends_with("/accounts/acc/d1/database/db-1/time_travel/restore?bookmark=bm-1"), "{}", req.url);
    h.answer(200, json!({"bookmark": "b2", "previous_bookmark": "b0", "message": "ok"}));
    assert_eq!(h.wake(), Action::Done);
    assert_eq!(h.job.phase, Phase::Restored);
}

#[test]
fn a_refused_bookmark_without_a_target_fails_saying_to_import_instead() {
    let mut h = Harness::new(Task::Restore, json!({"mode": "time_travel", "confirm": "db-1"}));
    h.io();
    h.manifest(manifest(&[], t0()));
    h.request();
    h.feed(Event::Response(HttpResponse::json(
        400,
        &json!({"success": false, "errors": [{"code": 7500, "message": "Bookmark bm-1 is outside the Time Travel window"}], "result": null}),
    )));
    assert_eq!(h.job.phase, Phase::Failed);
    let e = h.job.error.clone().unwrap();
    assert!(e.contains("outside the Time Travel window") && e.contains("importing its dump"), "{e}");
}

#[test]
fn a_refused_bookmark_with_a_target_falls_back_to_importing_into_it() {
    let mut h = Harness::new(
        Task::Restore,
        json!({"mode": "time_travel", "confirm": "db-1", "target": {"database_id": "db-2"}}),
    );
    h.io();
    h.manifest(manifest(&[], t0()));
    h.request();
    h.feed(Event::Response(HttpResponse::json(
        400,
        &json!({"success": false, "errors": [{"code": 7500, "message": "expired"}]}),
    )));
    h.import("db-2");
    assert_eq!(h.wake(), Action::Done);
    assert_eq!(h.job.phase, Phase::Restored);
    let Some(RestoreState::D1(state)) = h.job.restore.as_ref() else { panic!("a D1 restore") };
    assert!(state.notes[0].contains("expired"));
}

#[test]
fn a_backup_older_than_the_window_imports_without_asking_d1() {
    let mut h = Harness::new(
        Task::Restore,
        json!({"mode": "time_travel", "confirm": "db-1", "target": {"database_id": "db-2"}}),
    );
    h.io();
    h.manifest(manifest(&[], t0().minus(Duration::from_secs(31 * 86_400))));
    h.import("db-2");
    assert_eq!(h.wake(), Action::Done);
}

/// A drill up to its counts: create, import into the scratch database.
fn drill_to_counts(counts: &[(&str, u64)]) -> Harness {
    let mut h = Harness::new(Task::Drill, json!({}));
    assert_eq!(h.io(), Io::ReadManifest { key: None });
    h.manifest(manifest(counts, t0()));
    assert_eq!(h.io(), Io::Digest { key: format!("{FOLDER}db.sql") });
    h.feed(Event::RestoreIo(Ok(IoDone::Digest { md5: MD5.into(), size: 12_000_000 })));
    let create = h.request();
    assert!(create.url.ends_with("/accounts/acc/d1/database"), "{}", create.url);
    assert_eq!(body(&create), json!({"name": "ferry-drill-0123456789abcdef"}));
    h.answer(200, json!({"uuid": "scratch-1", "name": "ferry-drill-0123456789abcdef"}));
    h.import("scratch-1");
    h
}

fn count(h: &mut Harness, table: &str, n: u64) {
    let req = h.request();
    assert!(req.url.ends_with("/database/scratch-1/query"), "{}", req.url);
    assert_eq!(body(&req)["sql"], json!(format!("SELECT count(*) AS n FROM \"{table}\"")));
    h.answer(200, json!([{"results": [{"n": n}], "success": true, "meta": {}}]));
}

fn delete_and_record(h: &mut Harness) -> Value {
    let del = h.request();
    assert_eq!(del.method, crate::http::Method::Delete);
    assert!(del.url.ends_with("/database/scratch-1"), "{}", del.url);
    h.answer(200, Value::Null);
    let Io::Record { key, record } = h.io() else { panic!("expected the record") };
    assert_eq!(key, format!("{FOLDER}drill.json"));
    h.feed(Event::RestoreIo(Ok(IoDone::Recorded)));
    record
}

#[test]
fn a_drill_whose_counts_match_passes_and_deletes_its_scratch_database() {
    let mut h = drill_to_counts(&[("a", 2), ("b\"x", 5)]);
    count(&mut h, "a", 2);
    count(&mut h, "b\"\"x", 5);
    let record = delete_and_record(&mut h);
    assert_eq!(record["passed"], json!(true));
    assert_eq!(record["tables"]["a"], json!({"backup": 2, "restored": 2}));
    assert_eq!(h.wake(), Action::Done);
    assert_eq!(h.job.phase, Phase::Restored);
}

#[test]
fn a_drill_with_a_missing_row_fails_naming_the_table_after_cleaning_up() {
    let mut h = drill_to_counts(&[("a", 2), ("b", 5)]);
    count(&mut h, "a", 2);
    count(&mut h, "b", 0);
    let record = delete_and_record(&mut h);
    assert_eq!(record["passed"], json!(false));
    assert_eq!(h.wake(), Action::Done);
    assert_eq!(h.job.phase, Phase::Failed);
    let e = h.job.error.clone().unwrap();
    assert!(e.contains("table \"b\": 0 rows restored, 5 in the backup") && !e.contains("\"a\""), "{e}");
}

#[test]
fn a_drill_whose_import_fails_still_deletes_the_scratch_database_and_records_why() {
    let mut h = Harness::new(Task::Drill, json!({}));
    h.io();
    h.manifest(manifest(&[("a", 1)], t0()));
    h.io();
    h.feed(Event::RestoreIo(Ok(IoDone::Digest { md5: MD5.into(), size: 12_000_000 })));
    h.request();
    h.answer(200, json!({"uuid": "scratch-1"}));
    h.request();
    h.answer(400, json!(null));
    assert_eq!(h.job.phase, Phase::Restoring, "the failure waits for the clean-up");
    let record = delete_and_record(&mut h);
    assert_eq!(record["passed"], json!(false));
    assert!(record["error"].as_str().unwrap().contains("HTTP 400"), "{record}");
    h.wake();
    assert_eq!(h.job.phase, Phase::Failed);
}

#[test]
fn a_drill_that_cannot_delete_its_scratch_database_says_so() {
    let mut h = drill_to_counts(&[("a", 1)]);
    count(&mut h, "a", 1);
    h.request();
    h.answer(403, Value::Null);
    let Io::Record { record, .. } = h.io() else { panic!("expected the record") };
    assert!(record["error"].as_str().unwrap().contains("deleting the scratch database scratch-1 failed"), "{record}");
    h.feed(Event::RestoreIo(Ok(IoDone::Recorded)));
    h.wake();
    assert_eq!(h.job.phase, Phase::Failed);
}

#[test]
fn a_drill_of_an_altered_dump_imports_what_r2_holds_and_fails_naming_the_table_and_the_change() {
    let mut h = Harness::new(Task::Drill, json!({}));
    h.io();
    h.manifest(manifest(&[("a", 2), ("b", 5)], t0()));
    h.io();
    let other = "ffffffffffffffffffffffffffffffff";
    h.feed(Event::RestoreIo(Ok(IoDone::Digest { md5: other.into(), size: 11_000_000 })));
    h.request();
    h.answer(200, json!({"uuid": "scratch-1"}));
    let init = h.request();
    assert_eq!(body(&init)["etag"], json!(other), "the import's etag is the MD5 of what R2 holds");
    h.answer(200, json!({"status": "complete", "at_bookmark": "i", "result": {}}));
    count(&mut h, "a", 2);
    count(&mut h, "b", 0);
    let record = delete_and_record(&mut h);
    assert!(record["altered"].as_str().unwrap().contains(other));
    h.wake();
    let e = h.job.error.clone().unwrap();
    assert!(e.contains("table \"b\": 0 rows restored, 5 in the backup") && e.contains("not the one copied"), "{e}");
}

#[test]
fn an_import_into_a_database_that_does_not_exist_fails_before_anything_is_sent_to_it() {
    let mut h = Harness::new(Task::Restore, import_params());
    let _ = h.io();
    h.manifest(manifest(&[("a", 2)], t0()));
    let lookup = h.raw_request();
    assert_eq!(
        (lookup.method, lookup.url.as_str()),
        (Method::Get, "http://127.0.0.1:9/client/v4/accounts/acc/d1/database/db-2")
    );
    h.feed(Event::Response(HttpResponse::json(
        404,
        &json!({"success": false, "errors": [{"code": 7404, "message": "The database db-2 could not be found"}], "messages": [], "result": null}),
    )));
    assert_eq!(h.job.phase, Phase::Failed);
    let error = h.job.error.clone().unwrap_or_default();
    assert!(error.contains("target database db-2 does not exist") && error.contains("could not be found"), "{error}");
}

#[test]
fn an_import_applies_the_query_artifact_after_the_dump() {
    const EXTRA_MD5: &str = "fedcba9876543210fedcba9876543210";
    let mut h = Harness::new(Task::Restore, import_params());
    h.io();
    let mut m = manifest(&[], t0());
    let name = crate::providers::d1::query::FILENAME;
    m.artifacts.insert(
        0,
        Artifact {
            md5: Some(EXTRA_MD5.into()),
            details: Some(json!({"role": crate::providers::d1::query::ROLE})),
            ..Artifact::sample(format!("{FOLDER}{name}"), name, 300, "s", "application/sql")
        },
    );
    h.manifest(m);
    h.import("db-2");
    let init = h.request();
    assert_eq!(body(&init), json!({"action": "init", "etag": EXTRA_MD5}), "then the query artifact");
    h.answer(200, json!({"upload_url": "https://r2.example/up2", "filename": "g.sql"}));
    let Io::Upload { key, size, .. } = h.io() else { panic!("expected the upload") };
    assert_eq!((key, size), (format!("{FOLDER}{name}"), 300));
    h.feed(Event::RestoreIo(Ok(IoDone::Uploaded { status: 200, etag: Some(EXTRA_MD5.into()), body: String::new() })));
    let ingest = h.request();
    assert_eq!(body(&ingest), json!({"action": "ingest", "etag": EXTRA_MD5, "filename": "g.sql"}));
    h.answer(200, json!({"status": "complete", "at_bookmark": "imp-2", "result": {"num_queries": 3}}));
    h.wake();
    assert_eq!(h.job.phase, Phase::Restored);
}
