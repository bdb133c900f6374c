//! Dgraph restores, driven through the job state machine with canned Dgraph answers and a
//! virtual clock.

use serde_json::{json, Value};

use super::driver::{driven, Driver};
use super::*;
use crate::config::{Config, SourceConfig};
use crate::http::{HttpRequest, HttpResponse};
use crate::identity::Trigger;
use crate::job::{Action, Event, Phase};
use crate::time::Timestamp;

const FOLDER: &str = "graph/2026-11-23T030000Z-00000000000000aa/";
const UID: &str = "0xf0ffe9";

fn source(fields: Value) -> SourceConfig {
    let mut v = json!({
        "name": "graph", "kind": "dgraph", "schedule": "0 3 * * *",
        "endpoint": "http://127.0.0.1:9/backends/blue", "api_key_secret": "DGRAPH_KEY",
        "retry": {"max_attempts": 2, "base_ms": 1000, "max_delay_ms": 8000}, "export_timeout_minutes": 60
    });
    for (k, val) in fields.as_object().unwrap() {
        if val.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = val.clone();
        }
    }
    Config::from_value(&json!([v])).unwrap().sources.remove(0)
}

fn account() -> Value {
    json!({"endpoint": null, "api_key_secret": null, "cerebro_url": "http://127.0.0.1:9/cerebro/graphql",
           "cerebro_email": "ops@acme.com", "cerebro_password_secret": "CEREBRO_PW"})
}

fn t(s: &str) -> Timestamp {
    Timestamp::parse_rfc3339(s).unwrap()
}

fn manifest(finished: Timestamp, backend: Value) -> Manifest {
    Manifest {
        source: "graph".into(),
        kind: "dgraph".into(),
        job_id: JobId::new("00000000000000aa"),
        trigger: Trigger::Cron,
        started_at: finished,
        scheduled_for: None,
        finished_at: finished,
        provider: json!({"backend": backend, "format": "json", "files": ["g01.json.gz"]}),
        artifacts: vec![],
    }
}

fn body(req: &HttpRequest) -> Value {
    serde_json::from_slice(req.body.as_deref().unwrap()).unwrap()
}

driven!(Harness);

impl Harness {
    fn new(fields: Value, params: Value) -> Self {
        Self::try_new(fields, params).unwrap()
    }

    fn try_new(fields: Value, params: Value) -> Result<Self, String> {
        let secrets = [("DGRAPH_KEY", "admin-key"), ("CEREBRO_PW", "cerebro-pw"), ("PW", "acl-pw")];
        let backup = Some(format!("{FOLDER}manifest.json"));
        Driver::start(Task::Restore, source(fields), &params, backup, &secrets, t("2026-11-23T10:00:00Z")).map(Self)
    }

    fn answer(&mut self, payload: Value) -> Action {
        self.feed(Event::Response(HttpResponse::json(200, &payload)))
    }

    fn data(&mut self, d: Value) -> Action {
        self.answer(json!({ "data": d }))
    }

    fn read_manifest(&mut self, m: Manifest) {
        match self.wake() {
            Action::Restore(io) => assert_eq!(*io, Io::ReadManifest { key: Some(format!("{FOLDER}manifest.json")) }),
            other => panic!("expected the manifest read, got {other:?}"),
        }
        self.feed(Event::RestoreIo(Ok(IoDone::Manifest(format!("{FOLDER}manifest.json"), Box::new(m)))));
    }
}

fn series() -> Value {
    json!({"listBackups": {"response": [
        [{"backupNum": 1, "folder": "2026-47", "timestamp": "2026-11-16T00:00:00+0000", "type": "full"},
         {"backupNum": 2, "folder": "2026-47", "timestamp": "2026-11-23T00:00:00+0000", "type": "incremental"},
         {"backupNum": 3, "folder": "2026-47", "timestamp": "2026-11-23T04:00:00+0000", "type": "incremental"}],
        [{"backupNum": 1, "folder": "2026-46", "timestamp": "2026-11-09T00:00:00+0000", "type": "full"}]
    ], "errors": []}})
}

fn restored(id: i64) -> Value {
    json!({"restore": {"errors": null, "response": {"code": "Success", "message": "Restore operation started.", "restoreId": id}}})
}

fn status(s: &str, errors: Value) -> Value {
    json!({"restoreStatus": {"response": {"status": s, "errors": errors}}})
}

#[test]
fn restores_the_newest_dgraph_backup_taken_at_or_before_the_ferry_backup_finished() {
    let mut h = Harness::new(json!({}), json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    let list = h.request();
    assert_eq!(list.url, "http://127.0.0.1:9/backends/blue/admin/slash");
    assert_eq!(list.header_value("x-auth-token"), Some("admin-key"));
    assert!(body(&list)["query"].as_str().unwrap().contains("listBackups"));
    h.data(series());
    let restore = h.request();
    assert!(body(&restore)["query"].as_str().unwrap().contains("restore(uid: $uid"));
    assert_eq!(body(&restore)["variables"], json!({"uid": UID, "backupFolder": "2026-47", "backupNum": 2}));
    let sleep = h.data(restored(7));
    assert!(matches!(sleep, Action::Sleep(_)), "{sleep:?}");
    let poll = h.request();
    assert_eq!(body(&poll)["variables"], json!({"restoreId": 7}));
    assert!(matches!(h.data(status("InProgress", json!([]))), Action::Sleep(_)));
    h.request();
    h.data(status("OK", json!([])));
    assert!(matches!(h.wake(), Action::Done));
    assert_eq!(h.job.phase, Phase::Restored, "{:?}", h.job.error);
    let note = h.job.note.clone().unwrap();
    assert!(note.contains("2026-47 #2 (incremental, taken 2026-11-23T00:00:00+0000)"), "{note}");
    assert!(note.contains("at or before Ferry backup"), "{note}");
}

#[test]
fn confirm_must_repeat_the_deployment_uid_or_the_source_name_and_the_uid_is_required() {
    let e = Harness::try_new(json!({}), json!({"deployment_uid": UID})).err().unwrap();
    assert!(e.contains("confirm") && e.contains(UID) && e.contains("\"graph\""), "{e}");
    let e = Harness::try_new(json!({}), json!({"deployment_uid": UID, "confirm": "0x1"})).err().unwrap();
    assert!(e.contains("replaces all data"), "{e}");
    let e = Harness::try_new(json!({}), json!({"confirm": "graph"})).err().unwrap();
    assert!(e.contains("deployment_uid"), "{e}");
    assert!(Harness::try_new(json!({}), json!({"deployment_uid": UID, "confirm": "graph"})).is_ok());
    let e =
        Harness::try_new(json!({}), json!({"deployment_uid": UID, "confirm": UID, "dgraph_backup": {"folder": "x"}}))
            .err()
            .unwrap();
    assert!(e.contains("dgraph_backup"), "{e}");
    let e = plan(Task::Drill, &source(json!({})), &json!({}), None).unwrap_err();
    assert!(e.contains("live loader"), "{e}");
}

#[test]
fn a_named_dgraph_backup_is_restored_and_an_unknown_one_fails_listing_what_exists() {
    let params = json!({"confirm": UID, "deployment_uid": UID, "dgraph_backup": {"folder": "2026-46", "num": 1}});
    let mut h = Harness::new(json!({}), params);
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    h.request();
    h.data(series());
    let restore = h.request();
    assert_eq!(body(&restore)["variables"], json!({"uid": UID, "backupFolder": "2026-46", "backupNum": 1}));

    let params = json!({"confirm": UID, "deployment_uid": UID, "dgraph_backup": {"folder": "2026-40", "num": 1}});
    let mut h = Harness::new(json!({}), params);
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    h.request();
    assert!(matches!(h.data(series()), Action::Done));
    let err = h.job.error.clone().unwrap();
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(err.contains("no backup 2026-40 #1") && err.contains("2026-47 #3 (incremental"), "{err}");
}

#[test]
fn no_dgraph_backup_before_the_ferry_backup_fails_listing_what_exists_and_sends_no_restore() {
    let mut h = Harness::new(json!({}), json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-01T00:00:00Z"), Value::Null));
    h.request();
    assert!(matches!(h.data(series()), Action::Done));
    let err = h.job.error.clone().unwrap();
    assert!(err.contains("no Dgraph backup was taken at or before"), "{err}");
    assert!(err.contains("2026-46 #1 (full, taken 2026-11-09T00:00:00+0000)") && err.contains("nothing was touched"));
    let mut h = Harness::new(json!({}), json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-01T00:00:00Z"), Value::Null));
    h.request();
    h.data(json!({"listBackups": {"response": [], "errors": []}}));
    assert!(h.job.error.clone().unwrap().contains("Dgraph lists no backups"));
}

#[test]
fn a_non_dedicated_backend_fails_with_dgraphs_message() {
    let message = "Backups are only available for dedicated backends";
    let mut h = Harness::new(json!({}), json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    h.request();
    h.data(json!({"listBackups": {"response": null, "errors": [{"message": message}]}}));
    assert_eq!(h.job.phase, Phase::Failed);
    assert_eq!(h.job.error.clone().unwrap(), format!("Dgraph listBackups failed (nothing was touched): {message}"));
    // The same refusal as a top-level GraphQL error (HTTP 200).
    let mut h = Harness::new(json!({}), json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    h.request();
    h.answer(json!({"data": {"listBackups": null}, "errors": [{"message": message}]}));
    assert!(h.job.error.clone().unwrap().ends_with(message));
}

#[test]
fn restore_status_errors_and_a_refused_restore_fail_with_dgraphs_messages() {
    let mut h = Harness::new(json!({}), json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    h.request();
    h.data(series());
    h.request();
    h.data(restored(3));
    h.request();
    h.data(status("ERR", json!(["backup 2026-47 #2 is corrupt", "manifest unreadable"])));
    assert_eq!(h.job.phase, Phase::Failed);
    let err = h.job.error.clone().unwrap();
    assert_eq!(err, "Dgraph restore 3 failed (status ERR): backup 2026-47 #2 is corrupt; manifest unreadable");

    let mut h = Harness::new(json!({}), json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    h.request();
    h.data(series());
    h.request();
    h.data(json!({"restore": {"errors": [{"message": "uid 0xf0ffe9 not found"}], "response": null}}));
    assert_eq!(h.job.error.clone().unwrap(), "Dgraph refused the restore: uid 0xf0ffe9 not found");
}

#[test]
fn an_unanswered_restore_mutation_is_never_sent_again() {
    let mut h = Harness::new(json!({}), json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    // An unanswered listBackups is retried: it is a read.
    h.request();
    assert!(matches!(h.feed(Event::Unreachable("timed out".into())), Action::Sleep(_)));
    assert!(body(&h.request())["query"].as_str().unwrap().contains("listBackups"));
    h.data(series());
    h.request();
    assert!(matches!(h.feed(Event::Unreachable("connection reset".into())), Action::Done));
    assert_eq!(h.job.phase, Phase::Failed);
    let err = h.job.error.clone().unwrap();
    assert!(err.contains("got no answer (connection reset)") && err.contains("a restore may have started"), "{err}");

    // A gateway's 502 is no answer from Dgraph either.
    let mut h = Harness::new(json!({}), json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    h.request();
    h.data(series());
    h.request();
    let bad = HttpResponse { status: 502, headers: vec![], body: b"<html>502</html>".to_vec() };
    assert!(matches!(h.feed(Event::Response(bad)), Action::Done));
    assert!(h.job.error.clone().unwrap().contains("a restore may have started"));

    // A 429 refused it before it ran: retried.
    let mut h = Harness::new(json!({}), json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    h.request();
    h.data(series());
    h.request();
    let limited = HttpResponse { status: 429, headers: vec![], body: b"slow down".to_vec() };
    assert!(matches!(h.feed(Event::Response(limited)), Action::Sleep(_)));
    assert!(body(&h.request())["query"].as_str().unwrap().contains("restore(uid"));
}

#[test]
fn unknown_statuses_keep_polling_until_the_restore_deadline_then_fail_naming_it() {
    // export_timeout_minutes is 60: the restore's own deadline, 30 min, is what counts.
    let mut h = Harness::new(json!({"restore_timeout_minutes": 30}), json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    h.request();
    h.data(series());
    h.request();
    h.data(restored(9));
    for s in ["Queued", "Restoring", "Paused"] {
        h.request();
        assert!(matches!(h.data(status(s, json!([]))), Action::Sleep(_)));
    }
    h.now = h.now.plus(std::time::Duration::from_secs(29 * 60));
    h.request();
    assert!(matches!(h.data(status("Paused", json!([]))), Action::Sleep(_)), "still within the deadline");
    h.now = h.now.plus(std::time::Duration::from_secs(2 * 60));
    assert!(matches!(h.wake(), Action::Done));
    assert_eq!(h.job.phase, Phase::Failed);
    let err = h.job.error.clone().unwrap();
    assert!(err.contains("did not report OK within 30 min (the source's restore_timeout_minutes)"), "{err}");
    assert!(err.contains("\"Paused\"") && err.contains("may still be running"), "{err}");
}

#[test]
fn a_restore_deadline_defaults_to_six_hours_and_is_checked_as_a_field() {
    let crate::providers::ProviderConfig::Dgraph(cfg) = source(json!({})).provider else { panic!() };
    assert_eq!(cfg.restore_timeout(), std::time::Duration::from_secs(6 * 3600));
    let bad = json!([{"name": "graph", "kind": "dgraph", "schedule": "0 3 * * *",
        "endpoint": "http://127.0.0.1:9/", "api_key_secret": "K", "restore_timeout_minutes": 0}]);
    let err = Config::from_value(&bad).unwrap_err().to_string();
    assert!(err.contains("restore_timeout_minutes"), "{err}");
}

#[test]
fn account_mode_signs_in_finds_the_deployment_and_checks_confirm_against_the_manifest() {
    let backend = json!({"uid": UID, "name": "alpha"});
    let mut h = Harness::new(account(), json!({"confirm": "alpha"}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), backend.clone()));
    let login = h.request();
    assert_eq!(login.url, "http://127.0.0.1:9/cerebro/graphql");
    h.data(json!({"login": {"token": "cer-1"}}));
    let list = h.request();
    assert_eq!(list.header_value("authorization"), Some("Bearer cer-1"));
    h.data(json!({"deployments": [
        {"uid": "0x2", "name": "beta", "url": "http://127.0.0.1:9/backends/beta", "jwtToken": "jwt-b"},
        {"uid": UID, "name": "alpha", "url": "http://127.0.0.1:9/backends/alpha", "jwtToken": "jwt-a"}]}));
    let backups = h.request();
    assert_eq!(backups.url, "http://127.0.0.1:9/backends/alpha/admin/slash");
    assert_eq!(backups.header_value("x-auth-token"), Some("jwt-a"));
    h.data(series());
    let restore = h.request();
    assert_eq!(body(&restore)["variables"]["uid"], UID);
    let shown = crate::providers::redact(serde_json::to_value(&h.job).unwrap()).to_string();
    assert!(!shown.contains("jwt-a") && !shown.contains("cer-1"), "{shown}");

    // confirm names another deployment: failed after the manifest, before any call to Dgraph.
    let mut h = Harness::new(account(), json!({"confirm": "beta"}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), backend.clone()));
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(h.job.error.clone().unwrap().contains("repeat its uid or name"));
    // The deployment is gone from the account.
    let mut h = Harness::new(account(), json!({"confirm": UID}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), backend));
    h.request();
    h.data(json!({"login": {"token": "cer-1"}}));
    h.request();
    h.data(json!({"deployments": [{"uid": "0x2", "name": "beta", "url": "http://x/beta", "jwtToken": "j"}]}));
    let err = h.job.error.clone().unwrap();
    assert!(err.contains("no deployment with uid 0xf0ffe9 (it has: beta (0x2))"), "{err}");
    assert!(Harness::try_new(account(), json!({})).err().unwrap().contains("confirm"));
}

#[test]
fn acl_logs_in_first_and_again_when_the_access_token_expires() {
    let fields = json!({"user_id": "groot", "password_secret": "PW"});
    let mut h = Harness::new(fields, json!({"confirm": UID, "deployment_uid": UID}));
    h.read_manifest(manifest(t("2026-11-23T03:00:00Z"), Value::Null));
    let login = h.request();
    assert_eq!(login.url, "http://127.0.0.1:9/backends/blue/admin");
    h.data(json!({"login": {"response": {"accessJWT": "acc-1", "refreshJWT": "ref-1"}}}));
    let list = h.request();
    assert_eq!(list.header_value("x-dgraph-accesstoken"), Some("acc-1"));
    h.data(series());
    h.request();
    h.data(restored(4));
    h.request();
    h.answer(json!({"errors": [{"message": "Token is expired"}]}));
    let refresh = h.request();
    assert_eq!(body(&refresh)["variables"], json!({"refreshToken": "ref-1"}));
    h.data(json!({"login": {"response": {"accessJWT": "acc-2", "refreshJWT": "ref-2"}}}));
    let poll = h.request();
    assert_eq!(poll.header_value("x-dgraph-accesstoken"), Some("acc-2"));
    assert_eq!(body(&poll)["variables"], json!({"restoreId": 4}));
}

#[test]
fn backup_timestamps_are_read_in_dgraphs_form_and_rfc3339() {
    let a = dgraph::parse_backup_time("2021-04-15T18:00:58+0000").unwrap();
    assert_eq!(a, t("2021-04-15T18:00:58Z"));
    let b = dgraph::parse_backup_time("2021-04-15T20:00:58.5+02:00").unwrap();
    assert_eq!(b, t("2021-04-15T18:00:58.5Z"));
    assert!(dgraph::parse_backup_time("yesterday").is_none());
}
