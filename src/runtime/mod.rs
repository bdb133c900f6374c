//! The thin shell over the Workers runtime (wasm32 only).
//!
//! Entry points live here; the work is in `api` (the Worker's HTTP API), `budget` (the Cloudflare
//! API's request budget per token, and the hook its requests pass through), `source_object` (one
//! Durable Object per source, running jobs from its alarm), `alerts` (the alert queue's producer
//! and consumer, and the attempt record), `net` (outgoing fetch with timeouts), `transfer` (one
//! slice of a copy into R2 or an S3-compatible bucket), `objects` (the calls both kinds of bucket
//! offer), `retention` (applying a retention plan, pins), `index` (each
//! source's backup index), `store` (manifests, listing, clean-up), `replica` (the replica
//! bucket's identity probe), `sweeper` (the daily orphan sweep), `restore` (a restore's R2 work and
//! streamed uploads) and `graph_load` (a step of loading an Aura graph export). None of them
//! decide anything the
//! core can decide: they read
//! the clock, call `Job::handle`, and perform the action it returns.

mod alerts;
mod api;
mod budget;
mod graph_load;
mod index;
mod net;
mod objects;
mod replica;
mod restore;
mod retention;
mod source_object;
mod store;
mod sweeper;
mod transfer;
mod verify;

use wasm_bindgen::JsValue;
use worker::{
    console_error, console_log, event, Context, Env, MessageBatch, Request, Response, ScheduleContext, ScheduledEvent,
};

use crate::config::{Config, ConfigError};
use crate::providers::Credentials;
use crate::schedule::Window;
use crate::secret::Secret;
use crate::time::Timestamp;

/// The R2 bucket binding.
pub(crate) const BUCKET: &str = "BACKUPS";
/// The Durable Object namespace binding.
pub(crate) const SOURCES: &str = "SOURCES";

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
    api::handle(req, &env).await
}

#[event(scheduled)]
async fn scheduled(event: ScheduledEvent, env: Env, _ctx: ScheduleContext) {
    // The glue discards this handler's result, so every error is logged here.
    let config = match load_config(&env) {
        Ok(c) => c,
        Err(e) => {
            console_error!("cron {}: not running anything: {e}", event.cron());
            return;
        }
    };
    let scheduled = Timestamp::from_millis(event.schedule() as i64);
    let window = Window::for_trigger(&event.cron(), scheduled);
    // Each source decides what is due since the last tick it processed (the trigger's window is
    // only the first one's), so late or skipped ticks and busy periods lose no fire time.
    for source in &config.sources {
        let outcome = source_object::tick(&env, &source.name, scheduled, window.start).await;
        match outcome {
            Ok(line) => console_log!("cron {}: {}: {line}", event.cron(), source.name),
            Err(e) => console_error!("cron {}: {}: {e}", event.cron(), source.name),
        }
    }
    // After the sources were served: the daily sweep (at most once per UTC day, "now" being this
    // tick's scheduled time). Its failures are in its report and never reach the backups.
    let names: Vec<String> = config.sources.iter().map(|s| s.name.clone()).collect();
    match source_object::sweep(&env, scheduled, &names).await {
        Ok(line) => console_log!("cron {}: {line}", event.cron()),
        Err(e) => console_error!("cron {}: sweep: {e}", event.cron()),
    }
}

/// The `ALERTS` queue's consumer: delivers alerts. Every message is acknowledged or retried
/// inside; the handler never returns an error (the glue would turn it into a panic).
#[event(queue)]
async fn deliver_alerts(batch: MessageBatch<String>, env: Env, _ctx: Context) -> worker::Result<()> {
    alerts::consume(batch, &env).await;
    Ok(())
}

/// Parses `FERRY_SOURCES` (with `FERRY_DEFAULTS`, the fields every source takes unless it sets
/// them) from the environment.
pub(crate) fn load_config(env: &Env) -> Result<Config, ConfigError> {
    let sources = var_value(env, "FERRY_SOURCES")?.unwrap_or_else(|| serde_json::Value::Array(Vec::new()));
    let defaults = var_value(env, "FERRY_DEFAULTS")?;
    Config::with_defaults(&sources, defaults.as_ref())
}

/// A `[vars]` entry as JSON (a TOML table, or its JSON text as a string); `None` when unset.
fn var_value(env: &Env, name: &str) -> Result<Option<serde_json::Value>, ConfigError> {
    let raw = js_sys::Reflect::get(env.as_ref(), &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED);
    if raw.is_undefined() || raw.is_null() {
        return Ok(None);
    }
    match raw.as_string() {
        Some(s) => Ok(Some(serde_json::Value::String(s))),
        None => serde_wasm_bindgen::from_value(raw).map(Some).map_err(|e| ConfigError {
            source_name: None,
            field: None,
            problem: format!("{name} could not be read: {e}"),
        }),
    }
}

/// A Worker secret, or `None` when it is not set.
pub(crate) fn secret(env: &Env, name: &str) -> Option<Secret> {
    env.secret(name).ok().map(|s| Secret::new(s.to_string())).filter(|s| !s.is_empty())
}

/// The secrets a source names (missing ones are left out; the job reports them).
pub(crate) fn credentials(env: &Env, names: &[&str]) -> Credentials {
    let mut creds = Credentials::new();
    for name in names {
        if let Some(value) = secret(env, name) {
            creds.insert(*name, value);
        }
    }
    creds
}

/// Now, from `Date.now()` (`std::time` panics on wasm32).
pub(crate) fn now() -> Timestamp {
    Timestamp::from_millis(js_sys::Date::now() as i64)
}

/// A number in `[0, 1)` for backoff jitter.
pub(crate) fn jitter() -> f64 {
    js_sys::Math::random()
}

/// Eight random bytes for a job id.
pub(crate) fn random_bytes() -> [u8; 8] {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // Fall back to Math.random: ids need uniqueness, not secrecy.
        for b in &mut bytes {
            *b = (js_sys::Math::random() * 256.0) as u8;
        }
    }
    bytes
}
