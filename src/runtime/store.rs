//! R2 and Durable Object storage beyond the copy itself: manifests (the commit marker), listing,
//! and discarding what a failed job left. The copy is `runtime::transfer`.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use worker::{Bucket, Data, HttpMetadata, Object};

use crate::job::JobId;
use crate::manifest::Manifest;

/// Durable Object storage key of a job's record.
pub(crate) fn job_key(id: &JobId) -> String {
    format!("job:{id}")
}

/// Writes a manifest, the commit marker, after every artifact is stored.
pub(crate) async fn write_manifest(bucket: &Bucket, key: &str, manifest: &Manifest) -> Result<(), String> {
    put_json(bucket, key, manifest).await.map_err(|e| format!("{e} (manifest)"))
}

/// Stores a small JSON document with R2's SHA-256 check and the hash in its metadata.
pub(crate) async fn put_json(bucket: &Bucket, key: &str, value: &impl serde::Serialize) -> Result<(), String> {
    let body = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    let digest = Sha256::digest(&body).to_vec();
    let metadata = HashMap::from([("sha256".to_string(), hex::encode(&digest))]);
    bucket
        .put(key.to_string(), Data::Bytes(body))
        .http_metadata(HttpMetadata { content_type: Some("application/json".into()), ..HttpMetadata::default() })
        .custom_metadata(metadata)
        .sha256(digest)
        .execute()
        .await
        .map_err(|e| format!("R2 put of {key} failed: {e}"))?
        .ok_or_else(|| format!("R2 refused the put of {key}"))?;
    Ok(())
}

/// Reads and parses a small JSON document; `None` when it is missing or unreadable.
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(bucket: &Bucket, key: &str) -> Option<T> {
    let object = bucket.get(key.to_string()).execute().await.ok()??;
    let bytes = object.body()?.bytes().await.ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Every key under `prefix`, following R2's cursor.
pub(crate) async fn list_keys(bucket: &Bucket, prefix: &str) -> worker::Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut list = bucket.list().prefix(prefix.to_string()).limit(1000);
        if let Some(c) = cursor.take() {
            list = list.cursor(c);
        }
        let page = list.execute().await?;
        keys.extend(page.objects().iter().map(Object::key));
        match (page.truncated(), page.cursor()) {
            (true, Some(c)) => cursor = Some(c),
            _ => break,
        }
    }
    Ok(keys)
}

/// Deletes everything under a failed job's folder and aborts its open multipart upload.
pub(crate) async fn discard(bucket: &Bucket, folder: &str, upload: Option<(String, String)>) -> Result<usize, String> {
    if let Some((key, id)) = upload {
        if let Ok(open) = bucket.resume_multipart_upload(key, id) {
            // An upload that is already gone (completed or aborted) is fine.
            let _ = open.abort().await;
        }
    }
    let keys = list_keys(bucket, folder).await.map_err(|e| e.to_string())?;
    for batch in keys.chunks(1000) {
        bucket.delete_multiple(batch.to_vec()).await.map_err(|e| e.to_string())?;
    }
    Ok(keys.len())
}

/// Reads and parses one manifest.
pub(crate) async fn read_manifest(bucket: &Bucket, key: &str) -> Option<Manifest> {
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

/// Deletes every Durable Object storage entry under `prefix` (in batches of 128 keys).
pub(crate) async fn delete_prefix(storage: &worker::Storage, prefix: &str) -> worker::Result<usize> {
    let keys: Vec<String> = list_texts(storage, prefix).await?.into_iter().map(|(k, _)| k).collect();
    for batch in keys.chunks(128) {
        storage.delete_multiple(batch.to_vec()).await?;
    }
    Ok(keys.len())
}
