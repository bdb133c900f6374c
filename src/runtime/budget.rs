//! The Cloudflare API budget's Durable Object, and the hook every Cloudflare API request of a job
//! passes through (see [`crate::budget`], which decides everything).
//!
//! One object per API token, named `~budget-<hash of the token>` in the `SOURCES` namespace (a
//! source's name never contains `~`), so every source and job using one token shares it; the
//! token itself is never stored. [`send`] asks it before each request (a refusal becomes
//! [`Event::Throttled`]: the job sleeps until then, nothing is sent) and tells it each answer's
//! status and rate-limit headers. If the object cannot be reached the request is sent anyway and
//! the failure logged: the budget protects the token, it must not stop backups on its own.

use serde_json::{json, Value};
use worker::{console_error, Env, Method, Request, Response, Storage};

use super::net;
use super::source_object::call;
use crate::budget::{cloudflare_token, token_id, Budget, BudgetPolicy, BudgetView, Decision, Need, Sizes};
use crate::config::SourceConfig;
use crate::http::HttpRequest;
use crate::job::Event;
use crate::providers::Credentials;

const KEY: &str = "budget";
/// The rate-limit headers handed to the budget (nothing else of an answer is).
const RATE_HEADERS: [&str; 6] =
    ["retry-after", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit", "ratelimit-policy"];

fn object_name(id: &str) -> String {
    format!("~budget-{id}")
}

fn rust_err(e: impl std::fmt::Display) -> worker::Error {
    worker::Error::RustError(e.to_string())
}

async fn load(storage: &Storage) -> worker::Result<Budget> {
    match storage.get::<String>(KEY).await? {
        Some(text) => serde_json::from_str(&text).map_err(|e| rust_err(format!("API budget: {e}"))),
        None => Ok(Budget::default()),
    }
}

/// The budget object's requests (paths under `/budget/`, routed by the source object's `fetch`).
/// The body is read first: between loading the budget and storing it there is no await but
/// storage's, so the object's input gate keeps concurrent requests from reading a stale count.
pub(crate) async fn object_request(storage: &Storage, mut req: Request) -> worker::Result<Response> {
    let path = req.path();
    let method = req.method();
    let body: Value = if method == Method::Post { req.json().await? } else { Value::Null };
    let mut budget = load(storage).await?;
    // The sizes of the source asking (its own config); a view uses the latest ones.
    if let Ok(sizes) = serde_json::from_value::<Sizes>(body["sizes"].clone()) {
        budget.sizes = Some(sizes);
    }
    let policy = BudgetPolicy::with_sizes(budget.sizes.unwrap_or_default());
    let now = super::now();
    let answer = match (method, path.as_str()) {
        (Method::Post, "/budget/acquire") => {
            let need: Need = serde_json::from_value(body["need"].clone()).unwrap_or(Need::Start);
            serde_json::to_value(budget.decide(&policy, need, now)).map_err(rust_err)?
        }
        (Method::Post, "/budget/observe") => {
            let status = body["status"].as_u64().and_then(|s| u16::try_from(s).ok()).unwrap_or(0);
            let headers: Vec<(String, String)> = serde_json::from_value(body["headers"].clone()).unwrap_or_default();
            budget.observe(&policy, status, &headers, now);
            json!({ "observed": true })
        }
        (Method::Get, "/budget/view") => return Response::from_json(&budget.view(&policy, now)),
        _ => return Response::error("not found", 404),
    };
    storage.put(KEY, serde_json::to_string(&budget).map_err(rust_err)?).await?;
    Response::from_json(&answer)
}

/// Sends a job's request; a request to the Cloudflare API first asks its token's budget, and its
/// answer's rate-limit headers are handed back to it.
pub(crate) async fn send(
    env: &Env,
    source: &SourceConfig,
    creds: &Credentials,
    need: Need,
    req: &HttpRequest,
) -> Event {
    let Some(id) = cloudflare_token(&source.provider, req, creds).map(|t| token_id(t.expose())) else {
        return answered(net::exchange(req).await);
    };
    let name = object_name(&id);
    let sizes = Sizes::of(&source.provider);
    match call(env, &name, Method::Post, "/budget/acquire", Some(&json!({ "need": need, "sizes": sizes }))).await {
        Ok((200, value)) => {
            if let Ok(Decision::Wait { until }) = serde_json::from_value::<Decision>(value) {
                return Event::Throttled(until);
            }
        }
        Ok((status, _)) => console_error!("the API budget answered HTTP {status}; sending anyway"),
        Err(e) => console_error!("the API budget could not be asked ({e}); sending anyway"),
    }
    let result = net::exchange(req).await;
    if let Ok(resp) = &result {
        let headers: Vec<(String, String)> =
            resp.headers.iter().filter(|(k, _)| RATE_HEADERS.contains(&k.as_str())).cloned().collect();
        let body = json!({ "status": resp.status, "headers": headers, "sizes": sizes });
        if let Err(e) = call(env, &name, Method::Post, "/budget/observe", Some(&body)).await {
            console_error!("the API budget could not be told an answer: {e}");
        }
    }
    answered(result)
}

fn answered(result: Result<crate::http::HttpResponse, String>) -> Event {
    match result {
        Ok(resp) => Event::Response(resp),
        Err(e) => Event::Unreachable(e),
    }
}

/// Each token's budget, by its id, for `/metrics` (a budget that cannot be read is left out).
pub(crate) async fn views(env: &Env, ids: &[String]) -> Vec<(String, BudgetView)> {
    let mut out = Vec::new();
    for id in ids {
        match call(env, &object_name(id), Method::Get, "/budget/view", None).await {
            Ok((200, value)) => match serde_json::from_value::<BudgetView>(value) {
                Ok(view) => out.push((id.clone(), view)),
                Err(e) => console_error!("metrics: API budget {}: {e}", crate::budget::short_id(id)),
            },
            Ok((status, _)) => console_error!("metrics: API budget answered HTTP {status}"),
            Err(e) => console_error!("metrics: API budget: {e}"),
        }
    }
    out
}
