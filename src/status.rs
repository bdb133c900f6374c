//! What a source's Durable Object reports about it: the job in flight with its progress, the
//! health judgement, recent jobs and counts. `GET /v1/sources`, `GET /metrics` and the dashboard
//! all read this one report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::health::{assess, Health};
use crate::job::{CopyProgress, Job, Phase};
use crate::ledger::{JobSummary, Ledger};
use crate::schedule::Schedule;
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
}

impl SourceReport {
    /// The report from the ledger, the job in flight and the most recent job.
    pub fn new(
        ledger: &Ledger,
        current: Option<&Job>,
        last: Option<&Job>,
        schedule: &Schedule,
        max_age: Option<std::time::Duration>,
        now: Timestamp,
    ) -> Self {
        Self {
            current_job: current.map(Job::public_json),
            progress: current.and_then(|j| j.progress(now)),
            last_job: last.map(Job::public_json),
            health: assess(schedule, max_age, &ledger.history, ledger.watched_since, now),
            history: ledger.history.clone(),
            outcomes: ledger.outcomes.clone(),
        }
    }
}
