//! The restore and drill tasks: `queued → restoring → restored | failed`, each step decided by
//! the provider's own phase machine ([`crate::restore`]): a request to send, R2 work for the
//! runtime, a wait, or the end. A drill is a restore into a scratch target that compares and
//! cleans up; a failing or stopped one deletes what it created before the job ends.

use serde::{Deserialize, Serialize};

use super::{Action, Context, Event, Job, Phase, StepError, Task, Work};
use crate::restore::{Answer, IoDone, Next, RestoreCx, RestoreState};

/// A restore or drill job's own state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Restoring {
    /// The provider's restore state; `None` for one that could not be planned (the job then
    /// fails at its first step with the reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreState>,
}

/// A restore talks to the provider at once.
pub(super) const START: Phase = Phase::Restoring;

/// The next restore step: a request, R2 work, or the end.
pub(super) fn step(mut job: Job, cx: &Context<'_>) -> (Job, Action) {
    if job.phase != Phase::Restoring {
        return job.idle(cx.now);
    }
    let Some(mut state) = take(&mut job) else {
        return job.fail("restore job without its state".into(), cx.now);
    };
    let next = state.next(&RestoreCx { source: cx.source, creds: cx.creds, job: &job.id, now: cx.now });
    if matches!(next, Ok(Next::Send(_))) {
        state.sending(&job.id);
    }
    if let Work::Restore(r) | Work::Drill(r) = &mut job.work {
        r.restore = Some(state);
    }
    match next {
        Ok(Next::Send(req)) => {
            job.attempts += 1;
            (job, Action::Send(req))
        }
        Ok(Next::Io(crate::restore::Io::Record { .. })) if job.cancelled.is_some() => {
            // A cancelled drill found nothing about the backup: no record goes next to it.
            let answer = match state_mut(&mut job) {
                Some(state) => state.on_io(IoDone::Recorded, cx.now),
                None => Err(StepError::permanent("restore job without its state")),
            };
            on_answer(job, answer, cx)
        }
        Ok(Next::Io(io)) => {
            job.attempts += 1;
            (job, Action::Restore(Box::new(io)))
        }
        Ok(Next::Finished(Ok(note))) => {
            job.note = Some(note);
            job.succeed(Phase::Restored, cx.now)
        }
        Ok(Next::Finished(Err(message))) => job.fail(message, cx.now),
        Err(e) => failed(job, e, cx),
    }
}

/// A restore's events: the provider's answers and the R2 work's outcome.
pub(super) fn on_event(mut job: Job, event: Event, cx: &Context<'_>) -> (Job, Action) {
    let now = cx.now;
    match (job.phase, event) {
        (Phase::Restoring, Event::Response(resp)) => {
            let answer = match state_mut(&mut job) {
                Some(state) => state.on_response(&resp, now),
                None => Err(StepError::permanent("restore job without its state")),
            };
            on_answer(job, answer, cx)
        }
        (Phase::Restoring, Event::RestoreIo(done)) => {
            if let Ok(IoDone::Manifest(key, manifest)) = &done {
                if let Some(why) = encrypted_backup(key, manifest, cx.source) {
                    return failed(job, StepError::permanent(why), cx);
                }
            }
            let answer = match (state_mut(&mut job), done) {
                (Some(state), Ok(done)) => state.on_io(done, now),
                (_, Err(e)) => Err(e),
                (None, _) => Err(StepError::permanent("restore job without its state")),
            };
            on_answer(job, answer, cx)
        }
        (Phase::Restoring, Event::Unreachable(msg)) => match state_mut(&mut job).and_then(|s| s.unanswered(&msg)) {
            Some(reason) => failed(job, StepError::permanent(reason), cx),
            None => failed(job, StepError::transient(msg), cx),
        },
        (_, _) => job.idle(now),
    }
}

impl Job {
    /// A job that restores (or drills) as `state` says; `task` is `Restore` or `Drill` (any other
    /// is taken as a restore).
    pub fn restore_of(mut self, task: Task, state: RestoreState) -> Self {
        self.work = work(task, Some(state));
        self
    }

    /// A job of `task` (`Restore` or `Drill`) as its plan came out: the restore's state, or why
    /// it cannot be planned. One that cannot is still a job of its task (never an export): it
    /// fails at its first step with the reason.
    pub fn planned(mut self, task: Task, plan: Result<RestoreState, String>) -> Self {
        match plan {
            Ok(state) => self.restore_of(task, state),
            Err(reason) => {
                self.work = work(task, None);
                let what = if task == Task::Drill { "the drill" } else { "the restore" };
                self.error = Some(format!("{what} could not start: {reason}"));
                self
            }
        }
    }

    /// A restore or drill job's state.
    pub fn restore_state(&self) -> Option<&RestoreState> {
        match &self.work {
            Work::Restore(r) | Work::Drill(r) => r.restore.as_ref(),
            _ => None,
        }
    }
}

fn work(task: Task, restore: Option<RestoreState>) -> Work {
    let state = Restoring { restore };
    if task == Task::Drill {
        Work::Drill(state)
    } else {
        Work::Restore(state)
    }
}

fn state_mut(job: &mut Job) -> Option<&mut RestoreState> {
    match &mut job.work {
        Work::Restore(r) | Work::Drill(r) => r.restore.as_mut(),
        _ => None,
    }
}

fn take(job: &mut Job) -> Option<RestoreState> {
    match &mut job.work {
        Work::Restore(r) | Work::Drill(r) => r.restore.take(),
        _ => None,
    }
}

/// Asks a stopping restore to clean up first: true when it has clean-up steps to run (staged
/// objects, a drill's scratch database or instance), which end the job with `message`.
pub(super) fn clean_up_first(job: &mut Job, message: &str) -> bool {
    state_mut(job).is_some_and(|s| s.fail_after_cleanup(message.to_string()))
}

/// Drop the provider state of a job whose clean-up was given up: nothing more is sent.
pub(super) fn give_up(job: &mut Job) {
    take(job);
}

fn on_answer(job: Job, answer: Result<Answer, StepError>, cx: &Context<'_>) -> (Job, Action) {
    match answer {
        Ok(Answer::Continue) => job.step_succeeded(cx.now),
        Ok(Answer::Pending) => job.wait_until(cx.now.plus(cx.source.poll_interval)),
        Ok(Answer::WaitUntil(at)) => job.wait_until(at.max(cx.now)),
        Err(e) => failed(job, e, cx),
    }
}

/// A restore step failed: retried while the error is transient and tries are left; then a
/// drill deletes its scratch database and records the outcome before the job fails.
fn failed(mut job: Job, err: StepError, cx: &Context<'_>) -> (Job, Action) {
    if err.is_retryable() && job.retries < cx.source.retry.max_attempts {
        return job.retry(err, cx);
    }
    let message = if err.is_retryable() {
        format!("{} (gave up after {} tries)", err.message(), job.retries + 1)
    } else {
        err.message().to_string()
    };
    if clean_up_first(&mut job, &message) {
        return job.cleaning_up(message, cx.now);
    }
    job.fail(message, cx.now)
}

/// Why a restore or drill of an encrypted backup stops before it touches anything, if it must:
/// D1's restores and drills and Aura's logical loads and drills decrypt, with the identity the
/// source names.
fn encrypted_backup(
    manifest_key: &str,
    manifest: &crate::manifest::Manifest,
    source: &crate::config::SourceConfig,
) -> Option<String> {
    use crate::providers::ProviderConfig;
    if !manifest.artifacts.iter().any(crate::transfer::sealed::is_encrypted) {
        return None;
    }
    if !matches!(source.provider, ProviderConfig::D1(_) | ProviderConfig::Aura(_)) {
        return Some(format!(
            "backup {manifest_key} is encrypted with age (its files end in .age), and restores and drills of {} \
             backups do not decrypt yet: nothing was touched. Decrypt each file with `age -d -i key.txt <file>.age \
             > <file>` and restore it by hand (see the README's \"Encrypted backups\")",
            source.kind()
        ));
    }
    source.age_identity_secret.is_none().then(|| {
        format!(
            "backup {manifest_key} is encrypted with age and the source names no identity to decrypt it with: \
             nothing was touched. Put the age identity (AGE-SECRET-KEY-1…) in a Worker secret (wrangler secret \
             put FERRY_AGE_IDENTITY) and name it in the source's age_identity_secret"
        )
    })
}
