//! The daily orphan sweep: what to abort and delete, decided without I/O.
//!
//! A copy that is killed, or a job that fails and whose clean-up fails too, can leave things in
//! R2 that no manifest commits: an open multipart upload (invisible to listings, its parts
//! billed until aborted), staging objects, a folder of files whose job never committed. Each
//! source's Durable Object records every multipart upload it opens (before any part is sent) and
//! every clean-up that failed; once a UTC day the runtime lists the bucket, asks each source what
//! it recorded and which jobs are in flight, and this module decides what goes.
//!
//! It is pure (the bucket's listing, the records and "now" come in as values) because the rules
//! that protect backups must be tested exhaustively with `cargo test`:
//! - a folder with a manifest is a committed backup and nothing in it is ever touched;
//! - the folder and the uploads of a job in flight are never touched, however old;
//! - a folder without a manifest goes only when its newest object is older than
//!   [`STALE_AFTER`], or when its job recorded it as a failed clean-up;
//! - only Ferry's own layout (`{source}/{stamp}-{job_id}/`, see `manifest::parse_folder`) is
//!   judged: other keys in the bucket, and the reserved `_ferry/` prefix, are left alone.
//!
//! The runtime feeds listings in batches cut at folder boundaries ([`split_at_folder`]), so one
//! invocation does bounded work and a large bucket is swept over several cron ticks ([`Sweep`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::manifest::{folder_of, manifest_key, parse_folder};
use crate::time::Timestamp;

/// A folder without a manifest is left alone until its newest object is this old: a job that
/// is not recorded as in flight may still be starting or committing.
pub const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Where sweep reports are written: a prefix no source can have (source names start with a
/// letter or digit), so backup listings never see it.
pub const REPORT_PREFIX: &str = "_ferry/sweeps/";

/// Durable Object storage prefix of a source's open multipart uploads.
pub const UPLOAD_PREFIX: &str = "upload:";

/// Durable Object storage prefix of a source's failed clean-ups.
pub const LEFTOVER_PREFIX: &str = "leftover:";

/// Entries one report lists at most per kind (removed folders, aborted uploads, errors, kept);
/// counts stay exact beyond it.
pub const REPORT_LIST_CAP: usize = 200;

/// The report of the sweep of `day` (`YYYY-MM-DD`).
pub fn report_key(day: &str) -> String {
    format!("{REPORT_PREFIX}{day}.json")
}

/// The UTC day of an instant, `YYYY-MM-DD`.
pub fn utc_day(t: Timestamp) -> String {
    t.to_datetime().format("%Y-%m-%d").to_string()
}

/// The source name a top-level prefix of the bucket (`app-db/`) could belong to: the sweeper
/// asks that source's object for its records even when the source is no longer configured.
/// `None` for prefixes no source can have (`_ferry/`, anything not a valid source name).
pub fn source_of_prefix(prefix: &str) -> Option<&str> {
    let name = prefix.strip_suffix('/')?;
    let bytes = name.as_bytes();
    let valid = (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    valid.then_some(name)
}

/// One object of the bucket as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredObject {
    /// Full key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// When it was written.
    pub uploaded: Timestamp,
}

/// A multipart upload a source opened and has not yet completed or aborted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenUpload {
    /// The object key it will complete to.
    pub key: String,
    /// R2's upload id.
    pub upload_id: String,
    /// The job that opened it.
    pub job_id: String,
    /// When it was opened.
    pub created_at: Timestamp,
    /// The binding of the bucket it is in when that is not the primary bucket (a replica's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
}

impl OpenUpload {
    /// Its Durable Object storage key.
    pub fn storage_key(&self) -> String {
        upload_storage_key(&self.job_id, &self.upload_id)
    }
}

/// The Durable Object storage key of an open upload's record.
pub fn upload_storage_key(job_id: &str, upload_id: &str) -> String {
    format!("{UPLOAD_PREFIX}{job_id}:{upload_id}")
}

/// A clean-up that failed: a job's whole folder (key ending in `/`) or one staging object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leftover {
    /// A folder (with trailing slash) or an object key.
    pub key: String,
    /// The job that left it.
    pub job_id: String,
    /// What failed.
    pub reason: String,
    /// When it was recorded.
    pub at: Timestamp,
}

impl Leftover {
    /// Its Durable Object storage key.
    pub fn storage_key(&self) -> String {
        leftover_storage_key(&self.key)
    }

    fn folder(&self) -> Option<&str> {
        if self.key.ends_with('/') {
            Some(self.key.as_str())
        } else {
            folder_of(&self.key)
        }
    }
}

/// The Durable Object storage key of a leftover's record.
pub fn leftover_storage_key(key: &str) -> String {
    format!("{LEFTOVER_PREFIX}{key}")
}

/// What one source's object answers the sweeper.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecords {
    /// The source's name.
    pub source: String,
    /// Every multipart upload it opened and did not close.
    #[serde(default)]
    pub uploads: Vec<OpenUpload>,
    /// Every clean-up that failed.
    #[serde(default)]
    pub leftovers: Vec<Leftover>,
    /// Ids of its jobs in flight or queued: their folders and uploads are never touched.
    #[serde(default)]
    pub in_flight: Vec<String>,
    /// Folders those jobs write that are not named after them (a replicate job writes its
    /// backup's folder in the replica bucket): never touched either.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_flight_folders: Vec<String>,
}

/// Why a folder (or some of its objects) is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovalReason {
    /// No manifest, and nothing written to it for a day.
    Stale,
    /// Its job failed and recorded that cleaning the folder failed.
    RecordedFolder,
    /// Staging objects whose deletion failed and was recorded.
    RecordedObjects,
}

/// Objects to delete, one folder at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    /// The folder, with trailing slash.
    pub folder: String,
    /// Why.
    pub reason: RemovalReason,
    /// The keys to delete.
    pub keys: Vec<String>,
    /// Their total size.
    pub bytes: u64,
    /// Leftover records settled once these keys are deleted: `(source, storage key)`.
    #[serde(skip)]
    pub settles: Vec<(String, String)>,
}

/// An upload to abort.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    /// The source that recorded it.
    pub source: String,
    /// The upload.
    #[serde(flatten)]
    pub upload: OpenUpload,
}

/// Something recorded as a leftover that the sweep leaves in place, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// The key or folder.
    pub key: String,
    /// Why it stays.
    pub why: String,
}

/// What one batch of the sweep does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Uploads to abort (their jobs are no longer in flight).
    pub abort: Vec<Abort>,
    /// Recorded uploads kept because their job is in flight.
    pub uploads_kept: u64,
    /// Objects to delete, per folder.
    pub remove: Vec<Removal>,
    /// Recorded leftovers left in place (inside a committed backup), reported once.
    pub kept: Vec<Kept>,
    /// Leftover records settled with nothing to do (already gone, or kept and reported):
    /// `(source, storage key)`.
    pub settled: Vec<(String, String)>,
    /// Ferry folders judged.
    pub folders_checked: u64,
    /// … of which committed backups.
    pub committed: u64,
    /// … of which belong to a job in flight.
    pub in_flight: u64,
    /// … of which have no manifest but are younger than [`STALE_AFTER`].
    pub fresh: u64,
    /// Objects judged (in Ferry folders).
    pub objects_checked: u64,
}

/// Decides one batch of the sweep.
///
/// `objects` must hold every object of each folder it touches (a listing cut at a folder
/// boundary, [`split_at_folder`]). Leftover records in `sources` whose folder has no object in
/// `objects` are taken as already gone, so pass leftovers only with a listing that covers their
/// folders. Every recorded upload in `sources` is judged: pass them once per sweep.
pub fn plan(objects: &[StoredObject], sources: &[SourceRecords], now: Timestamp) -> Plan {
    let mut plan = Plan::default();
    let in_flight: BTreeSet<&str> = sources.iter().flat_map(|s| s.in_flight.iter().map(String::as_str)).collect();
    let folders_in_flight: BTreeSet<&str> =
        sources.iter().flat_map(|s| s.in_flight_folders.iter().map(String::as_str)).collect();
    let job_in_flight = |folder: &str| {
        folders_in_flight.contains(folder) || parse_folder(folder).is_some_and(|(_, job)| in_flight.contains(job))
    };

    for source in sources {
        for upload in &source.uploads {
            let job_folder = folder_of(&upload.key).is_some_and(job_in_flight);
            if in_flight.contains(upload.job_id.as_str()) || job_folder {
                plan.uploads_kept += 1;
            } else {
                plan.abort.push(Abort { source: source.source.clone(), upload: upload.clone() });
            }
        }
    }

    let mut folders: BTreeMap<&str, Vec<&StoredObject>> = BTreeMap::new();
    for object in objects {
        if let Some(folder) = folder_of(&object.key).filter(|f| parse_folder(f).is_some()) {
            folders.entry(folder).or_default().push(object);
        }
    }
    let mut recorded: BTreeMap<&str, Vec<(&str, &Leftover)>> = BTreeMap::new();
    for source in sources {
        for leftover in &source.leftovers {
            match leftover.folder().filter(|f| parse_folder(f).is_some()) {
                Some(folder) => recorded.entry(folder).or_default().push((source.source.as_str(), leftover)),
                // Not Ferry's layout: never acted upon; the record is dropped.
                None => plan.settled.push((source.source.clone(), leftover.storage_key())),
            }
        }
    }

    for (folder, objs) in &folders {
        plan.folders_checked += 1;
        plan.objects_checked += objs.len() as u64;
        let records = recorded.remove(folder).unwrap_or_default();
        let settle = |records: &[(&str, &Leftover)]| -> Vec<(String, String)> {
            records.iter().map(|(s, l)| (s.to_string(), l.storage_key())).collect()
        };
        let manifest = manifest_key(folder);
        if objs.iter().any(|o| o.key == manifest) {
            plan.committed += 1;
            for (_, leftover) in &records {
                let present = leftover.key.ends_with('/') || objs.iter().any(|o| o.key == leftover.key);
                if present {
                    plan.kept.push(Kept {
                        key: leftover.key.clone(),
                        why: format!("inside a committed backup (recorded: {})", leftover.reason),
                    });
                }
            }
            plan.settled.extend(settle(&records));
            continue;
        }
        if job_in_flight(folder) {
            plan.in_flight += 1;
            continue;
        }
        let newest = objs.iter().map(|o| o.uploaded).max().unwrap_or(now);
        let stale = now.since(newest) >= STALE_AFTER;
        let whole_folder_recorded = records.iter().any(|(_, l)| l.key.ends_with('/'));
        let removal = if whole_folder_recorded || stale {
            let reason = if whole_folder_recorded { RemovalReason::RecordedFolder } else { RemovalReason::Stale };
            Some(removal(folder, reason, objs, |_| true, settle(&records)))
        } else if !records.is_empty() {
            let keys: BTreeSet<&str> = records.iter().map(|(_, l)| l.key.as_str()).collect();
            let (here, gone): (Vec<_>, Vec<_>) = records.iter().partition(|(_, l)| objs.iter().any(|o| o.key == l.key));
            plan.settled.extend(settle(&gone));
            (!here.is_empty()).then(|| {
                removal(folder, RemovalReason::RecordedObjects, objs, |o| keys.contains(o.key.as_str()), settle(&here))
            })
        } else {
            None
        };
        match removal {
            Some(r) => {
                if r.reason == RemovalReason::RecordedObjects {
                    plan.fresh += 1;
                }
                plan.remove.push(r);
            }
            None => plan.fresh += 1,
        }
    }
    // Recorded folders with nothing left in the listing: already gone.
    for records in recorded.values() {
        for (source, leftover) in records {
            plan.settled.push((source.to_string(), leftover.storage_key()));
        }
    }
    plan
}

fn removal(
    folder: &str,
    reason: RemovalReason,
    objs: &[&StoredObject],
    pick: impl Fn(&StoredObject) -> bool,
    settles: Vec<(String, String)>,
) -> Removal {
    let chosen: Vec<&&StoredObject> = objs.iter().filter(|o| pick(o)).collect();
    Removal {
        folder: folder.to_string(),
        reason,
        keys: chosen.iter().map(|o| o.key.clone()).collect(),
        bytes: chosen.iter().map(|o| o.size).sum(),
        settles,
    }
}

/// Splits a page of a listing (in key order) into the objects of complete folders and those of
/// the last folder, which may go on in the next page. With `more == false` the listing ended and
/// everything is complete. Returns `(complete, held back)`.
pub fn split_at_folder(mut objects: Vec<StoredObject>, more: bool) -> (Vec<StoredObject>, Vec<StoredObject>) {
    if !more {
        return (objects, Vec::new());
    }
    let Some(last) = objects.last() else { return (objects, Vec::new()) };
    let last_folder = folder_of(&last.key).map(str::to_string);
    let cut = objects.iter().rposition(|o| folder_of(&o.key).map(str::to_string) != last_folder).map_or(0, |i| i + 1);
    let held = objects.split_off(cut);
    (objects, held)
}

/// A removed folder, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The folder.
    pub folder: String,
    /// Why.
    pub reason: RemovalReason,
    /// The keys deleted.
    pub keys: Vec<String>,
    /// Their total size.
    pub bytes: u64,
}

/// What a day's sweep did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The UTC day swept for.
    pub day: String,
    /// The sweep's "now": the scheduled time of the cron tick that started it.
    pub started_at: Timestamp,
    /// When it ended (the scheduled time of its last tick).
    pub finished_at: Option<Timestamp>,
    /// False while the sweep still has part of the bucket to list.
    pub complete: bool,
    /// Cron ticks it took.
    pub ticks: u32,
    /// Ferry folders judged.
    pub folders_checked: u64,
    /// Objects in them.
    pub objects_checked: u64,
    /// Committed backups seen (never touched).
    pub committed_folders: u64,
    /// Folders of jobs in flight (never touched).
    pub in_flight_folders: u64,
    /// Folders without a manifest, younger than a day (left for a later sweep).
    pub fresh_folders: u64,
    /// Uploads aborted.
    pub uploads_aborted: Vec<Abort>,
    /// Recorded uploads of jobs in flight (kept).
    pub uploads_kept: u64,
    /// Folders removed (or emptied of recorded staging objects).
    pub removed: Vec<Removed>,
    /// Objects deleted.
    pub objects_removed: u64,
    /// Bytes deleted.
    pub bytes_removed: u64,
    /// Recorded leftovers left in place, and why.
    pub kept: Vec<Kept>,
    /// What failed (the sweep goes on; what failed stays recorded for the next day).
    pub errors: Vec<String>,
    /// Entries beyond [`REPORT_LIST_CAP`] not listed (counts above stay exact).
    pub omitted: u64,
}

impl Report {
    /// An empty report for a sweep starting at `now`.
    pub fn new(now: Timestamp) -> Self {
        Self {
            day: utc_day(now),
            started_at: now,
            finished_at: None,
            complete: false,
            ticks: 0,
            folders_checked: 0,
            objects_checked: 0,
            committed_folders: 0,
            in_flight_folders: 0,
            fresh_folders: 0,
            uploads_aborted: Vec::new(),
            uploads_kept: 0,
            removed: Vec::new(),
            objects_removed: 0,
            bytes_removed: 0,
            kept: Vec::new(),
            errors: Vec::new(),
            omitted: 0,
        }
    }

    /// Counts what a batch judged and kept (what it removed is added as it succeeds).
    pub fn judged(&mut self, plan: &Plan) {
        self.folders_checked += plan.folders_checked;
        self.objects_checked += plan.objects_checked;
        self.committed_folders += plan.committed;
        self.in_flight_folders += plan.in_flight;
        self.fresh_folders += plan.fresh;
        self.uploads_kept += plan.uploads_kept;
        for kept in &plan.kept {
            push_capped(&mut self.kept, kept.clone(), &mut self.omitted);
        }
    }

    /// An upload was aborted.
    pub fn aborted(&mut self, abort: &Abort) {
        push_capped(&mut self.uploads_aborted, abort.clone(), &mut self.omitted);
    }

    /// Every key of a removal was deleted.
    pub fn removed(&mut self, removal: &Removal) {
        self.objects_removed += removal.keys.len() as u64;
        self.bytes_removed += removal.bytes;
        let entry = Removed {
            folder: removal.folder.clone(),
            reason: removal.reason,
            keys: removal.keys.clone(),
            bytes: removal.bytes,
        };
        push_capped(&mut self.removed, entry, &mut self.omitted);
    }

    /// Something failed.
    pub fn error(&mut self, message: impl Into<String>) {
        push_capped(&mut self.errors, message.into(), &mut self.omitted);
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        format!(
            "sweep {}{}: {} folders checked ({} committed, {} in flight, {} fresh); removed {} objects ({} bytes) in \
             {} folders; aborted {} uploads ({} kept in flight); {} errors",
            self.day,
            if self.complete { "" } else { " (in progress)" },
            self.folders_checked,
            self.committed_folders,
            self.in_flight_folders,
            self.fresh_folders,
            self.objects_removed,
            self.bytes_removed,
            self.removed.len(),
            self.uploads_aborted.len(),
            self.uploads_kept,
            self.errors.len()
        )
    }
}

fn push_capped<T>(list: &mut Vec<T>, item: T, omitted: &mut u64) {
    if list.len() < REPORT_LIST_CAP {
        list.push(item);
    } else {
        *omitted += 1;
    }
}

/// Where a sweep stands between cron ticks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Recorded uploads and leftovers are next.
    Records,
    /// Walking a bucket; the next listing starts after this key.
    Walk {
        /// The last key of the last complete folder judged.
        after: Option<String>,
        /// The replica bucket's binding; the primary bucket when `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bucket: Option<String>,
    },
    /// Over.
    Done,
}

/// Where the sweep goes when the walk of `bucket` (the primary when `None`) is over: the next
/// replica bucket in `replicas`' order, or the end.
pub fn after_walk(bucket: Option<&str>, replicas: &[String]) -> Stage {
    let mut sorted: Vec<&String> = replicas.iter().collect();
    sorted.sort();
    sorted.dedup();
    let next = sorted.into_iter().find(|b| bucket.is_none_or(|current| b.as_str() > current));
    match next {
        Some(b) => Stage::Walk { after: None, bucket: Some(b.clone()) },
        None => Stage::Done,
    }
}

/// A day's sweep, persisted between ticks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sweep {
    /// Where it stands.
    pub stage: Stage,
    /// What it did so far.
    pub report: Report,
}

/// What a cron tick does about the sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    /// Run (or go on with) this sweep.
    Run(Box<Sweep>),
    /// Today's sweep is over: nothing to do until the next UTC day.
    AlreadySwept(String),
}

/// Decides whether a tick at `now` sweeps: at most one sweep starts per UTC day, whatever the
/// cron triggers; an unfinished sweep goes on first, even past midnight.
pub fn tick(saved: Option<Sweep>, now: Timestamp) -> Tick {
    match saved {
        Some(sweep) if sweep.stage != Stage::Done => Tick::Run(Box::new(sweep)),
        Some(sweep) if sweep.report.day == utc_day(now) => Tick::AlreadySwept(sweep.report.day),
        _ => Tick::Run(Box::new(Sweep { stage: Stage::Records, report: Report::new(now) })),
    }
}

/// How long one cron tick of the sweep may work before it stops and saves where it stands (the
/// rest waits for the next tick). Below [`LEASE`], so a tick is over before its lease can expire.
pub const TICK_LIMIT: Duration = Duration::from_secs(10 * 60);

/// How long a tick's lease on the sweeper lasts. A cron invocation has 15 minutes of wall clock,
/// and every call of a tick is raced against [`CALL_TIMEOUT`] and the tick against
/// [`TICK_LIMIT`], so a lease still held past this is a tick that died: the next tick takes over.
pub const LEASE: Duration = Duration::from_secs(12 * 60);

/// How long one R2 call (list, abort, delete, put) or one call to a source's object may take
/// within a sweep before it counts as failed (reported; the sweep goes on).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The sweeper's lease: which tick holds it and until when. Persisted in the sweeper's object, so
/// a tick that never ended (a call without an answer, an isolate that died) blocks later ticks only
/// until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// A random token naming the tick that holds it.
    pub holder: String,
    /// When it was taken.
    pub taken_at: Timestamp,
    /// When it lapses.
    pub expires_at: Timestamp,
}

/// What a tick asking for the lease gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseClaim {
    /// Free: the tick holds this lease.
    Granted(Lease),
    /// The previous holder's lease had expired: the tick holds this new one.
    TakenOver {
        /// The new lease.
        lease: Lease,
        /// The lapsed one (its tick never ended).
        expired: Lease,
    },
    /// Another tick holds a live lease: this tick does nothing.
    Held(Lease),
}

/// Decides whether the tick `holder` may sweep at `now` (wall clock), given the stored lease.
pub fn claim_lease(current: Option<Lease>, holder: &str, now: Timestamp) -> LeaseClaim {
    let lease = Lease { holder: holder.to_string(), taken_at: now, expires_at: now.plus(LEASE) };
    match current {
        None => LeaseClaim::Granted(lease),
        Some(held) if now < held.expires_at => LeaseClaim::Held(held),
        Some(expired) => LeaseClaim::TakenOver { lease, expired },
    }
}

/// What stays stored once the tick `holder` ends: nothing when it still held the lease, the other
/// tick's lease otherwise (a tick whose lease was taken over never releases its successor's).
pub fn release_lease(current: Option<Lease>, holder: &str) -> Option<Lease> {
    current.filter(|l| l.holder != holder)
}

#[cfg(test)]
mod tests;
