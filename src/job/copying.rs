//! The copy that exports and replicate jobs share: files copied into R2 one after another, each
//! in slices ([`crate::transfer`]), with the same watchdogs (the copy's timeout, stalled slices,
//! restarts from zero), the same record of restarts and the same end of a file. Where a file's
//! bytes come from and what a finished file is checked against are the task's.

use serde::{Deserialize, Serialize};

use super::{Action, Context, CopyProgress, CopySource, Job, SliceOrder, SliceOutcome, Work};
use crate::error::StepError;
use crate::manifest::Artifact;
use crate::time::Timestamp;
use crate::transfer::CopyState;

/// A copying task's files: those stored, the one in flight, and when copying began.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Copying {
    /// Files already stored in R2, in order.
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    /// The copy in progress: the next file's resumable state, persisted after every part.
    #[serde(default)]
    pub copy: Option<CopyState>,
    /// When copying began (an export: when the provider's files were ready).
    #[serde(default)]
    pub transfer_started_at: Option<Timestamp>,
    /// Every time a copy went back to byte 0, with the file and the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarts: Vec<String>,
}

impl Copying {
    /// How far the copy has come at `now` of `files_total` files: bytes stored (finished files
    /// and the file in flight), the total when it is known (`known_total`, or the file in flight
    /// is the last one and its length was declared), the average rate since copying began, and
    /// the time left at that rate.
    pub fn progress(&self, files_total: usize, known_total: Option<u64>, now: Timestamp) -> CopyProgress {
        let done: u64 = self.artifacts.iter().map(|a| a.size).sum();
        let current = self.copy.as_ref();
        let copied = done + current.map_or(0, |c| c.offset);
        let last_file = files_total > 0 && self.artifacts.len() + 1 >= files_total;
        let length = current.and_then(|c| c.validators.as_ref()).and_then(|v| v.length);
        let total = match (known_total, last_file, length) {
            (Some(total), _, _) => Some(total),
            (None, true, Some(len)) => Some(done + len),
            _ if files_total > 0 && self.artifacts.len() == files_total => Some(done),
            _ => None,
        };
        let elapsed = self.transfer_started_at.map(|t| now.since(t).as_secs_f64()).unwrap_or(0.0);
        let rate = (elapsed >= 1.0 && copied > 0).then(|| copied as f64 / elapsed);
        let eta = match (total, rate) {
            (Some(total), Some(rate)) if rate > 0.0 => Some((total.saturating_sub(copied) as f64 / rate).ceil() as u64),
            _ => None,
        };
        CopyProgress {
            bytes_copied: copied,
            bytes_total: total,
            bytes_per_second: rate.map(|r| r.round() as u64),
            eta_seconds: eta,
            file: current.map(|c| c.key.rsplit('/').next().unwrap_or_default().to_string()),
            files_done: self.artifacts.len(),
            files_total,
        }
    }
}

/// The next file to copy, as its task names it.
pub(super) struct NextFile {
    /// Its R2 key, for a copy that starts now.
    pub key: String,
    /// The provider's name for it (or the primary's key, for a replica).
    pub filename: String,
    /// Content type to store.
    pub content_type: String,
}

impl Job {
    /// Orders the next slice of `file`'s copy, unless a watchdog says stop. `source` says where
    /// the slice's bytes come from, given the copy's state.
    pub(super) fn slice(
        mut self,
        file: NextFile,
        source: impl FnOnce(&Self, &CopyState) -> Result<CopySource, StepError>,
        cx: &Context<'_>,
    ) -> (Self, Action) {
        let Some(copying) = self.copying_mut() else {
            return self.fail("only an export or a replicate job copies files".into(), cx.now);
        };
        let index = copying.artifacts.len() as u32;
        let mut state = copying.copy.take().unwrap_or_else(|| CopyState::new(file.key, index, cx.now));
        if let Some(why) = self.copy_stopped(&state, &file.filename, cx) {
            self.keep_copy(state);
            return self.fail(why, cx.now);
        }
        let source = match source(&self, &state) {
            Ok(source) => source,
            Err(e) => {
                self.keep_copy(state);
                return self.step_failed(e, cx);
            }
        };
        // Counted before the slice runs: a slice cut off without storing a part counts as stalled.
        state.slices += 1;
        state.stalled += 1;
        self.attempts += 1;
        self.keep_copy(state.clone());
        let order = SliceOrder {
            source,
            state,
            filename: file.filename,
            content_type: file.content_type,
            settings: cx.source.transfer,
        };
        (self, Action::CopySlice(Box::new(order)))
    }

    /// Records the copy's state on the job.
    fn keep_copy(&mut self, state: CopyState) {
        if let Some(copying) = self.copying_mut() {
            copying.copy = Some(state);
        }
    }

    /// Why the copy must stop for good before its next slice (its watchdogs), if it must.
    fn copy_stopped(&self, state: &CopyState, filename: &str, cx: &Context<'_>) -> Option<String> {
        let settings = cx.source.transfer;
        let since = self.copying().and_then(|c| c.transfer_started_at);
        let copying_since = since.unwrap_or(state.started_at);
        if cx.now.since(copying_since) > settings.copy_timeout {
            let limit = super::humanize(settings.copy_timeout);
            return Some(format!("copying did not finish within {limit} (copy_timeout_minutes)"));
        }
        if state.stalled >= settings.max_stalled_slices {
            let n = state.stalled;
            let last = self.last_error.as_deref().map(|e| format!("; last error: {e}")).unwrap_or_default();
            return Some(format!(
                "the copy of {filename} made no progress in {n} consecutive slices (no part stored); giving up \
                 (max_stalled_slices){last}"
            ));
        }
        if state.restarts > settings.max_restarts {
            let why = state.last_restart.clone().unwrap_or_default();
            return Some(format!(
                "the copy of {filename} had to restart from zero more than {} times; last: {why}",
                settings.max_restarts
            ));
        }
        None
    }

    /// The name of the file being copied, for the job's record.
    fn current_file(&self) -> String {
        let done = self.artifacts().len();
        let name = match &self.work {
            Work::Export(e) => e.downloads.get(done).map(|d| d.filename.clone()),
            Work::Replicate(r) => r.replica.as_ref().and_then(|r| r.file(done)).map(|f| f.filename.clone()),
            Work::Verify(_) | Work::Restore(_) | Work::Drill(_) => None,
        };
        name.unwrap_or_else(|| "?".to_string())
    }

    /// Records how a slice left the copy: its state, its restarts and warnings. Returns the
    /// file's name.
    pub(super) fn sliced(&mut self, state: CopyState) -> String {
        let before = self.copy().map_or(0, |c| c.restarts);
        let file = self.current_file();
        if state.restarts > before {
            let why = state.last_restart.as_deref().unwrap_or("no reason given");
            let line =
                format!("{file}: restarted from byte 0 ({} of {}): {why}", state.restarts - before, state.restarts);
            if let Some(copying) = self.copying_mut() {
                copying.restarts.push(line);
            }
        }
        self.note_all(state.warnings.clone());
        self.keep_copy(state);
        file
    }

    /// Folds in how a slice ended: its restarts and warnings recorded, then the copy goes on, the
    /// file is stored (after the task's own check), or the step is retried. (An export handles
    /// an expired URL itself, before this.)
    pub(super) fn on_slice(mut self, state: CopyState, outcome: SliceOutcome, cx: &Context<'_>) -> (Self, Action) {
        if self.copying().is_none() {
            return self.fail("only an export or a replicate job copies files".into(), cx.now);
        }
        let progressed = state.stalled == 0;
        let file = self.sliced(state);
        match outcome {
            SliceOutcome::Paused => self.step_succeeded(cx.now),
            SliceOutcome::Finished(artifact) => {
                let checked = match &self.work {
                    Work::Replicate(r) => r.check(self.artifacts().len(), &artifact),
                    _ => Ok(()),
                };
                if let Some(copying) = self.copying_mut() {
                    copying.copy = None;
                }
                if let Err(why) = checked {
                    // Its upload is complete: the folder's deletion removes the object.
                    return self.fail(why, cx.now);
                }
                self.note_all(crate::providers::artifact_warnings(&artifact));
                // The part hashes stay in the copy's part records (`CopyState::part_key`), out of
                // the job's record, which stays small whatever the part count; the runtime puts
                // them into the manifest when it writes it.
                let mut artifact = artifact;
                artifact.part_sha256 = Vec::new();
                if let Some(copying) = self.copying_mut() {
                    copying.artifacts.push(artifact);
                }
                self.step_succeeded(cx.now)
            }
            SliceOutcome::UrlExpired(answer) => self.fail(format!("the copy of {file} was refused: {answer}"), cx.now),
            SliceOutcome::Failed(err) => {
                if progressed {
                    // Parts were stored before the failure: the copy is moving, start counting anew.
                    self.retries = 0;
                }
                self.step_failed(err, cx)
            }
        }
    }
}
