//! DXP restore jobs (uploads), driven through the job state machine with canned answers of the
//! backup service and a virtual clock.

use std::time::Duration;

use serde_json::{json, Value};

use super::driver::{driven, Driver};
use super::dxp::{boundary, UPLOAD_INTERVAL};
use super::*;
use crate::config::{Config, SourceConfig};
use crate::http::{HttpRequest, HttpResponse};
use crate::identity::Trigger;
use crate::job::{Action, Event, Phase};
use crate::manifest::Artifact;
use crate::time::Timestamp;

const FOLDER: &str = "portal/2026-11-23T030000Z-00000000000000aa/";
const JOB: &str = "0123456789abcdef";
const OLD: &str = "dxpcloud-aaaaaaaaaaaaaaaaaa-202611230300";
const NEW: &str = "dxpcloud-bbbbbbbbbbbbbbbbbb-202611231000";

fn source() -> SourceConfig {
    let v = json!({
        "name": "portal", "kind": "dxp", "schedule": "0 3 * * *", "api_base": "http://127.0.0.1:9/",
        "user_token_secret": "TOKEN", "retry": {"max_attempts": 3, "base_ms": 1000, "max_delay_ms": 8000}
    });
    Config::from_value(&json!([v])).unwrap().sources.remove(0)
}

fn t0() -> Timestamp {
    Timestamp::parse_rfc3339("2026-11-23T10:00:00Z").unwrap()
}

fn artifact(name: &str, size: u64) -> Artifact {
    Artifact { parts: 2, ..Artifact::sample(format!("{FOLDER}{name}"), name, size, "s", "application/gzip") }
}

fn manifest(artifacts: Vec<Artifact>) -> Manifest {
    Manifest {
        source: "portal".into(),
        kind: "dxp".into(),
        job_id: JobId::new("00000000000000aa"),
        trigger: Trigger::Cron,
        started_at: t0(),
        scheduled_for: None,
        finished_at: t0(),
        provider: json!({"backup_id": OLD}),
        artifacts,
    }
}

fn both() -> Manifest {
    manifest(vec![artifact("database.gz", 7_000_000), artifact("volume.tgz", 12_000_000)])
}

fn listed(uploaded: bool) -> Value {
    let mut items = vec![json!({"backupId": OLD, "type": "Auto", "status": "success"})];
    if uploaded {
        items.push(json!({"backupId": NEW, "type": "Uploaded", "status": "success"}));
    }
    json!({ "backups": items })
}

driven!(Harness);

impl Harness {
    fn new() -> Self {
        let backup = Some(format!("{FOLDER}manifest.json"));
        Self(Driver::start(Task::Restore, source(), &json!({}), backup, &[("TOKEN", "tok")], t0()).unwrap())
    }

    fn list_request(&mut self) {
        match self.wake() {
            Action::Send(req) => {
                assert_eq!(req.url, "http://127.0.0.1:9/backup/list");
                assert_eq!(req.header_value("dxpcloud-authorization"), Some("Bearer tok"));
            }
            other => panic!("expected the backup list, got {other:?}"),
        }
    }

    fn answer(&mut self, resp: HttpResponse) -> Action {
        self.feed(Event::Response(resp))
    }

    fn upload(&mut self) -> (HttpRequest, Vec<Piece>) {
        match self.wake() {
            Action::Restore(io) => match *io {
                Io::PostPieces { request, pieces } => (request, pieces),
                other => panic!("expected the upload, got {other:?}"),
            },
            other => panic!("expected the upload, got {other:?}"),
        }
    }

    fn posted(&mut self, posted: Result<HttpResponse, String>) -> Action {
        self.feed(Event::RestoreIo(Ok(IoDone::Posted(posted))))
    }

    /// Manifest read, baseline listed: the next wake uploads.
    fn ready(&mut self, m: Manifest) {
        assert!(matches!(self.wake(), Action::Restore(io) if matches!(*io, Io::ReadManifest { .. })));
        self.feed(Event::RestoreIo(Ok(IoDone::Manifest(format!("{FOLDER}manifest.json"), Box::new(m)))));
        self.list_request();
        self.answer(HttpResponse::json(200, &listed(false)));
    }

    fn uploads_sent(&self) -> Option<Timestamp> {
        match self.job.restore_state() {
            Some(RestoreState::Dxp(s)) => s.last_upload_at,
            _ => None,
        }
    }
}

#[test]
fn plan_needs_no_confirm_and_refuses_drills_targets_and_other_modes() {
    let src = source();
    let key = Some(format!("{FOLDER}manifest.json"));
    assert!(plan(Task::Restore, &src, &json!({}), key.clone()).is_ok());
    assert!(plan(Task::Restore, &src, &json!({"mode": "upload"}), key.clone()).is_ok());
    let e = plan(Task::Restore, &src, &json!({"mode": "overwrite"}), key.clone()).unwrap_err();
    assert!(e.contains("upload"), "{e}");
    let e = plan(Task::Restore, &src, &json!({"target": {"database_id": "x"}}), key).unwrap_err();
    assert!(e.contains("no \"target\""), "{e}");
    let e = plan(Task::Drill, &src, &json!({}), None).unwrap_err();
    assert!(e.contains("no restore drill"), "{e}");
    assert!(plan(Task::Restore, &src, &json!({}), None).is_err());
}

#[test]
fn the_archives_are_uploaded_as_one_multipart_body_of_known_length_and_the_new_backup_is_confirmed() {
    let mut h = Harness::new();
    h.ready(both());
    let (req, pieces) = h.upload();
    assert_eq!(req.url, "http://127.0.0.1:9/backup/upload");
    assert_eq!(req.header_value("dxpcloud-authorization"), Some("Bearer tok"));
    let b = boundary(&JobId::new(JOB));
    assert!(b.len() >= 40 && b.contains(JOB), "{b}");
    assert_eq!(req.header_value("content-type"), Some(format!("multipart/form-data; boundary={b}").as_str()));
    assert!(req.body.is_none(), "the body is streamed from R2");
    let head = |field: &str, file: &str| {
        format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{file}\"\r\n\
             Content-Type: application/gzip\r\n\r\n"
        )
    };
    assert_eq!(
        pieces,
        vec![
            Piece::Text(head("database", "database.gz")),
            Piece::Object { key: format!("{FOLDER}database.gz"), size: 7_000_000 },
            Piece::Text(format!("\r\n{}", head("volume", "volume.tgz"))),
            Piece::Object { key: format!("{FOLDER}volume.tgz"), size: 12_000_000 },
            Piece::Text(format!("\r\n--{b}--\r\n")),
        ]
    );
    let texts: u64 = pieces.iter().filter(|p| matches!(p, Piece::Text(_))).map(Piece::length).sum();
    assert_eq!(pieces.iter().map(Piece::length).sum::<u64>(), 19_000_000 + texts);
    h.posted(Ok(HttpResponse::json(200, &json!({"backupId": NEW, "type": "Uploaded"}))));
    h.list_request();
    h.answer(HttpResponse::json(200, &listed(true)));
    assert!(matches!(h.wake(), Action::Done));
    assert_eq!(h.job.phase, Phase::Restored);
    let note = h.job.note.clone().unwrap();
    assert!(note.contains(NEW) && note.contains("Restore to") && note.contains("Admin"), "{note}");
    assert!(note.contains("nothing was overwritten"), "{note}");
}

#[test]
fn a_backup_without_a_volume_fails_naming_it_before_anything_is_sent() {
    let mut h = Harness::new();
    h.wake();
    h.feed(Event::RestoreIo(Ok(IoDone::Manifest(
        format!("{FOLDER}manifest.json"),
        Box::new(manifest(vec![artifact("database.gz", 10)])),
    ))));
    assert_eq!(h.job.phase, Phase::Failed);
    let error = h.job.error.clone().unwrap_or_default();
    assert!(error.contains("volume archive (volume.tgz)") && error.contains("nothing was uploaded"), "{error}");
    assert!(!error.contains("database archive"), "{error}");
}

#[test]
fn a_429_is_waited_out_by_its_retry_after_and_the_upload_sent_again() {
    let mut h = Harness::new();
    h.ready(both());
    h.upload();
    let at = h.now;
    let resp = HttpResponse::json(429, &json!({"message": "Only one backup upload is allowed per minute"}))
        .with_header("retry-after", "42");
    assert!(matches!(h.posted(Ok(resp)), Action::Sleep(t) if t == at.plus(Duration::from_secs(42))));
    assert_eq!(h.job.retries, 0, "a 429 is not a failed try");
    assert_eq!(h.uploads_sent(), None, "a refused upload was not taken");
    h.list_request();
    h.answer(HttpResponse::json(200, &listed(false)));
    h.upload();
    h.posted(Ok(HttpResponse::json(200, &json!({}))));
    h.list_request();
    h.answer(HttpResponse::json(200, &listed(true)));
    h.wake();
    assert_eq!(h.job.phase, Phase::Restored, "{:?}", h.job.last_error);
    assert!(h.job.note.clone().unwrap().contains(NEW));
}

#[test]
fn endless_429s_fail_the_job_with_the_services_words() {
    let mut h = Harness::new();
    h.ready(both());
    for _ in 0..=dxp::MAX_THROTTLED {
        h.upload();
        h.posted(Ok(HttpResponse::json(429, &json!({"message": "busy restoring"})).with_header("retry-after", "5")));
        if h.job.phase == Phase::Failed {
            break;
        }
        h.list_request();
        h.answer(HttpResponse::json(200, &listed(false)));
    }
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(h.job.error.clone().unwrap().contains("busy restoring"));
}

#[test]
fn a_lost_answer_is_looked_for_in_the_list_and_not_uploaded_twice() {
    let mut h = Harness::new();
    h.ready(both());
    h.upload();
    h.posted(Err("the upload got no answer within 14 min".into()));
    assert_eq!(h.job.phase, Phase::Restoring);
    h.list_request();
    h.answer(HttpResponse::json(200, &listed(true)));
    assert!(matches!(h.wake(), Action::Done));
    assert_eq!(h.job.phase, Phase::Restored);
    let note = h.job.note.clone().unwrap();
    assert!(note.contains(NEW) && note.contains("not uploaded again"), "{note}");
}

#[test]
fn a_lost_answer_not_yet_listed_waits_out_the_minute_before_uploading_again() {
    let mut h = Harness::new();
    h.ready(both());
    h.upload();
    let started = h.now;
    h.posted(Ok(HttpResponse::json(502, &json!({"message": "Bad gateway"}))));
    h.list_request();
    let action = h.answer(HttpResponse::json(200, &listed(false)));
    assert!(matches!(action, Action::Sleep(t) if t == started.plus(UPLOAD_INTERVAL)), "{action:?}");
    h.list_request();
    assert!(h.now >= started.plus(UPLOAD_INTERVAL));
    h.answer(HttpResponse::json(200, &listed(false)));
    h.upload();
    assert!(h.now.since(started) >= UPLOAD_INTERVAL, "never two uploads within a minute");
}

#[test]
fn a_lost_answer_without_a_list_to_check_fails_rather_than_uploading_twice() {
    let mut h = Harness::new();
    h.ready(both());
    h.upload();
    h.posted(Err("connection reset".into()));
    h.list_request();
    h.answer(HttpResponse::json(404, &json!({"message": "Not found"})));
    assert_eq!(h.job.phase, Phase::Failed);
    let error = h.job.error.clone().unwrap();
    assert!(error.contains("may have taken it") && error.contains("GET /backup/list"), "{error}");
}

#[test]
fn without_a_list_the_upload_still_goes_and_the_note_says_it_is_unconfirmed() {
    let mut h = Harness::new();
    h.wake();
    h.feed(Event::RestoreIo(Ok(IoDone::Manifest(format!("{FOLDER}manifest.json"), Box::new(both())))));
    h.list_request();
    h.answer(HttpResponse::json(404, &json!({"message": "use the lcp CLI"})));
    h.upload();
    h.posted(Ok(HttpResponse::json(200, &json!({}))));
    h.list_request();
    h.answer(HttpResponse::json(404, &json!({"message": "use the lcp CLI"})));
    h.wake();
    assert_eq!(h.job.phase, Phase::Restored);
    let note = h.job.note.clone().unwrap();
    assert!(note.contains("unavailable") && note.contains("use the lcp CLI"), "{note}");
}

#[test]
fn a_refused_upload_fails_the_job_with_the_services_message() {
    let mut h = Harness::new();
    h.ready(both());
    h.upload();
    h.posted(Ok(HttpResponse::json(
        400,
        &json!({"message": "Project does not have GCS enabled for Document Library Store."}),
    )));
    assert_eq!(h.job.phase, Phase::Failed);
    let error = h.job.error.clone().unwrap();
    assert!(error.contains("HTTP 400") && error.contains("GCS enabled"), "{error}");
}

#[test]
fn an_upload_interrupted_by_a_reset_is_looked_for_before_it_is_sent_again() {
    let mut h = Harness::new();
    h.ready(both());
    h.upload();
    // The isolate died mid-upload: no answer was fed; the watchdog wakes the job 15 s later.
    h.now = h.now.plus(Duration::from_secs(15));
    h.list_request();
    h.answer(HttpResponse::json(200, &listed(true)));
    h.wake();
    assert_eq!(h.job.phase, Phase::Restored);
}

#[test]
fn an_expired_user_token_fails_the_restore_naming_the_secret_as_a_backup_does() {
    let expired = || HttpResponse::json(401, &json!({"message": "Token expired"}));
    // At the listing before the upload.
    let mut h = Harness::new();
    assert!(matches!(h.wake(), Action::Restore(io) if matches!(*io, Io::ReadManifest { .. })));
    h.feed(Event::RestoreIo(Ok(IoDone::Manifest(format!("{FOLDER}manifest.json"), Box::new(both())))));
    h.list_request();
    h.answer(expired());
    assert_eq!(h.job.phase, Phase::Failed);
    let listing = h.job.error.clone().unwrap();
    let backup = crate::providers::dxp::credentials_refused(
        match &source().provider {
            crate::providers::ProviderConfig::Dxp(cfg) => cfg.auth(),
            _ => None,
        },
        &expired(),
    );
    assert!(listing.contains(backup.message()), "the backup path's words: {listing}");
    assert!(
        listing.contains("user token in the Worker secret TOKEN has expired (HTTP 401: Token expired)"),
        "{listing}"
    );
    // At the upload itself.
    let mut h = Harness::new();
    h.ready(both());
    h.upload();
    h.posted(Ok(HttpResponse::json(401, &json!({"message": "Unauthorized"}))));
    assert_eq!(h.job.phase, Phase::Failed);
    let upload = h.job.error.clone().unwrap();
    assert!(upload.contains("user token in the Worker secret TOKEN was refused (it may have expired"), "{upload}");
    assert!(upload.contains("wrangler secret put TOKEN"), "{upload}");
}
