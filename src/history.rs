//! What a source remembers of a finished job: a few fields, enough for health, alerts, the
//! dashboard and `/metrics` to judge and show it without reading the job.

use serde::{Deserialize, Serialize};

use crate::identity::{JobId, Task, Trigger};
use crate::job::{Job, Phase};
use crate::time::Timestamp;

/// One member's latest export jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberJobs {
    /// Its latest export that committed or failed.
    pub last_finished: Option<JobSummary>,
    /// Its latest committed export.
    pub last_committed: Option<JobSummary>,
    /// When its first job started: a backend that joined the account later is judged young
    /// (amber, not red, without a backup) from here, not from the source's start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<Timestamp>,
}

/// A finished job in a few fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Its id.
    pub id: JobId,
    /// Export or verify.
    pub task: Task,
    /// Cron, webhook or API.
    pub trigger: Trigger,
    /// How it ended.
    pub phase: Phase,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Timestamp,
    /// Bytes it stored (an export) or read back (a verification).
    pub bytes: u64,
    /// Why it failed, in the provider's words (cut to 500 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The backup folder it made or checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<String>,
    /// In account mode, the member (a Dgraph account's backend) an export backed up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// What the job warned of (a table whose big integers D1's export rounds, a paging plan
    /// that scans): at most [`MAX_SUMMARY_WARNINGS`], each cut to 500 characters, so alerts and
    /// the dashboard say it without reading the job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Warnings a job's summary keeps at most.
pub const MAX_SUMMARY_WARNINGS: usize = 10;

impl JobSummary {
    /// The summary of a finished job (`None` while it runs).
    pub fn of(job: &Job) -> Option<Self> {
        if !job.phase.is_terminal() {
            return None;
        }
        use crate::job::Work;
        let bytes = match &job.work {
            Work::Export(_) | Work::Replicate(_) => job.artifacts().iter().map(|a| a.size).sum(),
            Work::Verify(v) => v.verify.as_ref().map_or(0, |v| v.bytes_read),
            Work::Restore(_) | Work::Drill(_) => 0,
        };
        let folder = match &job.work {
            Work::Export(_) | Work::Replicate(_) => (job.phase == Phase::Committed).then(|| job.folder()),
            Work::Verify(v) => v
                .verify
                .as_ref()
                .and_then(|v| v.manifest_key.as_deref())
                .and_then(crate::manifest::folder_of)
                .map(str::to_string),
            Work::Restore(r) | Work::Drill(r) => {
                r.restore.as_ref().and_then(crate::restore::RestoreState::backup_folder)
            }
        };
        Some(Self {
            id: job.id.clone(),
            task: job.task(),
            trigger: job.trigger,
            phase: job.phase,
            started_at: job.started_at,
            finished_at: job.finished_at.unwrap_or(job.updated_at),
            bytes,
            error: job.error.as_ref().map(|e| e.chars().take(500).collect()),
            folder,
            member: job.provider().and_then(|p| p.member()),
            warnings: job.warnings.iter().take(MAX_SUMMARY_WARNINGS).map(|w| w.chars().take(500).collect()).collect(),
        })
    }
}
