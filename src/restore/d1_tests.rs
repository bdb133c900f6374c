//! Restore, time travel and drill jobs, driven through the job state machine with canned D1
//! answers and a virtual clock.

use std::time::Duration;

use serde_json::{json, Value};

use super::driver::{driven, Driver};
use super::*;
use crate::config::Config;
use crate::config::SourceConfig;
use crate::http::{HttpRequest, HttpResponse, Method};
use crate::identity::Trigger;
use crate::job::{Action, Event, Phase};
use crate::manifest::Artifact;
use crate::restore::d1_sql::{Input, Staging};
use crate::time::Timestamp;

const FOLDER: &str = "app-db/2026-11-23T030000Z-00000000000000aa/";
const MD5: &str = "0123456789abcdef0123456789abcdef";
/// What R2 holds as the backup's dump in these tests.
const DUMP: &str = "PRAGMA defer_foreign_keys=TRUE;\nCREATE TABLE a(x);\nINSERT INTO \"a\" (\"x\") VALUES(1);\n\
    CREATE VIEW v AS SELECT * FROM a;\nINSERT INTO \"a\" (\"x\") VALUES(2);";
/// Where this job stages its rewritten dump.
const STAGED: &str = "app-db/2026-11-23T100000Z-0123456789abcdef/restore-staging/";

/// `DUMP` as the restore stages it (rewritten), with `replace` or not.
fn staging(replace: bool) -> Staging {
    let input = Input { key: format!("{FOLDER}db.sql"), size: DUMP.len() as u64, sealed: None };
    let mut st = Staging::new(vec![input], STAGED.into(), replace);
    while !st.done {
        let data = st.next_read(8 << 20).map(|(_, off, len)| &DUMP.as_bytes()[off as usize..(off + len) as usize]);
        st.step(data, 8 << 20).unwrap();
    }
    st
}

/// The MD5 of `DUMP` as staged.
fn staged_md5(replace: bool) -> String {
    staging(replace).final_md5().unwrap()
}

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
            ..Artifact::sample(format!("{FOLDER}db.sql"), "db.sql", DUMP.len() as u64, "s", "application/sql")
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

    /// Wakes and expects a request; returns it. The look-up of an import's target database and
    /// the read of what it holds are answered on the way (it exists and is empty), and the
    /// staging is run (see [`Self::stage`]), except where a test asks with
    /// [`Self::raw_request`].
    fn request(&mut self) -> HttpRequest {
        loop {
            match self.wake() {
                Action::Send(req)
                    if req.method == Method::Get && req.url.ends_with("/accounts/acc/d1/database/db-2") =>
                {
                    self.answer(200, json!({"uuid": "db-2", "name": "two"}));
                }
                Action::Send(req)
                    if req.url.ends_with("/query") && body(&req)["sql"].as_str().unwrap().contains("sqlite_schema") =>
                {
                    self.answer(200, json!([{"results": [], "success": true, "meta": {}}]));
                }
                Action::Restore(io) => match *io {
                    Io::Stage { staging, step_bytes, .. } => self.stage_step(*staging, step_bytes),
                    other => panic!("expected a request, got {other:?}"),
                },
                Action::Send(req) => return req,
                other => panic!("expected a request, got {other:?}"),
            }
        }
    }

    /// Performs one staging order as the runtime would, with `DUMP` as the dump in R2.
    fn stage_step(&mut self, mut staging: Staging, step_bytes: u64) {
        assert_eq!(staging.prefix, STAGED);
        let data = staging.next_read(step_bytes).map(|(key, off, len)| {
            assert_eq!(key, format!("{FOLDER}db.sql"));
            &DUMP.as_bytes()[off as usize..(off + len) as usize]
        });
        staging.step(data, step_bytes).unwrap();
        self.feed(Event::RestoreIo(Ok(IoDone::Staged(Box::new(staging)))));
    }

    /// An import of the dump, up to the moment D1's upload URL is handed to the runtime.
    fn at_the_upload() -> Self {
        let mut h = Self::new(Task::Restore, import_params());
        h.io();
        h.manifest(manifest(&[], t0()));
        h.request();
        h.answer(200, json!({"upload_url": "https://r2.example/up", "filename": "f.sql"}));
        h.io();
        h
    }

    /// The staged chunks are deleted.
    fn cleanup(&mut self) {
        let Io::DeleteObjects { keys } = self.io() else { panic!("expected the staged chunks' deletion") };
        let chunks = staging(self.replace()).chunks.len();
        assert_eq!(keys, (0..=chunks).map(|i| format!("{STAGED}{i:05}.sql")).collect::<Vec<_>>());
        self.feed(Event::RestoreIo(Ok(IoDone::Deleted)));
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

    /// stage → init → upload → ingest (active) → poll (complete) → clean-up, checking each step.
    fn import(&mut self, target: &str) {
        let staged = staging(self.replace());
        let md5 = staged.final_md5().unwrap();
        let init = self.request();
        assert!(init.url.ends_with(&format!("/accounts/acc/d1/database/{target}/import")), "{}", init.url);
        assert_eq!(body(&init), json!({"action": "init", "etag": md5}));
        self.answer(200, json!({"upload_url": "https://r2.example/up?sig=1", "filename": "f.sql"}));
        let Io::PostPieces { request, pieces } = self.io() else { panic!("expected the upload") };
        assert_eq!((request.method, request.url.as_str()), (Method::Put, "https://r2.example/up?sig=1"));
        assert!(request.header_value("authorization").is_none(), "the token never goes to the upload URL");
        let chunks: Vec<Piece> = staged
            .chunks
            .iter()
            .enumerate()
            .map(|(i, size)| Piece::Object { key: staged.chunk_key(i), size: *size })
            .collect();
        assert_eq!(pieces, chunks);
        self.uploaded(&md5);
        let ingest = self.request();
        assert_eq!(body(&ingest), json!({"action": "ingest", "etag": md5, "filename": "f.sql"}));
        let slept = self.answer(202, json!({"status": "active", "at_bookmark": "imp-1", "messages": ["Importing"]}));
        assert!(matches!(slept, Action::Sleep(_)));
        let poll = self.request();
        assert_eq!(body(&poll), json!({"action": "poll", "current_bookmark": "imp-1"}));
        self.answer(200, json!({"status": "complete", "at_bookmark": "imp-1", "result": {"final_bookmark": "f", "num_queries": 9, "meta": {}}}));
        self.cleanup();
    }

    fn replace(&self) -> bool {
        matches!(self.job.restore_state(), Some(RestoreState::D1(s)) if s.replace)
    }

    /// The upload's answer, with this `ETag`.
    fn uploaded(&mut self, etag: &str) -> Action {
        let resp = HttpResponse::json(200, &json!(null)).with_header("etag", &format!("\"{etag}\""));
        self.feed(Event::RestoreIo(Ok(IoDone::Posted(Ok(resp)))))
    }

    fn state(&self) -> &d1::D1Restore {
        let Some(RestoreState::D1(state)) = self.job.restore_state() else { panic!("a D1 restore") };
        state
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
fn an_upload_whose_etag_is_not_the_md5_fails_naming_both_after_deleting_the_staged_chunks() {
    let mut h = Harness::at_the_upload();
    h.uploaded("ffffffffffffffffffffffffffffffff");
    assert_eq!(h.job.phase, Phase::Restoring, "the staged chunks are deleted first");
    h.cleanup();
    assert_eq!(h.wake(), Action::Done);
    assert_eq!(h.job.phase, Phase::Failed);
    let md5 = staged_md5(false);
    assert!(h.job.error.as_deref().unwrap().contains(&md5), "{:?}", h.job.error);
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
    h.cleanup();
    h.wake();
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
    assert!(matches!(h.io(), Io::PostPieces { .. }), "the upload is tried again");
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
        json!({"mode": "time_travel", "confirm": ["db-1", "db-2"], "target": {"database_id": "db-2"}}),
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
    let Some(RestoreState::D1(state)) = h.job.restore_state() else { panic!("a D1 restore") };
    assert!(state.notes[0].contains("expired"));
}

#[test]
fn a_backup_older_than_the_window_imports_without_asking_d1() {
    let mut h = Harness::new(
        Task::Restore,
        json!({"mode": "time_travel", "confirm": ["db-1", "db-2"], "target": {"database_id": "db-2"}}),
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
    let start = crate::dump::Md5Progress::start();
    let step_bytes = crate::dump::DIGEST_STEP_BYTES;
    assert_eq!(
        h.io(),
        Io::Digest { key: format!("{FOLDER}db.sql"), from: start.clone(), step_bytes, sealed: None, identity: None }
    );
    // The MD5 of the dump in R2 is read back in bounded steps, each going on where the last stopped.
    let halfway = crate::dump::Md5Progress { offset: 5, md5_state: start.md5_state.clone() };
    h.feed(Event::RestoreIo(Ok(IoDone::DigestPart(halfway.clone()))));
    assert_eq!(
        h.io(),
        Io::Digest { key: format!("{FOLDER}db.sql"), from: halfway, step_bytes, sealed: None, identity: None }
    );
    h.feed(Event::RestoreIo(Ok(IoDone::Digest { md5: MD5.into(), size: DUMP.len() as u64 })));
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

/// A drill of a one-table backup, up to its scratch database's creation.
fn drill_with_scratch() -> Harness {
    let mut h = Harness::new(Task::Drill, json!({}));
    h.io();
    h.manifest(manifest(&[("a", 1)], t0()));
    h.io();
    h.feed(Event::RestoreIo(Ok(IoDone::Digest { md5: MD5.into(), size: DUMP.len() as u64 })));
    h.request();
    h.answer(200, json!({"uuid": "scratch-1"}));
    h
}

#[test]
fn a_drill_whose_import_fails_still_deletes_the_scratch_database_and_records_why() {
    let mut h = drill_with_scratch();
    h.request();
    h.answer(400, json!(null));
    assert_eq!(h.job.phase, Phase::Restoring, "the failure waits for the clean-up");
    h.cleanup();
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
    h.feed(Event::RestoreIo(Ok(IoDone::Digest { md5: other.into(), size: DUMP.len() as u64 })));
    h.request();
    h.answer(200, json!({"uuid": "scratch-1"}));
    let init = h.request();
    assert_eq!(body(&init)["etag"], json!(staged_md5(false)), "the import's etag is the MD5 of what was staged");
    h.answer(200, json!({"status": "complete", "at_bookmark": "i", "result": {}}));
    h.cleanup();
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
fn an_import_into_a_database_that_holds_objects_is_refused_naming_them_and_imports_nothing() {
    let mut h = Harness::new(Task::Restore, import_params());
    h.io();
    h.manifest(manifest(&[("a", 2)], t0()));
    h.raw_request();
    h.answer(200, json!({"uuid": "db-2", "name": "two"}));
    let inspect = h.raw_request();
    assert!(inspect.url.ends_with("/database/db-2/query"), "{}", inspect.url);
    assert!(body(&inspect)["sql"].as_str().unwrap().contains("sqlite_schema"));
    h.answer(
        200,
        json!([{"results": [{"type": "table", "name": "users"}, {"type": "view", "name": "v"}], "success": true}]),
    );
    assert_eq!(h.job.phase, Phase::Failed);
    let e = h.job.error.clone().unwrap();
    assert!(
        e.contains("database db-2 is not empty")
            && e.contains("table \"users\", view \"v\"")
            && e.contains("\"replace\": true"),
        "{e}"
    );
}

#[test]
fn replace_true_imports_into_a_non_empty_database_dropping_the_dumps_objects_first() {
    let mut params = import_params();
    params["replace"] = json!(true);
    let mut h = Harness::new(Task::Restore, params);
    h.io();
    h.manifest(manifest(&[("a", 2)], t0()));
    h.raw_request();
    h.answer(200, json!({"uuid": "db-2"}));
    h.raw_request();
    h.answer(200, json!([{"results": [{"type": "table", "name": "a"}], "success": true}]));
    assert!(h.state().replace);
    h.import("db-2");
    assert_eq!(h.wake(), Action::Done);
    assert_eq!(h.job.phase, Phase::Restored);
    assert!(h.state().notes.iter().any(|n| n.contains("held table \"a\"")), "{:?}", h.state().notes);
    assert_ne!(staged_md5(true), staged_md5(false), "the staged file drops the objects first");
    assert!(Harness::try_new(
        Task::Restore,
        json!({"target": {"database_id": "db-2"}, "confirm": "db-2", "replace": "yes"})
    )
    .err()
    .unwrap()
    .contains("\"replace\""));
}

#[test]
fn a_time_travel_with_an_import_fallback_must_name_both_databases_in_confirm() {
    let tt = |confirm: Value| {
        Harness::try_new(
            Task::Restore,
            json!({"mode": "time_travel", "confirm": confirm, "target": {"database_id": "db-2"}}),
        )
    };
    let only_source = tt(json!("db-1")).err().unwrap();
    assert!(
        only_source.contains("importing into database db-2") && only_source.contains(r#"["db-1", "db-2"]"#),
        "{only_source}"
    );
    let only_target = tt(json!("db-2")).err().unwrap();
    assert!(
        only_target.contains("source database db-1") && only_target.contains(r#"["db-1", "db-2"]"#),
        "{only_target}"
    );
    assert!(tt(json!(["db-2", "db-1"])).is_ok());
    assert!(Harness::try_new(Task::Restore, json!({"mode": "time_travel", "confirm": ["db-1"]})).is_ok());
    assert!(Harness::try_new(Task::Restore, json!({"target": {"database_id": "db-2"}, "confirm": ["db-2"]})).is_ok());
}

fn ten_day_old_time_travel(time_travel_days: Option<u32>) -> Harness {
    let src = match time_travel_days {
        Some(d) => source(json!({ "time_travel_days": d })),
        None => source(json!({})),
    };
    let params = json!({"mode": "time_travel", "confirm": ["db-1", "db-2"], "target": {"database_id": "db-2"}});
    let backup = Some(format!("{FOLDER}manifest.json"));
    let mut h = Harness(Driver::start(Task::Restore, src, &params, backup, &[("D1_TOKEN", "tok")], t0()).unwrap());
    h.io();
    h.manifest(manifest(&[], t0().minus(Duration::from_secs(10 * 86_400))));
    h
}

#[test]
fn the_time_travel_window_is_seven_days_unless_the_source_says_thirty() {
    let mut free = ten_day_old_time_travel(None);
    free.import("db-2");
    assert!(free.state().notes[0].contains("more than 7 days ago"), "{:?}", free.state().notes);
    let mut paid = ten_day_old_time_travel(Some(30));
    let req = paid.request();
    assert!(req.url.contains("/database/db-1/time_travel/restore?bookmark=bm-1"), "{}", req.url);
    let err = Config::from_value(&json!([{
        "name": "x", "kind": "d1", "schedule": "0 3 * * *", "account_id": "acc", "database_id": "db-1",
        "token_secret": "T", "time_travel_days": 31
    }]))
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("time_travel_days"), "{err}");
}

#[test]
fn time_travel_never_sends_a_bookmark_of_another_database() {
    let mut h = Harness::new(Task::Restore, json!({"mode": "time_travel", "confirm": "db-1"}));
    h.io();
    let mut m = manifest(&[], t0());
    m.provider = json!({"database_id": "db-0", "at_bookmark": "bm-1"});
    h.manifest(m);
    assert_eq!(h.job.phase, Phase::Failed, "no request was sent");
    let e = h.job.error.clone().unwrap();
    assert!(e.contains("taken of database db-0, not of the source database db-1"), "{e}");
}

#[test]
fn sql_artifacts_marked_after_dump_are_staged_after_the_dump_in_manifest_order() {
    let mut h = Harness::new(Task::Restore, import_params());
    h.io();
    let mut m = manifest(&[("a", 2)], t0());
    m.artifacts.push(Artifact {
        details: Some(json!({"d1_import": "after_dump"})),
        ..Artifact::sample(format!("{FOLDER}virtual_tables.sql"), "virtual_tables.sql", 40, "s", "application/sql")
    });
    h.manifest(m);
    h.raw_request();
    h.answer(200, json!({"uuid": "db-2"}));
    h.raw_request();
    h.answer(200, json!([{"results": []}]));
    let Io::Stage { staging, step_bytes, .. } = h.io() else { panic!("expected staging") };
    assert_eq!(step_bytes, 8 << 20, "a step reads at most the source's part size");
    let keys: Vec<&str> = staging.inputs.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, [format!("{FOLDER}db.sql"), format!("{FOLDER}virtual_tables.sql")]);
}

#[test]
fn a_failed_staging_step_fails_the_import_after_deleting_what_was_staged() {
    let mut h = Harness::new(Task::Restore, import_params());
    h.io();
    h.manifest(manifest(&[("a", 2)], t0()));
    h.raw_request();
    h.answer(200, json!({"uuid": "db-2"}));
    h.raw_request();
    h.answer(200, json!([{"results": []}]));
    let Io::Stage { staging, step_bytes, .. } = h.io() else { panic!("expected staging") };
    h.stage_step(*staging, step_bytes);
    assert!(matches!(h.io(), Io::Stage { .. }));
    h.feed(Event::RestoreIo(Err(StepError::permanent("no statement ends within 6291456 bytes"))));
    let Io::DeleteObjects { keys } = h.io() else { panic!("expected the clean-up") };
    assert_eq!(keys, [format!("{STAGED}00000.sql"), format!("{STAGED}00001.sql")]);
    h.feed(Event::RestoreIo(Ok(IoDone::Deleted)));
    h.wake();
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(h.job.error.clone().unwrap().contains("no statement ends"));
}

#[test]
fn the_exports_query_artifact_is_staged_after_the_dump_wherever_the_manifest_lists_it() {
    let mut h = Harness::new(Task::Restore, import_params());
    h.io();
    let mut m = manifest(&[("a", 2)], t0());
    m.artifacts.insert(0, query_artifact(300, json!({})));
    let name = crate::providers::d1::query::FILENAME;
    let keys = staged_keys(&mut h, m);
    assert_eq!(keys, [format!("{FOLDER}db.sql"), format!("{FOLDER}{name}")], "the dump first, then the query artifact");
}

/// A drill up to its scratch database's create.
fn drill_to_create(m: Manifest) -> Harness {
    drill_to_create_on(source(json!({})), m)
}

fn drill_to_create_on(src: SourceConfig, m: Manifest) -> Harness {
    let mut h = Harness(Driver::start(Task::Drill, src, &json!({}), None, &[("D1_TOKEN", "tok")], t0()).unwrap());
    h.io();
    h.manifest(m);
    h.io();
    h.feed(Event::RestoreIo(Ok(IoDone::Digest { md5: MD5.into(), size: DUMP.len() as u64 })));
    let create = h.request();
    assert_eq!(body(&create), json!({"name": "ferry-drill-0123456789abcdef"}));
    h
}

/// The look-up of the scratch database by its name, answered with `found`.
fn look_up_scratch(h: &mut Harness, found: Value) {
    let list = h.request();
    assert_eq!(list.method, Method::Get);
    assert!(list.url.ends_with("/accounts/acc/d1/database?name=ferry-drill-0123456789abcdef"), "{}", list.url);
    h.answer(200, found);
}

#[test]
fn a_drill_whose_create_answer_is_lost_finds_its_scratch_database_by_name_and_deletes_it() {
    let mut h = drill_to_create(manifest(&[("a", 1)], t0()));
    h.feed(Event::Unreachable("connection closed before the answer's end".into()));
    look_up_scratch(
        &mut h,
        json!([{"uuid": "other", "name": "ferry-drill-0123456789abcdef0"},
               {"uuid": "scratch-1", "name": "ferry-drill-0123456789abcdef"}]),
    );
    h.import("scratch-1");
    count(&mut h, "a", 1);
    let record = delete_and_record(&mut h);
    assert_eq!(record["passed"], json!(true), "{record}");
    assert_eq!(h.wake(), Action::Done);
    assert_eq!(h.job.phase, Phase::Restored);
    assert!(h.state().notes.iter().any(|n| n.contains("adopted it (scratch-1)")), "{:?}", h.state().notes);
}

#[test]
fn a_drill_whose_create_is_refused_as_name_taken_adopts_the_database_of_that_name() {
    let mut h = drill_to_create(manifest(&[("a", 1)], t0()));
    // cloudflare-typescript `database.create`; the code wrangler names (workers-sdk#2143).
    h.feed(Event::Response(HttpResponse::json(
        400,
        &json!({"success": false, "result": null, "messages": [],
                "errors": [{"code": 7502, "message": "A database with that name already exists"}]}),
    )));
    look_up_scratch(&mut h, json!([{"uuid": "scratch-1", "name": "ferry-drill-0123456789abcdef"}]));
    h.import("scratch-1");
    count(&mut h, "a", 1);
    delete_and_record(&mut h);
    h.wake();
    assert_eq!(h.job.phase, Phase::Restored);
}

#[test]
fn a_lost_create_that_never_arrived_is_sent_again_after_the_look_up_finds_nothing() {
    let mut h = drill_to_create(manifest(&[("a", 1)], t0()));
    h.feed(Event::Unreachable("timed out".into()));
    look_up_scratch(&mut h, json!([]));
    let again = h.request();
    assert_eq!(body(&again), json!({"name": "ferry-drill-0123456789abcdef"}));
    h.answer(200, json!({"uuid": "scratch-1"}));
    h.import("scratch-1");
}

/// The prints of `values`, in order.
fn print_of(values: &[&str]) -> crate::providers::d1::query::Fingerprint {
    let mut p = crate::providers::d1::query::Fingerprint::default();
    values.iter().for_each(|v| p.add(v));
    p
}

/// A backup whose query artifact recorded a virtual table `notes(a)` with rows 1 and 2 and the
/// integers beyond 2^53 of `nums.v`.
fn manifest_with_checks() -> Manifest {
    let mut m = manifest(&[("nums", 3)], t0());
    m.artifacts.push(query_artifact(
        QUERY_SQL.len() as u64,
        json!({"drill_checks": [
            {"table": "notes", "kind": "rows", "columns": ["a"], "prints": [print_of(&["1, 'x'", "2, 'y'"])]},
            {"table": "nums", "kind": "exact", "columns": ["v"],
             "prints": [print_of(&["9007199254740993", "9223372036854775807"])]},
        ]}),
    ));
    m
}

/// What R2 holds as the query artifact in the drills with checks.
const QUERY_SQL: &str = "INSERT INTO \"notes\"(rowid, \"a\") VALUES(1, 'x');\n";

/// Runs a drill of [`manifest_with_checks`] whose scratch database answers `notes_pages` and
/// `nums_pages`; the job's error, if it failed.
fn drill_with_checks(notes_pages: &[Value], nums_pages: &[Value]) -> (Option<String>, Value) {
    let mut h = drill_to_create_on(source(json!({"query_page_rows": 2})), manifest_with_checks());
    h.answer(200, json!({"uuid": "scratch-1"}));
    // The rewritten dump and the query artifact, staged into one import.
    loop {
        match h.wake() {
            Action::Restore(io) => {
                let Io::Stage { mut staging, step_bytes, .. } = *io else { panic!("expected staging") };
                let data = staging.next_read(step_bytes).map(|(key, off, len)| {
                    let text = if key.ends_with("db.sql") { DUMP } else { QUERY_SQL };
                    &text.as_bytes()[off as usize..(off + len) as usize]
                });
                staging.step(data, step_bytes).unwrap();
                h.feed(Event::RestoreIo(Ok(IoDone::Staged(staging))));
            }
            Action::Send(init) => {
                assert!(init.url.ends_with("/scratch-1/import"), "{}", init.url);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    h.answer(200, json!({"status": "complete", "at_bookmark": "i", "result": {}}));
    h.cleanup_any();
    count(&mut h, "nums", 3);
    for page in notes_pages {
        let req = h.request();
        let sql = body(&req)["sql"].as_str().unwrap().to_string();
        assert!(
            sql.contains("quote(\"a\") AS v0") && sql.contains("FROM \"notes\"") && sql.contains("LIMIT 2"),
            "{sql}"
        );
        h.answer(200, json!([{"results": page, "success": true}]));
    }
    for page in nums_pages {
        let req = h.request();
        let sql = body(&req)["sql"].as_str().unwrap().to_string();
        assert!(sql.contains("CAST(\"v\" AS TEXT)") && sql.contains("FROM \"nums\""), "{sql}");
        h.answer(200, json!([{"results": page, "success": true}]));
    }
    let record = delete_and_record(&mut h);
    h.wake();
    (h.job.error.clone(), record)
}

impl Harness {
    /// The staged chunks are deleted, whatever they were.
    fn cleanup_any(&mut self) {
        let Io::DeleteObjects { .. } = self.io() else { panic!("expected the staged chunks' deletion") };
        self.feed(Event::RestoreIo(Ok(IoDone::Deleted)));
    }
}

#[test]
fn a_drill_reads_back_virtual_rows_and_exact_integers_page_by_page_and_passes_when_equal() {
    let notes = [json!([{"r": "1", "v0": "'x'"}, {"r": "2", "v0": "'y'"}]), json!([])];
    let nums = [
        json!([{"r": "2", "k": 2, "n": 1, "v0": "9007199254740993"}, {"r": "4", "k": 4, "n": 2, "v0": null}]),
        json!([{"r": "5", "k": 5, "n": 1, "v0": "9223372036854775807"}]),
        json!([]),
    ];
    let (error, record) = drill_with_checks(&notes, &nums);
    assert_eq!(error, None, "{record}");
    assert_eq!(record["checks"][1]["restored"], record["checks"][1]["backup"], "{record}");
}

#[test]
fn a_drill_fails_naming_the_virtual_table_whose_rows_are_missing() {
    let (error, _) = drill_with_checks(
        &[json!([{"r": "1", "v0": "'x'"}])],
        &[
            json!([{"r": "5", "k": 5, "n": 1, "v0": "9007199254740993"}, {"r": "6", "k": 6, "n": 2, "v0": "9223372036854775807"}]),
            json!([]),
        ],
    );
    let e = error.unwrap();
    assert!(e.contains("virtual table \"notes\": 1 rows restored, 2 in the backup") && !e.contains("\"nums\""), "{e}");
}

#[test]
fn a_drill_fails_naming_table_and_column_when_a_big_integer_differs() {
    let (error, _) = drill_with_checks(
        &[json!([{"r": "1", "v0": "'x'"}, {"r": "2", "v0": "'y'"}]), json!([])],
        &[
            json!([{"r": "5", "k": 5, "n": 1, "v0": "9007199254740993"}, {"r": "6", "k": 6, "n": 2, "v0": "9223372036854775806"}]),
            json!([]),
        ],
    );
    let e = error.unwrap();
    assert!(
        e.contains("table \"nums\" column \"v\": 2 integers beyond 2^53 restored, 2 in the backup, with other values")
            && !e.contains("notes"),
        "{e}"
    );
}

#[test]
fn a_backup_of_only_virtual_tables_restores_from_its_query_artifact_alone() {
    let mut h = Harness::new(Task::Restore, import_params());
    h.io();
    let mut m = manifest(&[], t0());
    m.artifacts = vec![Artifact { md5: Some(MD5.into()), ..query_artifact(300, json!({})) }];
    let keys = staged_keys(&mut h, m);
    assert_eq!(keys, [format!("{FOLDER}{}", crate::providers::d1::query::FILENAME)]);
}

#[test]
fn the_sweep_deletes_only_old_scratch_databases_of_jobs_no_longer_in_flight() {
    let src = source(json!({}));
    let crate::providers::ProviderConfig::D1(cfg) = &src.provider else { panic!("d1") };
    let token = crate::secret::Secret::new("tok");
    use super::d1::{scratch_delete_request, scratch_leftovers, scratch_list_request};
    let list = scratch_list_request(cfg, &token).unwrap();
    assert!(list.url.ends_with("/accounts/acc/d1/database?name=ferry-drill-&per_page=100"), "{}", list.url);
    let listed = HttpResponse::json(
        200,
        &json!({"success": true, "errors": [], "result": [
            {"uuid": "u-ended", "name": "ferry-drill-00000000000000e1", "created_at": "2026-11-23T07:00:00.000Z"},
            {"uuid": "u-live", "name": "ferry-drill-00000000000000f2", "created_at": "2026-11-23T07:00:00.000Z"},
            {"uuid": "u-young", "name": "ferry-drill-00000000000000e3", "created_at": "2026-11-23T09:30:00.000Z"},
            {"uuid": "u-theirs", "name": "ferry-drill-backup-of-prod", "created_at": "2026-11-01T00:00:00.000Z"},
            {"uuid": "u-app", "name": "app", "created_at": "2026-11-01T00:00:00.000Z"},
        ]}),
    );
    let live = ["00000000000000f2".to_string()].into_iter().collect();
    let gone = scratch_leftovers(&listed, &live, t0()).unwrap();
    assert_eq!(gone, [("u-ended".to_string(), "ferry-drill-00000000000000e1".to_string())]);
    let del = scratch_delete_request(cfg, &token, "u-ended").unwrap();
    assert_eq!(del.method, Method::Delete);
    assert!(del.url.ends_with("/accounts/acc/d1/database/u-ended"), "{}", del.url);
}

/// The query artifact of a backup in these tests, with `details` added to its role and marker.
fn query_artifact(size: u64, details: Value) -> Artifact {
    let name = crate::providers::d1::query::FILENAME;
    let mut all = json!({
        "role": crate::providers::d1::query::ROLE,
        "d1_import": crate::providers::d1::query::AFTER_DUMP,
    });
    for (k, v) in details.as_object().into_iter().flatten() {
        all[k] = v.clone();
    }
    Artifact { details: Some(all), ..Artifact::sample(format!("{FOLDER}{name}"), name, size, "s", "application/sql") }
}

/// An import of `m` into an existing, empty database, up to its first staging order: the keys
/// it stages, in order.
fn staged_keys(h: &mut Harness, m: Manifest) -> Vec<String> {
    h.manifest(m);
    assert_eq!(h.job.phase, Phase::Restoring, "{:?}", h.job.error);
    h.raw_request();
    h.answer(200, json!({"uuid": "db-2"}));
    h.raw_request();
    h.answer(200, json!([{"results": []}]));
    let Io::Stage { staging, .. } = h.io() else { panic!("expected staging") };
    staging.inputs.iter().map(|i| i.key.clone()).collect()
}

/// An import with `deadline_seconds.restore = 60`, up to D1's first `active` answer to ingest.
fn import_that_stays_active() -> Harness {
    let src = source(json!({"deadline_seconds": {"restore": 60}}));
    let backup = Some(format!("{FOLDER}manifest.json"));
    let mut h =
        Driver::start(Task::Restore, src, &import_params(), backup, &[("D1_TOKEN", "tok")], t0()).map(Harness).unwrap();
    h.io();
    h.manifest(manifest(&[("a", 2)], t0()));
    h.request();
    h.answer(200, json!({"upload_url": "https://r2.example/up?sig=1", "filename": "f.sql"}));
    h.io();
    h.uploaded(&staged_md5(false));
    h.request();
    h.answer(202, json!({"status": "active", "at_bookmark": "imp-1", "messages": []}));
    h
}

#[test]
fn an_import_that_stays_active_past_the_restore_deadline_fails_naming_it_after_deleting_the_staged_chunks() {
    let mut h = import_that_stays_active();
    let mut polls = 0;
    loop {
        match h.wake() {
            Action::Send(poll) => {
                assert_eq!(body(&poll)["action"], json!("poll"));
                polls += 1;
                assert!(polls < 100, "polled forever");
                h.answer(202, json!({"status": "active", "at_bookmark": "imp-1", "messages": []}));
            }
            Action::Sleep(_) => {}
            Action::Restore(io) => {
                assert!(matches!(*io, Io::DeleteObjects { .. }), "expected the staged chunks' deletion, got {io:?}");
                h.feed(Event::RestoreIo(Ok(IoDone::Deleted)));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(h.wake(), Action::Done);
    assert_eq!(h.job.phase, Phase::Failed);
    let e = h.job.error.clone().unwrap();
    assert!(
        e.contains("the restore job did not finish within its deadline of 1 min (deadline_seconds.restore)"),
        "{e}"
    );
    assert!(h.now <= t0().plus(Duration::from_secs(62)), "stopped at its deadline, not later: {}", h.now);
}

#[test]
fn an_import_cancelled_while_d1_says_active_deletes_the_staged_chunks_and_ends_cancelled() {
    let mut h = import_that_stays_active();
    let by = Event::Cancel { by: "api".into(), reason: Some("wrong backup".into()) };
    assert!(matches!(h.feed(by), Action::Sleep(_)), "the clean-up runs first");
    assert_eq!(h.job.phase, Phase::Restoring);
    let again = Event::Cancel { by: "api".into(), reason: Some("again".into()) };
    h.feed(again);
    assert_eq!(h.job.cancelled.as_ref().unwrap().reason.as_deref(), Some("wrong backup"), "the first request counts");
    h.cleanup();
    assert_eq!(h.wake(), Action::Done);
    assert_eq!(h.job.phase, Phase::Cancelled);
    assert_eq!(h.job.error.as_deref(), Some("cancelled by api: wrong backup"));
}

#[test]
fn a_drill_cancelled_after_its_scratch_database_exists_deletes_it_and_ends_cancelled() {
    let mut h = drill_with_scratch();
    h.feed(Event::Cancel { by: "api".into(), reason: None });
    let del = h.request();
    assert_eq!(del.method, crate::http::Method::Delete);
    assert!(del.url.ends_with("/database/scratch-1"), "{}", del.url);
    h.answer(200, Value::Null);
    assert!(matches!(h.wake(), Action::Sleep(_)), "a cancel is no finding about the backup: no drill record");
    assert_eq!(h.wake(), Action::Done);
    assert_eq!(h.job.phase, Phase::Cancelled);
}

#[test]
fn a_restore_cancelled_before_its_manifest_was_read_ends_at_once() {
    let mut h = Harness::new(Task::Restore, import_params());
    assert!(matches!(h.io(), Io::ReadManifest { .. }));
    assert_eq!(h.feed(Event::Cancel { by: "api".into(), reason: None }), Action::Done);
    assert_eq!(h.job.phase, Phase::Cancelled);
}

#[test]
fn a_clean_up_that_never_ends_is_given_up_after_the_clean_up_limit() {
    let mut h = import_that_stays_active();
    h.feed(Event::Cancel { by: "api".into(), reason: None });
    assert!(matches!(h.io(), Io::DeleteObjects { .. }));
    // The deletion never answers; the runtime's watchdog wakes the job.
    h.now = h.now.plus(crate::job::CLEANUP_LIMIT + Duration::from_secs(1));
    assert_eq!(h.feed(Event::Wake), Action::Done);
    assert_eq!(h.job.phase, Phase::Cancelled);
    assert!(h.job.error.as_deref().unwrap().contains("clean-up did not finish within 15 min"), "{:?}", h.job.error);
}

/// A time travel of a whole-account source (`database_id = "*"`), confirming `confirm`.
fn whole_account_time_travel(confirm: &str) -> Harness {
    let params = json!({"mode": "time_travel", "confirm": confirm});
    let backup = Some(format!("{FOLDER}manifest.json"));
    let src = source(json!({ "database_id": "*" }));
    let mut h = Harness(Driver::start(Task::Restore, src, &params, backup, &[("D1_TOKEN", "tok")], t0()).unwrap());
    h.io();
    h.manifest(manifest(&[], t0()));
    h
}

#[test]
fn a_whole_account_time_travel_restores_the_database_the_backup_was_taken_of_once_it_is_confirmed() {
    let mut h = whole_account_time_travel("db-1");
    let req = h.request();
    assert!(req.url.ends_with("/accounts/acc/d1/database/db-1/time_travel/restore?bookmark=bm-1"), "{}", req.url);

    let mut other = whole_account_time_travel("db-9");
    assert_eq!(other.wake(), Action::Done, "refused before any request");
    assert_eq!(other.job.phase, Phase::Failed);
    let e = other.job.error.clone().unwrap();
    assert!(e.contains("database db-1") && e.contains("confirm"), "{e}");

    let params = json!({"mode": "time_travel"});
    let backup = Some(format!("{FOLDER}manifest.json"));
    let refused = Driver::start(Task::Restore, source(json!({ "database_id": "*" })), &params, backup, &[], t0());
    let e = refused.err().unwrap();
    assert!(e.contains("name its id in \"confirm\""), "{e}");
}
