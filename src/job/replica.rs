//! The replicate task (see [`crate::replica`]): a job whose task is `replicate` starts copying
//! at once (`queued → transferring → committed | failed`), one file of the primary manifest
//! after another, each into the replica bucket at the same key, then writes the replica's
//! manifest. Before the first write it proves the replica is another bucket. The copy, its
//! watchdogs, retries and the clean-up of a failure are the export's own ([`super::copying`],
//! [`Job::fail`]); only where the bytes come from and what a finished file is checked against
//! differ.

use serde::{Deserialize, Serialize};

use super::copying::NextFile;
use super::{Action, Context, CopySource, Copying, Event, Job, JobId, Phase, StepError, Task, Work};
use crate::config::SourceConfig;
use crate::manifest::{self, Manifest};
use crate::replica::{same_bucket_reason, Identity, ProbeAnswer, ReplicaState};
use crate::time::Timestamp;

/// A replicate job's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replicate {
    /// The backup it copies: the primary manifest and the replica bucket's binding (`None` only
    /// for an unreadable record, which fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaState>,
    /// Its copy into the replica bucket.
    #[serde(flatten)]
    pub copying: Copying,
}

impl Replicate {
    /// Checks a finished file against the primary manifest's record of it.
    pub(super) fn check(&self, index: usize, artifact: &crate::manifest::Artifact) -> Result<(), String> {
        match &self.replica {
            Some(replica) => replica.check(index, artifact),
            None => Err("a replicate job without its backup (an unreadable record)".into()),
        }
    }
}

/// A replicate job starts copying at once.
pub(super) const START: Phase = Phase::Transferring;

/// The next replicate step: the probe, a slice of the next file, or the replica's manifest once
/// every file is copied and checked.
pub(super) fn step(mut job: Job, cx: &Context<'_>) -> (Job, Action) {
    if job.phase != Phase::Transferring {
        return job.idle(cx.now);
    }
    let Some(replica) = job.replica().cloned() else {
        return job.fail("a replicate job without its backup (an unreadable record)".into(), cx.now);
    };
    if replica.identity == Identity::Unproven {
        // Before anything is written: is the replica another bucket at all?
        job.attempts += 1;
        let probe = replica.probe(&job.id, job.attempts);
        return (job, Action::ProbeReplica(probe));
    }
    let Some(file) = replica.file(job.artifacts().len()).cloned() else {
        job.finished_at = Some(cx.now);
        job.attempts += 1;
        let key = manifest::manifest_key(&replica.folder());
        let manifest = Box::new(replica.manifest(&job.id, cx.now));
        return (job, Action::CommitReplica { key, manifest });
    };
    let next =
        NextFile { key: file.key.clone(), filename: file.filename.clone(), content_type: file.content_type.clone() };
    let source =
        |_: &Job, _: &crate::transfer::CopyState| Ok(CopySource::R2 { key: file.key.clone(), size: file.size });
    job.slice(next, source, cx)
}

/// A replicate job's events: the probe's answer, the copy's slices, the commit.
pub(super) fn on_event(job: Job, event: Event, cx: &Context<'_>) -> (Job, Action) {
    match (job.phase, event) {
        (Phase::Transferring, Event::ReplicaProbed(answer)) => on_probe(job, answer, cx),
        (Phase::Transferring, Event::Unreachable(msg)) => job.retry(StepError::transient(msg), cx),
        (Phase::Transferring, Event::Sliced { state, outcome }) => job.on_slice(state, outcome, cx),
        (Phase::Transferring, Event::Committed) => job.succeed(Phase::Committed, cx.now),
        (Phase::Transferring, Event::CommitFailed(msg)) => job.retry(StepError::transient(msg), cx),
        (_, _) => job.idle(cx.now),
    }
}

impl Job {
    /// A queued replicate job copying the backup `export` committed as `manifest` (at
    /// `manifest_key`) into the bucket bound as `binding`.
    pub fn replica_of(
        export: &Job,
        id: JobId,
        source: &SourceConfig,
        binding: &str,
        manifest_key: String,
        manifest: Manifest,
        now: Timestamp,
    ) -> Self {
        let mut job = Self::new(id, source, export.trigger, None, None, now);
        job.parent = Some(export.id.clone());
        // The primary manifest's part hashes are read back from it when the replica's manifest
        // is written: the job's record stays small whatever the part count.
        let mut manifest = manifest;
        manifest.artifacts.iter_mut().for_each(|a| a.part_sha256.clear());
        let replica =
            ReplicaState { binding: binding.to_string(), manifest_key, manifest, identity: Identity::Unproven };
        job.work = Work::Replicate(Replicate { replica: Some(replica), copying: Copying::default() });
        job
    }

    /// The replicate job that follows this job's end, if any: only a committed export, whose
    /// manifest was just written at `committed`, of a source with a `replica` table. The shell
    /// stores it before the ledger names it ([`crate::ledger::Ledger::close`]).
    pub fn replica_after(
        &self,
        committed: Option<&(String, Manifest)>,
        source: &SourceConfig,
        id: JobId,
        now: Timestamp,
    ) -> Option<Job> {
        let (key, manifest) = committed?;
        let replica = source.replica.as_ref()?;
        (self.phase == Phase::Committed && self.task() == Task::Export)
            .then(|| Job::replica_of(self, id, source, &replica.name(), key.clone(), manifest.clone(), now))
    }

    /// A replicate job's backup and bucket.
    pub fn replica(&self) -> Option<&ReplicaState> {
        match &self.work {
            Work::Replicate(r) => r.replica.as_ref(),
            _ => None,
        }
    }

    /// True for a replicate job that committed (its copy is whole in the replica bucket).
    pub fn replica_committed(&self) -> bool {
        self.task() == Task::Replicate && self.phase == Phase::Committed
    }
}

/// Folds in what the replica's probe showed: one bucket fails the job (and nothing is cleaned,
/// [`Job::fail`]); distinct buckets let the copy begin; a probe that could not run is retried
/// like any step.
fn on_probe(mut job: Job, answer: Result<ProbeAnswer, StepError>, cx: &Context<'_>) -> (Job, Action) {
    let Work::Replicate(Replicate { replica: Some(replica), .. }) = &mut job.work else {
        return job.fail("a replicate job without its backup (an unreadable record)".into(), cx.now);
    };
    match answer {
        Ok(ProbeAnswer::Distinct) => {
            replica.identity = Identity::Distinct;
            job.step_succeeded(cx.now)
        }
        Ok(ProbeAnswer::SameBucket) => {
            let reason = same_bucket_reason(&replica.binding);
            job.fail(reason, cx.now)
        }
        Err(e) => job.step_failed(e, cx),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::super::{Event, SliceOutcome, Trigger};
    use super::*;
    use crate::config::Config;
    use crate::error::StepError;
    use crate::manifest::Artifact;
    use crate::providers::Credentials;

    const FOLDER: &str = "portal/2026-11-28T030000Z-00000000000000aa/";

    fn source() -> SourceConfig {
        let v = json!([{
            "name": "portal", "kind": "d1", "schedule": "0 3 * * *", "account_id": "acc", "database_id": "db",
            "token_secret": "T", "replica": { "bucket_binding": "BACKUPS_EU" },
            "retry": {"max_attempts": 2, "base_ms": 1000, "max_delay_ms": 4000}, "max_stalled_slices": 3
        }]);
        Config::from_value(&v).unwrap().sources.remove(0)
    }

    fn file(name: &str, size: u64, sha: &str) -> Artifact {
        Artifact::sample(format!("{FOLDER}{name}"), name, size, sha, "application/gzip")
    }

    fn t0() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T03:10:00Z").unwrap()
    }

    /// A committed export of two files and the replicate job queued after it.
    fn replicate() -> (Job, SourceConfig) {
        let src = source();
        let mut export = Job::new(JobId::new("00000000000000aa"), &src, Trigger::Cron, None, None, t0());
        export.phase = Phase::Committed;
        let manifest = Manifest {
            source: "portal".into(),
            kind: "dxp".into(),
            job_id: export.id.clone(),
            trigger: Trigger::Cron,
            started_at: t0(),
            scheduled_for: None,
            finished_at: t0(),
            provider: json!({}),
            artifacts: vec![file("database.gz", 12 << 20, "aa"), file("volume.tgz", 100, "bb")],
        };
        let key = manifest::manifest_key(FOLDER);
        let job = Job::replica_of(&export, JobId::new("00000000000000bb"), &src, "BACKUPS_EU", key, manifest, t0());
        (job, src)
    }

    /// Steps the job as the runtime does, through its JSON record (a restart between any two
    /// steps changes nothing).
    fn step(job: Job, src: &SourceConfig, event: Event, now: Timestamp) -> (Job, Action) {
        let creds = Credentials::new();
        let cx = Context { now, jitter: 0.0, source: src, creds: &creds, seen: &[] };
        let (job, action) = job.handle(event, &cx);
        let stored: Job = serde_json::from_str(&serde_json::to_string(&job).unwrap()).unwrap();
        assert_eq!(stored, job);
        (stored, action)
    }

    #[test]
    fn only_a_committed_export_of_a_source_with_a_replica_is_followed_by_a_replicate_job() {
        let (replicate_job, src) = replicate();
        let key = replicate_job.replica().unwrap().manifest_key.clone();
        let manifest = replicate_job.replica().unwrap().manifest.clone();
        let committed = Some((key.clone(), manifest));
        let mut export = Job::new(JobId::new("00000000000000aa"), &src, Trigger::Cron, None, None, t0());
        export.phase = Phase::Committed;
        let id = || JobId::new("00000000000000cc");
        let follow = export.replica_after(committed.as_ref(), &src, id(), t0()).expect("a replicate job");
        assert_eq!((follow.task(), follow.parent.as_ref()), (Task::Replicate, Some(&export.id)));
        assert_eq!(
            follow.replica().map(|r| (r.binding.as_str(), r.manifest_key.as_str())),
            Some(("BACKUPS_EU", key.as_str()))
        );
        assert_eq!(export.replica_after(None, &src, id(), t0()), None, "nothing was committed");
        let mut failed = export.clone();
        failed.phase = Phase::Failed;
        assert_eq!(failed.replica_after(committed.as_ref(), &src, id(), t0()), None);
        let copy = Job::replica_of(&export, id(), &src, "REPLICA", "k".into(), committed.clone().unwrap().1, t0());
        let mut copy = copy;
        copy.phase = Phase::Committed;
        assert_eq!(copy.replica_after(committed.as_ref(), &src, id(), t0()), None, "a replica is not copied again");
        let mut plain = src.clone();
        plain.replica = None;
        assert_eq!(export.replica_after(committed.as_ref(), &plain, id(), t0()), None);
    }

    /// Wakes a queued replicate job and answers its probe: the replica is another bucket.
    fn start(job: Job, src: &SourceConfig) -> (Job, Action) {
        let (job, action) = step(job, src, Event::Wake, t0());
        assert!(matches!(action, Action::ProbeReplica(_)), "the probe goes first, got {action:?}");
        let (job, action) = step(job, src, Event::ReplicaProbed(Ok(ProbeAnswer::Distinct)), t0());
        assert_eq!(action, Action::Sleep(t0()));
        assert_eq!(job.replica().map(|r| r.identity), Some(Identity::Distinct));
        step(job, src, Event::Wake, t0())
    }

    fn order(action: &Action) -> &super::super::SliceOrder {
        match action {
            Action::CopySlice(order) => order,
            other => panic!("expected a slice, got {other:?}"),
        }
    }

    #[test]
    fn a_replica_copies_every_file_from_the_primary_key_then_writes_its_manifest_last() {
        let (job, src) = replicate();
        assert_eq!((job.task(), job.phase, job.folder()), (Task::Replicate, Phase::Queued, FOLDER.to_string()));
        let (job, action) = start(job, &src);
        assert_eq!(job.phase, Phase::Transferring);
        let first = order(&action).clone();
        assert_eq!(first.source, CopySource::R2 { key: format!("{FOLDER}database.gz"), size: 12 << 20 });
        assert_eq!(first.state.key, format!("{FOLDER}database.gz"), "the same key as in the primary");
        // Two slices of the first file: a pause resumes from the persisted state.
        let mut paused = first.state.clone();
        paused.offset = 5 << 20;
        paused.parts_stored = 1;
        paused.stalled = 0;
        let (job, action) =
            step(job, &src, Event::Sliced { state: paused.clone(), outcome: SliceOutcome::Paused }, t0());
        assert_eq!(action, Action::Sleep(t0()));
        let progress = job.progress(t0().plus(Duration::from_secs(5))).unwrap();
        assert_eq!((progress.bytes_copied, progress.bytes_total), (5 << 20, Some((12 << 20) + 100)));
        assert_eq!((progress.files_done, progress.files_total), (0, 2));
        let (job, action) = step(job, &src, Event::Wake, t0());
        assert_eq!(order(&action).state.offset, 5 << 20, "resumes where the last slice stopped");
        let done = order(&action).state.clone();
        let copied = file("database.gz", 12 << 20, "aa");
        let (job, _) = step(job, &src, Event::Sliced { state: done, outcome: SliceOutcome::Finished(copied) }, t0());
        let (job, action) = step(job, &src, Event::Wake, t0());
        assert_eq!(order(&action).source, CopySource::R2 { key: format!("{FOLDER}volume.tgz"), size: 100 });
        let state = order(&action).state.clone();
        let copied = file("volume.tgz", 100, "bb");
        let (job, _) = step(job, &src, Event::Sliced { state, outcome: SliceOutcome::Finished(copied) }, t0());
        let later = t0().plus(Duration::from_secs(60));
        let (job, action) = step(job, &src, Event::Wake, later);
        let Action::CommitReplica { key, manifest } = action else { panic!("expected the manifest, got {action:?}") };
        assert_eq!(key, format!("{FOLDER}manifest.json"));
        assert_eq!(manifest.manifest, job.replica().unwrap().manifest, "the primary manifest, unchanged");
        assert_eq!(manifest.replica_of.manifest_key, format!("{FOLDER}manifest.json"));
        assert_eq!(manifest.replica_of.replica_job_id, job.id);
        assert_eq!(manifest.replica_of.replicated_at, later);
        let written = serde_json::to_value(&*manifest).unwrap();
        assert_eq!(written["artifacts"][1]["sha256"], "bb");
        assert_eq!(written["replica_of"]["bucket_binding"], "BACKUPS");
        let read: Manifest = serde_json::from_value(written).unwrap();
        assert_eq!(read.artifacts.len(), 2, "a replica's manifest reads as a manifest");
        let (job, action) = step(job, &src, Event::Committed, later);
        assert_eq!((job.phase, action), (Phase::Committed, Action::Done));
        assert!(job.replica_committed());
        let summary = crate::history::JobSummary::of(&job).unwrap();
        assert_eq!(
            (summary.task, summary.bytes, summary.folder.as_deref()),
            (Task::Replicate, (12 << 20) + 100, Some(FOLDER))
        );
    }

    #[test]
    fn a_file_that_does_not_match_the_primary_manifest_fails_the_job_naming_it_and_cleans_the_replica() {
        let (job, src) = replicate();
        let (job, action) = start(job, &src);
        let mut state = order(&action).state.clone();
        state.upload_id = Some("up-1".into());
        let tampered = file("database.gz", 12 << 20, "cc");
        let (job, action) = step(job, &src, Event::Sliced { state, outcome: SliceOutcome::Finished(tampered) }, t0());
        assert_eq!(job.phase, Phase::Failed);
        let error = job.error.clone().unwrap();
        assert!(error.contains(&format!("replica of {FOLDER}database.gz")) && error.contains("SHA-256"), "{error}");
        // The whole folder goes, in the replica bucket (the runtime's target); the completed
        // upload is not aborted.
        assert_eq!(action, Action::Discard { folder: FOLDER.into(), upload: None });
        let summary = crate::history::JobSummary::of(&job).unwrap();
        assert_eq!((summary.task, summary.phase), (Task::Replicate, Phase::Failed));
    }

    #[test]
    fn a_size_that_differs_is_named_too() {
        let (job, _) = replicate();
        let r = job.replica().cloned().unwrap();
        let e = r.check(1, &file("volume.tgz", 99, "bb")).unwrap_err();
        assert_eq!(e, format!("replica of {FOLDER}volume.tgz: 99 bytes were copied, the primary manifest says 100"));
    }

    #[test]
    fn a_failing_read_is_retried_then_fails_the_job_and_discards_what_it_wrote() {
        let (job, src) = replicate();
        let (mut job, mut action) = start(job, &src);
        let mut now = t0();
        for _ in 0..3 {
            let mut state = order(&action).state.clone();
            state.upload_id = Some("up-1".into());
            let failed = SliceOutcome::Failed(StepError::transient("R2 get failed: network"));
            let (j, a) = step(job, &src, Event::Sliced { state, outcome: failed }, now);
            job = j;
            if job.phase == Phase::Failed {
                assert!(job.error.as_deref().unwrap().contains("R2 get failed: network"), "{:?}", job.error);
                let upload = Some((format!("{FOLDER}database.gz"), "up-1".to_string()));
                assert_eq!(a, Action::Discard { folder: FOLDER.into(), upload });
                return;
            }
            let Action::Sleep(at) = a else { panic!("expected a retry, got {a:?}") };
            now = at;
            let (j, a) = step(job, &src, Event::Wake, now);
            job = j;
            action = a;
        }
        panic!("the job never gave up");
    }

    #[test]
    fn a_missing_primary_object_fails_at_once() {
        let (job, src) = replicate();
        let (job, action) = start(job, &src);
        let state = order(&action).state.clone();
        let gone =
            SliceOutcome::Failed(StepError::permanent(format!("the primary object {FOLDER}database.gz is missing")));
        let (job, action) = step(job, &src, Event::Sliced { state, outcome: gone }, t0());
        assert_eq!(job.phase, Phase::Failed);
        assert!(matches!(action, Action::Discard { .. }));
    }

    #[test]
    fn a_replicate_job_cancelled_mid_copy_aborts_its_upload_and_cleans_the_replica_folder() {
        let (job, src) = replicate();
        let (job, action) = start(job, &src);
        let mut state = order(&action).state.clone();
        state.upload_id = Some("up-1".into());
        state.stalled = 0;
        let (job, _) = step(job, &src, Event::Sliced { state, outcome: SliceOutcome::Paused }, t0());
        let cancel = Event::Cancel { by: "api".into(), reason: None };
        let (job, action) = step(job, &src, cancel, t0());
        assert_eq!(job.phase, Phase::Cancelled);
        let upload = Some((format!("{FOLDER}database.gz"), "up-1".to_string()));
        assert_eq!(action, Action::Discard { folder: FOLDER.into(), upload });
    }

    #[test]
    fn a_replica_bound_to_the_primary_bucket_fails_before_any_write_and_deletes_nothing() {
        let (job, src) = replicate();
        let (job, action) = step(job, &src, Event::Wake, t0());
        let Action::ProbeReplica(probe) = action else { panic!("expected the probe, got {action:?}") };
        assert!(probe.key.starts_with(crate::replica::PROBE_PREFIX) && probe.key.contains(job.id.as_str()));
        let seen = crate::replica::judge_probe(&probe, Some(probe.token.as_bytes()));
        let (job, action) = step(job, &src, Event::ReplicaProbed(Ok(seen)), t0());
        assert_eq!(job.phase, Phase::Failed);
        let error = job.error.clone().unwrap();
        assert!(error.contains("BACKUPS_EU is the primary bucket BACKUPS"), "{error}");
        assert_eq!(action, Action::Done, "no clean-up: the folder there is the primary's backup");
    }

    #[test]
    fn a_probe_that_keeps_failing_fails_the_job_without_deleting_anything() {
        let (job, src) = replicate();
        let (mut job, _) = step(job, &src, Event::Wake, t0());
        let mut now = t0();
        let mut probes = Vec::new();
        loop {
            let failed = Event::ReplicaProbed(Err(StepError::transient("R2 put failed: network")));
            let (j, a) = step(job, &src, failed, now);
            job = j;
            if job.phase == Phase::Failed {
                assert_eq!(a, Action::Done);
                assert!(job.error.as_deref().unwrap().contains("R2 put failed"), "{:?}", job.error);
                break;
            }
            let Action::Sleep(at) = a else { panic!("expected a retry, got {a:?}") };
            now = at;
            let (j, a) = step(job, &src, Event::Wake, now);
            job = j;
            let Action::ProbeReplica(probe) = a else { panic!("expected the probe again, got {a:?}") };
            probes.push(probe.key);
        }
        probes.dedup();
        assert_eq!(probes.len(), 2, "each attempt probes with its own key");
        // Stopped from outside before the probe: nothing to clean either.
        let (job, _) = replicate();
        let (job, _) = step(job, &src, Event::Wake, t0());
        assert_eq!(job.abandon("source removed".into(), t0()).1, Action::Done);
    }

    #[test]
    fn a_replicate_job_recorded_before_the_probe_existed_probes_first() {
        let (job, src) = replicate();
        let mut record = serde_json::to_value(&job).unwrap();
        record["replica"].as_object_mut().unwrap().remove("identity");
        let old: Job = serde_json::from_value(record).unwrap();
        let (_, action) = step(old, &src, Event::Wake, t0());
        assert!(matches!(action, Action::ProbeReplica(_)), "{action:?}");
    }
}
