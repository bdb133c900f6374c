//! What a source's Durable Object reports about it: the job in flight with its progress, the
//! health judgement, recent jobs and counts. `GET /v1/sources`, `GET /metrics` and the dashboard
//! all read this one report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::health::Health;
use crate::history::JobSummary;
use crate::job::{CopyProgress, Job, Phase};
use crate::ledger::Ledger;
use crate::time::Timestamp;

/// One source's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceReport {
    /// The job in flight (the API's job JSON), if any.
    pub current_job: Option<Value>,
    /// Its copy's progress, while it copies.
    pub progress: Option<CopyProgress>,
    /// The most recent job (the API's job JSON), running or finished.
    pub last_job: Option<Value>,
    /// Green, amber or red, and why.
    pub health: Health,
    /// The latest finished jobs, oldest first.
    pub history: Vec<JobSummary>,
    /// Finished jobs by how they ended, since the first.
    pub outcomes: BTreeMap<Phase, u64>,
    /// In account mode, each member (a Dgraph account's backend) on its own: its health and its
    /// newest committed backup. `health` is then the worst member's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, MemberStatus>,
}

/// One member of an account-mode source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Green, amber or red, and why, for this member alone.
    pub health: Health,
    /// Its newest committed backup.
    pub last_backup: Option<JobSummary>,
}

impl SourceReport {
    /// The report from the ledger, the job in flight and the most recent job.
    pub fn new(
        ledger: &Ledger,
        current: Option<&Job>,
        last: Option<&Job>,
        source: &crate::config::SourceConfig,
        now: Timestamp,
    ) -> Self {
        let (health, judged) = ledger.health(source, now);
        let members = judged
            .into_iter()
            .map(|(member, health)| {
                let last_backup = ledger.members.get(&member).and_then(|m| m.last_committed.clone());
                (member, MemberStatus { health, last_backup })
            })
            .collect();
        Self {
            current_job: current.map(Job::public_json),
            progress: current.and_then(|j| j.progress(now)),
            last_job: last.map(Job::public_json),
            health,
            history: ledger.history.clone(),
            outcomes: ledger.outcomes.clone(),
            members,
        }
    }
}
