//! R2 and Durable Object storage beyond the copy itself: manifests (the commit marker), listing,
//! and discarding what a failed job left. The copy is `runtime::transfer`.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use worker::{console_error, Bucket, Object, Storage};

use super::objects::Objects;

use crate::identity::JobId;
use crate::manifest::Manifest;
use crate::sweep::{upload_storage_key, Leftover, OpenUpload};

/// Durable Object storage key of a job's record.
pub(crate) fn job_key(id: &JobId) -> String {
    format!("job:{id}")
}

/// Writes a manifest, the commit marker, after every artifact is stored.
pub(crate) async fn write_manifest(bucket: impl Into<Objects>, key: &str, manifest: &Manifest) -> Result<(), String> {
    put_json(bucket, key, manifest).await.map_err(|e| format!("{e} (manifest)"))
}

/// Stores a small JSON document with the store's SHA-256 check and the hash in its metadata.
pub(crate) async fn put_json(
    objects: impl Into<Objects>,
    key: &str,
    value: &impl serde::Serialize,
) -> Result<(), String> {
    let body = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    let digest: [u8; 32] = Sha256::digest(&body).into();
    let metadata = HashMap::from([("sha256".to_string(), hex::encode(digest))]);
    objects.into().put(key, body, "application/json", &metadata, digest).await.map_err(|e| e.message().to_string())?;
    Ok(())
}

/// Reads and parses a small JSON document; `None` when it is missing or unreadable.
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(objects: impl Into<Objects>, key: &str) -> Option<T> {
    let bytes = objects.into().get(key).await.ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// Every key under `prefix`, following R2's cursor.
pub(crate) async fn list_keys(objects: impl Into<Objects>, prefix: &str) -> Result<Vec<String>, String> {
    objects.into().list(prefix).await.map_err(|e| e.message().to_string())
}

/// Every object under `prefix` (key, size, upload time), following R2's cursor.
pub(crate) async fn list_objects(bucket: &Bucket, prefix: &str) -> worker::Result<Vec<Object>> {
    let mut objects = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut list = bucket.list().prefix(prefix.to_string()).limit(1000);
        if let Some(c) = cursor.take() {
            list = list.cursor(c);
        }
        let page = list.execute().await?;
        objects.extend(page.objects());
        match (page.truncated(), page.cursor()) {
            (true, Some(c)) => cursor = Some(c),
            _ => break,
        }
    }
    Ok(objects)
}

/// Deletes everything under a failed job's folder and aborts its open multipart upload.
///
/// Nothing that fails here is only logged: the folder is recorded as a leftover before the
/// clean-up starts and forgotten only once it succeeded, and the upload's record goes only once
/// R2 confirmed the abort, so whatever remains is the daily sweep's (`crate::sweep`).
pub(crate) async fn discard(
    bucket: &Objects,
    storage: &Storage,
    job_id: &JobId,
    folder: &str,
    upload: Option<(String, String)>,
) -> Result<usize, String> {
    let leftover = Leftover {
        key: folder.to_string(),
        job_id: job_id.to_string(),
        reason: "the failed job's clean-up did not finish".into(),
        at: super::now(),
    };
    record_leftover(storage, &leftover).await;
    let mut problems = Vec::new();
    if let Some((key, id)) = upload {
        if let Err(e) = abort_upload(bucket, storage, job_id.as_str(), &key, &id).await {
            problems.push(e);
        }
    }
    let removed = match delete_all(bucket, folder).await {
        Ok(n) => n,
        Err(e) => {
            problems.push(e);
            0
        }
    };
    if !problems.is_empty() {
        return Err(format!("{}; left for the daily sweep", problems.join("; ")));
    }
    if let Err(e) = storage.delete(&leftover.storage_key()).await {
        console_error!("forgetting the leftover record of {folder} failed: {e}");
    }
    Ok(removed)
}

/// Deletes every object under `prefix`; returns how many.
pub(crate) async fn delete_all(objects: impl Into<Objects>, prefix: &str) -> Result<usize, String> {
    let objects = objects.into();
    let keys = objects.list(prefix).await.map_err(|e| e.message().to_string())?;
    objects.delete_keys(&keys).await.map_err(|e| e.message().to_string())?;
    Ok(keys.len())
}

/// True for R2's answer to aborting an upload that no longer exists (completed or aborted).
pub(crate) fn upload_gone(message: &str) -> bool {
    ["NoSuchUpload", "10024", "does not exist"].iter().any(|m| message.contains(m))
}

/// Aborts a recorded multipart upload, then forgets its record. An upload already gone counts as
/// aborted; any other error keeps the record (for the sweep) and is returned.
pub(crate) async fn abort_upload(
    objects: &Objects,
    storage: &Storage,
    job_id: &str,
    key: &str,
    upload_id: &str,
) -> Result<(), String> {
    objects.abort(key, upload_id).await?;
    forget_upload(storage, job_id, upload_id).await;
    Ok(())
}

/// Records a multipart upload as open (in its own storage entry), before any part is sent.
pub(crate) fn upload_entry(upload: &OpenUpload) -> Result<(String, String), String> {
    serde_json::to_string(upload).map(|text| (upload.storage_key(), text)).map_err(|e| e.to_string())
}

/// Forgets an upload once it is completed or aborted (best effort: a stale record only makes the
/// sweep abort an upload that is already gone, which R2 refuses harmlessly).
pub(crate) async fn forget_upload(storage: &Storage, job_id: &str, upload_id: &str) {
    if let Err(e) = storage.delete(&upload_storage_key(job_id, upload_id)).await {
        console_error!("forgetting the record of upload {upload_id} failed: {e}");
    }
}

/// Records something a clean-up could not remove, for the daily sweep.
pub(crate) async fn record_leftover(storage: &Storage, leftover: &Leftover) {
    let written = match serde_json::to_string(leftover) {
        Ok(text) => storage.put(&leftover.storage_key(), text).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = written {
        console_error!("recording the leftover {} failed: {e}; the sweep finds it by age", leftover.key);
    }
}

/// Reads and parses one manifest.
pub(crate) async fn read_manifest(bucket: impl Into<Objects>, key: &str) -> Option<Manifest> {
    read_json(bucket, key).await
}

/// Every `(key, text)` entry of Durable Object storage under `prefix`, in key order.
pub(crate) async fn list_texts(storage: &worker::Storage, prefix: &str) -> worker::Result<Vec<(String, String)>> {
    let map = storage.list_with_options(worker::ListOptions::new().prefix(prefix)).await?;
    let mut entries = Vec::new();
    map.for_each(&mut |value, key| {
        if let (Some(k), Some(v)) = (key.as_string(), value.as_string()) {
            entries.push((k, v));
        }
    });
    entries.sort();
    Ok(entries)
}

/// Deletes every Durable Object storage entry under `prefix`.
pub(crate) async fn delete_prefix(storage: &worker::Storage, prefix: &str) -> worker::Result<usize> {
    let keys: Vec<String> = list_texts(storage, prefix).await?.into_iter().map(|(k, _)| k).collect();
    let n = keys.len();
    delete_keys(storage, keys).await?;
    Ok(n)
}

/// Deletes Durable Object storage keys, in calls within the platform's keys-per-call limit
/// (`crate::transfer::storage_batches`).
pub(crate) async fn delete_keys(storage: &worker::Storage, keys: Vec<String>) -> worker::Result<()> {
    for batch in crate::transfer::storage_batches(keys) {
        within_key_limit(batch.len())?;
        storage.delete_multiple(batch).await?;
    }
    Ok(())
}

/// Writes Durable Object storage entries (JSON texts), in order, in calls within the
/// platform's keys-per-call limit: `batches` comes from `crate::transfer::progress_batches` or
/// `storage_batches`.
pub(crate) async fn put_batches(storage: &worker::Storage, batches: Vec<Vec<(String, String)>>) -> worker::Result<()> {
    for batch in batches {
        within_key_limit(batch.len())?;
        let entries = js_sys::Object::new();
        for (key, text) in &batch {
            js_sys::Reflect::set(
                &entries,
                &wasm_bindgen::JsValue::from_str(key),
                &wasm_bindgen::JsValue::from_str(text),
            )
            .map_err(|_| worker::Error::RustError(format!("cannot stage {key}")))?;
        }
        storage.put_multiple_raw(entries).await?;
    }
    Ok(())
}

/// The runtime's own check that a multi-key storage call stays within the platform's limit.
fn within_key_limit(keys: usize) -> worker::Result<()> {
    if keys > crate::transfer::STORAGE_KEYS_PER_CALL {
        return Err(worker::Error::RustError(format!(
            "a storage call of {keys} keys passes the limit of {} per call",
            crate::transfer::STORAGE_KEYS_PER_CALL
        )));
    }
    Ok(())
}

/// Fills the part hashes of a job's finished files into its manifest, from the copies' part
/// records (file `i` of the manifest is file `i` of the job; a single put has no records).
pub(crate) async fn fill_part_hashes(
    storage: &worker::Storage,
    job_id: &str,
    manifest: &mut Manifest,
) -> Result<(), String> {
    for (i, artifact) in manifest.artifacts.iter_mut().enumerate() {
        let prefix = format!("{}{i}:", crate::transfer::job_parts_prefix(job_id));
        let entries = list_texts(storage, &prefix).await.map_err(|e| format!("reading the part records: {e}"))?;
        if entries.is_empty() {
            continue;
        }
        artifact.part_sha256 = crate::transfer::final_part_hashes(&entries, artifact.parts)
            .map_err(|e| format!("{}: {e}", artifact.key))?;
    }
    Ok(())
}
