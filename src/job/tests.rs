//! Exhaustive tests of the job state machine, driven by a virtual clock and canned D1 answers.

use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::config::Config;
use crate::providers::Download;
use crate::secret::Secret;

fn source(extra: Value) -> SourceConfig {
    let mut v = json!({
        "name": "app-db", "kind": "d1", "schedule": "0 3 * * *", "account_id": "acc",
        "database_id": "db-1", "token_secret": "D1_TOKEN", "api_base": "http://127.0.0.1:9/client/v4",
        "retry": {"max_attempts": 3, "base_ms": 1000, "max_delay_ms": 8000}
    });
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    Config::from_value(&json!([v])).unwrap().sources.remove(0)
}

fn creds() -> Credentials {
    let mut c = Credentials::new();
    c.insert("D1_TOKEN", Secret::new("tok"));
    c
}

fn t0() -> Timestamp {
    Timestamp::parse_rfc3339("2026-11-23T10:00:00Z").unwrap()
}

/// A job plus a virtual clock, stepped like the runtime steps it.
struct Harness {
    job: Job,
    src: SourceConfig,
    creds: Credentials,
    now: Timestamp,
    jitter: f64,
}

impl Harness {
    fn new(src: SourceConfig) -> Self {
        let mut job =
            Job::new(JobId::new("0123456789abcdef"), &src, Trigger::Webhook, Some("msg_1".into()), None, t0());
        if let ProviderState::D1(state) = &mut job.export_mut().provider {
            // Schema read, nothing to scan: the export call is next (the inspection before it is
            // tested in `providers::d1`).
            let plan =
                crate::providers::d1::query::QueryPlan { export: true, schema: true, data: true, ..Default::default() };
            state.plan = Some(plan);
        }
        Self { job, src, creds: creds(), now: t0(), jitter: 0.0 }
    }

    fn d1() -> Self {
        Self::new(source(json!({})))
    }

    fn feed(&mut self, event: Event) -> Action {
        let cx = Context { now: self.now, jitter: self.jitter, source: &self.src, creds: &self.creds, seen: &[] };
        let (job, action) = self.job.clone().handle(event, &cx);
        self.job = job;
        action
    }

    fn advance(&mut self, d: Duration) {
        self.now = self.now.plus(d);
    }

    /// Sleeps until the job's next step and wakes it.
    fn wake_when_due(&mut self) -> Action {
        if let Some(at) = self.job.next_step_at {
            if at > self.now {
                self.now = at;
            }
        }
        self.feed(Event::Wake)
    }
}

fn d1_active() -> HttpResponse {
    HttpResponse::json(
        202,
        &json!({"success": true, "result": {"success": true, "type": "export", "at_bookmark": "bm-1", "status": "active", "messages": ["Generating db-1-bm-1.sql"]}}),
    )
}

fn d1_complete() -> HttpResponse {
    HttpResponse::json(
        200,
        &json!({"success": true, "result": {"success": true, "type": "export", "at_bookmark": "bm-1", "status": "complete", "messages": [],
        "result": {"filename": "db-1-bm-1.sql", "signed_url": "http://127.0.0.1:9/__signed/abc/db-1-bm-1.sql"}}}),
    )
}

fn d1_error(msg: &str) -> HttpResponse {
    HttpResponse::json(
        200,
        &json!({"success": true, "result": {"success": true, "at_bookmark": "bm-1", "status": "error", "error": msg, "messages": []}}),
    )
}

fn artifact(key: &str) -> Artifact {
    Artifact::sample(key, "db-1-bm-1.sql", 42, "00".repeat(32), "application/sql")
}

/// The runtime's answer when the ordered slice stored the whole file.
fn copied(order: &SliceOrder) -> Event {
    Event::Sliced { state: order.state.clone(), outcome: SliceOutcome::Finished(artifact(&order.state.key)) }
}

/// The runtime's answer when the slice in flight failed without storing a part.
fn slice_failed(h: &Harness, err: StepError) -> Event {
    Event::Sliced { state: h.job.copy().cloned().expect("a copy in flight"), outcome: SliceOutcome::Failed(err) }
}

fn expect_send(a: Action) -> HttpRequest {
    match a {
        Action::Send(r) => r,
        other => panic!("expected Send, got {other:?}"),
    }
}

fn expect_copy(a: Action) -> SliceOrder {
    match a {
        Action::CopySlice(c) => *c,
        other => panic!("expected Copy, got {other:?}"),
    }
}

/// Drives a D1 job from queued up to its copy order.
fn to_copy(h: &mut Harness) -> SliceOrder {
    let start = expect_send(h.wake_when_due());
    assert!(start.header_value("authorization").is_some());
    assert_eq!(h.feed(Event::Response(d1_active())), Action::Sleep(h.now.plus(Duration::from_secs(1))));
    expect_send(h.wake_when_due());
    assert_eq!(h.feed(Event::Response(d1_complete())), Action::Sleep(h.now));
    assert_eq!(h.job.phase, Phase::Transferring);
    expect_copy(h.wake_when_due())
}

#[test]
fn d1_job_runs_queued_exporting_transferring_committed() {
    let mut h = Harness::d1();
    assert_eq!(h.job.phase, Phase::Queued);
    let start = expect_send(h.wake_when_due());
    assert_eq!(h.job.phase, Phase::Exporting);
    let body: Value = serde_json::from_slice(start.body.as_deref().unwrap()).unwrap();
    assert!(body.get("current_bookmark").is_none());

    h.feed(Event::Response(d1_active()));
    let poll = expect_send(h.wake_when_due());
    let body: Value = serde_json::from_slice(poll.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["current_bookmark"], "bm-1");

    h.feed(Event::Response(d1_complete()));
    let order = expect_copy(h.wake_when_due());
    assert_eq!(order.state.key, "app-db/2026-11-23T100000Z-0123456789abcdef/db-1-bm-1.sql");
    let CopySource::Http(request) = &order.source else { panic!("expected a download") };
    assert_eq!(request.url, "http://127.0.0.1:9/__signed/abc/db-1-bm-1.sql");
    assert!(request.header_value("authorization").is_none(), "signed URLs take no auth");
    assert_eq!(order.settings.part_size, crate::config::DEFAULT_PART_SIZE);

    h.advance(Duration::from_secs(3));
    assert_eq!(h.feed(copied(&order)), Action::Sleep(h.now));
    let Action::Commit { key, manifest } = h.wake_when_due() else { panic!("expected commit") };
    assert_eq!(key, "app-db/2026-11-23T100000Z-0123456789abcdef/manifest.json");
    assert_eq!(manifest.source, "app-db");
    assert_eq!(manifest.kind, "d1");
    assert_eq!(manifest.trigger, Trigger::Webhook);
    assert_eq!(manifest.started_at, t0());
    assert_eq!(manifest.finished_at, h.now);
    assert_eq!(manifest.provider["at_bookmark"], "bm-1");
    assert_eq!(manifest.artifacts, vec![artifact(&order.state.key)]);

    assert_eq!(h.feed(Event::Committed), Action::Done);
    assert_eq!(h.job.phase, Phase::Committed);
    assert_eq!(h.job.finished_at, Some(h.now));
    assert_eq!(h.job.next_step_at, None);
    assert_eq!(h.job.attempts, 4, "start, poll, copy, commit");
    assert_eq!(h.feed(Event::Wake), Action::Done, "a committed job ignores further alarms");
}

#[test]
fn early_wake_sleeps_until_the_step_is_due() {
    let mut h = Harness::d1();
    expect_send(h.wake_when_due());
    let Action::Sleep(at) = h.feed(Event::Response(d1_active())) else { panic!() };
    assert_eq!(h.feed(Event::Wake), Action::Sleep(at));
    assert_eq!(h.job.attempts, 1, "nothing was sent");
}

#[test]
fn poll_interval_comes_from_the_source() {
    let mut h = Harness::new(source(json!({"poll_interval_ms": 250})));
    expect_send(h.wake_when_due());
    assert_eq!(h.feed(Event::Response(d1_active())), Action::Sleep(t0().plus(Duration::from_millis(250))));
}

#[test]
fn transient_failures_back_off_within_bounds_and_reset_on_success() {
    let mut h = Harness::d1();
    h.jitter = 0.5;
    expect_send(h.wake_when_due());
    let e503 = HttpResponse::json(503, &json!({"success": false, "errors": [{"code": 1, "message": "busy"}]}));
    let mut previous = Duration::ZERO;
    for retry in 1..=3u32 {
        let before = h.now;
        let Action::Sleep(at) = h.feed(Event::Response(e503.clone())) else { panic!() };
        let delay = at.since(before);
        let full = Duration::from_secs(1 << (retry - 1)).min(Duration::from_secs(8));
        assert!(delay >= full / 2 && delay <= full, "retry {retry}: {delay:?}");
        assert!(delay > previous);
        previous = delay;
        assert_eq!(h.job.retries, retry);
        assert_eq!(h.job.last_error.as_deref(), Some("D1 API error (HTTP 503): 1: busy"));
        assert_eq!(h.job.phase, Phase::Exporting);
        expect_send(h.wake_when_due());
    }
    h.feed(Event::Response(d1_active()));
    assert_eq!(h.job.retries, 0);
    assert_eq!(h.job.last_error, None);
}

#[test]
fn retries_give_up_after_max_attempts_with_the_last_message() {
    let mut h = Harness::d1();
    for _ in 0..3 {
        expect_send(h.wake_when_due());
        assert!(matches!(h.feed(Event::Unreachable("connection refused".into())), Action::Sleep(_)));
    }
    expect_send(h.wake_when_due());
    assert_eq!(h.feed(Event::Unreachable("connection refused".into())), Action::Done);
    assert_eq!(h.job.phase, Phase::Failed);
    assert_eq!(h.job.error.as_deref(), Some("connection refused (gave up after 4 tries)"));
}

#[test]
fn rate_limit_waits_for_retry_after() {
    let mut h = Harness::d1();
    expect_send(h.wake_when_due());
    let limited =
        HttpResponse::json(429, &json!({"success": false, "errors": [{"code": 971, "message": "slow down"}]}))
            .with_header("retry-after", "30");
    assert_eq!(h.feed(Event::Response(limited)), Action::Sleep(t0().plus(Duration::from_secs(30))));
}

#[test]
fn permanent_error_fails_at_once_with_the_providers_message() {
    let mut h = Harness::d1();
    expect_send(h.wake_when_due());
    let denied = HttpResponse::json(
        403,
        &json!({"success": false, "errors": [{"code": 10000, "message": "Authentication error"}]}),
    );
    assert_eq!(h.feed(Event::Response(denied)), Action::Done);
    assert_eq!(h.job.phase, Phase::Failed);
    assert_eq!(h.job.error.as_deref(), Some("D1 API error (HTTP 403): 10000: Authentication error"));
    assert_eq!(h.job.finished_at, Some(h.now));
}

#[test]
fn export_error_status_fails_with_d1_error() {
    let mut h = Harness::d1();
    expect_send(h.wake_when_due());
    h.feed(Event::Response(d1_active()));
    expect_send(h.wake_when_due());
    assert_eq!(h.feed(Event::Response(d1_error("disk on fire"))), Action::Done);
    assert_eq!(h.job.phase, Phase::Failed);
    let err = h.job.error.clone().unwrap();
    assert!(err.starts_with("D1 export failed: disk on fire"), "{err}");
    assert!(err.contains("Generating db-1-bm-1.sql"), "D1's messages are kept: {err}");
}

#[test]
fn missing_secret_fails_naming_it() {
    let mut h = Harness::d1();
    h.creds = Credentials::new();
    assert_eq!(h.wake_when_due(), Action::Done);
    assert_eq!(h.job.error.as_deref(), Some("the Worker secret D1_TOKEN is not set (wrangler secret put D1_TOKEN)"));
    assert_eq!(h.job.attempts, 0, "nothing was sent");
}

#[test]
fn export_that_outlives_its_timeout_fails() {
    let mut h = Harness::new(source(json!({"export_timeout_minutes": 1})));
    expect_send(h.wake_when_due());
    for _ in 0..59 {
        h.feed(Event::Response(d1_active()));
        expect_send(h.wake_when_due());
    }
    h.feed(Event::Response(d1_active()));
    h.advance(Duration::from_secs(5));
    assert_eq!(h.wake_when_due(), Action::Done);
    assert_eq!(h.job.error.as_deref(), Some("the export did not finish within 1 min"));
}

#[test]
fn copy_failures_retry_then_fail_and_discard_the_folder() {
    let mut h = Harness::d1();
    to_copy(&mut h);
    assert!(matches!(h.feed(slice_failed(&h, StepError::transient("reset by peer"))), Action::Sleep(_)));
    expect_copy(h.wake_when_due());
    let mut state = h.job.copy().cloned().unwrap();
    state.upload_id = Some("upload-1".into());
    let key = state.key.clone();
    assert_eq!(
        h.feed(Event::Sliced {
            state,
            outcome: SliceOutcome::Failed(StepError::permanent("signed URL refused (HTTP 403)"))
        }),
        Action::Discard {
            folder: "app-db/2026-11-23T100000Z-0123456789abcdef/".into(),
            upload: Some((key, "upload-1".into()))
        }
    );
    assert_eq!(h.job.phase, Phase::Failed);
    assert_eq!(h.job.error.as_deref(), Some("signed URL refused (HTTP 403)"));
    assert!(h.job.export().downloads.is_empty());
}

#[test]
fn failure_after_some_files_landed_discards_them() {
    let mut h = Harness::d1();
    let order = to_copy(&mut h);
    // Pretend the provider produced two files.
    h.job.export_mut().downloads.push(Download::url("http://x/2", "second.gz", "application/gzip", false));
    h.feed(copied(&order));
    let second = expect_copy(h.wake_when_due());
    assert!(second.state.key.ends_with("/second.gz"));
    let folder = h.job.folder();
    assert!(order.state.key.starts_with(&folder));
    assert_eq!(h.feed(slice_failed(&h, StepError::permanent("gone"))), Action::Discard { folder, upload: None });
    assert!(h.job.artifacts().is_empty(), "a failed job lists no artifacts");
}

#[test]
fn same_filenames_get_distinct_keys() {
    let mut h = Harness::d1();
    let order = to_copy(&mut h);
    h.job.export_mut().downloads.push(Download::url("http://x/2", "db-1-bm-1.sql", "application/sql", false));
    h.feed(copied(&order));
    let second = expect_copy(h.wake_when_due());
    assert_ne!(second.state.key, order.state.key);
    assert!(second.state.key.ends_with("/2-db-1-bm-1.sql"), "{}", second.state.key);
}

#[test]
fn commit_failures_are_retried() {
    let mut h = Harness::d1();
    let order = to_copy(&mut h);
    h.feed(copied(&order));
    assert!(matches!(h.wake_when_due(), Action::Commit { .. }));
    assert!(matches!(h.feed(Event::CommitFailed("R2 said 500".into())), Action::Sleep(_)));
    assert_eq!(h.job.phase, Phase::Transferring);
    assert!(matches!(h.wake_when_due(), Action::Commit { .. }));
    assert_eq!(h.feed(Event::Committed), Action::Done);
    assert_eq!(h.job.phase, Phase::Committed);
}

#[test]
fn events_that_do_not_fit_the_phase_are_ignored() {
    let mut h = Harness::d1();
    // A copy result while exporting (a duplicate from before a restart) changes nothing.
    expect_send(h.wake_when_due());
    let before = h.job.clone();
    let stray = crate::transfer::CopyState::new("x".into(), 0, t0());
    let finished = SliceOutcome::Finished(artifact("x"));
    assert!(matches!(h.feed(Event::Sliced { state: stray, outcome: finished }), Action::Sleep(_)));
    assert_eq!(h.job.artifacts(), before.artifacts());
    assert!(matches!(h.feed(Event::Committed), Action::Sleep(_)));
    assert_eq!(h.job.phase, Phase::Exporting);
    // A response after the job failed is ignored too.
    h.feed(Event::Response(d1_error("x")));
    assert_eq!(h.feed(Event::Response(d1_complete())), Action::Done);
    assert_eq!(h.job.phase, Phase::Failed);
}

#[test]
fn d1_export_resumes_after_restart() {
    // Persist the job mid-export, "restart" by reloading it from JSON, and finish from there.
    let mut h = Harness::d1();
    expect_send(h.wake_when_due());
    h.feed(Event::Response(d1_active()));
    let stored = serde_json::to_string(&h.job).unwrap();
    h.job = serde_json::from_str(&stored).unwrap();
    h.advance(Duration::from_secs(20));
    let poll = expect_send(h.wake_when_due());
    let body: Value = serde_json::from_slice(poll.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["current_bookmark"], "bm-1", "resumes the same export task");
    h.feed(Event::Response(d1_complete()));
    // Restart again mid-transfer: the next slice resumes the same copy, counted as one more.
    let order = expect_copy(h.wake_when_due());
    h.job = serde_json::from_str(&serde_json::to_string(&h.job).unwrap()).unwrap();
    let again = expect_copy(h.wake_when_due());
    assert_eq!(again.state.key, order.state.key);
    assert_eq!((again.state.slices, again.state.stalled), (2, 2));
    h.feed(copied(&order));
    assert!(matches!(h.wake_when_due(), Action::Commit { .. }));
    h.feed(Event::Committed);
    assert_eq!(h.job.phase, Phase::Committed);
}

#[test]
fn public_json_hides_signed_urls() {
    let mut h = Harness::d1();
    to_copy(&mut h);
    let shown = h.job.public_json().to_string();
    assert!(!shown.contains("__signed"), "{shown}");
    assert!(shown.contains("db-1-bm-1.sql"));
    // The D1 token travels only in requests, whose Debug output redacts it.
    let mut h = Harness::d1();
    let start = expect_send(h.wake_when_due());
    assert_eq!(start.header_value("authorization"), Some("Bearer tok"));
    assert!(!format!("{start:?}").contains("Bearer tok"), "{start:?}");
    assert!(!serde_json::to_string(&h.job).unwrap().contains("Bearer tok"), "the job never stores the token");
}

#[test]
fn job_ids_parse_strictly() {
    assert_eq!(JobId::from_random([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]).as_str(), "0123456789abcdef");
    assert!(JobId::parse("0123456789abcdef").is_some());
    for bad in ["", "0123456789ABCDEF", "0123456789abcde", "../../etc/passwd", "0123456789abcdeg"] {
        assert!(JobId::parse(bad).is_none(), "{bad}");
    }
}

#[test]
fn phases_serialize_as_documented() {
    let names: Vec<String> = [
        Phase::Queued,
        Phase::Exporting,
        Phase::Transferring,
        Phase::Committed,
        Phase::Failed,
        Phase::Skipped,
        Phase::Dispatched,
    ]
    .iter()
    .map(|p| serde_json::to_value(p).unwrap().as_str().unwrap().to_string())
    .collect();
    assert_eq!(names, ["queued", "exporting", "transferring", "committed", "failed", "skipped", "dispatched"]);
    assert_eq!(serde_json::to_value(Trigger::Cron).unwrap(), "cron");
    assert_eq!(serde_json::to_value(Trigger::Api).unwrap(), "api");
}

#[test]
fn a_copy_cut_off_again_and_again_fails_within_the_watchdog_and_frees_the_source() {
    // Each wake orders a slice whose invocation dies: no Sliced event ever comes back.
    let mut h = Harness::new(source(json!({"max_stalled_slices": 4})));
    to_copy(&mut h);
    h.job.copying_for_test().copy.as_mut().unwrap().upload_id = Some("u-9".into());
    let mut wakes = 1;
    let action = loop {
        h.advance(Duration::from_secs(15));
        match h.feed(Event::Wake) {
            Action::CopySlice(_) => wakes += 1,
            other => break other,
        }
        assert!(wakes < 10_000, "the watchdog never fired");
    };
    assert_eq!(wakes, 4, "four slices without a part, then the job fails");
    let Action::Discard { folder, upload } = action else { panic!("expected discard, got {action:?}") };
    assert_eq!(folder, h.job.folder());
    assert_eq!(upload.map(|u| u.1).as_deref(), Some("u-9"), "the open upload is aborted");
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(h.job.error.as_deref().unwrap().contains("no progress in 4 consecutive slices"), "{:?}", h.job.error);
    assert!(h.job.attempts < 10, "attempts stay bounded: {}", h.job.attempts);
}

#[test]
fn slices_that_store_parts_keep_the_copy_alive() {
    let mut h = Harness::new(source(json!({"max_stalled_slices": 2})));
    let mut order = to_copy(&mut h);
    for n in 1..=10u16 {
        // The runtime stored one part in this slice, then paused at its budget.
        let mut state = order.state.clone();
        let hash = state.hash_state.clone();
        state.record_part(
            &crate::transfer::PartRecord { number: n, etag: format!("e{n}"), size: 5 << 20, sha256: String::new() },
            hash,
        );
        assert_eq!(h.feed(Event::Sliced { state, outcome: SliceOutcome::Paused }), Action::Sleep(h.now));
        order = expect_copy(h.wake_when_due());
        assert_eq!(order.state.parts_stored, u32::from(n));
        assert_eq!(order.state.stalled, 1);
    }
    assert_eq!(h.job.phase, Phase::Transferring);
}

#[test]
fn too_many_restarts_from_zero_fail_the_job() {
    let mut h = Harness::d1();
    to_copy(&mut h);
    let mut state = h.job.copy().cloned().unwrap();
    for _ in 0..4 {
        state.restart("the source object changed: its ETag changed".into());
    }
    state.stalled = 0;
    h.feed(Event::Sliced { state, outcome: SliceOutcome::Paused });
    assert!(matches!(h.wake_when_due(), Action::Discard { .. }));
    let error = h.job.error.clone().unwrap();
    assert!(error.contains("restart from zero more than 3 times") && error.contains("ETag changed"), "{error}");
}

#[test]
fn copying_past_copy_timeout_fails() {
    let mut h = Harness::new(source(json!({"copy_timeout_minutes": 10})));
    let order = to_copy(&mut h);
    h.advance(Duration::from_secs(11 * 60));
    let state = order.state.clone();
    h.feed(Event::Sliced { state, outcome: SliceOutcome::Paused });
    assert!(matches!(h.wake_when_due(), Action::Discard { .. }));
    assert!(h.job.error.as_deref().unwrap().contains("within 10 min"), "{:?}", h.job.error);
}

#[test]
fn a_restart_from_zero_is_recorded_on_the_job() {
    let mut h = Harness::d1();
    let order = to_copy(&mut h);
    let mut state = order.state.clone();
    state.restart("the source ignored the range request for bytes from 5242880".into());
    h.feed(Event::Sliced { state: state.clone(), outcome: SliceOutcome::Paused });
    assert_eq!(h.job.copying().unwrap().restarts.len(), 1);
    assert!(
        h.job.copying().unwrap().restarts[0].starts_with("db-1-bm-1.sql: restarted from byte 0"),
        "{:?}",
        h.job.copying().unwrap().restarts
    );
    assert!(h.job.copying().unwrap().restarts[0].contains("ignored the range"));
    h.feed(Event::Sliced { state, outcome: SliceOutcome::Finished(artifact("k")) });
    assert_eq!(h.job.copying().unwrap().restarts.len(), 1, "the same restart is not counted twice");
}

fn verify_job(manifest_key: Option<&str>) -> Harness {
    let mut h = Harness::d1();
    h.job = h.job.clone().verify_of(manifest_key.map(str::to_string));
    h
}

#[test]
fn a_verify_job_reads_in_slices_then_records_ok_and_ends_verified() {
    let mut h = verify_job(Some("app-db/f/manifest.json"));
    let Action::VerifySlice { state, .. } = h.wake_when_due() else { panic!("expected a verify slice") };
    assert_eq!(h.job.phase, Phase::Verifying);
    assert_eq!(state.manifest_key.as_deref(), Some("app-db/f/manifest.json"));
    // The runtime read the manifest and one file, in two slices.
    let mut state = *state;
    let m = crate::manifest::Manifest {
        source: "app-db".into(),
        kind: "d1".into(),
        job_id: JobId::new("0123456789abcdef"),
        trigger: Trigger::Cron,
        started_at: t0(),
        scheduled_for: None,
        finished_at: t0(),
        provider: json!({}),
        artifacts: vec![artifact("app-db/f/x.sql")],
    };
    state.resolve("app-db/f/manifest.json".into(), &m);
    assert_eq!(h.feed(Event::VerifySliced { state: state.clone(), outcome: Ok(false) }), Action::Sleep(h.now));
    let Action::VerifySlice { state: again, .. } = h.wake_when_due() else { panic!("expected a second slice") };
    assert_eq!(again.slices, 2);
    let mut done = *again;
    done.index = 1;
    h.feed(Event::VerifySliced { state: done, outcome: Ok(true) });
    let Action::RecordVerification { key, record } = h.wake_when_due() else { panic!("expected the record") };
    assert_eq!(key, "app-db/f/verification.json");
    assert_eq!(record.outcome, "ok");
    assert_eq!(h.feed(Event::Recorded), Action::Done);
    assert_eq!(h.job.phase, Phase::Verified);
    assert_eq!(h.job.verification().map(|v| v.outcome.as_str()), Some("ok"));
    let shown = h.job.public_json();
    assert_eq!(shown["task"], "verify");
    assert_eq!(shown["verify"]["manifest_key"], "app-db/f/manifest.json");
}

#[test]
fn a_verify_mismatch_fails_the_job_naming_the_key_and_discards_nothing() {
    let mut h = verify_job(None);
    let Action::VerifySlice { state, .. } = h.wake_when_due() else { panic!() };
    let mut state = *state;
    state.manifest_key = Some("app-db/f/manifest.json".into());
    state.resolved = true;
    state.mismatches.push("app-db/f/x.sql: SHA-256 is 00, the manifest says 11".into());
    h.feed(Event::VerifySliced { state, outcome: Ok(true) });
    assert!(matches!(h.wake_when_due(), Action::RecordVerification { .. }));
    assert_eq!(h.feed(Event::Recorded), Action::Done, "a failed verification deletes nothing");
    assert_eq!(h.job.phase, Phase::Failed);
    let error = h.job.error.clone().unwrap();
    assert!(error.contains("app-db/f/") && error.contains("app-db/f/x.sql: SHA-256 is 00"), "{error}");
}

#[test]
fn jobs_stored_before_tasks_existed_are_exports() {
    let h = Harness::d1();
    let mut v = serde_json::to_value(&h.job).unwrap();
    v.as_object_mut().unwrap().remove("task");
    let job: Job = serde_json::from_value(v).unwrap();
    assert_eq!(job.task(), Task::Export);
    let round: Job = serde_json::from_str(&serde_json::to_string(&verify_job(Some("k")).job).unwrap()).unwrap();
    assert_eq!(round.task(), Task::Verify);
    assert_eq!(round.verify_state().unwrap().manifest_key.as_deref(), Some("k"));
}

/// The keys of a job's stored record.
fn keys(job: &Job) -> Vec<String> {
    serde_json::to_value(job).unwrap().as_object().unwrap().keys().cloned().collect()
}

#[test]
fn each_task_stores_only_its_own_state_flat_next_to_the_envelope() {
    let export = Harness::d1().job;
    let verify = verify_job(Some("k")).job;
    let drill = Harness::d1().job.planned(Task::Drill, Err("no drill target".into()));
    let envelope = ["id", "source", "kind", "trigger", "phase", "started_at", "updated_at", "attempts", "retries"];
    for job in [&export, &verify, &drill] {
        let keys = keys(job);
        for field in envelope.iter().chain(["task"].iter()) {
            assert!(keys.contains(&field.to_string()), "{:?} lacks {field}: {keys:?}", job.task());
        }
    }
    let v = serde_json::to_value(&export).unwrap();
    assert_eq!(v["task"], "export");
    for field in ["provider", "downloads", "artifacts"] {
        assert!(v.get(field).is_some(), "an export stores {field}");
    }
    let v = serde_json::to_value(&verify).unwrap();
    assert_eq!(v["task"], "verify");
    assert_eq!(v["verify"]["manifest_key"], "k");
    for field in ["provider", "downloads", "artifacts", "copy", "restore", "replica"] {
        assert!(v.get(field).is_none(), "a verify job has no {field}: {v}");
    }
    let v = serde_json::to_value(&drill).unwrap();
    assert_eq!(v["task"], "drill");
    for field in ["provider", "downloads", "artifacts", "copy", "verify", "replica"] {
        assert!(v.get(field).is_none(), "a drill has no {field}: {v}");
    }
    for job in [export, verify, drill] {
        let back: Job = serde_json::from_value(serde_json::to_value(&job).unwrap()).unwrap();
        assert_eq!(back, job, "a record reads back as it was written");
    }
}

#[test]
fn a_record_stored_when_every_job_carried_every_field_reads_back_as_its_task() {
    // Before tasks had their own state, a verify job was stored with an export's empty fields too.
    let mut old = serde_json::to_value(Harness::d1().job).unwrap();
    let state = serde_json::to_value(crate::verify::VerifyState::new(Some("app-db/f/manifest.json".into()))).unwrap();
    old["task"] = json!("verify");
    old["verify"] = state;
    old["downloads"] = json!([]);
    old["artifacts"] = json!([]);
    let job: Job = serde_json::from_value(old).unwrap();
    assert_eq!(job.task(), Task::Verify);
    assert_eq!(job.verify_state().and_then(|v| v.manifest_key.as_deref()), Some("app-db/f/manifest.json"));
    assert!(job.provider().is_none() && job.artifacts().is_empty());
    let v = serde_json::to_value(&job).unwrap();
    assert!(v.get("provider").is_none() && v.get("downloads").is_none(), "written back without them: {v}");
    let mut unknown = serde_json::to_value(Harness::d1().job).unwrap();
    unknown["task"] = json!("defragment");
    let err = serde_json::from_value::<Job>(unknown).unwrap_err().to_string();
    assert!(err.contains("defragment"), "an unknown task is named: {err}");
}

#[test]
fn an_expired_signed_url_is_renewed_from_the_same_export_and_the_copy_resumes() {
    let mut h = Harness::d1();
    let order = to_copy(&mut h);
    let mut state = order.state.clone();
    let hash = state.hash_state.clone();
    state.record_part(
        &crate::transfer::PartRecord { number: 1, etag: "e1".into(), size: 5 << 20, sha256: String::new() },
        hash,
    );
    state.upload_id = Some("u1".into());
    let expired =
        SliceOutcome::UrlExpired("download of db-1-bm-1.sql was refused (HTTP 403): Request has expired".into());
    assert_eq!(h.feed(Event::Sliced { state: state.clone(), outcome: expired }), Action::Sleep(h.now));
    assert_eq!(h.job.phase, Phase::Exporting);
    assert!(h.job.export().renewing);
    h.advance(Duration::from_secs(7 * 3600)); // long past export_timeout: renewing is not exporting
    let poll = expect_send(h.wake_when_due());
    let body: Value = serde_json::from_slice(poll.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["current_bookmark"], "bm-1", "asks the same export again");
    let fresh = HttpResponse::json(
        200,
        &json!({"success": true, "result": {"success": true, "type": "export", "at_bookmark": "bm-1", "status": "complete", "messages": [],
        "result": {"filename": "db-1-bm-1.sql", "signed_url": "http://127.0.0.1:9/__signed/fresh/db-1-bm-1.sql"}}}),
    );
    h.feed(Event::Response(fresh));
    assert_eq!((h.job.phase, h.job.export().renewals, h.job.export().renewing), (Phase::Transferring, 1, false));
    let resumed = expect_copy(h.wake_when_due());
    let CopySource::Http(request) = &resumed.source else { panic!() };
    assert!(request.url.contains("/fresh/"), "{}", request.url);
    assert_eq!(resumed.state.offset, 5 << 20, "resumes at the persisted offset");
    assert_eq!(resumed.state.upload_id.as_deref(), Some("u1"));
    // The fresh URL is refused as well, with nothing stored since: not an expiry, a failure.
    let refused = SliceOutcome::UrlExpired("download of db-1-bm-1.sql was refused (HTTP 403): denied".into());
    assert!(matches!(h.feed(Event::Sliced { state: resumed.state, outcome: refused }), Action::Discard { .. }));
    let error = h.job.error.clone().unwrap();
    assert!(error.contains("refused (HTTP 403)") && error.contains("freshly issued URL was refused too"), "{error}");
}

#[test]
fn an_expired_url_that_cannot_be_renewed_fails_saying_so_and_discards() {
    let mut h = Harness::d1();
    to_copy(&mut h);
    if let crate::providers::ProviderState::D1(d1) = &mut h.job.export_mut().provider {
        d1.at_bookmark = None;
    }
    let state = h.job.copy().cloned().unwrap();
    let action = h.feed(Event::Sliced { state, outcome: SliceOutcome::UrlExpired("HTTP 403".into()) });
    assert!(matches!(action, Action::Discard { .. }), "{action:?}");
    assert!(h.job.error.as_deref().unwrap().contains("expired mid-copy and this export cannot issue a new one"));
}

#[test]
fn a_finished_job_keeps_no_live_credential() {
    // Committed: the signed download URL the job held is gone from what is stored.
    let mut h = Harness::d1();
    let order = to_copy(&mut h);
    assert!(serde_json::to_string(&h.job).unwrap().contains("__signed/abc"), "held while copying");
    h.feed(copied(&order));
    assert!(matches!(h.wake_when_due(), Action::Commit { .. }));
    h.feed(Event::Committed);
    let stored = serde_json::to_string(&h.job).unwrap();
    assert!(!stored.contains("__signed/abc"), "{stored}");
    // Failed: a provider's access token is gone too.
    let mut h = Harness::d1();
    let aura =
        crate::providers::aura::AuraState { secret_access_token: Some("tok-live-123".into()), ..Default::default() };
    h.job.export_mut().provider = crate::providers::ProviderState::Aura(aura);
    assert!(serde_json::to_string(&h.job).unwrap().contains("tok-live-123"));
    h.job.phase = Phase::Exporting;
    h.job.next_step_at = None;
    h.feed(Event::Unreachable("x".into()));
    h.job.retries = 99;
    h.feed(Event::Unreachable("down".into()));
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(!serde_json::to_string(&h.job).unwrap().contains("tok-live-123"));
}

#[test]
fn an_active_d1_export_is_polled_within_the_cap_whatever_the_back_off_says() {
    let mut h = Harness::new(source(json!({
        "poll_interval_ms": 600000, "retry": {"max_attempts": 6, "base_ms": 60000, "max_delay_ms": 86400000}
    })));
    expect_send(h.wake_when_due());
    h.feed(Event::Response(d1_active()));
    let cap = crate::providers::d1::MAX_POLL_GAP;
    assert_eq!(h.job.next_step_at, Some(h.now.plus(cap)), "poll_interval_ms is capped while exporting");
    h.advance(cap);
    expect_send(h.wake_when_due());
    let limited =
        HttpResponse::json(429, &json!({"success": false, "errors": [{"code": 971, "message": "slow down"}]}))
            .with_header("Retry-After", "900");
    h.feed(Event::Response(limited));
    assert_eq!(h.job.phase, Phase::Exporting);
    assert_eq!(h.job.next_step_at, Some(h.now.plus(cap)), "a 15-minute Retry-After is capped too");
    h.advance(cap);
    expect_send(h.wake_when_due());
    h.feed(Event::Unreachable("timeout".into()));
    assert_eq!(h.job.next_step_at, Some(h.now.plus(cap)), "and so is the generic back-off");
}

#[test]
fn the_api_shows_a_copys_progress_not_its_part_list() {
    let mut h = Harness::d1();
    to_copy(&mut h);
    let copy = h.job.copying_for_test().copy.as_mut().unwrap();
    let hash = copy.hash_state.clone();
    copy.record_part(
        &crate::transfer::PartRecord { number: 1, etag: "etag-1".into(), size: 5 << 20, sha256: "ab".into() },
        hash,
    );
    let shown = h.job.public_json();
    assert_eq!(shown["copy"]["parts_stored"], 1);
    assert_eq!(shown["copy"]["offset"], 5 << 20);
    assert!(shown["copy"].get("hash_state").is_none() && !shown.to_string().contains("etag-1"));
}

#[test]
fn a_job_whose_source_was_removed_is_abandoned_with_its_upload() {
    let mut h = Harness::d1();
    to_copy(&mut h);
    h.job.copying_for_test().copy.as_mut().unwrap().upload_id = Some("u-7".into());
    let (job, action) = h.job.clone().abandon("source \"app-db\" is no longer configured".into(), h.now);
    assert_eq!(job.phase, Phase::Failed);
    assert!(job.error.as_deref().unwrap().contains("no longer configured"));
    let Action::Discard { upload, .. } = action else { panic!("expected discard, got {action:?}") };
    assert_eq!(upload.map(|u| u.1).as_deref(), Some("u-7"));
    let (again, action) = job.abandon("twice".into(), h.now);
    assert_eq!((again.phase, action), (Phase::Failed, Action::Done), "a finished job stays as it ended");
}

#[test]
fn an_unanswered_first_export_call_says_a_duplicate_export_may_exist() {
    let mut h = Harness::d1();
    assert!(matches!(h.feed(Event::Wake), Action::Send(_)));
    let action = h.feed(Event::Unreachable("request to api.cloudflare.com timed out after 60 s".into()));
    assert!(matches!(action, Action::Sleep(_)), "{action:?}");
    assert_eq!(h.job.warnings.len(), 1, "{:?}", h.job.warnings);
    assert!(h.job.warnings[0].contains("second export"), "{}", h.job.warnings[0]);
    assert!(h.job.public_json()["warnings"][0].as_str().unwrap().contains("second export"));
    // Once D1 answered with a bookmark, a lost poll is not a create: nothing more is said.
    assert!(matches!(h.wake_when_due(), Action::Send(_)));
    h.feed(Event::Response(d1_active()));
    assert!(matches!(h.wake_when_due(), Action::Send(_)));
    h.feed(Event::Unreachable("reset".into()));
    let error_503 = HttpResponse::json(503, &json!({"success": false, "errors": [{"code": 7500, "message": "busy"}]}));
    assert!(matches!(h.wake_when_due(), Action::Send(_)));
    h.feed(Event::Response(error_503));
    assert_eq!(h.job.warnings.len(), 1);
}

#[test]
fn progress_reports_bytes_total_rate_and_eta_of_a_running_copy() {
    let mut h = Harness::d1();
    assert_eq!(h.job.progress(t0()), None, "nothing is copied before transferring");
    h.job.phase = Phase::Transferring;
    h.job.copying_for_test().transfer_started_at = Some(t0());
    h.job.export_mut().downloads = vec![
        Download::url("https://x/a", "a.sql", "application/sql", false),
        Download::url("https://x/b", "b.sql", "application/sql", false),
    ];
    let mut first = artifact("app-db/f/a.sql");
    first.size = 100;
    h.job.copying_for_test().artifacts = vec![first];
    let mut copy = crate::transfer::CopyState::new("app-db/f/b.sql".into(), 1, t0());
    copy.offset = 50;
    h.job.copying_for_test().copy = Some(copy.clone());
    let p = h.job.progress(t0().plus(Duration::from_secs(10))).unwrap();
    assert_eq!((p.bytes_copied, p.bytes_total, p.eta_seconds), (150, None, None), "length not declared yet");
    assert_eq!((p.bytes_per_second, p.files_done, p.files_total, p.file.as_deref()), (Some(15), 1, 2, Some("b.sql")));
    copy.validators = Some(crate::transfer::Validators { etag: None, last_modified: None, length: Some(200) });
    h.job.copying_for_test().copy = Some(copy);
    let p = h.job.progress(t0().plus(Duration::from_secs(10))).unwrap();
    assert_eq!((p.bytes_total, p.eta_seconds), (Some(300), Some(10)));
}

/// The config after an edit: another database, other dump options, poll interval, part size
/// and token secret than the job started with.
fn edited_config() -> SourceConfig {
    source(json!({
        "database_id": "db-2", "dump_options": {"no_data": true}, "poll_interval_ms": 5000,
        "part_size_mib": 16, "token_secret": "OTHER_TOKEN", "retry": {"max_attempts": 0}
    }))
}

#[test]
fn a_job_keeps_polling_the_database_it_started_with_after_the_config_changes() {
    let mut h = Harness::new(source(json!({"dump_options": {"tables": ["users"]}})));
    let start = expect_send(h.wake_when_due());
    assert_eq!(start.url, "http://127.0.0.1:9/client/v4/accounts/acc/d1/database/db-1/export");
    h.feed(Event::Response(d1_active()));
    h.src = edited_config();
    let poll = expect_send(h.wake_when_due());
    assert_eq!(
        poll.url, "http://127.0.0.1:9/client/v4/accounts/acc/d1/database/db-1/export",
        "the old bookmark goes to the old database"
    );
    assert_eq!(poll.header_value("authorization"), Some("Bearer tok"), "the token named when the job started");
    let body: Value = serde_json::from_slice(poll.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["current_bookmark"], "bm-1");
    assert_eq!(body["dump_options"], json!({"tables": ["users"], "no_data": false, "no_schema": false}));
    // The poll interval is the snapshot's (1 s), not the edited 5 s.
    assert_eq!(h.feed(Event::Response(d1_active())), Action::Sleep(h.now.plus(Duration::from_secs(1))));
    // A transient error is retried under the snapshot's retry policy (3 tries), not the edited 0.
    expect_send(h.wake_when_due());
    assert!(matches!(h.feed(Event::Unreachable("down".into())), Action::Sleep(_)));
    assert_eq!(h.job.phase, Phase::Exporting);
    expect_send(h.wake_when_due());
    h.feed(Event::Response(d1_complete()));
    let order = expect_copy(h.wake_when_due());
    assert_eq!(order.settings.part_size, crate::config::DEFAULT_PART_SIZE, "the snapshot's part size");
    h.feed(copied(&order));
    let Action::Commit { manifest, .. } = h.wake_when_due() else { panic!("expected commit") };
    assert_eq!(manifest.provider["database_id"], "db-1");
    assert_eq!(manifest.provider["dump_options"], json!({"tables": ["users"], "no_data": false, "no_schema": false}));
}

#[test]
fn the_snapshot_survives_storage_and_is_shown_without_secrets_or_their_names() {
    let h = Harness::new(source(json!({"dump_options": {"tables": ["users"]}})));
    let stored: Job = serde_json::from_str(&serde_json::to_string(&h.job).unwrap()).unwrap();
    assert_eq!(stored, h.job);
    assert_eq!(stored.config.as_ref(), Some(&h.src));
    let shown = h.job.public_json();
    assert_eq!(shown["config"]["provider"]["database_id"], "db-1");
    assert_eq!(shown["config"]["provider"]["dump_options"]["tables"], json!(["users"]));
    assert_eq!(shown["config"]["poll_interval_ms"], 1000);
    assert!(shown["config"]["provider"].get("token_secret").is_none(), "no secret, nor its name: {shown}");
    assert!(!shown.to_string().contains("D1_TOKEN") && !shown.to_string().contains("\"tok\""));
}

#[test]
fn a_job_stored_without_a_snapshot_uses_the_current_config() {
    let mut h = Harness::d1();
    let mut v = serde_json::to_value(&h.job).unwrap();
    v.as_object_mut().unwrap().remove("config");
    h.job = serde_json::from_value(v).unwrap();
    assert_eq!(h.job.config, None);
    h.src = source(json!({"database_id": "db-2"}));
    let start = expect_send(h.wake_when_due());
    assert_eq!(start.url, "http://127.0.0.1:9/client/v4/accounts/acc/d1/database/db-2/export");
}

#[test]
fn an_unreadable_snapshot_falls_back_to_the_current_config() {
    let h = Harness::d1();
    let mut v = serde_json::to_value(&h.job).unwrap();
    v["config"] = json!({"written by": "a future version"});
    let job: Job = serde_json::from_value(v).unwrap();
    assert_eq!(job.config, None);
}

#[test]
fn a_snapshot_request_that_never_gets_an_answer_fails_within_the_retry_budget_despite_the_look_ups() {
    let src = Config::from_value(&json!([{
        "name": "graph", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "2f49c2b3",
        "client_id_secret": "AURA_ID", "client_secret_secret": "AURA_SECRET", "api_base": "http://127.0.0.1:9",
        "mode": "snapshot", "retry": {"max_attempts": 3, "base_ms": 100, "max_delay_ms": 200}
    }]))
    .unwrap()
    .sources
    .remove(0);
    let mut h = Harness::new(src);
    h.creds.insert("AURA_ID", Secret::new("id"));
    h.creds.insert("AURA_SECRET", Secret::new("secret"));
    let (mut posts, mut lookups) = (0, 0);
    for _ in 0..100 {
        if h.job.phase.is_terminal() {
            break;
        }
        let Action::Send(req) = h.wake_when_due() else { continue };
        let event = if req.url.ends_with("/oauth/token") {
            Event::Response(HttpResponse::json(200, &json!({"access_token": "t", "expires_in": 3600})))
        } else if req.method == crate::http::Method::Post {
            posts += 1;
            Event::Unreachable("request to aura was redirected to sso, which answered with an HTML page".into())
        } else {
            lookups += 1;
            Event::Response(HttpResponse::json(200, &json!({"data": []})))
        };
        h.feed(event);
    }
    assert_eq!(h.job.phase, Phase::Failed, "{:?}", h.job);
    let error = h.job.error.clone().unwrap();
    assert!(error.contains("HTML page") && error.contains("gave up after 4 tries"), "{error}");
    assert_eq!((posts, lookups), (4, 3), "each unanswered POST is looked up once before the next");
}

#[test]
fn a_request_held_back_by_the_api_budget_is_sent_again_at_its_time_without_counting_a_retry() {
    let mut h = Harness::d1();
    let Action::Send(first) = h.feed(Event::Wake) else { panic!("expected the export call") };
    let until = h.now.plus(Duration::from_secs(42));
    assert_eq!(h.feed(Event::Throttled(until)), Action::Sleep(until));
    assert_eq!((h.job.phase, h.job.retries, h.job.next_step_at), (Phase::Exporting, 0, Some(until)));
    assert!(h.job.warnings.is_empty(), "nothing was sent, so no duplicate export can exist");
    assert_eq!(h.wake_when_due(), Action::Send(first), "the same call, at the budget's time");
    assert_eq!(h.now, until);
    // A finished job ignores it.
    h.job.phase = Phase::Failed;
    assert_eq!(h.feed(Event::Throttled(until)), Action::Done);
}

fn cancel(reason: Option<&str>) -> Event {
    Event::Cancel { by: "api".into(), reason: reason.map(str::to_string) }
}

fn assert_cancelled(h: &Harness, reason: &str) {
    assert_eq!(h.job.phase, Phase::Cancelled);
    assert!(h.job.phase.is_terminal(), "the source is free for its next job");
    let c = h.job.cancelled.clone().expect("who cancelled is recorded");
    assert_eq!((c.by.as_str(), c.at), ("api", h.now));
    let error = h.job.error.clone().unwrap();
    assert!(error.starts_with("cancelled by api") && error.contains(reason), "{error}");
    assert!(h.job.cancellable().is_err(), "an ended job cannot be cancelled again");
}

#[test]
fn a_queued_job_cancelled_ends_at_once_without_touching_anything() {
    let mut h = Harness::d1();
    assert!(h.job.cancellable().is_ok());
    assert_eq!(h.feed(cancel(Some("not now"))), Action::Done);
    assert_cancelled(&h, "not now");
    assert_eq!(h.job.attempts, 0, "nothing was sent");
    assert_eq!(h.feed(Event::Wake), Action::Done);
}

#[test]
fn an_export_cancelled_while_the_provider_exports_ends_with_nothing_to_delete() {
    let mut h = Harness::d1();
    expect_send(h.wake_when_due());
    h.feed(Event::Response(d1_active()));
    assert_eq!(h.feed(cancel(None)), Action::Done);
    assert_cancelled(&h, "cancelled by api");
    assert_eq!(h.job.cancelled.as_ref().unwrap().reason, None);
}

#[test]
fn an_export_cancelled_mid_copy_aborts_its_open_upload_and_deletes_its_folder() {
    let mut h = Harness::d1();
    let order = to_copy(&mut h);
    let mut state = order.state.clone();
    state.upload_id = Some("up-1".into());
    state.parts_stored = 2;
    state.stalled = 0;
    h.feed(Event::Sliced { state, outcome: SliceOutcome::Paused });
    let key = order.state.key.clone();
    let action = h.feed(cancel(Some("wrong database")));
    assert_eq!(
        action,
        Action::Discard {
            folder: "app-db/2026-11-23T100000Z-0123456789abcdef/".into(),
            upload: Some((key, "up-1".into()))
        }
    );
    assert_cancelled(&h, "wrong database");
    assert!(h.job.artifacts().is_empty() && h.job.export().downloads.is_empty(), "nothing is listed as a backup");
}

#[test]
fn an_export_cancelled_while_its_manifest_is_written_deletes_its_folder() {
    let mut h = Harness::d1();
    let order = to_copy(&mut h);
    h.feed(copied(&order));
    assert!(matches!(h.wake_when_due(), Action::Commit { .. }));
    let Action::Discard { folder, upload: None } = h.feed(cancel(None)) else {
        panic!("expected the folder's deletion")
    };
    assert_eq!(folder, "app-db/2026-11-23T100000Z-0123456789abcdef/");
    assert_eq!(h.job.phase, Phase::Cancelled);
}

#[test]
fn a_verify_job_cancelled_mid_read_ends_without_a_record() {
    let mut h = verify_job(None);
    assert!(matches!(h.wake_when_due(), Action::VerifySlice { .. }));
    assert_eq!(h.feed(cancel(Some("later"))), Action::Done, "no verification record is written");
    assert_cancelled(&h, "later");
    assert!(h.job.verification().is_none());
}

#[test]
fn a_cancel_after_the_job_ended_changes_nothing() {
    let mut h = Harness::d1();
    let order = to_copy(&mut h);
    h.feed(copied(&order));
    h.wake_when_due();
    h.feed(Event::Committed);
    let before = h.job.clone();
    assert_eq!(h.feed(cancel(None)), Action::Done);
    assert_eq!((h.job.phase, &h.job.cancelled), (Phase::Committed, &None));
    assert_eq!(h.job.artifacts(), before.artifacts());
    let refused = h.job.cancellable().unwrap_err();
    assert!(refused.contains("already ended (committed)"), "{refused}");
}

#[test]
fn an_export_past_its_task_deadline_fails_naming_the_deadline() {
    // The export timeout is 6 h; the task's own deadline is shorter here.
    let mut h = Harness::new(source(json!({"deadline_seconds": {"export": 5}})));
    expect_send(h.wake_when_due());
    for _ in 0..4 {
        h.feed(Event::Response(d1_active()));
        expect_send(h.wake_when_due());
    }
    h.feed(Event::Response(d1_active()));
    assert_eq!(h.wake_when_due(), Action::Done);
    assert_eq!(h.job.phase, Phase::Failed);
    let e = h.job.error.clone().unwrap();
    assert!(e.contains("deadline of 5 s (deadline_seconds.export)"), "{e}");
    assert_eq!(h.job.cancelled, None);
}

#[test]
fn a_wait_never_outlasts_the_task_deadline() {
    let mut h = Harness::new(source(json!({"deadline_seconds": {"export": 30}})));
    expect_send(h.wake_when_due());
    let until = t0().plus(Duration::from_secs(3600));
    assert_eq!(h.feed(Event::Throttled(until)), Action::Sleep(t0().plus(Duration::from_secs(30))));
    assert_eq!(h.wake_when_due(), Action::Done);
    assert!(h.job.error.as_deref().unwrap().contains("deadline_seconds.export"), "{:?}", h.job.error);
}

#[test]
fn the_deadline_counts_from_when_the_job_left_the_queue() {
    let mut h = Harness::new(source(json!({"deadline_seconds": {"export": 10}})));
    h.advance(Duration::from_secs(600));
    expect_send(h.wake_when_due());
    assert_eq!(h.job.running_since, Some(h.now));
    assert_eq!(h.job.phase, Phase::Exporting);
}

#[test]
fn a_drill_that_cannot_be_planned_fails_as_a_drill_job_with_the_reason() {
    let mut h = Harness::d1();
    h.job = h.job.clone().planned(Task::Drill, Err("db_password_secret is required".into()));
    assert_eq!(h.job.task(), Task::Drill);
    assert_eq!(h.wake_when_due(), Action::Done);
    assert_eq!((h.job.task(), h.job.phase), (Task::Drill, Phase::Failed));
    assert_eq!(h.job.error.as_deref(), Some("the drill could not start: db_password_secret is required"));
    assert_eq!(h.job.attempts, 0, "nothing was exported");
}

#[test]
fn every_drill_config_the_parser_accepts_can_be_planned() {
    let aura = |extra: Value| {
        let mut v = json!({"name": "g", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "2f49c2b3",
            "client_id_secret": "A", "client_secret_secret": "B", "drill_schedule": "0 6 * * 1"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let candidates = [
        source(json!({"drill_schedule": "0 6 * * 1"})),
        Config::from_value(&json!([aura(json!({"mode": "snapshot", "drill_scratch": {"memory": "1GB"}}))]))
            .unwrap()
            .sources
            .remove(0),
        Config::from_value(&json!([aura(json!({"mode": "snapshot", "drill_instance": "5c7a7c11",
            "drill_password_secret": "SPARE"}))]))
        .unwrap()
        .sources
        .remove(0),
        Config::from_value(&json!([aura(
            json!({"mode": "both", "db_password_secret": "PW", "drill_database": "drill"})
        )]))
        .unwrap()
        .sources
        .remove(0),
    ];
    for src in candidates {
        assert!(crate::restore::plan(Task::Drill, &src, &json!({}), None).is_ok(), "{}", src.name);
    }
    for refused in [aura(json!({"mode": "snapshot", "drill_database": "drill"})), aura(json!({"mode": "snapshot"}))] {
        assert!(Config::from_value(&json!([refused])).is_err());
    }
}

/// The job's stored record after its file finished with `parts` parts (and the replicate job
/// that copies the backup), as the runtime serializes them.
fn records_after_a_copy_of(parts: u32) -> (usize, usize) {
    let mut h = Harness::d1();
    let order = to_copy(&mut h);
    let mut stored = artifact(&order.state.key);
    stored.parts = parts;
    stored.part_sha256 = (0..parts).map(|i| format!("{i:064x}")).collect();
    h.feed(Event::Sliced { state: order.state.clone(), outcome: SliceOutcome::Finished(stored) });
    let export = serde_json::to_vec(&h.job).unwrap().len();
    let Action::Commit { key, manifest } = h.wake_when_due() else { panic!("expected commit") };
    assert!(manifest.artifacts[0].part_sha256.is_empty(), "the runtime fills them from the part records");
    let replica = Job::replica_of(&h.job, JobId::new("00000000000000bb"), &h.src, "BACKUPS_EU", key, *manifest, h.now);
    (export, serde_json::to_vec(&replica).unwrap().len())
}

#[test]
fn a_jobs_record_stays_small_whatever_the_part_count() {
    let (export_one, replica_one) = records_after_a_copy_of(1);
    let (export_many, replica_many) = records_after_a_copy_of(10_000);
    assert!(export_many <= export_one + 8, "the export's record grew: {export_one} -> {export_many} bytes");
    assert!(replica_many <= replica_one + 8, "the replica's record grew: {replica_one} -> {replica_many} bytes");
    assert!(export_many < 8 * 1024 && replica_many < 8 * 1024, "{export_many} and {replica_many} bytes");
}

#[test]
fn the_next_step_runs_in_this_invocation_only_when_due_within_the_step_cap_and_after_no_slice() {
    let now = t0();
    let later = now.plus(Duration::from_secs(5));
    assert_eq!(after_sleep(now, now, 1, false, false), AfterSleep::StepNow);
    assert_eq!(after_sleep(later, now, 1, false, false), AfterSleep::Alarm(later), "not due yet");
    assert_eq!(after_sleep(now, now, MAX_INLINE_STEPS, false, false), AfterSleep::Alarm(now), "the step cap");
    assert_eq!(after_sleep(now, now, 1, true, false), AfterSleep::Alarm(now), "a slice had this invocation");
    assert_eq!(after_sleep(later, now, MAX_INLINE_STEPS, true, true), AfterSleep::StepNow, "a cancel waits");
    let past = Timestamp::from_secs(0);
    assert_eq!(after_sleep(past, now, 99, false, false), AfterSleep::Alarm(now), "never an alarm in the past");
}

#[test]
fn every_action_with_io_arms_the_watchdog_and_no_other() {
    let mut h = Harness::d1();
    let send = h.wake_when_due();
    assert!(matches!(send, Action::Send(_)) && send.may_hang());
    assert!(!Action::Sleep(t0()).may_hang() && !Action::Done.may_hang());
    assert!(!Action::Discard { folder: "f/".into(), upload: None }.may_hang(), "the clean-up has its own timeout");
    let order = to_copy(&mut Harness::d1());
    assert!(Action::CopySlice(Box::new(order)).may_hang());
}

#[test]
fn a_polled_d1_export_asks_the_budget_for_a_poll_and_everything_else_for_a_start() {
    let mut h = Harness::d1();
    assert_eq!(h.job.budget_need(), crate::budget::Need::Start, "queued");
    let _ = h.wake_when_due();
    let _ = h.feed(Event::Response(d1_active()));
    assert_eq!(h.job.phase, Phase::Exporting);
    assert_eq!(h.job.budget_need(), crate::budget::Need::Poll, "the export runs: its polls come first");
    let verify = verify_job(None).job;
    assert_eq!(verify.budget_need(), crate::budget::Need::Start);
    assert_eq!(h.job.bucket_binding(), None, "an export writes into the primary bucket");
}

#[test]
fn a_source_with_age_recipients_copies_each_file_encrypted_as_name_dot_age() {
    let recipient = crate::encryption::Identity::from_secret_bytes([3u8; 32]).to_recipient().to_string();
    let mut h = Harness::new(source(json!({ "age_recipients": [recipient] })));
    let order = to_copy(&mut h);
    assert!(order.filename.ends_with(".sql.age") && order.state.key.ends_with(".sql.age"), "{}", order.filename);
    assert_eq!(order.content_type, "application/octet-stream");
    let CopySource::Sealed { plain, recipients, tally } = &order.source else { panic!("{:?}", order.source) };
    assert!(matches!(**plain, CopySource::Http(_)), "the plaintext is the provider's download");
    assert_eq!(recipients.len(), 1);
    assert!(*tally, "the dump's MD5 and row counts are taken of its plaintext");
    assert_eq!(order.source.resume_points(), crate::transfer::ResumePoints::SliceEnd);
    // Without recipients the file is stored as the provider serves it.
    let plain_order = to_copy(&mut Harness::d1());
    assert!(matches!(plain_order.source, CopySource::Http(_)) && plain_order.filename.ends_with(".sql"));
}

#[test]
fn a_bad_age_recipient_or_an_encrypted_copy_over_the_memory_budget_is_a_config_error_naming_the_field() {
    let v = json!([{
        "name": "app-db", "kind": "d1", "schedule": "0 3 * * *", "account_id": "acc", "database_id": "db-1",
        "token_secret": "D1_TOKEN", "age_recipients": ["AGE-SECRET-KEY-1QQQQ"]
    }]);
    let e = Config::from_value(&v).unwrap_err().to_string();
    assert!(e.contains("age_recipients") && e.contains("secret key"), "{e}");
    let recipient = crate::encryption::Identity::from_secret_bytes([3u8; 32]).to_recipient().to_string();
    let mut big = v.clone();
    big[0]["age_recipients"] = json!([recipient]);
    big[0]["part_size_mib"] = json!(32);
    big[0]["parts_in_flight"] = json!(1);
    assert!(Config::from_value(&big).is_ok(), "64 MiB of parts fit without encryption's pages");
    let e = Config::from_value(&json!([{
        "name": "app-db", "kind": "d1", "schedule": "0 3 * * *", "account_id": "acc", "database_id": "db-1",
        "token_secret": "D1_TOKEN", "age_recipients": [recipient], "part_size_mib": 24, "parts_in_flight": 2
    }]))
    .unwrap_err()
    .to_string();
    assert!(e.contains("\"part_size_mib\"") && e.contains("encryption"), "{e}");
}
