//! The export task: one backup. `queued → exporting → transferring → committed | failed`.
//!
//! While `exporting`, the provider's protocol ([`ProviderState`]) decides each request and reads
//! each answer, until its files are ready (or it skips, or it queues one child job per part of
//! an account). While `transferring`, each file is copied into R2 ([`super::copying`]); a signed
//! URL that expires mid-copy sends the job back to `exporting` only to ask for fresh URLs. Once
//! every file is stored, the manifest is written last, as the commit marker.

use serde::{Deserialize, Serialize};

use super::copying::NextFile;
use super::{is_zero, Action, Context, CopySource, Copying, Event, Job, JobId, Phase, SliceOutcome, StepError, Work};
use crate::config::SourceConfig;
use crate::http::HttpResponse;
use crate::manifest::{self, Manifest};
use crate::providers::{Download, Origin, Progress, ProviderState};
use crate::time::Timestamp;
use crate::transfer::sealed;

/// How many times one job may ask the provider for fresh download URLs.
pub const MAX_RENEWALS: u32 = 10;

/// An export's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Export {
    /// The provider's protocol state and references.
    pub provider: ProviderState,
    /// Files the provider produced, to copy in order.
    #[serde(default)]
    pub downloads: Vec<Download>,
    /// Their copy into R2.
    #[serde(flatten)]
    pub copying: Copying,
    /// A signed download URL expired mid-copy: the job is back in `exporting` only to ask the
    /// provider for fresh URLs, then resumes the copy where it stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub renewing: bool,
    /// Fresh download URLs obtained so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub renewals: u32,
    /// The copy's offset when its URL was last renewed: refused again there, the URL was not
    /// the problem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at_offset: Option<u64>,
}

impl Export {
    /// An export that has not started.
    pub fn new(provider: ProviderState) -> Self {
        Self {
            provider,
            downloads: Vec::new(),
            copying: Copying::default(),
            renewing: false,
            renewals: 0,
            renewed_at_offset: None,
        }
    }
}

/// An export starts by asking the provider.
pub(super) const START: Phase = Phase::Exporting;

/// The export's next step: the provider's next request, the next slice, or the manifest.
pub(super) fn step(mut job: Job, cx: &Context<'_>) -> (Job, Action) {
    let Job { head, work } = &mut job;
    let Work::Export(export) = work else { return job.idle(cx.now) };
    match head.phase {
        Phase::Exporting => {
            if !export.renewing && cx.now.since(head.started_at) > cx.source.export_timeout {
                let limit = super::humanize(cx.source.export_timeout);
                return job.fail(format!("the export did not finish within {limit}"), cx.now);
            }
            let decided = export.provider.advance(&cx.input(&head.params));
            match decided {
                Ok(Some(progress)) => return apply(job, progress, cx),
                Ok(None) => {}
                Err(e) => return job.step_failed(e, cx),
            }
            match export.provider.next_request(&cx.input(&head.params)) {
                Ok(req) => {
                    head.attempts += 1;
                    (job, Action::Send(req))
                }
                Err(e) => job.step_failed(e, cx),
            }
        }
        Phase::Transferring => match export.downloads.get(export.copying.artifacts.len()).cloned() {
            Some(download) => slice(job, download, cx),
            None => commit(job, cx),
        },
        _ => job.idle(cx.now),
    }
}

/// An export's events: the provider's answers while exporting, the copy's slices, the commit.
pub(super) fn on_event(mut job: Job, event: Event, cx: &Context<'_>) -> (Job, Action) {
    match (job.phase, event) {
        (Phase::Exporting, Event::Response(resp)) => on_response(job, &resp, cx),
        (Phase::Exporting | Phase::Transferring, Event::Unreachable(msg)) => {
            unanswered(&mut job, cx);
            job.retry(StepError::transient(msg), cx)
        }
        (Phase::Transferring, Event::Sliced { state, outcome: SliceOutcome::UrlExpired(answer) }) => {
            let file = job.sliced(state);
            renew(job, file, answer, cx)
        }
        (Phase::Transferring, Event::Sliced { state, outcome }) => job.on_slice(state, outcome, cx),
        (Phase::Transferring, Event::Committed) => job.succeed(Phase::Committed, cx.now),
        (Phase::Transferring, Event::CommitFailed(msg)) => job.retry(StepError::transient(msg), cx),
        (_, _) => job.idle(cx.now),
    }
}

impl Job {
    /// A queued child of `parent` that exports the part described by `provider`.
    pub fn child_of(parent: &Self, id: JobId, source: &SourceConfig, provider: ProviderState, now: Timestamp) -> Self {
        let mut job = Self::with_params(id, source, parent.trigger, None, None, parent.params.clone(), now);
        job.work = Work::Export(Export::new(provider));
        job.parent = Some(parent.id.clone());
        job
    }

    /// An export's provider state.
    pub fn provider(&self) -> Option<&ProviderState> {
        match &self.work {
            Work::Export(e) => Some(&e.provider),
            _ => None,
        }
    }

    /// What this job copied that must not be copied again, once it committed.
    pub fn dedupe_key(&self) -> Option<String> {
        (self.phase == Phase::Committed).then(|| self.provider().and_then(ProviderState::dedupe_key)).flatten()
    }
}

/// Orders the next slice of `download`'s copy.
fn slice(job: Job, download: Download, cx: &Context<'_>) -> (Job, Action) {
    let taken: Vec<&str> = job.artifacts().iter().map(|a| a.key.rsplit('/').next().unwrap_or("")).collect();
    let recipients = &cx.source.age_recipients;
    // An encrypted file is stored as `<name>.age`, an age file whatever it holds.
    let (filename, content_type) = match recipients.is_empty() {
        true => (download.filename.clone(), download.content_type.clone()),
        false => (format!("{}{}", download.filename, sealed::SUFFIX), sealed::CONTENT_TYPE.to_string()),
    };
    let key = format!("{}{}", job.folder(), manifest::object_name(&filename, &taken));
    let file = NextFile { key, filename, content_type };
    let tally = crate::dump::Tally::applies_to(&download.filename);
    let plain = |job: &Job, state: &crate::transfer::CopyState| {
        let provider = job.provider().ok_or_else(|| StepError::permanent("an export without its provider"))?;
        match &download.origin {
            Origin::Url { secret_url, authenticated } => provider
                .download_request(&cx.source.provider, secret_url, *authenticated, cx.creds)
                .map(CopySource::Http),
            Origin::Graph => provider
                .graph_export(&cx.source.provider, cx.creds, state.started_at)
                .map(|g| CopySource::Graph(Box::new(g))),
            Origin::D1Query => {
                provider.query_export(&cx.source.provider, cx.creds).map(|q| CopySource::D1Query(Box::new(q)))
            }
        }
    };
    let source = |job: &Job, state: &crate::transfer::CopyState| {
        let plain = plain(job, state)?;
        Ok(match recipients.is_empty() {
            true => plain,
            false => CopySource::Sealed { plain: Box::new(plain), recipients: recipients.clone(), tally },
        })
    };
    job.slice(file, source, cx)
}

fn on_response(job: Job, resp: &HttpResponse, cx: &Context<'_>) -> (Job, Action) {
    let mut job = job;
    let params = job.params.clone();
    let Work::Export(export) = &mut job.work else { return job.idle(cx.now) };
    match export.provider.on_response(&cx.input(&params), resp) {
        Ok(progress) => apply(job, progress, cx),
        Err(e) => {
            if e.is_retryable() {
                unanswered(&mut job, cx);
            }
            job.step_failed(e, cx)
        }
    }
}

/// The last request got no usable answer: if it created something at the provider, the
/// provider decides how to avoid a duplicate, and the job records what it says.
fn unanswered(job: &mut Job, cx: &Context<'_>) {
    let Job { head, work } = job;
    let Work::Export(export) = work else { return };
    if head.phase != Phase::Exporting || export.renewing {
        return;
    }
    if let Some(warning) = export.provider.create_unanswered(&cx.input(&head.params)) {
        if !head.warnings.contains(&warning) {
            head.warnings.push(warning);
        }
    }
}

/// Folds in what the provider's protocol decided.
fn apply(mut job: Job, progress: Progress, cx: &Context<'_>) -> (Job, Action) {
    let Job { head, work } = &mut job;
    let Work::Export(export) = work else { return job.idle(cx.now) };
    match progress {
        Progress::Pending { poll_after } => {
            let wait = job.capped(poll_after.unwrap_or(cx.source.poll_interval));
            job.wait_until(cx.now.plus(wait))
        }
        Progress::Ready(downloads) if export.renewing => {
            // Same files, fresh URLs: the copy resumes at its persisted offset.
            for d in &mut export.downloads {
                match downloads.iter().find(|fresh| fresh.filename == d.filename) {
                    Some(fresh) => d.origin = fresh.origin.clone(),
                    None => {
                        let name = d.filename.clone();
                        return job.fail(format!("the provider no longer lists {name} while renewing its URL"), cx.now);
                    }
                }
            }
            export.renewing = false;
            export.renewals += 1;
            head.phase = Phase::Transferring;
            job.step_succeeded(cx.now)
        }
        Progress::Ready(downloads) => {
            let notes = export.provider.notes();
            export.downloads = downloads;
            export.copying.transfer_started_at = Some(cx.now);
            head.phase = Phase::Transferring;
            job.note_all(notes);
            job.step_succeeded(cx.now)
        }
        Progress::Again => {
            head.next_step_at = Some(cx.now);
            (job, Action::Sleep(cx.now))
        }
        Progress::Failed(message) => job.fail(message, cx.now),
        Progress::Skip(reason) => {
            head.note = Some(reason);
            head.finished_at = Some(cx.now);
            head.phase = Phase::Skipped;
            head.next_step_at = None;
            (job, Action::Done)
        }
        Progress::Spawn(children) => {
            head.note = Some(format!("queued {} jobs, one per backend", children.len()));
            head.finished_at = Some(cx.now);
            head.phase = Phase::Dispatched;
            head.next_step_at = None;
            (job, Action::Spawn(children))
        }
    }
}

/// Every file is stored: the manifest goes last.
fn commit(mut job: Job, cx: &Context<'_>) -> (Job, Action) {
    let now = cx.now;
    let folder = job.folder();
    job.finished_at = Some(now);
    job.attempts += 1;
    let Work::Export(export) = &job.work else { return job.idle(now) };
    let manifest = Manifest {
        source: job.source.clone(),
        kind: job.kind.clone(),
        job_id: job.id.clone(),
        trigger: job.trigger,
        started_at: job.started_at,
        scheduled_for: job.scheduled_for,
        finished_at: now,
        provider: export.provider.references(&cx.source.provider),
        artifacts: export.copying.artifacts.clone(),
    };
    (job, Action::Commit { key: manifest::manifest_key(&folder), manifest: Box::new(manifest) })
}

/// A signed download URL expired mid-copy (`answer` says how): back to `exporting` for fresh
/// URLs, unless this export cannot issue them, a fresh one was refused at the same offset, or
/// it happened too often.
fn renew(mut job: Job, file: String, answer: String, cx: &Context<'_>) -> (Job, Action) {
    let offset = job.copy().map_or(0, |c| c.offset);
    let Job { head, work } = &mut job;
    let Work::Export(export) = work else {
        return job.fail(format!("the copy of {file} was refused: {answer}"), cx.now);
    };
    if !export.provider.can_renew_urls() {
        return job.fail(
            format!(
                "the signed URL of {file} expired mid-copy and this export cannot issue a new one ({answer}); the \
                 copy must fit the URL's lifetime"
            ),
            cx.now,
        );
    }
    if export.renewed_at_offset == Some(offset) {
        return job.fail(format!("{answer} (a freshly issued URL was refused too)"), cx.now);
    }
    if export.renewals >= MAX_RENEWALS {
        return job.fail(format!("the signed URL of {file} expired {MAX_RENEWALS} times ({answer})"), cx.now);
    }
    export.renewing = true;
    export.renewed_at_offset = Some(offset);
    head.phase = Phase::Exporting;
    job.step_succeeded(cx.now)
}
