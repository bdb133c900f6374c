//! The verify task: read a committed backup back from R2 in slices, re-hash every file, compare
//! with its manifest ([`crate::verify`]), and store the outcome next to the backup.
//! `queued → verifying → verified | failed`.

use serde::{Deserialize, Serialize};

use super::{Action, Context, Event, Job, Phase, StepError, Work};
use crate::time::Timestamp;
use crate::verify::{Verification, VerifyState};

/// A verify job's own state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verifying {
    /// Its progress through the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyState>,
    /// Its outcome, as recorded next to the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

/// A verify job starts reading at once.
pub(super) const START: Phase = Phase::Verifying;

/// The next verify step: a slice to read, or the record once every file was read.
pub(super) fn step(mut job: Job, cx: &Context<'_>) -> (Job, Action) {
    let Job { head, work } = &mut job;
    let (Phase::Verifying, Work::Verify(verifying)) = (head.phase, work) else { return job.idle(cx.now) };
    let state = verifying.verify.get_or_insert_with(|| VerifyState::new(None));
    head.attempts += 1;
    if state.done() {
        let record = state.verification(&head.id, cx.now);
        let key = crate::verify::verification_key(state.manifest_key.as_deref().unwrap_or_default());
        return (job, Action::RecordVerification { key, record });
    }
    state.slices += 1;
    let state = Box::new(state.clone());
    (job, Action::VerifySlice { state, settings: cx.source.transfer })
}

/// A verify job's events: a slice read, the record stored (or not).
pub(super) fn on_event(job: Job, event: Event, cx: &Context<'_>) -> (Job, Action) {
    match (job.phase, event) {
        (Phase::Verifying, Event::VerifySliced { state, outcome }) => on_slice(job, state, outcome, cx),
        (Phase::Verifying, Event::Recorded) => on_recorded(job, cx.now),
        (Phase::Verifying, Event::CommitFailed(msg)) => job.retry(StepError::transient(msg), cx),
        (_, _) => job.idle(cx.now),
    }
}

impl Job {
    /// A job that verifies the backup whose manifest is `manifest_key` (the newest when `None`).
    pub fn verify_of(mut self, manifest_key: Option<String>) -> Self {
        self.work = Work::Verify(Verifying { verify: Some(VerifyState::new(manifest_key)), verification: None });
        self
    }

    /// A verify job's outcome, once recorded.
    pub fn verification(&self) -> Option<&Verification> {
        match &self.work {
            Work::Verify(v) => v.verification.as_ref(),
            _ => None,
        }
    }

    /// A verify job's progress.
    pub fn verify_state(&self) -> Option<&VerifyState> {
        match &self.work {
            Work::Verify(v) => v.verify.as_ref(),
            _ => None,
        }
    }
}

fn on_slice(mut job: Job, state: VerifyState, outcome: Result<bool, StepError>, cx: &Context<'_>) -> (Job, Action) {
    let Work::Verify(verifying) = &mut job.work else { return job.idle(cx.now) };
    let progressed = verifying.verify.as_ref().is_none_or(|v| v.bytes_read < state.bytes_read || v.index < state.index);
    verifying.verify = Some(state);
    match outcome {
        Ok(_) => job.step_succeeded(cx.now),
        Err(e) => {
            if progressed {
                job.retries = 0;
            }
            job.step_failed(e, cx)
        }
    }
}

fn on_recorded(mut job: Job, now: Timestamp) -> (Job, Action) {
    let id = job.id.clone();
    let Work::Verify(verifying) = &mut job.work else { return job.idle(now) };
    let Some(state) = verifying.verify.as_ref() else { return job.idle(now) };
    let record = state.verification(&id, now);
    let backup = state.manifest_key.as_deref().and_then(crate::manifest::folder_of).unwrap_or("?").to_string();
    verifying.verification = Some(record.clone());
    if record.mismatches.is_empty() {
        return job.succeed(Phase::Verified, now);
    }
    job.fail(format!("backup {backup} failed verification: {}", record.mismatches.join("; ")), now)
}
