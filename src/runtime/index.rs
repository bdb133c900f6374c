//! The per-source backup index in the source's Durable Object storage (what it is and why there:
//! `crate::index`). This module reads and writes its entries, rebuilds it from R2 one bounded step
//! at a time, and answers the index routes of a source's object:
//!
//! - `GET /index?limit=N&before=F&member=M`: a page of entries, newest first, and the folder to
//!   continue before (`next`); `503` while the index is being rebuilt (each request advances it);
//! - `GET /index/plan`: the source's retention plan, planned from the index (no R2 call);
//! - `GET /index/count`: how many backups the index holds;
//! - `POST /index/pin` `{folder, pinned}`: a pin placed or removed (after the marker in R2).

use serde_json::{json, Value};
use wasm_bindgen::JsValue;
use worker::{Bucket, Env, ListOptions, Method, Request, Response, Storage};

use super::source_object::bounded;
use super::{load_config, store, BUCKET};
use crate::index::{
    entry_key, past_folder, rebuild_step, IndexEntry, IndexState, StepBudget, ENTRY_PREFIX, STATE_KEY, STEP_BUDGET_VAR,
};
use crate::manifest::{folder_of, manifest_key, parse_folder, Manifest};
use crate::retention::pin_key;
use crate::verify::{verification_key, Verification};

/// How long one R2 call of a rebuild step may take.
const R2_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn rust_err(e: impl std::fmt::Display) -> worker::Error {
    worker::Error::RustError(e.to_string())
}

/// The step budget the Worker is configured with ([`STEP_BUDGET_VAR`]); an invalid value is an
/// error naming the var.
pub(crate) fn budget(env: &Env) -> Result<StepBudget, String> {
    let raw = js_sys::Reflect::get(env.as_ref(), &JsValue::from_str(STEP_BUDGET_VAR)).unwrap_or(JsValue::UNDEFINED);
    StepBudget::parse(raw.as_string().as_deref()).map_err(|e| e.to_string())
}

/// The index's state (a missing state: never built, rebuild from the start).
pub(crate) async fn state(storage: &Storage) -> worker::Result<IndexState> {
    Ok(storage.get::<IndexState>(STATE_KEY).await?.unwrap_or_else(IndexState::missing))
}

async fn put_entry(storage: &Storage, entry: &IndexEntry) -> worker::Result<()> {
    storage.put(&entry_key(&entry.folder), serde_json::to_string(entry).map_err(rust_err)?).await
}

async fn get_entry(storage: &Storage, folder: &str) -> worker::Result<Option<IndexEntry>> {
    Ok(storage.get::<String>(&entry_key(folder)).await?.and_then(|t| serde_json::from_str(&t).ok()))
}

/// At commit: the backup whose manifest was just written gets its entry. Never fails the job: a
/// failed write drops the index's state, so it is rebuilt from R2.
pub(crate) async fn record_commit(storage: &Storage, manifest_key: &str, manifest: &Manifest) {
    let Some(folder) = folder_of(manifest_key) else { return };
    let entry = IndexEntry::of(folder, manifest, false, None);
    forget_state_on_error(storage, "recording a commit", put_entry(storage, &entry)).await;
}

/// After a verification record is written: its backup's entry says how it went.
pub(crate) async fn record_verification(storage: &Storage, record_key: &str, record: &Verification) {
    let Some(folder) = folder_of(record_key) else { return };
    let update = async {
        if let Some(mut entry) = get_entry(storage, folder).await? {
            entry.verified = Some(record.outcome == "ok");
            put_entry(storage, &entry).await?;
        }
        Ok(())
    };
    forget_state_on_error(storage, "recording a verification", update).await;
}

/// A pin placed or removed (the marker in R2 is already written or deleted).
pub(crate) async fn record_pin(storage: &Storage, folder: &str, pinned: bool) -> worker::Result<()> {
    if let Some(mut entry) = get_entry(storage, folder).await? {
        entry.pinned = pinned;
        put_entry(storage, &entry).await?;
    }
    Ok(())
}

/// A backup deleted by retention.
pub(crate) async fn forget(storage: &Storage, folder: &str) {
    forget_state_on_error(storage, "forgetting a deleted backup", storage.delete(&entry_key(folder))).await;
}

async fn forget_state_on_error<T>(
    storage: &Storage,
    what: &str,
    update: impl std::future::Future<Output = worker::Result<T>>,
) {
    if let Err(e) = bounded(R2_TIMEOUT, what, update).await {
        worker::console_error!("backup index: {what} failed ({e}); it is rebuilt from R2");
        if let Err(e) = storage.delete(STATE_KEY).await {
            worker::console_error!("backup index: dropping its state failed too: {e}");
        }
    }
}

/// Every entry, oldest first (Durable Object storage only: no subrequest).
pub(crate) async fn all(storage: &Storage) -> worker::Result<Vec<IndexEntry>> {
    Ok(store::list_texts(storage, ENTRY_PREFIX)
        .await?
        .into_iter()
        .filter_map(|(_, text)| serde_json::from_str(&text).ok())
        .collect())
}

/// Entries before `before` (all when `None`), newest first, at most `limit` when given.
async fn newest_first(
    storage: &Storage,
    before: Option<&str>,
    limit: Option<usize>,
) -> worker::Result<Vec<IndexEntry>> {
    let end = before.map(entry_key);
    let mut options = ListOptions::new().prefix(ENTRY_PREFIX).reverse(true);
    if let Some(e) = &end {
        options = options.end(e);
    }
    if let Some(n) = limit {
        options = options.limit(n);
    }
    let map = storage.list_with_options(options).await?;
    let mut entries: Vec<(String, IndexEntry)> = Vec::new();
    map.for_each(&mut |value, key| {
        if let (Some(k), Some(v)) = (key.as_string(), value.as_string()) {
            if let Ok(e) = serde_json::from_str(&v) {
                entries.push((k, e));
            }
        }
    });
    entries.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(entries.into_iter().map(|(_, e)| e).collect())
}

/// Advances a rebuild by one step of at most `budget` subrequests; returns the state after it
/// (nothing is read when the index is ready).
pub(crate) async fn advance(
    storage: &Storage,
    bucket: &Bucket,
    source: &str,
    budget: StepBudget,
) -> Result<IndexState, String> {
    let state = state(storage).await.map_err(|e| e.to_string())?;
    let IndexState::Building { after } = state else { return Ok(state) };
    let prefix = format!("{source}/");
    let mut list = bucket.list().prefix(prefix.clone()).delimiter("/").limit(budget.rebuild_folders());
    if let Some(a) = &after {
        list = list.start_after(past_folder(a));
    }
    let page = bounded(R2_TIMEOUT, "an R2 list page", list.execute()).await.map_err(|e| e.to_string())?;
    let folders: Vec<String> = page.delimited_prefixes().into_iter().filter(|f| parse_folder(f).is_some()).collect();
    let (to_read, next) = rebuild_step(folders, page.truncated(), budget);
    for folder in &to_read {
        let manifest_key = manifest_key(folder);
        let Some(manifest) =
            bounded(R2_TIMEOUT, "reading a manifest", async { Ok(store::read_manifest(bucket, &manifest_key).await) })
                .await
                .map_err(|e| e.to_string())?
        else {
            continue; // no manifest: not a backup
        };
        let pin = pin_key(folder);
        let pinned = bounded(R2_TIMEOUT, "an R2 head", bucket.head(pin)).await.map_err(|e| e.to_string())?.is_some();
        let verified = bounded(R2_TIMEOUT, "reading a verification record", async {
            Ok(store::read_json::<Verification>(bucket, &verification_key(&manifest_key)).await)
        })
        .await
        .map_err(|e| e.to_string())?
        .map(|v| v.outcome == "ok");
        put_entry(storage, &IndexEntry::of(folder, &manifest, pinned, verified)).await.map_err(|e| e.to_string())?;
    }
    storage.put(STATE_KEY, &next).await.map_err(|e| e.to_string())?;
    Ok(next)
}

fn json_response(status: u16, body: &Value) -> worker::Result<Response> {
    Ok(Response::from_json(body)?.with_status(status))
}

/// Advances a rebuild by a step; `Some(answer)` (503, how far) while it is not ready.
async fn ready_or_503(
    storage: &Storage,
    env: &Env,
    source: &str,
    budget: StepBudget,
) -> worker::Result<Option<Response>> {
    let bucket = env.bucket(BUCKET)?;
    match advance(storage, &bucket, source, budget).await {
        Ok(IndexState::Ready) => Ok(None),
        Ok(IndexState::Building { after }) => {
            let indexed = store::list_texts(storage, ENTRY_PREFIX).await?.len();
            let mut resp = json_response(
                503,
                &json!({
                    "error": format!(
                        "the backup index of {source} is being rebuilt from R2 ({indexed} backups so far, up to {}); \
                         each request advances it: try again",
                        after.as_deref().unwrap_or("the start")
                    ),
                    "indexed": indexed,
                }),
            )?;
            resp.headers_mut().set("retry-after", "1")?;
            Ok(Some(resp))
        }
        Err(e) => Ok(Some(json_response(500, &json!({ "error": format!("rebuilding the backup index: {e}") }))?)),
    }
}

/// The index routes of a source's object (see the module doc).
pub(crate) async fn object_request(
    storage: &Storage,
    env: &Env,
    source: &str,
    mut req: Request,
) -> worker::Result<Response> {
    let budget = match budget(env) {
        Ok(b) => b,
        Err(e) => return json_response(500, &json!({ "error": e })),
    };
    let path = req.path();
    match (req.method(), path.as_str()) {
        (Method::Post, "/index/pin") => {
            let body: Value = req.json().await?;
            let (Some(folder), Some(pinned)) = (body["folder"].as_str(), body["pinned"].as_bool()) else {
                return json_response(400, &json!({ "error": "bad pin" }));
            };
            record_pin(storage, folder, pinned).await?;
            json_response(200, &json!({ "folder": folder, "pinned": pinned }))
        }
        (Method::Get, "/index") => {
            if let Some(busy) = ready_or_503(storage, env, source, budget).await? {
                return Ok(busy);
            }
            let url = req.url()?;
            let query = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.to_string());
            let limit =
                query("limit").and_then(|v| v.parse::<usize>().ok()).unwrap_or(crate::index::DEFAULT_LISTING_PAGE);
            let limit = limit.clamp(1, budget.listing_page());
            let member = query("member");
            let before = query("before");
            // With a member filter every older entry may have to be read (storage only).
            let read = if member.is_some() { None } else { Some(limit + 1) };
            let entries = newest_first(storage, before.as_deref(), read).await?;
            let (shown, next) = crate::index::page(entries, limit, member.as_deref());
            json_response(200, &json!({ "entries": shown, "next": next, "limit": limit }))
        }
        (Method::Get, "/index/count") => {
            if let Some(busy) = ready_or_503(storage, env, source, budget).await? {
                return Ok(busy);
            }
            // Also per member (a Dgraph account's backends), from the same entries.
            let texts = store::list_texts(storage, ENTRY_PREFIX).await?;
            let members = crate::metrics::count_by_member(
                texts.iter().filter_map(|(_, t)| serde_json::from_str::<IndexEntry>(t).ok()).map(|e| e.member),
            );
            json_response(200, &json!({ "count": texts.len(), "members": members }))
        }
        (Method::Get, "/index/plan") => {
            if let Some(busy) = ready_or_503(storage, env, source, budget).await? {
                return Ok(busy);
            }
            let config = match load_config(env) {
                Ok(c) => c,
                Err(e) => return json_response(500, &json!({ "error": e.to_string() })),
            };
            let Some(source) = config.source(source) else {
                return json_response(404, &json!({ "error": format!("no source named {source:?}") }));
            };
            let infos: Vec<_> = all(storage).await?.iter().map(IndexEntry::info).collect();
            let now = super::now();
            let verifies = source.verify_schedule.is_some();
            let plan = match &source.retention {
                Some(policy) => crate::retention::plan(policy, &infos, verifies, now),
                None => crate::retention::Plan::keep_everything(&infos),
            };
            json_response(
                200,
                &json!({
                    "keep": plan.kept().count(),
                    "delete": plan.deleted().count(),
                    "planned_at": now,
                    "backups": plan.backups,
                }),
            )
        }
        _ => json_response(404, &json!({ "error": "not found" })),
    }
}
