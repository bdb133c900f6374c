//! The daily orphan sweep's I/O (the decisions are `crate::sweep`).
//!
//! It runs in one Durable Object of the `SOURCES` namespace named `~sweeper` (no source can have
//! that name), called by every cron tick: the object keeps the sweep's state, so at most one sweep
//! starts per UTC day whatever the triggers, and a bucket too large for one tick is walked over
//! several (a bounded number of list pages each, resuming after the last folder judged). A tick
//! asks each source's object for its records, aborts the uploads and deletes the objects the plan
//! names, tells each source which records are settled, and writes the report to R2 under
//! `_ferry/sweeps/` when the walk ends. Every failure goes into the report; none stops the sweep
//! or a backup, and nothing here panics.
//!
//! A tick holds the sweeper's lease (`crate::sweep::claim_lease`, stored in the object) instead
//! of an in-memory flag: every R2 call and every call to a source's object is raced against
//! [`CALL_TIMEOUT`], the tick's work against [`TICK_LIMIT`], and a lease that a dead tick never
//! released lapses after [`crate::sweep::LEASE`], so one hung call cannot block later sweeps.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::future::join_all;
use serde_json::json;
use worker::{Bucket, Env, Method, Response, Storage};

use super::objects::{stored, Objects};
use super::source_object::{bounded, call};
use super::{store, BUCKET};
use crate::manifest::{folder_of, parse_folder};
use crate::sweep::{
    claim_lease, plan, release_lease, report_key, source_of_prefix, split_at_folder, Lease, LeaseClaim, Plan,
    SourceRecords, Stage, StoredObject, Sweep, Tick, CALL_TIMEOUT, REPORT_PREFIX, TICK_LIMIT,
};
use crate::time::Timestamp;

/// Durable Object storage key of the sweep's state (and its latest report).
const STATE: &str = "sweep";
/// Durable Object storage key of the sweeper's lease.
const LEASE_KEY: &str = "sweep_lease";
/// Objects per list page (R2's maximum).
const PAGE: u32 = 1000;
/// List pages one tick reads at most.
const PAGES_PER_TICK: u32 = 10;
/// A folder with more objects than this is not Ferry's: it is reported and skipped.
const MAX_FOLDER_OBJECTS: usize = 5000;
/// Keys per R2 `delete` call (its maximum).
const DELETE_BATCH: usize = 1000;

/// Runs `tick` (a sweep tick) under the sweeper's lease, for at most [`TICK_LIMIT`]; returns its
/// line for the log, or why it did not run.
pub(super) async fn leased(storage: &Storage, tick: impl std::future::Future<Output = String>) -> String {
    let holder = hex::encode(super::random_bytes());
    let stored = match bounded(CALL_TIMEOUT, "reading the sweeper's lease", storage.get::<Lease>(LEASE_KEY)).await {
        Ok(lease) => lease,
        Err(e) => return format!("sweep: its lease cannot be read: {e}"),
    };
    // The lease runs on the wall clock, not on the tick's scheduled time.
    let taken_over = match claim_lease(stored, &holder, super::now()) {
        LeaseClaim::Held(lease) => {
            return format!("sweep: a tick holding the lease until {} is still running", lease.expires_at)
        }
        LeaseClaim::Granted(lease) => Ok(lease),
        LeaseClaim::TakenOver { lease, expired } => Err((lease, expired)),
    };
    let lease = match &taken_over {
        Ok(lease) | Err((lease, _)) => lease.clone(),
    };
    if let Err(e) = bounded(CALL_TIMEOUT, "taking the sweeper's lease", storage.put(LEASE_KEY, &lease)).await {
        return format!("sweep: taking its lease failed: {e}");
    }
    let line = match super::net::within(TICK_LIMIT, tick).await {
        Some(line) => line,
        None => format!("sweep: the tick stopped after {} s; the next tick goes on", TICK_LIMIT.as_secs()),
    };
    let line = match taken_over {
        Err((_, expired)) => {
            format!("{line} (took over the lease of a tick that never ended, taken at {})", expired.taken_at)
        }
        Ok(_) => line,
    };
    let release = async {
        let current = storage.get::<Lease>(LEASE_KEY).await?;
        match release_lease(current, &holder) {
            None => storage.delete(LEASE_KEY).await.map(|_| ()),
            Some(_) => Ok(()),
        }
    };
    if let Err(e) = bounded(CALL_TIMEOUT, "releasing the sweeper's lease", release).await {
        worker::console_error!("sweep: releasing its lease failed ({e}); it lapses at {}", lease.expires_at);
    }
    line
}

/// One cron tick of the sweep at `now` (the tick's scheduled time; run it [`leased`]); returns a
/// line for the log. `replicas` are the replica buckets' bindings the config names: walked after
/// the primary.
pub(super) async fn tick(
    storage: &Storage,
    env: &Env,
    now: Timestamp,
    configured: Vec<String>,
    replicas: Vec<String>,
) -> String {
    let saved = match bounded(CALL_TIMEOUT, "reading the sweep's state", storage.get::<String>(STATE)).await {
        Ok(text) => text.and_then(|t| serde_json::from_str::<Sweep>(&t).ok()),
        Err(e) => return format!("sweep: its state cannot be read: {e}"),
    };
    let mut sweep = match crate::sweep::tick(saved, now) {
        Tick::AlreadySwept(day) => return format!("sweep: {day} was already swept"),
        Tick::Run(sweep) => *sweep,
    };
    sweep.report.ticks += 1;
    match env.bucket(BUCKET) {
        Ok(bucket) => advance(storage, env, &bucket, &mut sweep, now, configured, &replicas).await,
        Err(e) => sweep.report.error(format!("the bucket binding is unavailable: {e}")),
    }
    save(storage, &mut sweep).await;
    sweep.report.summary()
}

/// The latest sweep's report (complete or under way).
pub(super) async fn latest(storage: &Storage) -> worker::Result<Response> {
    match storage.get::<String>(STATE).await?.and_then(|t| serde_json::from_str::<Sweep>(&t).ok()) {
        Some(sweep) => Response::from_json(&sweep.report),
        None => Ok(Response::from_json(&json!({ "error": "no sweep has run yet" }))?.with_status(404)),
    }
}

async fn save(storage: &Storage, sweep: &mut Sweep) {
    let written = match serde_json::to_string(&*sweep) {
        Ok(text) => {
            bounded(CALL_TIMEOUT, "saving the sweep's state", storage.put(STATE, text)).await.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = written {
        worker::console_error!("sweep: saving its state failed: {e}");
    }
}

async fn advance(
    storage: &Storage,
    env: &Env,
    bucket: &Bucket,
    sweep: &mut Sweep,
    now: Timestamp,
    configured: Vec<String>,
    replicas: &[String],
) {
    let (records, unreadable) = gather(env, bucket, configured, sweep).await;
    if sweep.stage == Stage::Records {
        sweep_records(env, bucket, &records, sweep).await;
        if unreadable.is_empty() {
            sweep_scratch(env, &records, sweep, now).await;
        }
        sweep.stage = Stage::Walk { after: None, bucket: None };
        save(storage, sweep).await;
    }
    // Only the jobs in flight matter to the walks: records were handled above.
    let in_flight: Vec<SourceRecords> = records
        .iter()
        .map(|r| SourceRecords {
            source: r.source.clone(),
            in_flight: r.in_flight.clone(),
            in_flight_folders: r.in_flight_folders.clone(),
            ..Default::default()
        })
        .collect();
    // The primary bucket, then each replica bucket, as far as this tick's pages go.
    while let Stage::Walk { after, bucket: binding } = sweep.stage.clone() {
        let target = match &binding {
            None => Objects::from(bucket),
            Some(name) => match super::objects::named(env, name) {
                Ok(b) => b,
                Err(e) => {
                    sweep.report.error(format!("the replica bucket {name} is unavailable: {e}"));
                    sweep.stage = crate::sweep::after_walk(Some(name), replicas);
                    continue;
                }
            },
        };
        if !walk(storage, env, &target, sweep, after, binding.as_deref(), replicas, &in_flight, &unreadable).await {
            break;
        }
    }
    if sweep.stage == Stage::Done {
        sweep.report.complete = true;
        sweep.report.finished_at = Some(now);
        let key = report_key(&sweep.report.day);
        let written = match super::net::within(CALL_TIMEOUT, store::put_json(bucket, &key, &sweep.report)).await {
            Some(result) => result,
            None => Err(format!("R2 put of {key} did not answer within {} s", CALL_TIMEOUT.as_secs())),
        };
        if let Err(e) = written {
            sweep.report.error(format!("writing the report failed: {e}"));
        }
        worker::console_log!("{}", sweep.report.summary());
    }
}

/// Deletes the D1 scratch databases drills lost track of (`ferry-drill-<job>` of no job in
/// flight; the decision is `crate::restore::d1::scratch_leftovers`), once per account and token.
async fn sweep_scratch(env: &Env, records: &[SourceRecords], sweep: &mut Sweep, now: Timestamp) {
    use crate::providers::ProviderConfig;
    use crate::restore::d1;
    let Ok(config) = super::load_config(env) else { return };
    let live: BTreeSet<String> = records.iter().flat_map(|r| r.in_flight.iter().cloned()).collect();
    let mut asked = BTreeSet::new();
    for source in &config.sources {
        let ProviderConfig::D1(cfg) = &source.provider else { continue };
        let account = (cfg.api_base.as_ref().map(|u| u.to_string()), cfg.account_id.clone(), cfg.token_secret.clone());
        if !asked.insert(account) {
            continue;
        }
        let creds = super::credentials(env, &[cfg.token_secret.as_str()]);
        let Ok(token) = creds.get(&cfg.token_secret) else { continue };
        let gone = match d1::scratch_list_request(cfg, token) {
            Ok(req) => match super::budget::send(env, source, &creds, crate::budget::Need::Start, &req).await {
                crate::job::Event::Response(resp) => {
                    d1::scratch_leftovers(&resp, &live, now).map_err(|e| e.to_string())
                }
                other => Err(format!("{other:?}")),
            },
            Err(e) => Err(e.to_string()),
        };
        let gone = match gone {
            Ok(gone) => gone,
            Err(e) => {
                sweep.report.error(format!("listing D1 scratch databases of source {:?} failed: {e}", source.name));
                continue;
            }
        };
        for (uuid, name) in gone {
            let Ok(req) = d1::scratch_delete_request(cfg, token, &uuid) else { continue };
            match super::budget::send(env, source, &creds, crate::budget::Need::Start, &req).await {
                crate::job::Event::Response(r) if (200..300).contains(&r.status) => {
                    worker::console_log!("sweep: deleted the D1 scratch database {name} ({uuid}) a drill left");
                }
                other => sweep.report.error(format!("deleting the D1 scratch database {name} failed: {other:?}")),
            }
        }
    }
}

/// Asks every source's object for its records: the configured sources and any source prefix in
/// the bucket (a removed source's leftovers too). Returns the records and the sources whose
/// records could not be read (their folders are not judged in this tick).
async fn gather(
    env: &Env,
    bucket: &Bucket,
    configured: Vec<String>,
    sweep: &mut Sweep,
) -> (Vec<SourceRecords>, BTreeSet<String>) {
    let mut names: BTreeSet<String> = configured.into_iter().collect();
    match top_level_prefixes(bucket).await {
        Ok(prefixes) => names.extend(prefixes.iter().filter_map(|p| source_of_prefix(p)).map(str::to_string)),
        Err(e) => sweep.report.error(format!("listing the bucket's sources failed: {e}")),
    }
    let answers = join_all(
        names
            .iter()
            .map(|n| bounded(CALL_TIMEOUT, "a source's records", call(env, n, Method::Get, "/leftovers", None))),
    )
    .await;
    let mut records = Vec::new();
    let mut unreadable = BTreeSet::new();
    for (name, answer) in names.into_iter().zip(answers) {
        match answer.map_err(|e| e.to_string()).and_then(|(status, value)| match status {
            200 => serde_json::from_value::<SourceRecords>(value).map_err(|e| e.to_string()),
            _ => Err(format!("HTTP {status}: {value}")),
        }) {
            Ok(mut r) => {
                r.source = name;
                records.push(r);
            }
            Err(e) => {
                sweep.report.error(format!("the records of source {name:?} could not be read ({e}); its folders wait"));
                unreadable.insert(name);
            }
        }
    }
    (records, unreadable)
}

async fn top_level_prefixes(bucket: &Bucket) -> worker::Result<Vec<String>> {
    let mut prefixes = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..PAGES_PER_TICK {
        let mut list = bucket.list().delimiter("/").limit(PAGE);
        if let Some(c) = cursor.take() {
            list = list.cursor(c);
        }
        let page = bounded(CALL_TIMEOUT, "listing the bucket's sources", list.execute()).await?;
        prefixes.extend(page.delimited_prefixes());
        match (page.truncated(), page.cursor()) {
            (true, Some(c)) => cursor = Some(c),
            _ => break,
        }
    }
    Ok(prefixes)
}

/// The first stage: every recorded upload, and the folders of recorded failed clean-ups (listed
/// whole, so the plan can see their manifests).
async fn sweep_records(env: &Env, bucket: &Bucket, records: &[SourceRecords], sweep: &mut Sweep) {
    let folders: BTreeSet<String> = records
        .iter()
        .flat_map(|r| r.leftovers.iter())
        .filter_map(|l| if l.key.ends_with('/') { Some(l.key.as_str()) } else { folder_of(&l.key) })
        .filter(|f| parse_folder(f).is_some())
        .map(str::to_string)
        .collect();
    let mut objects = Vec::new();
    let mut unlisted = BTreeSet::new();
    for folder in &folders {
        match bounded(CALL_TIMEOUT, "listing a recorded leftover", store::list_objects(bucket, folder)).await {
            Ok(list) => objects.extend(list.iter().map(stored)),
            Err(e) => {
                sweep.report.error(format!("listing the recorded leftover {folder} failed: {e}"));
                unlisted.insert(folder.clone());
            }
        }
    }
    // A leftover whose folder could not be listed stays recorded (the plan would take it as gone).
    let input: Vec<SourceRecords> = records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.leftovers.retain(|l| {
                let folder = if l.key.ends_with('/') { Some(l.key.as_str()) } else { folder_of(&l.key) };
                !folder.is_some_and(|f| unlisted.contains(f))
            });
            r
        })
        .collect();
    let plan = plan(&objects, &input, sweep.report.started_at);
    execute(env, &Objects::from(bucket), &plan, sweep).await;
}

/// The second stage: a bucket (`binding`, the primary when `None`) in key order, a bounded
/// number of pages per tick, judged a complete folder at a time. `true` when the walk of that
/// bucket ended (the stage moved on), `false` when this tick's pages ran out (or a listing
/// failed) and it goes on at the next tick.
#[allow(clippy::too_many_arguments)]
async fn walk(
    storage: &Storage,
    env: &Env,
    bucket: &Objects,
    sweep: &mut Sweep,
    mut after: Option<String>,
    binding: Option<&str>,
    replicas: &[String],
    in_flight: &[SourceRecords],
    unreadable: &BTreeSet<String>,
) -> bool {
    let walking = |after: Option<String>| Stage::Walk { after, bucket: binding.map(str::to_string) };
    let name = binding.unwrap_or(BUCKET);
    let mut pending: Vec<StoredObject> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..PAGES_PER_TICK {
        let listing = bucket.walk_page(after.as_deref(), cursor.take(), PAGE, sweep.report.started_at);
        let (objects, next) = match super::net::within(CALL_TIMEOUT, listing).await {
            Some(Ok(page)) => page,
            Some(Err(e)) => {
                sweep.report.error(format!("listing {name} failed: {e}; the walk goes on at the next tick"));
                return false;
            }
            None => {
                sweep.report.error(format!(
                    "listing {name} did not answer within {} s; the walk goes on at the next tick",
                    CALL_TIMEOUT.as_secs()
                ));
                return false;
            }
        };
        let more = next.is_some();
        cursor = next;
        pending.extend(objects.into_iter().filter(|o| {
            let source = o.key.split('/').next().unwrap_or_default();
            !o.key.starts_with(REPORT_PREFIX) && !unreadable.contains(source)
        }));
        let (complete, held) = split_at_folder(std::mem::take(&mut pending), more);
        if let Some(last) = complete.last() {
            after = Some(last.key.clone());
        }
        if !complete.is_empty() {
            let plan = plan(&complete, in_flight, sweep.report.started_at);
            execute(env, bucket, &plan, sweep).await;
        }
        pending = held;
        if pending.len() > MAX_FOLDER_OBJECTS {
            let folder = pending.last().and_then(|o| folder_of(&o.key)).unwrap_or_default().to_string();
            sweep.report.error(format!("{folder} holds over {MAX_FOLDER_OBJECTS} objects: not Ferry's, not judged"));
            // Past every key of that folder.
            after = Some(format!("{folder}\u{10FFFF}"));
            pending.clear();
            cursor = None;
        }
        if !more {
            sweep.stage = crate::sweep::after_walk(binding, replicas);
            return true;
        }
        sweep.stage = walking(after.clone());
        save(storage, sweep).await;
    }
    // Out of pages for this tick: the held-back folder is listed again next time.
    sweep.stage = walking(after);
    false
}

/// Performs a plan: aborts, deletions (batched), then tells each source what is settled.
async fn execute(env: &Env, bucket: &Objects, plan: &Plan, sweep: &mut Sweep) {
    let report = &mut sweep.report;
    report.judged(plan);
    let mut settled: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (source, key) in &plan.settled {
        settled.entry(source.clone()).or_default().push(key.clone());
    }
    for abort in &plan.abort {
        let upload = &abort.upload;
        // A replica's upload is aborted in its own bucket.
        let target = match upload.bucket.as_deref().map(|b| super::objects::named(env, b)) {
            None => bucket.clone(),
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                report.error(format!("upload {} of {}: its bucket is unavailable: {e}", upload.upload_id, upload.key));
                continue;
            }
        };
        let result = match super::net::within(CALL_TIMEOUT, target.abort(&upload.key, &upload.upload_id)).await {
            Some(Ok(true)) => Ok(()),
            Some(Ok(false)) => Err("NoSuchUpload".to_string()),
            Some(Err(e)) => Err(e),
            None => Err(format!("an abort did not answer within {} s", CALL_TIMEOUT.as_secs())),
        };
        match result {
            Ok(()) => report.aborted(abort),
            Err(e) if store::upload_gone(&e) => report.kept.push(crate::sweep::Kept {
                key: format!("{} (upload {})", upload.key, upload.upload_id),
                why: "already completed or aborted".into(),
            }),
            Err(e) => {
                report.error(format!("aborting upload {} of {} failed: {e}", upload.upload_id, upload.key));
                continue;
            }
        }
        settled.entry(abort.source.clone()).or_default().push(upload.storage_key());
    }
    // All keys of the plan's removals, deleted in batches; a failed batch fails its folders.
    let keys: Vec<(usize, &String)> =
        plan.remove.iter().enumerate().flat_map(|(i, r)| r.keys.iter().map(move |k| (i, k))).collect();
    let mut failed = BTreeSet::new();
    for batch in keys.chunks(DELETE_BATCH) {
        let list: Vec<String> = batch.iter().map(|(_, k)| (*k).clone()).collect();
        let deleted = match super::net::within(CALL_TIMEOUT, bucket.delete_keys(&list)).await {
            Some(result) => result.map_err(|e| e.message().to_string()),
            None => Err(format!("a delete did not answer within {} s", CALL_TIMEOUT.as_secs())),
        };
        if let Err(e) = deleted {
            let folders: BTreeSet<usize> = batch.iter().map(|(i, _)| *i).collect();
            report.error(format!(
                "deleting {} objects failed: {e}; their folders are left for the next sweep: {}",
                batch.len(),
                folders.iter().map(|i| plan.remove[*i].folder.as_str()).collect::<Vec<_>>().join(", ")
            ));
            failed.extend(folders);
        }
    }
    for (i, removal) in plan.remove.iter().enumerate() {
        if failed.contains(&i) {
            continue;
        }
        report.removed(removal);
        for (source, key) in &removal.settles {
            settled.entry(source.clone()).or_default().push(key.clone());
        }
    }
    for (source, keys) in settled {
        let body = json!({ "keys": keys });
        let settle = call(env, &source, Method::Post, "/leftovers/settle", Some(&body));
        match bounded(CALL_TIMEOUT, "settling a source's records", settle).await {
            Ok((200, _)) => {}
            Ok((status, value)) => report.error(format!("settling the records of {source:?}: HTTP {status}: {value}")),
            Err(e) => report.error(format!("settling the records of {source:?} failed: {e}")),
        }
    }
}
