//! Applying a source's retention policy to R2, and pins. What to keep is decided by the core
//! (`crate::retention::plan`); this module reads what the plan needs and deletes what it says.
//!
//! A backup is deleted manifest first: from that moment its folder is no longer a backup, so a
//! deletion cut short leaves files that are never listed or served as one (and that the next
//! attempt at the folder, or the orphan sweep, removes). A pin marker written since the listing
//! is checked for right before the manifest goes, so a pin wins over a plan made just before it.

use std::collections::HashSet;

use futures_util::future::join_all;
use serde::Serialize;
use worker::Bucket;

use super::objects::Objects;
use super::store;
use crate::config::SourceConfig;
use crate::manifest::{folder_of, is_manifest_key, manifest_key};
use crate::retention::{backup_time, member, pin_key, plan, BackupInfo, Pin};
use crate::time::Timestamp;
use crate::verify::{verification_key, Verification};

/// How many manifests (and verification records) are read at once.
const READS_AT_ONCE: usize = 32;

/// A source's committed backups as the planner sees them.
pub(crate) struct Backups {
    /// Every backup whose manifest could be read.
    pub infos: Vec<BackupInfo>,
    /// Folders whose manifest could not be read: left out of the plan, so never deleted.
    pub unreadable: Vec<String>,
}

/// Lists the backups of `bucket` from R2 (a replica's: its own manifests, so the copy outlives a
/// lost primary), with the pin markers and verification records of `marks` too, when given (a
/// replica's pins and verifications are the primary's).
async fn backups_with(
    bucket: &Objects,
    marks: Option<&Objects>,
    source: &str,
    verifies: bool,
) -> Result<Backups, String> {
    let keys =
        store::list_keys(bucket, &format!("{source}/")).await.map_err(|e| format!("listing {source}/ failed: {e}"))?;
    let marked = match marks {
        Some(m) => {
            store::list_keys(m, &format!("{source}/")).await.map_err(|e| format!("listing {source}/ failed: {e}"))?
        }
        None => Vec::new(),
    };
    let marked_set: HashSet<&str> = marked.iter().map(String::as_str).collect();
    let marked_set = &marked_set;
    let present: HashSet<&str> = keys.iter().map(String::as_str).collect();
    let present = &present;
    let manifests: Vec<&String> = keys.iter().filter(|k| is_manifest_key(k)).collect();
    let mut found = Backups { infos: Vec::with_capacity(manifests.len()), unreadable: Vec::new() };
    for chunk in manifests.chunks(READS_AT_ONCE) {
        let read = join_all(chunk.iter().map(|key| async move {
            let manifest = store::read_manifest(bucket, key).await;
            let record = verification_key(key);
            let verified = match marks {
                Some(m) if verifies && marked_set.contains(record.as_str()) => {
                    store::read_json::<Verification>(m, &record).await.map(|v| v.outcome == "ok")
                }
                _ if verifies && present.contains(record.as_str()) => {
                    store::read_json::<Verification>(bucket, &record).await.map(|v| v.outcome == "ok")
                }
                _ => None,
            };
            (key, manifest, verified)
        }))
        .await;
        for (key, manifest, verified) in read {
            let folder = folder_of(key).unwrap_or(key).to_string();
            match manifest {
                Some(m) => found.infos.push(BackupInfo {
                    pinned: present.contains(pin_key(&folder).as_str())
                        || marked_set.contains(pin_key(&folder).as_str()),
                    folder,
                    time: backup_time(&m),
                    verified,
                    member: member(&m),
                }),
                None => found.unreadable.push(folder),
            }
        }
    }
    Ok(found)
}

/// What one application of a policy did.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Applied {
    /// Backups that stay.
    pub kept: usize,
    /// Folders deleted.
    pub deleted: Vec<String>,
    /// Folders pinned after the plan was made, so kept.
    pub pinned_meanwhile: Vec<String>,
    /// Folders whose deletion failed, with why.
    pub failed: Vec<String>,
    /// Folders whose manifest could not be read (kept).
    pub unreadable: Vec<String>,
    /// The plan deletes more than one step may: the next step goes on.
    pub more: bool,
    /// The index is being rebuilt from R2: nothing was planned in this step.
    pub rebuilding: bool,
}

/// One step of a source's retention on the primary bucket, planned from the source's backup
/// index (`runtime::index`, no R2 read), deleting at most what `budget` allows
/// (`crate::index::deletions_now`); `None` when the source has no policy. While the index is
/// being rebuilt the step advances the rebuild instead, and deletes nothing.
pub(crate) async fn apply(
    bucket: &Bucket,
    storage: &worker::Storage,
    source: &SourceConfig,
    now: Timestamp,
    budget: crate::index::StepBudget,
) -> Result<Option<Applied>, String> {
    let Some(policy) = &source.retention else { return Ok(None) };
    if super::index::advance(storage, bucket, &source.name, budget).await? != crate::index::IndexState::Ready {
        return Ok(Some(Applied { more: true, rebuilding: true, ..Applied::default() }));
    }
    let entries = super::index::all(storage).await.map_err(|e| format!("reading the backup index: {e}"))?;
    let infos: Vec<BackupInfo> = entries.iter().map(crate::index::IndexEntry::info).collect();
    let plan = plan(policy, &infos, source.verify_schedule.is_some(), now);
    let doomed: Vec<String> = plan.deleted().map(|d| d.folder.clone()).collect();
    let (now_, more) = crate::index::deletions_now(doomed, budget, false);
    let mut applied = Applied { kept: plan.kept().count(), more, ..Applied::default() };
    for folder in now_ {
        match delete_backup(&Objects::from(bucket), None, &folder).await {
            Ok(true) => {
                super::index::forget(storage, &folder).await;
                applied.deleted.push(folder);
            }
            Ok(false) => {
                applied.kept += 1;
                if let Err(e) = super::index::record_pin(storage, &folder, true).await {
                    worker::console_error!("backup index: recording the pin of {folder} failed: {e}");
                }
                applied.pinned_meanwhile.push(folder);
            }
            Err(e) => applied.failed.push(format!("{folder}: {e}")),
        }
    }
    Ok(Some(applied))
}

/// Retention of a replica bucket, counting the pins and verification records of `marks` (the
/// primary bucket): planned from the replica's own manifests, deleting at most what `budget`
/// allows per step (`more` says the next step goes on).
pub(crate) async fn apply_to(
    bucket: &Objects,
    marks: Option<&Objects>,
    source: &SourceConfig,
    now: Timestamp,
    budget: crate::index::StepBudget,
) -> Result<Option<Applied>, String> {
    let Some(policy) = &source.retention else { return Ok(None) };
    let verifies = source.verify_schedule.is_some();
    let found = backups_with(bucket, marks, &source.name, verifies).await?;
    let (plan, unreadable) = (plan(policy, &found.infos, verifies, now), found.unreadable);
    let doomed: Vec<String> = plan.deleted().map(|d| d.folder.clone()).collect();
    let (now_, more) = crate::index::deletions_now(doomed, budget, marks.is_some());
    let mut applied = Applied { kept: plan.kept().count(), unreadable, more, ..Applied::default() };
    for folder in now_ {
        match delete_backup(bucket, marks, &folder).await {
            Ok(true) => applied.deleted.push(folder),
            Ok(false) => {
                applied.kept += 1;
                applied.pinned_meanwhile.push(folder);
            }
            Err(e) => applied.failed.push(format!("{folder}: {e}")),
        }
    }
    Ok(Some(applied))
}

/// Deletes one backup, manifest first, then every other object of its folder; `Ok(false)` when
/// it was pinned meanwhile (nothing is deleted).
async fn delete_backup(bucket: &Objects, marks: Option<&Objects>, folder: &str) -> Result<bool, String> {
    let pin = pin_key(folder);
    for b in std::iter::once(bucket).chain(marks) {
        if b.head(&pin).await.map_err(|e| e.message().to_string())?.is_some() {
            return Ok(false);
        }
    }
    let manifest = manifest_key(folder);
    bucket.delete(&manifest).await.map_err(|e| e.message().to_string())?;
    // A folder left half-deleted has no manifest: it is never listed, and the daily sweep ends it.
    store::delete_all(bucket, folder).await?;
    Ok(true)
}

/// Pins (`pin`) or unpins a backup; `Ok(false)` when `folder` holds no committed backup.
pub(crate) async fn set_pin(bucket: &Bucket, folder: &str, pin: bool, now: Timestamp) -> Result<bool, String> {
    let manifest = manifest_key(folder);
    if bucket.head(manifest.clone()).await.map_err(|e| format!("R2 head of {manifest} failed: {e}"))?.is_none() {
        return Ok(false);
    }
    let key = pin_key(folder);
    if pin {
        store::put_json(bucket, &key, &Pin { pinned_at: now }).await?;
    } else {
        bucket.delete(key.clone()).await.map_err(|e| format!("R2 delete of {key} failed: {e}"))?;
    }
    Ok(true)
}
