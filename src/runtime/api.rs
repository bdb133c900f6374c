//! The Worker's HTTP API: the dashboard page, status for operators, and triggers (signed webhooks
//! or the API bearer token) for on-demand exports and verifications.
//!
//! Routing and checks come from the core (`crate::api`, `crate::webhook`, `crate::dashboard`);
//! this module reads the request, calls the source objects and R2, and writes JSON. A bad
//! signature or token is refused before anything else is touched.

use futures_util::future::join_all;
use serde_json::{json, Value};
use worker::{console_error, Env, Method, Request, Response, ResponseBody};

use super::source_object::{call, claim_delivery, retired_sources, trigger_api, trigger_webhook, SWEEPER};
use super::{load_config, now, retention, secret, store, BUCKET};
use crate::api::{
    account_mode, api_token_problem, bearer_ok, error_body, member_filter, route, trigger_auth, unknown_member, Route,
    TriggerAuth,
};
use crate::config::Config;
use crate::identity::Task;
use crate::manifest::{folder_of, manifest_key, Manifest};
use crate::metrics::{render, render_notifications, SourceMetrics};
use crate::status::SourceReport;
use crate::verify::{verification_key, Verification};
use crate::webhook::{verify, WebhookError, WebhookHeaders, WebhookSecret};

/// Largest webhook body accepted.
const MAX_WEBHOOK_BODY: usize = 64 * 1024;
const TOO_LARGE: &str = "webhook body is larger than 64 KiB";
const NOT_AN_OBJECT: &str = "the webhook body must be empty or a JSON object";

fn json(status: u16, body: &Value) -> worker::Result<Response> {
    Ok(Response::from_json(body)?.with_status(status))
}

fn error(status: u16, message: &str) -> worker::Result<Response> {
    json(status, &error_body(message))
}

/// The answer when the config is invalid (500) or names no source `name` (404); `None` when it does.
fn unknown_source(env: &Env, name: &str) -> worker::Result<Option<Response>> {
    match load_config(env) {
        Err(e) => error(500, &e.to_string()).map(Some),
        Ok(config) if config.source(name).is_none() => error(404, &format!("no source named {name:?}")).map(Some),
        Ok(_) => Ok(None),
    }
}

/// Handles one request to the Worker.
pub(crate) async fn handle(req: Request, env: &Env) -> worker::Result<Response> {
    let method = req.method().to_string();
    let path = req.path();
    match route(&method, &path) {
        Route::Health => json(200, &json!({ "service": "ferry", "version": env!("CARGO_PKG_VERSION") })),
        Route::Dashboard => dashboard(),
        Route::NotFound => error(404, "not found"),
        Route::MethodNotAllowed(allowed) => {
            let mut resp = error(405, &format!("use {allowed}"))?;
            resp.headers_mut().set("allow", allowed)?;
            Ok(resp)
        }
        Route::StartExport(name) => start_job(req, env, &name, Task::Export).await,
        Route::StartVerify(name) => start_job(req, env, &name, Task::Verify).await,
        Route::StartDrill(name) => start_job(req, env, &name, Task::Drill).await,
        Route::Restore { source, folder } => start_restore(req, env, &source, &folder).await,
        Route::CancelJob(id) => cancel_job(req, env, id.as_str()).await,
        other => {
            if let Some(refused) = refuse_bearer(&req, env)? {
                return Ok(refused);
            }
            let config = match load_config(env) {
                Ok(c) => c,
                Err(e) => return error(500, &e.to_string()),
            };
            match other {
                Route::ListSources => list_sources(env, &config).await,
                Route::Metrics => metrics(env, &config).await,
                Route::Alerts => alerts(env).await,
                Route::Job(id) => find_job(env, &config, id.as_str()).await,
                Route::Backups(name) => list_backups(&req, env, &config, &name).await,
                Route::Artifact(key) => artifact(env, &key).await,
                Route::Retention(name) => retention_plan(env, &config, &name).await,
                Route::Pin { folder, pin } => set_pin(env, &folder, pin).await,
                Route::LatestSweep => {
                    let (status, value) = call(env, SWEEPER, Method::Get, "/sweeps/latest", None).await?;
                    json(status, &value)
                }
                _ => error(404, "not found"),
            }
        }
    }
}

/// The dashboard page, with its Content-Security-Policy and the other locking headers.
fn dashboard() -> worker::Result<Response> {
    let headers = worker::Headers::new();
    for (name, value) in crate::dashboard::headers() {
        headers.set(name, &value)?;
    }
    Ok(Response::ok(crate::dashboard::HTML)?.with_headers(headers))
}

/// The answer refusing a request without the right API bearer token (or when none usable is
/// configured), or `None` when it has it.
fn refuse_bearer(req: &Request, env: &Env) -> worker::Result<Option<Response>> {
    let Some(token) = secret(env, "FERRY_API_TOKEN") else {
        return error(503, "FERRY_API_TOKEN is not set: wrangler secret put FERRY_API_TOKEN").map(Some);
    };
    if let Some(problem) = api_token_problem(&token) {
        return error(503, &problem).map(Some);
    }
    if bearer_ok(req.headers().get("authorization")?.as_deref(), &token) {
        return Ok(None);
    }
    let mut resp = error(401, "missing or wrong bearer token")?;
    resp.headers_mut().set("www-authenticate", "Bearer")?;
    Ok(Some(resp))
}

/// A trigger, an export or the verification of a backup: signed as a webhook, or carrying the API
/// bearer token (the dashboard's buttons).
async fn start_job(req: Request, env: &Env, name: &str, task: Task) -> worker::Result<Response> {
    let has_webhook_headers =
        ["webhook-id", "webhook-timestamp", "webhook-signature"].iter().any(|h| req.headers().has(h).unwrap_or(false));
    match trigger_auth(has_webhook_headers, req.headers().get("authorization")?.as_deref()) {
        TriggerAuth::Webhook => start_webhook_job(req, env, name, task).await,
        TriggerAuth::Bearer => start_api_job(req, env, name, task).await,
    }
}

/// A trigger with the API bearer token: no delivery id, so nothing to replay; the source's single
/// flight still answers 409 while a job runs.
async fn start_api_job(mut req: Request, env: &Env, name: &str, task: Task) -> worker::Result<Response> {
    if let Some(refused) = refuse_bearer(&req, env)? {
        return Ok(refused);
    }
    let Some(body) = read_trigger_body(&mut req).await? else { return error(413, TOO_LARGE) };
    let Some(params) = params_of(&body) else { return error(400, NOT_AN_OBJECT) };
    if let Some(refused) = unknown_source(env, name)? {
        return Ok(refused);
    }
    let (status, value) = trigger_api(env, name, params, task).await?;
    json(status, &value)
}

/// `POST /v1/backups/{source}/{folder}/restore` with the API bearer token: the body says how
/// (`target`, `mode`, `confirm`); the source's object checks it before anything is touched.
async fn start_restore(mut req: Request, env: &Env, name: &str, folder: &str) -> worker::Result<Response> {
    if let Some(refused) = refuse_bearer(&req, env)? {
        return Ok(refused);
    }
    let Some(body) = read_trigger_body(&mut req).await? else { return error(413, TOO_LARGE) };
    let Some(mut params) = params_of(&body) else { return error(400, NOT_AN_OBJECT) };
    if let Some(refused) = unknown_source(env, name)? {
        return Ok(refused);
    }
    // Only a committed backup (its manifest written last) is restorable: anything else is refused
    // here, before the source's object or the provider is touched.
    let bucket = env.bucket(BUCKET)?;
    if store::read_manifest(&bucket, &crate::manifest::manifest_key(folder)).await.is_none() {
        return error(
            404,
            &format!(
                "{folder} is not a committed backup: it has no readable {} (an unfinished, failed or deleted \
                 backup cannot be restored; GET /v1/sources/{name}/backups lists the committed ones)",
                crate::manifest::MANIFEST_NAME
            ),
        );
    }
    params["backup"] = Value::String(folder.to_string());
    let (status, value) = trigger_api(env, name, params, Task::Restore).await?;
    json(status, &value)
}

/// A signed trigger.
async fn start_webhook_job(mut req: Request, env: &Env, name: &str, task: Task) -> worker::Result<Response> {
    let Some(raw_secret) = secret(env, "FERRY_WEBHOOK_SECRET") else {
        return error(503, "FERRY_WEBHOOK_SECRET is not set: wrangler secret put FERRY_WEBHOOK_SECRET");
    };
    let key = match WebhookSecret::parse(&raw_secret) {
        Ok(k) => k,
        Err(e) => return error(500, &e.to_string()),
    };
    let Some(body) = read_trigger_body(&mut req).await? else { return error(413, TOO_LARGE) };
    let headers = req.headers();
    let (id, ts, sig) =
        (headers.get("webhook-id")?, headers.get("webhook-timestamp")?, headers.get("webhook-signature")?);
    let hdrs = WebhookHeaders { id: id.as_deref(), timestamp: ts.as_deref(), signature: sig.as_deref() };
    let verified = match verify(&key, hdrs, &body, now()) {
        Ok(v) => v,
        Err(WebhookError::BadSecret) => return error(500, &WebhookError::BadSecret.to_string()),
        Err(e) => return error(401, &format!("webhook signature refused: {e}")),
    };
    let Some(params) = params_of(&body) else { return error(400, NOT_AN_OBJECT) };
    if let Some(refused) = unknown_source(env, name)? {
        return Ok(refused);
    }
    // One signed delivery starts one source's job: replaying it to another source starts nothing.
    if let Err(owner) = claim_delivery(env, verified.id(), name).await? {
        return error(
            409,
            &format!(
                "webhook-id {:?} was already delivered to source {owner:?}; each delivery starts one source's job \
                 (send one delivery, with its own webhook-id, per source)",
                verified.id()
            ),
        );
    }
    let (status, value) = trigger_webhook(env, name, verified.id(), params, task).await?;
    let mut resp = json(status, &value)?;
    if value.get("replayed").and_then(Value::as_bool) == Some(true) {
        resp.headers_mut().set("idempotent-replayed", "true")?;
    }
    Ok(resp)
}

/// A trigger's body, or `None` when it is over the cap. Nothing is read whole before it is known
/// to be small: a declared length over the cap is refused unread, and an undeclared one is read
/// only up to the cap.
async fn read_trigger_body(req: &mut Request) -> worker::Result<Option<Vec<u8>>> {
    let declared = req.headers().get("content-length")?.and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_WEBHOOK_BODY as u64) {
        return Ok(None);
    }
    read_capped(req, MAX_WEBHOOK_BODY).await
}

/// A trigger's parameters: its body as a JSON object (`{}` when empty), `None` when it is not one.
fn params_of(body: &[u8]) -> Option<Value> {
    if body.is_empty() {
        return Some(json!({}));
    }
    serde_json::from_slice::<Value>(body).ok().filter(Value::is_object)
}

/// The request body, or `None` as soon as it passes `cap` bytes (the rest is never read).
async fn read_capped(req: &mut Request, cap: usize) -> worker::Result<Option<Vec<u8>>> {
    use futures_util::StreamExt;
    let Ok(mut stream) = req.stream() else { return Ok(Some(Vec::new())) };
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

async fn list_sources(env: &Env, config: &Config) -> worker::Result<Response> {
    let now = now();
    let statuses = join_all(config.sources.iter().map(|s| call(env, &s.name, Method::Get, "/status", None))).await;
    let mut sources = Vec::new();
    for (source, status) in config.sources.iter().zip(statuses) {
        let mut entry = json!({
            "name": source.name,
            "kind": source.kind(),
            "schedule": source.schedule.as_str(),
            "verify_schedule": source.verify_schedule.as_ref().map(|s| s.as_str()),
            "drill_schedule": source.drill_schedule.as_ref().map(|s| s.as_str()),
            "next_run": source.schedule.next_after(now),
        });
        match status {
            // The report: current_job_id, current_job, progress, last_job, health, history, outcomes.
            Ok((200, Value::Object(report))) => {
                if let Value::Object(map) = &mut entry {
                    map.extend(report);
                }
            }
            Ok((status, v)) => entry["error"] = json!(format!("the source's object answered HTTP {status}: {v}")),
            Err(e) => entry["error"] = json!(e.to_string()),
        }
        sources.push(entry);
    }
    json(200, &json!({ "sources": sources }))
}

/// `GET /metrics`: every source's report, and its committed backups counted in R2.
async fn metrics(env: &Env, config: &Config) -> worker::Result<Response> {
    let reports = join_all(config.sources.iter().map(|s| call(env, &s.name, Method::Get, "/status", None))).await;
    // Counted by each source's backup index: one call per source, whatever the number of
    // backups; in account mode also each member's.
    let counts = join_all(config.sources.iter().map(|s| async move {
        match call(env, &s.name, Method::Get, "/index/count", None).await {
            Ok((200, value)) => {
                let count = value["count"].as_u64()? as usize;
                let members =
                    if account_mode(s) { serde_json::from_value(value["members"].clone()).ok() } else { None };
                Some((count, members))
            }
            _ => None,
        }
    }))
    .await;
    let mut parsed = Vec::new();
    for ((source, report), count) in config.sources.iter().zip(reports).zip(counts) {
        match report {
            Ok((200, value)) => match serde_json::from_value::<SourceReport>(value) {
                Ok(r) => parsed.push((source, r, count)),
                Err(e) => console_error!("metrics: {}: unreadable report: {e}", source.name),
            },
            Ok((status, _)) => console_error!("metrics: {}: its object answered HTTP {status}", source.name),
            Err(e) => console_error!("metrics: {}: {e}", source.name),
        }
    }
    let samples: Vec<SourceMetrics<'_>> = parsed
        .iter()
        .map(|(s, r, count)| SourceMetrics {
            name: &s.name,
            kind: s.kind(),
            report: r,
            backups_retained: count.as_ref().map(|c| c.0),
            retained_by_member: count.as_ref().and_then(|c| c.1.clone()),
        })
        .collect();
    let mut text = render(&samples);
    // Alert delivery failures, per destination, from the attempt record (best effort: the
    // sources' metrics are served even when the record cannot be read).
    let destinations = super::alerts::load_alerts(env).map(|a| a.destinations).unwrap_or_default();
    let names: Vec<&str> = destinations.iter().map(|d| d.name.as_str()).collect();
    match super::alerts::attempt_log(env).await {
        Ok(log) => text.push_str(&render_notifications(&names, &log.failures)),
        Err(e) => console_error!("metrics: the alert record: {e}"),
    }
    // The Cloudflare API request budget of each token the D1 sources use.
    let names: Vec<&str> = config.sources.iter().flat_map(|s| s.secret_names()).collect();
    let creds = super::credentials(env, &names);
    let budgets = super::budget::views(env, &crate::budget::token_ids(config, &creds)).await;
    text.push_str(&crate::metrics::render_budgets(&budgets));
    let mut resp = Response::ok(text)?;
    resp.headers_mut().set("content-type", "text/plain; version=0.0.4; charset=utf-8")?;
    Ok(resp)
}

/// `GET /v1/alerts`: the destinations, their failure counts and the recent delivery attempts.
async fn alerts(env: &Env) -> worker::Result<Response> {
    let config = match super::alerts::load_alerts(env) {
        Ok(c) => c,
        Err(e) => return error(500, &e.to_string()),
    };
    match super::alerts::attempt_log(env).await {
        Ok(log) => json(200, &super::alerts::view(&config, &log)),
        Err(e) => error(503, &format!("the alert record cannot be read: {e}")),
    }
}

async fn find_job(env: &Env, config: &Config, id: &str) -> worker::Result<Response> {
    match job_owner(env, config, id).await? {
        Some((_, job)) => json(200, &job),
        None => error(404, &format!("no job {id}")),
    }
}

/// `POST /v1/jobs/{id}/cancel` (bearer; body empty or `{"reason": …}`): the job's source object
/// records the request (404 unknown, 409 ended, 202 taken) and stops the job at its next step.
async fn cancel_job(mut req: Request, env: &Env, id: &str) -> worker::Result<Response> {
    if let Some(refused) = refuse_bearer(&req, env)? {
        return Ok(refused);
    }
    let Some(body) = read_trigger_body(&mut req).await? else { return error(413, TOO_LARGE) };
    let (by, reason) = match crate::api::cancel_request(&body) {
        Ok(r) => r,
        Err(e) => return error(400, &e),
    };
    let config = match load_config(env) {
        Ok(c) => c,
        Err(e) => return error(500, &e.to_string()),
    };
    let Some((name, _)) = job_owner(env, &config, id).await? else { return error(404, &format!("no job {id}")) };
    let body = json!({ "job_id": id, "by": by, "reason": reason });
    let (status, value) = call(env, &name, Method::Post, "/cancel", Some(&body)).await?;
    json(status, &value)
}

/// The source whose object holds job `id`, and the job as the API shows it.
async fn job_owner(env: &Env, config: &Config, id: &str) -> worker::Result<Option<(String, Value)>> {
    let path = format!("/job/{id}");
    // Configured sources, and those removed from the config while a job of theirs ran.
    let mut names: Vec<String> = config.sources.iter().map(|s| s.name.clone()).collect();
    for name in retired_sources(env).await.unwrap_or_default() {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let answers = join_all(names.iter().map(|name| call(env, name, Method::Get, &path, None))).await;
    for (name, answer) in names.into_iter().zip(answers) {
        if let Ok((200, job)) = answer {
            return Ok(Some((name, job)));
        }
    }
    Ok(None)
}

/// `GET /v1/sources/{name}/backups[?limit=N&before=F]`: a page of committed backups, newest
/// first, read from the source's backup index (`runtime::index`): one call to its object, then
/// [`crate::index::LISTING_PER_BACKUP`] R2 reads per backup shown, the page capped by the step
/// budget (`crate::index::StepBudget::listing_page`). `next` is the `before` of the next page.
async fn list_backups(req: &Request, env: &Env, config: &Config, name: &str) -> worker::Result<Response> {
    let Some(source) = config.source(name) else { return error(404, &format!("no source named {name:?}")) };
    let url = req.url()?;
    let members: Vec<String> = url.query_pairs().filter(|(k, _)| k == "member").map(|(_, v)| v.into_owned()).collect();
    let member = match member_filter(name, account_mode(source), &members) {
        Ok(member) => member,
        Err(refused) => return error(refused.status, &refused.message),
    };
    let mut index = worker::Url::parse("https://source/index").map_err(|e| worker::Error::RustError(e.to_string()))?;
    {
        let mut query = index.query_pairs_mut();
        for (k, v) in url.query_pairs() {
            if matches!(k.as_ref(), "limit" | "before") {
                query.append_pair(&k, &v);
            }
        }
        if let Some(member) = &member {
            query.append_pair("member", member);
        }
    }
    let path = match index.query() {
        Some(q) => format!("/index?{q}"),
        None => "/index".to_string(),
    };
    let (status, value) = call(env, name, Method::Get, &path, None).await?;
    if status != 200 {
        let mut resp = json(status, &value)?;
        if status == 503 {
            resp.headers_mut().set("retry-after", "1")?;
        }
        return Ok(resp);
    }
    let entries: Vec<crate::index::IndexEntry> = serde_json::from_value(value["entries"].clone()).unwrap_or_default();
    let bucket = env.bucket(BUCKET)?;
    // Each backup with its last verification (`null` when it was never verified) and its pin;
    // the index already kept only the member's entries when `?member=` names one.
    let keys: Vec<(String, bool)> = entries.iter().map(|e| (manifest_key(&e.folder), e.pinned)).collect();
    let backups: Vec<Value> =
        join_all(keys.iter().map(|(k, pinned)| backup_with_verification(&bucket, k, *pinned, member.as_deref())))
            .await
            .into_iter()
            .flatten()
            .collect();
    if let (Some(member), true) = (&member, backups.is_empty()) {
        // No backup of it: it must be one of the members the source judges now.
        let known: Vec<String> = match call(env, name, Method::Get, "/status", None).await {
            Ok((200, report)) => report
                .get("members")
                .and_then(Value::as_object)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        if let Some(refused) = unknown_member(name, member, 0, &known) {
            return error(refused.status, &refused.message);
        }
    }
    let mut answer = json!({ "source": name, "backups": backups, "next": value["next"] });
    if let Some(member) = member {
        answer["member"] = Value::String(member);
    }
    json(200, &answer)
}

/// A backup's manifest with its verification, drill and pin; `None` when it cannot be read, or
/// when `only` names a member it does not belong to.
async fn backup_with_verification(
    bucket: &worker::Bucket,
    manifest_key: &str,
    pinned: bool,
    only: Option<&str>,
) -> Option<Value> {
    let manifest: Manifest = store::read_manifest(bucket, manifest_key).await?;
    // In account mode, the member (a Dgraph account's backend) whose series it is.
    let member = crate::retention::member(&manifest);
    if only.is_some_and(|wanted| member.as_deref() != Some(wanted)) {
        return None;
    }
    let verification: Option<Verification> = store::read_json(bucket, &verification_key(manifest_key)).await;
    let mut value = serde_json::to_value(manifest).ok()?;
    value["member"] = serde_json::to_value(member).unwrap_or(Value::Null);
    value["verification"] = serde_json::to_value(verification).unwrap_or(Value::Null);
    // The latest restore drill's outcome (`null` when it was never drilled).
    let drill_key =
        format!("{}{}", crate::manifest::folder_of(manifest_key).unwrap_or_default(), crate::restore::DRILL_NAME);
    value["drill"] = store::read_json::<Value>(bucket, &drill_key).await.unwrap_or(Value::Null);
    value["pinned"] = Value::Bool(pinned);
    Some(value)
}

/// `GET /v1/sources/{name}/retention`: what retention would keep (and why) and delete, now,
/// planned by the source's object from its backup index (no R2 read).
async fn retention_plan(env: &Env, config: &Config, name: &str) -> worker::Result<Response> {
    let Some(source) = config.source(name) else { return error(404, &format!("no source named {name:?}")) };
    let (status, mut value) = call(env, name, Method::Get, "/index/plan", None).await?;
    if status != 200 {
        return json(status, &value);
    }
    value["source"] = json!(name);
    value["policy"] = json!(source.retention);
    value["verifies"] = json!(source.verify_schedule.is_some());
    // Folders without a readable manifest are not in the index, so never planned for deletion.
    value["unreadable"] = json!([]);
    json(200, &value)
}

/// `POST` / `DELETE /v1/backups/{source}/{folder}/pin`.
async fn set_pin(env: &Env, folder: &str, pin: bool) -> worker::Result<Response> {
    let bucket = env.bucket(BUCKET)?;
    match retention::set_pin(&bucket, folder, pin, now()).await {
        Ok(true) => {
            // The marker in R2 is the truth (retention checks it before deleting); the index follows.
            let source = folder.split('/').next().unwrap_or_default();
            let body = json!({ "folder": folder, "pinned": pin });
            match call(env, source, Method::Post, "/index/pin", Some(&body)).await {
                Ok((200, _)) => json(200, &json!({ "backup": folder, "pinned": pin })),
                Ok((status, value)) => {
                    error(500, &format!("the pin is stored, but the backup index answered {status}: {value}"))
                }
                Err(e) => error(500, &format!("the pin is stored, but updating the backup index failed: {e}")),
            }
        }
        Ok(false) => error(404, &format!("no backup {folder}")),
        Err(e) => error(500, &e),
    }
}

async fn artifact(env: &Env, key: &str) -> worker::Result<Response> {
    // Only files of committed backups are served: the folder's manifest must list them.
    let Some(folder) = folder_of(key) else { return error(404, "no such backup file") };
    let bucket = env.bucket(BUCKET)?;
    let manifest_key = manifest_key(folder);
    // The manifest is the record of each file's SHA-256 (a multipart object's metadata is fixed
    // before its hash is known).
    let recorded = if key == manifest_key {
        None
    } else {
        let manifest = store::read_manifest(&bucket, &manifest_key).await;
        match manifest.and_then(|m| m.artifacts.into_iter().find(|a| a.key == key)) {
            Some(a) => Some(a.sha256),
            None => return error(404, "no such backup file"),
        }
    };
    let Some(object) = bucket.get(key.to_string()).execute().await? else {
        return error(404, "no such backup file");
    };
    let headers = worker::Headers::new();
    let content_type = object.http_metadata().content_type.unwrap_or_else(|| "application/octet-stream".into());
    headers.set("content-type", &content_type)?;
    headers.set("content-length", &object.size().to_string())?;
    headers.set("etag", &object.http_etag())?;
    if let Some(sha) = recorded.or_else(|| object.custom_metadata().ok().and_then(|m| m.get("sha256").cloned())) {
        headers.set("x-ferry-sha256", &sha)?;
    }
    let body = match object.body() {
        Some(b) => b.response_body()?,
        None => ResponseBody::Empty,
    };
    Ok(Response::from_body(body)?.with_headers(headers))
}
