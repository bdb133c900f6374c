//! The per-source backup index, and the per-invocation bounds every request handler and alarm
//! step of Ferry stays within.
//!
//! # The platform's limits (where they are enforced)
//!
//! A Worker invocation (a request, a cron event, one Durable Object request or alarm) may make at
//! most [`SUBREQUESTS_FREE`] subrequests on Workers Free and [`SUBREQUESTS_PAID`] on Workers Paid
//! (R2 binding calls and calls to a Durable Object count), and has a CPU budget of
//! [`CPU_MS_FREE`] / [`CPU_MS_PAID`] by default (Cloudflare's Workers limits page; see
//! `shared/reference/workers-rs.md` §4.2: newer pages give 10,000 subrequests on Paid, and the
//! lower number is the one held to). Work whose size grows with the number of backups (listing,
//! retention planning and deleting, rebuilding this index) therefore goes in steps, each spending
//! at most a [`StepBudget`] of subrequests, configured by the Worker var [`STEP_BUDGET_VAR`]. The
//! cost of each unit of work is a constant here (`*_PER_*`), and the step sizes are computed from
//! them, so "how many R2 calls does one step make" is answered by `cargo test`.
//!
//! # The index
//!
//! Each source's Durable Object keeps one small [`IndexEntry`] per committed backup (folder,
//! time, size, member, pinned, verified) under [`ENTRY_PREFIX`] in its storage. Durable Object
//! storage rather than an R2 object: the source's object is already the single writer of its
//! backups (commit, verify, retention's deletions run in it; a pin goes through it), its storage
//! calls are not subrequests, one entry per key makes each update one small write with no
//! read-modify-write of a large blob, and a page is a range read in key order (folder names start
//! with the backup's start time). R2 stays the truth: a lost or never-built index is rebuilt from
//! R2 in bounded steps ([`IndexState::Building`]), a list page of folders at a time, and nothing is
//! planned for deletion until it is [`IndexState::Ready`].

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;
use crate::retention::{backup_time, member, BackupInfo};
use crate::time::Timestamp;

/// Subrequests one invocation may make on Workers Free.
pub const SUBREQUESTS_FREE: u32 = 50;
/// Subrequests one invocation may make on Workers Paid (the lower of the documented values).
pub const SUBREQUESTS_PAID: u32 = 1000;
/// CPU milliseconds of one invocation on Workers Free.
pub const CPU_MS_FREE: u32 = 10;
/// CPU milliseconds of one invocation on Workers Paid by default (`[limits] cpu_ms` raises it).
pub const CPU_MS_PAID: u32 = 30_000;

/// The Worker var that sets the subrequests one step may spend (a whole number).
pub const STEP_BUDGET_VAR: &str = "FERRY_STEP_SUBREQUESTS";
/// The default step budget: half of [`SUBREQUESTS_PAID`], leaving the rest of an invocation to
/// whatever else it does (an alarm that commits a backup and then runs retention).
pub const DEFAULT_STEP_SUBREQUESTS: u32 = 500;
/// The smallest step budget: one unit of the costliest work plus its overhead.
pub const MIN_STEP_SUBREQUESTS: u32 = 5;

/// Backups a listing page shows when the request gives no `limit` (at most
/// [`StepBudget::listing_page`]).
pub const DEFAULT_LISTING_PAGE: usize = 100;
/// R2 calls the listing makes per backup it shows: its manifest, verification and drill records.
pub const LISTING_PER_BACKUP: u32 = 3;
/// Subrequests of a listing besides its backups: the call to the source's object (the index).
pub const LISTING_OVERHEAD: u32 = 1;
/// R2 calls a rebuild makes per folder: the manifest `get`, the pin `head`, the verification `get`.
pub const REBUILD_PER_FOLDER: u32 = 3;
/// R2 calls of a rebuild step besides its folders: one delimited list page.
pub const REBUILD_OVERHEAD: u32 = 1;
/// R2 calls retention makes per deleted backup (a folder of at most 1,000 objects, Ferry's own):
/// the pin `head`, the manifest `delete`, the folder's list page and one `delete` of its keys.
pub const DELETE_PER_BACKUP: u32 = 4;
/// Extra R2 calls per deleted backup when another bucket's pins count too (a replica's pass).
pub const DELETE_MARKS_EXTRA: u32 = 1;

/// Durable Object storage prefix of the index entries (`index:{folder}`).
pub const ENTRY_PREFIX: &str = "index:";
/// Durable Object storage key of the index's [`IndexState`].
pub const STATE_KEY: &str = "index_state";

/// Why a step budget is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// Not a whole number in range.
    #[error(
        "invalid configuration: var {STEP_BUDGET_VAR} is {0:?}; expected a whole number from \
         {MIN_STEP_SUBREQUESTS} to {SUBREQUESTS_PAID} (subrequests one step may spend)"
    )]
    Invalid(String),
}

/// Subrequests one step (of a listing, a retention pass, an index rebuild) may spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBudget(u32);

impl Default for StepBudget {
    fn default() -> Self {
        Self(DEFAULT_STEP_SUBREQUESTS)
    }
}

impl StepBudget {
    /// Reads [`STEP_BUDGET_VAR`] (`None`: unset, the default).
    pub fn parse(var: Option<&str>) -> Result<Self, BudgetError> {
        let Some(text) = var else { return Ok(Self::default()) };
        match text.trim().parse::<u32>() {
            Ok(n) if (MIN_STEP_SUBREQUESTS..=SUBREQUESTS_PAID).contains(&n) => Ok(Self(n)),
            _ => Err(BudgetError::Invalid(text.to_string())),
        }
    }

    /// The subrequests it allows.
    pub fn subrequests(self) -> u32 {
        self.0
    }

    /// Backups one listing page shows at most.
    pub fn listing_page(self) -> usize {
        (self.0.saturating_sub(LISTING_OVERHEAD) / LISTING_PER_BACKUP).max(1) as usize
    }

    /// Folders one rebuild step reads at most.
    pub fn rebuild_folders(self) -> u32 {
        (self.0.saturating_sub(REBUILD_OVERHEAD) / REBUILD_PER_FOLDER).max(1)
    }

    /// Backups one retention step deletes at most (`marks`: pins of a second bucket count too).
    pub fn deletions(self, marks: bool) -> usize {
        let each = DELETE_PER_BACKUP + if marks { DELETE_MARKS_EXTRA } else { 0 };
        (self.0 / each).max(1) as usize
    }
}

/// Subrequests a listing page of `shown` backups makes.
pub fn listing_cost(shown: usize) -> u32 {
    LISTING_OVERHEAD + LISTING_PER_BACKUP * shown as u32
}

/// Subrequests a rebuild step over `folders` folders makes.
pub fn rebuild_cost(folders: usize) -> u32 {
    REBUILD_OVERHEAD + REBUILD_PER_FOLDER * folders as u32
}

/// Subrequests a retention step deleting `deleted` backups makes (reading the index: none).
pub fn deletion_cost(deleted: usize, marks: bool) -> u32 {
    (DELETE_PER_BACKUP + if marks { DELETE_MARKS_EXTRA } else { 0 }) * deleted as u32
}

/// One committed backup, as listing and retention need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// `{source}/{stamp}-{job}/`.
    pub folder: String,
    /// Its time for retention: the fire time it served, else its start.
    pub time: Timestamp,
    /// Bytes of its files.
    pub bytes: u64,
    /// In account mode, the member it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// Whether it carries a pin marker.
    #[serde(default)]
    pub pinned: bool,
    /// Its last verification: `Some(true)` ok, `Some(false)` mismatch, `None` never verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}

impl IndexEntry {
    /// The entry of a backup committed with `manifest` in `folder`.
    pub fn of(folder: &str, manifest: &Manifest, pinned: bool, verified: Option<bool>) -> Self {
        Self {
            folder: folder.to_string(),
            time: backup_time(manifest),
            bytes: manifest.artifacts.iter().map(|a| a.size).sum(),
            member: member(manifest),
            pinned,
            verified,
        }
    }

    /// What the retention planner reads.
    pub fn info(&self) -> BackupInfo {
        BackupInfo {
            folder: self.folder.clone(),
            time: self.time,
            pinned: self.pinned,
            verified: self.verified,
            member: self.member.clone(),
        }
    }
}

/// The storage key of a folder's entry.
pub fn entry_key(folder: &str) -> String {
    format!("{ENTRY_PREFIX}{folder}")
}

/// Whether the index can be trusted, persisted as [`STATE_KEY`] (missing: never built).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum IndexState {
    /// Being rebuilt from R2: folders up to `after` are indexed.
    Building {
        /// The last folder read (its prefix); `None` before the first step.
        after: Option<String>,
    },
    /// Every committed backup has its entry.
    Ready,
}

impl IndexState {
    /// The state of an index that was never built (or whose state was lost): rebuild from the start.
    pub fn missing() -> Self {
        Self::Building { after: None }
    }
}

/// The R2 `startAfter` of the next rebuild list page after `folder`: past every key inside it.
pub fn past_folder(folder: &str) -> String {
    format!("{folder}\u{10FFFF}")
}

/// One rebuild step's decision on a delimited list page: the folders to read now (at most what
/// the budget allows) and the state after them. `more` is whether R2 said the listing goes on.
pub fn rebuild_step(mut folders: Vec<String>, more: bool, budget: StepBudget) -> (Vec<String>, IndexState) {
    folders.sort();
    let cap = budget.rebuild_folders() as usize;
    let cut = folders.len() > cap;
    folders.truncate(cap);
    let state = match folders.last() {
        Some(last) if more || cut => IndexState::Building { after: Some(last.clone()) },
        None if more => IndexState::Building { after: None },
        _ => IndexState::Ready,
    };
    (folders, state)
}

/// A page of the listing: entries newest first (as read in reverse key order, `limit + 1` of
/// them at most, filtered by `member` when given), cut at `limit`, with the folder to continue
/// before when more remain.
pub fn page(newest_first: Vec<IndexEntry>, limit: usize, member: Option<&str>) -> (Vec<IndexEntry>, Option<String>) {
    let limit = limit.max(1);
    let mut shown: Vec<IndexEntry> =
        newest_first.into_iter().filter(|e| member.is_none_or(|m| e.member.as_deref() == Some(m))).collect();
    let next = (shown.len() > limit).then(|| shown[limit - 1].folder.clone());
    shown.truncate(limit);
    (shown, next)
}

/// One retention step: the backups to delete now (the plan's order, at most what the budget
/// allows) and whether more wait for the next step.
pub fn deletions_now(mut doomed: Vec<String>, budget: StepBudget, marks: bool) -> (Vec<String>, bool) {
    let cap = budget.deletions(marks);
    let more = doomed.len() > cap;
    doomed.truncate(cap);
    (doomed, more)
}

#[cfg(test)]
mod tests;
