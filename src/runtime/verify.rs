//! Performs one slice of a verify job (the bookkeeping is in `crate::verify`): find the backup,
//! then read its files back from R2 by ranges and hash them, within the slice's budget.

use std::time::Duration;

use futures_util::StreamExt;
use sha2::Digest;
use worker::{Bucket, Range};

use super::store;
use super::transfer::{r2_err, yield_now_and_then};
use crate::error::StepError;
use crate::job::Event;
use crate::manifest::is_manifest_key;
use crate::transfer::TransferSettings;
use crate::verify::VerifyState;

/// Runs one slice and reports it.
pub(crate) async fn run_slice(
    bucket: &Bucket,
    source: &str,
    mut state: VerifyState,
    settings: TransferSettings,
) -> Event {
    let outcome = slice(bucket, source, &mut state, settings).await;
    Event::VerifySliced { state, outcome }
}

/// The newest committed backup of `source`, by its manifest key (folders sort by start time).
pub(super) async fn newest_manifest(bucket: &Bucket, source: &str) -> Result<String, StepError> {
    let keys = store::list_keys(bucket, &format!("{source}/")).await.map_err(|e| r2_err("list", e))?;
    keys.into_iter()
        .filter(|k| is_manifest_key(k))
        .max()
        .ok_or_else(|| StepError::permanent(format!("source {source:?} has no committed backup")))
}

async fn slice(
    bucket: &Bucket,
    source: &str,
    state: &mut VerifyState,
    settings: TransferSettings,
) -> Result<bool, StepError> {
    if !state.resolved {
        let key = match state.manifest_key.clone() {
            Some(k) => k,
            None => newest_manifest(bucket, source).await?,
        };
        let manifest = store::read_manifest(bucket, &key)
            .await
            .ok_or_else(|| StepError::permanent(format!("no committed backup at {key}")))?;
        state.resolve(key, &manifest);
    }
    let started = js_sys::Date::now();
    let mut read = 0u64;
    while let Some(file) = state.current().cloned() {
        let elapsed = Duration::from_millis((js_sys::Date::now() - started).max(0.0) as u64);
        if read > 0 && (settings.slice_done(read, elapsed) || worker::signal::is_near_cpu_limit()) {
            return Ok(false);
        }
        let stored = bucket.head(file.key.clone()).await.map_err(|e| r2_err("head", e))?.map(|o| o.size());
        let Some(size) = stored.filter(|s| *s == file.size && state.offset < *s) else {
            let hasher = state.hasher()?;
            state.finish_file(stored, hasher);
            continue;
        };
        let length = (size - state.offset).min(settings.slice_bytes.saturating_sub(read).max(1));
        let object = bucket
            .get(file.key.clone())
            .range(Range::OffsetWithLength { offset: state.offset, length })
            .execute()
            .await
            .map_err(|e| r2_err("get", e))?;
        let Some(object) = object else {
            let hasher = state.hasher()?;
            state.finish_file(None, hasher);
            continue;
        };
        let body =
            object.body().ok_or_else(|| StepError::transient(format!("R2 returned no body for {}", file.key)))?;
        let mut stream = body.stream().map_err(|e| r2_err("read", e))?;
        let mut hasher = state.hasher()?;
        let mut got = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| r2_err("read", e))?;
            let before = got;
            got += chunk.len() as u64;
            hasher.update(&chunk);
            yield_now_and_then(before, got).await;
        }
        if got != length {
            return Err(StepError::transient(format!("R2 returned {got} of {length} bytes of {}", file.key)));
        }
        state.advance(&hasher, got);
        read += got;
        if state.offset == size {
            state.finish_file(Some(size), hasher);
        }
    }
    Ok(true)
}
